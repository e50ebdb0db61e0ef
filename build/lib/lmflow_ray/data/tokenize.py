"""Pure tokenization: validated instances -> (input_ids, labels), prompt tokens labelled -100.

Each sample is rendered to one string with its trained character spans, tokenized once (so ids
equal the official chat template's), and a token is trained when it overlaps a trained span.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmflow_ray.data.templates import Rendered, Template
from lmflow_ray.embedded import resolve_model_path
from lmflow_ray.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (cached per process); `default` is the embedded model."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.model_name_or_path: cannot load a tokenizer from {model_name_or_path!r} ({first})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model.model_name_or_path: {model_name_or_path!r} has no fast tokenizer (tokenizer.json); lmflow-ray needs one for exact label masks")
    return tokenizer


def trained_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for each token whose character range overlaps a trained span."""
    if len(offsets) == 0 or not spans:
        return np.zeros(len(offsets), dtype=bool)
    starts = np.fromiter((a for a, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((b for _, b in spans), dtype=np.int64, count=len(spans))
    tok_start, tok_end = offsets[:, 0], offsets[:, 1]
    first = np.searchsorted(ends, tok_start, side="right")  # first span ending after the token starts
    inside = first < len(spans)
    first = np.minimum(first, len(spans) - 1)
    return inside & (starts[first] < tok_end) & (tok_end > tok_start)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a bos token in front of plain text (Llama does, GPT-2 does not)."""
    if tokenizer.bos_token is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def render_plain(kind: str, instance: dict[str, Any], tokenizer: Any, with_bos: bool) -> Rendered:
    """text_only and text2text samples: no chat template; the eos token closes the trained part."""
    bos = tokenizer.bos_token if with_bos else ""
    eos = tokenizer.eos_token or ""
    if kind == "text_only":
        text = bos + instance["text"] + eos
        return Rendered(text, [(len(bos), len(text))])
    prompt = bos + instance["input"]
    text = prompt + instance["output"] + eos
    return Rendered(text, [(len(prompt), len(text))])


def render(kind: str, instance: dict[str, Any], tokenizer: Any, template: Template | None, with_bos: bool) -> Rendered:
    if kind == "conversation":
        assert template is not None
        return template.render(instance)
    return render_plain(kind, instance, tokenizer, with_bos)


@dataclass
class Tokenized:
    """A rendered sample as tokens: ids, which of them are trained, and their character offsets."""

    ids: np.ndarray
    trained: np.ndarray  # bool per token
    offsets: np.ndarray  # (n, 2) character ranges in the rendered text


def tokenize_rendered(rendered: list[Rendered], tokenizer: Any, train_on_prompt: bool = False) -> list[Tokenized]:
    """Tokenize a batch of rendered samples at once and mark the trained tokens from the spans."""
    batch = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for r, ids, offsets in zip(rendered, batch["input_ids"], batch["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        trained = np.ones(len(offsets), dtype=bool) if train_on_prompt else trained_mask(offsets, r.spans)
        out.append(Tokenized(np.asarray(ids, dtype=np.int64), trained, offsets))
    return out


def encode_rendered(
    rendered: list[Rendered], tokenizer: Any, block_size: int, train_on_prompt: bool = False
) -> list[Encoded]:
    """Rendered samples -> input ids and labels (-100 where untrained), cut at block_size."""
    out = []
    for t in tokenize_rendered(rendered, tokenizer, train_on_prompt):
        labels = np.where(t.trained, t.ids, IGNORE_INDEX)
        out.append(Encoded(t.ids[:block_size].tolist(), labels[:block_size].tolist(), len(t.ids) > block_size))
    return out
