"""Load a causal LM for training or inference from a folder, a cached name or `default`."""

from __future__ import annotations

from typing import Any

from lmflow_ray.config import ModelSection
from lmflow_ray.embedded import resolve_model_path
from lmflow_ray.errors import UserError

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


def load_model(section: ModelSection, dtype: str = "float32", device: Any = None) -> Any:
    """AutoModelForCausalLM in ``dtype`` (training keeps float32 master weights; mixed precision
    is the strategy's job), with the recipe's RoPE scaling; for QLoRA quantized by bitsandbytes
    and placed on ``device`` as it loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(section.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=section.trust_remote_code)
        scale_rope(config, section)
        extra: dict[str, Any] = {}
        if section.use_qlora:
            extra = {"quantization_config": quantization_config(section, device), "device_map": {"": device or "cpu"}}
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=getattr(torch, dtype), trust_remote_code=section.trust_remote_code,
            attn_implementation=attention_implementation(section), **extra,
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.model_name_or_path: cannot load a model from {section.model_name_or_path!r} ({first})") from None
    if section.use_qlora:
        _own_memory(model)
    return model


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
