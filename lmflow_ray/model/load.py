"""The one loader: a causal LM for training (``load_model``) or for inference with its LoRA
adapters (``load_for_inference``: eval, serve and merge), from a folder that ``model.locate``
found, with the RoPE scaling the model was trained with."""

from __future__ import annotations

import json
import os
from typing import Any

from lmflow_ray.config import ModelSection
from lmflow_ray.errors import UserError
from lmflow_ray.model.locate import model_folder

def attention_implementation(section: ModelSection, say=None) -> str:
    """flash_attention_2 when asked for and installed on a GPU; sdpa otherwise, saying why when
    flash attention was asked for (the same recipe runs on a laptop and on a GPU node)."""
    if not section.use_flash_attention:
        return "sdpa"
    import importlib.util
    import logging

    import torch

    missing = ("flash-attn is not installed" if importlib.util.find_spec("flash_attn") is None
               else "no CUDA GPU is present" if not torch.cuda.is_available() else None)
    if missing is None:
        return "flash_attention_2"
    (say or logging.getLogger("lmflow_ray").warning)(
        f"model.use_flash_attention: {missing}, so attention runs on sdpa (install the `gpu` extra on a GPU node "
        "for flash_attention_2)")
    return "sdpa"


ROPE_MARK = "lmflow_rope_scaling"  # config key recording the scaling this project applied


def scale_rope(config: Any, section: ModelSection) -> bool:
    """Position interpolation on a loaded config, in place: ``rope_pi_ratio`` stretches positions
    (transformers' "linear" RoPE, which servers read from the config), ``rope_ntk_ratio`` raises
    the RoPE base the NTK-aware way, theta * ratio ** (d / (d - 2)) with d the rotary dimension,
    and raises ``max_position_embeddings`` by the same ratio. Both may be combined. A config that
    already carries the same scaling (an exported run) is left alone. Returns whether it scaled."""
    pi, ntk = section.rope_pi_ratio, section.rope_ntk_ratio
    asked = {"rope_pi_ratio": pi, "rope_ntk_ratio": ntk}
    done = getattr(config, ROPE_MARK, None)
    if done is not None:
        if done == asked:
            return False
        raise UserError(f"model.rope_pi_ratio / rope_ntk_ratio: the model is already scaled by {done}; load the "
                        "unscaled base to change the scaling")
    if pi == 1.0 and ntk == 1.0:
        return False
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise UserError(f"model.rope_pi_ratio / rope_ntk_ratio: {getattr(config, 'model_type', 'this model')} has no "
                        "rotary position embeddings to scale")
    if params.get("rope_type", "default") != "default":
        raise UserError(f"model.rope_pi_ratio / rope_ntk_ratio: the model already uses {params['rope_type']!r} RoPE "
                        "scaling; leave both ratios at 1")
    scaled = dict(params)
    if ntk > 1.0:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        scaled["rope_theta"] = float(params["rope_theta"]) * ntk ** (dim / (dim - 2))
        config.max_position_embeddings = int(config.max_position_embeddings * ntk)
    if pi > 1.0:
        scaled.update(rope_type="linear", factor=float(pi))
    config.rope_parameters = scaled
    setattr(config, ROPE_MARK, asked)
    return True


def context_length(config: Any, fallback: int) -> int:
    """Tokens a model can attend over: its positions, times a linear RoPE factor."""
    native = getattr(config, "max_position_embeddings", None)
    if not native:
        return fallback
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("factor", 1.0) if params.get("rope_type") == "linear" else 1.0
    return int(native * factor)


def quantization_config(section: ModelSection, device: Any) -> Any:
    """QLoRA's base: 4-bit nf4 with double quantization (or 8-bit), computing in bf16 on a GPU and
    fp32 on CPU (bitsandbytes' bf16 CPU kernels are about 10x slower)."""
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.use_qlora: needs bitsandbytes (pip install bitsandbytes)")
    if section.quant_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if getattr(device, "type", "cpu") == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)


def inference_dtype(torch_dtype: str) -> Any:
    """The `dtype` for from_pretrained when serving or evaluating: `auto` means the checkpoint's own
    dtype on a GPU and float32 on CPU (half precision is slow there)."""
    import torch

    if torch_dtype == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return getattr(torch, torch_dtype)


HEADS = ("causal_lm", "score")


def load_model(section: ModelSection, dtype: str = "float32", device: Any = None, s3: dict | None = None,
               folder: str | None = None, head: str = "causal_lm", pad_token_id: int | None = None) -> Any:
    """AutoModelForCausalLM in ``dtype`` (training keeps float32 master weights; mixed precision
    is the strategy's job), with the recipe's RoPE scaling; for QLoRA quantized by bitsandbytes
    and placed on ``device`` as it loads. The model may be anything ``model_folder`` finds: a
    folder, `default`, a run or checkpoint, local or in object storage (fetched once per node);
    ``folder`` is where ``model_folder`` already found it (not looked up again).

    ``head="score"``: AutoModelForSequenceClassification with one output (a reward model, as
    LMFlow and TRL save it: the causal LM's body, a new ``score`` layer; an exported reward model
    loads with its trained head), with ``pad_token_id`` set so the standard export scores batches."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = folder or model_folder(section.model_name_or_path, s3)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=section.trust_remote_code)
        scale_rope(config, section)
        extra: dict[str, Any] = {}
        if section.use_qlora:
            extra = {"quantization_config": quantization_config(section, device), "device_map": {"": device or "cpu"}}
        loader = AutoModelForCausalLM
        if head == "score":
            loader = AutoModelForSequenceClassification
            config.num_labels = 1
            if config.pad_token_id is None and pad_token_id is not None:
                config.pad_token_id = pad_token_id
        model = loader.from_pretrained(
            path, config=config, dtype=getattr(torch, dtype), trust_remote_code=section.trust_remote_code,
            attn_implementation=attention_implementation(section), **extra,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"model.model_name_or_path: cannot load a model from {section.model_name_or_path!r} "
                        f"({_first_line(err)})") from None
    if section.use_qlora:
        _own_memory(model)
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def trained_rope(adapter: str | os.PathLike, s3: dict | None = None) -> dict:
    """The RoPE scaling a LoRA run trained with (its scaled base config is written next to the
    adapter, local or in object storage), as recipe keys; {} when it trained at the base's own
    positions."""
    from lmflow_ray import storage

    raw = storage.read_bytes(storage.join(os.fspath(adapter), "config.json"), s3)
    return (json.loads(raw).get(ROPE_MARK) or {}) if raw else {}


def adapters_rope(adapters: dict[str, str]) -> dict:
    """The one RoPE scaling a set of adapters needs on their shared base; adapters trained with
    different scalings cannot share one base model (positions would turn differently)."""
    found = {name: trained_rope(folder) for name, folder in adapters.items()}
    kinds = {json.dumps(rope, sort_keys=True) for rope in found.values()}
    if len(kinds) > 1:
        listed = ", ".join(f"{name} ({rope or 'none'})" for name, rope in found.items())
        raise UserError(f"LoRA adapters trained with different RoPE scaling cannot share one base: {listed}; serve "
                        "them in separate deployments, or merge each (`lmflow-ray merge`)")
    return next(iter(found.values()), {})


SERVE_QUANTIZATION = ("int8", "bnb-4bit", "bnb-8bit")


def _bnb_for_inference(how: str) -> Any:
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"serve.quantization {how}: needs bitsandbytes (pip install bitsandbytes)")
    if how == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def quantize_int8(model: Any) -> Any:
    """int8 weights for the Linear layers (the head too), activations quantized on the fly: torch's
    dynamic quantization, a CPU path. LoRA's own small matrices stay in full precision."""
    import warnings

    import torch

    if torch.cuda.is_available():
        raise UserError("serve.quantization int8 is the CPU path (torch's dynamic int8); on a GPU use bnb-8bit or bnb-4bit")
    names = {name for name, m in model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in name}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {name: default_dynamic_qconfig for name in names}, dtype=torch.qint8)


def load_for_inference(base_folder: str, adapters: dict[str, str] | None = None, *, dtype: str = "auto",
                       trust_remote_code: bool = False, merge: bool = False, quantization: str | None = None) -> Any:
    """The base model from a local folder with LoRA adapters (name -> local folder) on top, in eval
    mode: a PeftModel whose adapters are switched by name, or with ``merge`` one plain model with
    its single adapter merged in. The base gets the RoPE scaling the adapters trained with, so an
    adapter trained past the native context is scored and served with the positions it learnt."""
    from transformers import AutoConfig, AutoModelForCausalLM

    adapters = adapters or {}
    if merge and len(adapters) > 1:
        raise ValueError("merge takes one adapter")
    rope = adapters_rope(adapters)
    try:
        config = AutoConfig.from_pretrained(base_folder, trust_remote_code=trust_remote_code)
        scale_rope(config, ModelSection(model_name_or_path=base_folder, **rope))
        extra: dict[str, Any] = {}
        if quantization in ("bnb-4bit", "bnb-8bit"):
            import torch

            extra["quantization_config"] = _bnb_for_inference(quantization)
            if torch.cuda.is_available():
                extra["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(base_folder, config=config, dtype=inference_dtype(dtype),
                                                     trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as err:
        raise UserError(f"{base_folder}: cannot load a model ({_first_line(err)})") from None
    if adapters:
        from peft import PeftModel

        (first, folder), *rest = adapters.items()
        model = PeftModel.from_pretrained(model, folder, adapter_name=first)
        for name, folder in rest:
            model.load_adapter(folder, adapter_name=name)
        if merge:
            model = model.merge_and_unload()
    if quantization == "int8":
        model = quantize_int8(model)
    return model.eval()


def tokenizer_folder(base_folder: str, adapter_folder: str | None = None) -> str:
    """Where the tokenizer comes from: an adapter's own (saved with its run) beats its base's."""
    if adapter_folder and os.path.isfile(os.path.join(adapter_folder, "tokenizer_config.json")):
        return adapter_folder
    return base_folder


def _own_memory(model: Any) -> None:
    """Copies a quantized model's remaining full-precision CPU tensors (embeddings, norms) out of
    the checkpoint file's memory map: while any of them views it, the whole fp32 file stays
    mapped, and resident once quantization has read it."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.dtype.is_floating_point:
                tensor.data = tensor.data.clone()


def parameter_counts(model: Any) -> tuple[int, int]:
    """(all parameters, trainable parameters); ZeRO-3 partitioned tensors report their full size."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def matmul_parameters(model: Any) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding, unless the
    embedding is tied to the LM head (then it is the head's matmul)."""
    total, _ = parameter_counts(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    return total if tied else total - getattr(embed.weight, "ds_numel", embed.weight.numel())
