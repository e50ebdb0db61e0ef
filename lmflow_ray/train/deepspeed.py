"""The DeepSpeed config for a recipe: a ZeRO preset name or the user's JSON, with "auto" filled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmflow_ray.config import TrainSection
from lmflow_ray.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    "zero0": {"stage": 0},
    "zero2": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "zero3_offload": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                      "stage3_gather_16bit_weights_on_model_save": True},
    "zero3_offload_params": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                             "stage3_gather_16bit_weights_on_model_save": True},
}


def _from_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        names = ", ".join(PRESETS)
        raise UserError(f"train.deepspeed: {path!r} is neither a preset ({names}) nor a JSON file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def deepspeed_config(train: TrainSection, world_size: int) -> dict[str, Any] | None:
    """None when DeepSpeed is off (plain DDP). Batch sizes, clipping and precision always come
    from the recipe, so the recipe and the JSON cannot disagree; the JSON may say "auto"."""
    if not train.deepspeed:
        return None
    if isinstance(train.deepspeed, dict):
        config: dict[str, Any] = json.loads(json.dumps(train.deepspeed))  # a deep copy: "auto"s get filled
    elif train.deepspeed in PRESETS:
        config = {"zero_optimization": dict(PRESETS[train.deepspeed])}
    else:
        config = _from_file(train.deepspeed)
    ours = {
        "train_micro_batch_size_per_gpu": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.per_device_train_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in ours.items():
        if config.get(key, "auto") not in ("auto", value):
            where = train.deepspeed if isinstance(train.deepspeed, str) else "the inline config"
            raise UserError(f"train.deepspeed: {key} is {config[key]!r} in {where} but the recipe "
                            f"makes it {value!r}; set it to \"auto\" or change the recipe")
        config[key] = value
    config["bf16"] = {"enabled": train.bf16}
    config.pop("fp16", None)
    config.pop("optimizer", None)  # ours: AdamW (DeepSpeedCPUAdam when offloaded) with the recipe's LR
    config.pop("scheduler", None)
    config.setdefault("steps_per_print", 1 << 30)
    config.setdefault("wall_clock_breakdown", False)
    config.setdefault("zero_optimization", {"stage": 0})
    return config


def inline_file(train: TrainSection) -> TrainSection:
    """``train`` with a DeepSpeed JSON file replaced by its content, read here: the workers, on any
    node, get the config itself, not a path only this machine has."""
    if not isinstance(train.deepspeed, str) or not train.deepspeed or train.deepspeed in PRESETS:
        return train
    return train.model_copy(update={"deepspeed": _from_file(train.deepspeed)})


def zero_stage(config: dict[str, Any] | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(config: dict[str, Any] | None) -> bool:
    device = (config or {}).get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
