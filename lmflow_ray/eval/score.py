"""Scoring with a loaded model, a batch at a time, no Ray here.

Each sample is laid out as its prompt (left-padded, so every prompt ends at the same column) then
its reference (right-padded). One forward pass gives the log-likelihood of every scored token (NLL,
perplexity) and the prompts' KV cache; the cache is cut back to the prompts and greedy decoding
goes on from there (accuracy), so scoring the reference costs no second pass over the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lmflow_ray.data.packing import group_texts
from lmflow_ray.data.pipeline import Spec, encode, tools_for
from lmflow_ray.data.tokenize import IGNORE_INDEX, render_plain, tokenize_rendered
from lmflow_ray.errors import UserError


@dataclass
class Item:
    """One thing to score: token ids (prompt + reference), which tokens count for NLL, where the
    generation prompt ends, and the reference answer and a choice question's options (accuracy)."""

    index: int
    ids: list[int]
    scored: list[bool]
    prompt_len: int
    reference: str = ""
    options: list[str] = field(default_factory=list)


def prompt_text(instance: dict[str, Any], prompt_structure: str) -> str:
    """A text2text input placed in LMFlow's ``prompt_structure`` (``{input}`` is replaced)."""
    return prompt_structure.replace("{input}", instance["input"])


def prepare(instances: Sequence[dict[str, Any]], indices: Sequence[int], spec: Spec, prompt_structure: str) -> list[Item]:
    """Instances -> Items. A conversation's last assistant reply is the reference and everything
    before it the prompt; its NLL counts the tokens training learns (every reply and its
    end-of-turn). text2text: the input (in prompt_structure) is the prompt, the output the
    reference. text_only: the texts are joined and cut into block_size windows (LMFlow's nll)."""
    tokenizer, template, with_bos = tools_for(spec)
    if spec.kind == "text_only":
        rows = group_texts(encode(list(instances), spec), spec.block_size)
        return [Item(i, list(r.input_ids), [lab != IGNORE_INDEX for lab in r.labels], 0) for i, r in enumerate(rows)]
    if spec.kind == "conversation":
        rendered = [template.render(inst) for inst in instances]
        references = [inst["messages"][-1]["content"] for inst in instances]
    elif spec.kind == "text2text":
        rendered = [render_plain("text2text", {"input": prompt_text(inst, prompt_structure), "output": inst["output"]},
                                 tokenizer, with_bos) for inst in instances]
        references = [inst["output"] for inst in instances]
    else:
        raise UserError(f"eval: a {spec.kind} dataset has no single reference answer; use conversation, text2text or text_only")
    items = []
    for index, r, t, ref in zip(indices, rendered, tokenize_rendered(rendered, tokenizer), references):
        start = r.spans[-1][0]  # the last reply begins here
        prompt_len = int(np.sum(t.offsets[:, 1] <= start))
        items.append(Item(int(index), t.ids.tolist(), t.trained.tolist(), prompt_len, ref))
    return items


def _layout(prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]], pad_id: int):
    """(ids, attention mask, position ids, prompt width) for prompts left-padded to one width and
    continuations right-padded after them."""
    import torch

    width = max(len(p) for p in prompts)
    total = width + max(len(c) for c in conts)
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), total), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, conts)):
        ids[row, width - len(p): width + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        mask[row, width - len(p): width + len(c)] = 1
    # As generate() numbers positions: from 0 at each row's first real token; pads get 1.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions, width


def token_logprobs(model: Any, prompts: Sequence[Sequence[int]], conts: Sequence[Sequence[int]],
                   scored: Sequence[Sequence[bool]], pad_id: int, keep_cache: bool = False):
    """Log-probabilities of the scored tokens of each prompt + continuation (a list of arrays, one
    per row), and, with ``keep_cache``, (cache, ids, mask, width) to decode after the prompts from.
    Only the logits of positions that predict a scored token are computed."""
    import torch

    ids, mask, positions, width = _layout(prompts, conts, pad_id)
    wanted = torch.zeros_like(mask, dtype=torch.bool)
    for row, (p, c, s) in enumerate(zip(prompts, conts, scored)):
        start = width - len(p)
        flags = torch.tensor(list(s), dtype=torch.bool)
        flags[0] = False  # the first token has nothing before it to be predicted from
        wanted[row, start: start + len(flags)] = flags
    targets = wanted.any(0).nonzero().flatten()
    keep = (targets - 1).clamp(min=0)
    device = model.device
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=keep_cache,
                    logits_to_keep=keep.to(device) if len(keep) else 1)
        result = []
        if len(keep):
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            picked = logp.gather(-1, ids[:, targets.to(device)].unsqueeze(-1)).squeeze(-1).cpu()  # (rows, len(targets))
            for row in range(len(prompts)):
                result.append(picked[row][wanted[row, targets]].numpy().astype(np.float64))
        else:
            result = [np.zeros(0) for _ in prompts]
    if not keep_cache:
        return result, None
    return result, (out.past_key_values, ids, mask, width)


def stop_ids(eos: Any, tokenizer: Any) -> list[int]:
    """The ids that end an answer: a model's eos_token_id (one, a list or None) and the tokenizer's."""
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    return stop_ids(model.generation_config.eos_token_id, tokenizer)


def decode_until(tokenizer: Any, rows: Sequence[Sequence[int]], stops: Sequence[int]) -> tuple[list[str], list[int]]:
    """New-token rows -> (texts, token counts), each row cut at its first stop id."""
    stop = set(stops)
    texts, counts = [], []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(tokenizer.decode(list(row[:cut]), skip_special_tokens=True).strip())
        counts.append(cut)
    return texts, counts


def decode_answers(model: Any, tokenizer: Any, generated: Any) -> list[str]:
    """New tokens -> text, cut at the first end-of-sequence token."""
    return decode_until(tokenizer, generated.tolist(), _eos_ids(model, tokenizer))[0]


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     pad_id: int, cache: Any = None) -> list[str]:
    """Greedy answers to left-padded prompts; from a cache that already holds the prompts (cut back
    to all but their last token) when one is given."""
    import torch

    if cache is None:
        ids, mask, _, width = _layout(prompts, [[] for _ in prompts], pad_id)
        ids, mask, past = ids.to(model.device), mask.to(model.device), None
    else:
        past, ids, mask, width = cache
        past.crop(-(ids.shape[1] - width + 1))  # keep the prompts but their last token
        ids, mask = ids[:, :width], mask[:, :width]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=past, max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=_eos_ids(model, tokenizer), pad_token_id=pad_id)
    return decode_answers(model, tokenizer, out[:, width:].cpu())


def option_tokens(tokenizer: Any, option: str, after: str) -> list[int]:
    """An option's tokens as a continuation: a space first when the prompt ends in a word."""
    text = option if not after or after[-1].isspace() else " " + option
    return tokenizer(text, add_special_tokens=False).input_ids


def score_options(model: Any, tokenizer: Any, items: Sequence[Item], options: Sequence[Sequence[str]],
                  pad_id: int, batch_size: int) -> list[list[float]]:
    """Summed log-likelihood of each option after each item's prompt."""
    rows = []
    for n, (item, opts) in enumerate(zip(items, options)):
        prompt = item.ids[: item.prompt_len]
        after = tokenizer.decode(prompt[-1:]) if prompt else ""
        rows += [(n, prompt, option_tokens(tokenizer, o, after)) for o in opts]
    sums: list[list[float]] = [[] for _ in items]
    for at in range(0, len(rows), batch_size):
        chunk = rows[at: at + batch_size]
        prompts = [r[1] for r in chunk]
        conts = [r[2] for r in chunk]
        scored = [[False] * len(p) + [True] * len(c) for p, c in zip(prompts, conts)]
        logps, _ = token_logprobs(model, prompts, conts, scored, pad_id)
        for (n, _, _), lp in zip(chunk, logps):
            sums[n].append(float(lp.sum()))
    return sums
