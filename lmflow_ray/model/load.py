"""Load a causal LM for training or inference from a folder, a cached name or `default`."""

from __future__ import annotations

from typing import Any

from lmflow_ray.config import ModelSection
from lmflow_ray.embedded import resolve_model_path
from lmflow_ray.errors import UserError

def attention_implementation(section: ModelSection) -> str:
    """flash_attention_2 when asked for and installed on a GPU, else sdpa (with a clear message)."""
    if not section.use_flash_attention:
        return "sdpa"
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        raise UserError("model.use_flash_attention: flash-attn is not installed or no CUDA GPU is present; "
                        "install the `gpu` extra on a GPU node, or set use_flash_attention: false (sdpa is used)")
    return "flash_attention_2"


def inference_dtype(torch_dtype: str) -> Any:
    """The `dtype` for from_pretrained when serving or evaluating: `auto` means the checkpoint's own
    dtype on a GPU and float32 on CPU (half precision is slow there)."""
    import torch

    if torch_dtype == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return getattr(torch, torch_dtype)


def load_model(section: ModelSection, dtype: str = "float32") -> Any:
    """AutoModelForCausalLM in ``dtype`` (training keeps float32 master weights; mixed precision
    is the strategy's job)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_path(section.model_name_or_path), dtype=getattr(torch, dtype),
            trust_remote_code=section.trust_remote_code,
            attn_implementation=attention_implementation(section),
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.model_name_or_path: cannot load a model from {section.model_name_or_path!r} ({first})") from None


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
