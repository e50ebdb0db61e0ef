"""A draft model for speculative decoding made from its target: the target's first k decoder
blocks with its embeddings, final norm and head (`truncate`). It shares the target's tokenizer by
construction; `lmflow-ray draft` then distills it on the target's own greedy replies."""

from __future__ import annotations

import os
from typing import Any

from lmflow_ray.errors import UserError
from lmflow_ray.model.lisa import find_blocks


def truncate(model: Any, layers: int, where: str = "draft_layers") -> Any:
    """``model`` cut to its first ``layers`` decoder blocks, in place (config included)."""
    name, blocks = find_blocks(model)
    total = len(blocks)
    if not 1 <= layers < total:
        raise UserError(f"{where}: {layers} is not between 1 and {total - 1} (the target has {total} decoder blocks)")
    del blocks[layers:]
    config = model.config
    config.num_hidden_layers = layers
    for key in ("layer_types", "sliding_window_pattern_list"):
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[:layers])
    return model


def save_truncated(source_folder: str | os.PathLike, layers: int, output: str | os.PathLike,
                   trust_remote_code: bool = False) -> str:
    """Write the truncated copy of the model in ``source_folder`` (and its tokenizer) to ``output``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source_folder, trust_remote_code=trust_remote_code)
    truncate(model, layers).save_pretrained(output)
    AutoTokenizer.from_pretrained(source_folder, trust_remote_code=trust_remote_code).save_pretrained(output)
    return str(output)
