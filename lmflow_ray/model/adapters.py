"""LoRA / DoRA adapters (peft) on a loaded model, and merging an adapter into its base."""

from __future__ import annotations

import os
from typing import Any

from lmflow_ray.config import ModelSection
from lmflow_ray.errors import UserError


def apply_lora(model: Any, section: ModelSection, gradient_checkpointing: bool = False, head: str = "causal_lm") -> Any:
    """Wrap ``model`` in a PeftModel with the recipe's r / alpha / dropout / targets / DoRA flag;
    a quantized (QLoRA) base is first readied for k-bit training (norms in fp32, input grads on).
    A score head (``head="score"``, a reward model) is trained in full next to the adapters and
    saved with them (peft's sequence-classification task)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if section.use_qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})

    config = LoraConfig(
        r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
        target_modules=section.lora_target_modules, use_dora=section.use_dora,
        task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"model.lora_target_modules: {err}") from None
    peft_model.peft_config["default"].base_model_name_or_path = section.model_name_or_path
    return peft_model


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, "adapter_config.json"))


def adapter_base(folder: str | os.PathLike) -> str | None:
    import json

    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f).get("base_model_name_or_path")


def vllm_max_lora_rank(adapter_uris: list[str], s3: dict | None = None) -> int:
    """vLLM's ``max_lora_rank`` for these adapters: the smallest rank this vLLM accepts (its
    MaxLoRARanks) that holds the largest adapter's ``r``."""
    import json
    import typing

    from lmflow_ray import storage

    ranks = []
    for uri in adapter_uris:
        raw = storage.read_bytes(storage.join(uri, "adapter_config.json"), s3)
        ranks.append(int(json.loads(raw).get("r", 16)) if raw else 16)
    need = max(ranks, default=16)
    try:
        from vllm.config.lora import MaxLoRARanks
    except ImportError:  # a vLLM without the list takes any rank
        return need
    allowed = sorted(typing.get_args(MaxLoRARanks))
    fits = [r for r in allowed if r >= need]
    if not fits:
        raise UserError(f"vLLM serves LoRA ranks up to {allowed[-1]}; the adapter has r={need}: merge it first "
                        "(lmflow-ray merge) or use the transformers engine")
    return fits[0]


MODEL_OUTPUT = "model"  # the kind of output folder merge and vocab extend write (storage.put_output)


def merge_adapter(adapter_folder: str | os.PathLike, output: str | os.PathLike, base: str | None = None,
                  s3: dict | None = None) -> str:
    """Base + adapter -> one standalone model folder (weights, config, tokenizer), written aside and
    put in place when complete; the base (any model ``model.locate`` finds) gets the RoPE scaling
    the adapter trained with. ``output`` (a folder or s3://) must be new or an earlier model output
    of ours: a run, the adapter itself or any other folder with content is refused before any work."""
    import shutil

    from transformers import AutoTokenizer

    from lmflow_ray import storage
    from lmflow_ray.model.load import load_for_inference, tokenizer_folder
    from lmflow_ray.model.locate import model_folder

    adapter_folder = os.fspath(adapter_folder)
    if not is_adapter_folder(adapter_folder):
        raise UserError(f"{adapter_folder}: no adapter_config.json here (not a LoRA adapter folder)")
    key = "--model_name_or_path" if base else f"{adapter_folder}/adapter_config.json: base_model_name_or_path"
    base = base or adapter_base(adapter_folder)
    if not base:
        raise UserError(f"{adapter_folder}/adapter_config.json: no base_model_name_or_path; pass --model_name_or_path")
    output = os.fspath(output)
    output = output if storage.is_remote(output) else os.path.abspath(output)
    storage.check_output(output, MODEL_OUTPUT, s3)
    base_folder = model_folder(base, s3, key)
    merged = load_for_inference(base_folder, {"default": adapter_folder}, dtype="float32", merge=True)
    tok_source = tokenizer_folder(base_folder, adapter_folder)
    tmp = storage.new_output_dir(output)
    try:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tok_source).save_pretrained(tmp)
        storage.put_output(tmp, output, MODEL_OUTPUT, s3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
