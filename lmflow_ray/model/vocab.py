"""Vocabulary extension: learn the tokens a domain needs and give them to a model.

1. A BPE tokenizer of the base's own kind (same normalizer and pre-tokenizer) is trained on the
   user's text (``train_new_from_iterator``).
2. Its tokens the base lacks are merged into the base tokenizer's own BPE model: each new token
   gets an id after the existing ones, and merges are appended that join the pieces the base
   would split it into, so the token is reached by ordinary BPE (one id), not as a special
   "added token" matched before tokenization.
3. The embeddings (and an untied head) grow to the new size; each new row is the mean of the rows
   of the pieces the base tokenizer split that token into.
4. Model, tokenizer and a short report are written aside and moved into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from lmflow_ray.errors import UserError
from lmflow_ray.model.adapters import MODEL_OUTPUT

TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass
class VocabReport:
    base_size: int
    new_size: int
    added: list[str] = field(default_factory=list)
    texts: int = 0
    tokens_before: int = 0
    tokens_after: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self, base: str, output: str) -> str:
        saved = 1 - self.tokens_after / max(1, self.tokens_before)
        lines = [
            "# Vocabulary extension", "",
            "| | |", "|---|---|",
            f"| base model | `{base}` |",
            f"| output | `{output}` |",
            f"| vocabulary | {self.base_size:,} -> {self.new_size:,} (+{len(self.added):,}) |",
            f"| training text | {self.texts:,} texts |",
            f"| tokens for that text | {self.tokens_before:,} -> {self.tokens_after:,} ({saved:.1%} fewer) |",
            "", "| text | tokens before | tokens after |", "|---|---:|---:|",
        ]
        lines += [f"| `{e['text']}` | {e['before']} | {e['after']} |" for e in self.examples]
        return "\n".join(lines) + "\n"


# ---- text --------------------------------------------------------------------------------------


def _instance_texts(instance: dict[str, Any]) -> Iterator[str]:
    for key in ("text", "input", "output", "system"):
        if isinstance(instance.get(key), str) and instance[key]:
            yield instance[key]
    for key in ("messages", "chosen", "rejected"):
        value = instance.get(key)
        turns = value.get("messages", []) if isinstance(value, dict) else value or []
        for turn in turns:
            if isinstance(turn, dict) and isinstance(turn.get("content"), str) and turn["content"]:
                yield turn["content"]


def read_texts(dataset_path: str, s3: Any = None) -> list[str]:
    """Plain text files (one text per line) or an LMFlow dataset (every text field of every
    instance: text, input/output, message contents), from a file or a folder."""
    path = Path(dataset_path)
    local_text = path.is_file() and path.suffix in TEXT_SUFFIXES
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        local_text = bool(files) and all(p.suffix in TEXT_SUFFIXES for p in files)
    if local_text:
        files = [path] if path.is_file() else files
        return [line.strip() for p in files for line in p.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.strip()]

    from lmflow_ray.data.sources import open_dataset, read_shard
    from lmflow_ray.errors import DataError

    dataset = open_dataset(dataset_path, s3)
    texts, problems = [], []
    for shard in dataset.shards:
        for rec in read_shard(shard, dataset.s3):
            if rec.problem:
                problems.append(rec.message())
            else:
                texts.extend(_instance_texts(rec.instance))
    if problems:
        raise DataError(problems)
    return texts


# ---- merging a learned BPE into the base -------------------------------------------------------


def _pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces BPE with these merge ranks makes of ``word`` (its symbols are its characters)."""
    symbols = list(word)
    while len(symbols) > 1:
        ranked = [(ranks.get(pair, None), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        ranked = [(r, i) for r, i in ranked if r is not None]
        if not ranked:
            break
        best = min(ranked)[0]
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and ranks.get((symbols[i], symbols[i + 1])) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def merge_bpe(base: dict[str, Any], learned: dict[str, Any]) -> list[str]:
    """Adds ``learned``'s tokens to the ``base`` tokenizer.json (in place) in ``learned``'s merge
    order; returns the tokens added (new characters and intermediate pieces included)."""
    model = base["model"]
    vocab: dict[str, int] = model["vocab"]
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    pairs = _pairs(model["merges"])
    ranks = {pair: i for i, pair in enumerate(pairs)}
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in base.get("added_tokens", []))])
    specials = {t["content"] for t in base.get("added_tokens", [])}
    added: list[str] = []

    def add(token: str) -> None:
        nonlocal next_id
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
            added.append(token)

    for a, b in _pairs(learned["model"]["merges"]):
        token = a + b
        if token in vocab or token in specials:
            continue
        for ch in token:  # characters the base only had as bytes (byte fallback) become tokens
            add(ch)
        pieces = _bpe(token, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(pairs)
                pairs.append(pair)
            add(pair[0] + pair[1])
            pieces = [pair[0] + pair[1], *pieces[2:]]
    model["merges"] = [f"{a} {b}" for a, b in pairs] if string_merges else [[a, b] for a, b in pairs]
    return added


# ---- the whole job -----------------------------------------------------------------------------


def extend_vocabulary(model_name_or_path: str, texts: list[str], vocab_size: int, output: str | os.PathLike,
                      min_frequency: int = 2, trust_remote_code: bool = False, say=print) -> VocabReport:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray import storage
    from lmflow_ray.embedded import resolve_model_path

    if not texts:
        raise UserError("vocab extend: --dataset_path holds no text to learn from")
    output = Path(output).resolve()
    storage.check_output(str(output), MODEL_OUTPUT)  # a folder with other content is refused before any work
    source = resolve_model_path(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"--model_name_or_path: cannot load a tokenizer from {model_name_or_path!r} ({err})") from None
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else {}
    kind = spec.get("model", {}).get("type")
    if kind != "BPE":
        raise UserError(f"vocab extend: {model_name_or_path} has a {kind or 'slow (no tokenizer.json)'} tokenizer; "
                        "extending works on BPE tokenizers (Llama 3, Qwen2, Mistral, Gemma, GPT-2, SmolLM2, ...)")

    say(f"learning a {vocab_size:,}-token BPE on {len(texts):,} texts ...")
    learned = tokenizer.train_new_from_iterator(_batches(texts), vocab_size, min_frequency=min_frequency)
    added = merge_bpe(spec, json.loads(learned.backend_tokenizer.to_str()))
    if not added:
        raise UserError(f"vocab extend: the text taught no token {model_name_or_path} lacks; give more or "
                        "more specific text, or a larger --vocab_size")
    say(f"adding {len(added):,} tokens; resizing the embeddings")

    tmp = Path(storage.new_output_dir(str(output)))
    try:
        tokenizer.save_pretrained(tmp)
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        extended = AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)

        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=trust_remote_code)
        rows = model.get_input_embeddings().weight.shape[0]
        new_ids = [extended.convert_tokens_to_ids(t) for t in added]
        if max(new_ids) >= rows:
            model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
        with torch.no_grad():
            tables = [model.get_input_embeddings().weight]
            head = model.get_output_embeddings()
            if head is not None and head.weight is not tables[0]:
                tables.append(head.weight)
            for token, new_id in zip(added, new_ids):
                pieces = tokenizer(extended.convert_tokens_to_string([token]), add_special_tokens=False).input_ids
                for table in tables:
                    table[new_id] = table[pieces].mean(0) if pieces else table[:rows].mean(0)
        model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
        model.save_pretrained(tmp)
        extended.save_pretrained(tmp)

        report = _report(tokenizer, extended, texts, added)
        (tmp / "vocab_extension.json").write_text(json.dumps(asdict(report), ensure_ascii=False, indent=1))
        (tmp / "vocab_extension.md").write_text(report.markdown(model_name_or_path, str(output)), encoding="utf-8")
        storage.put_output(str(tmp), str(output), MODEL_OUTPUT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _batches(texts: list[str], size: int = 1000) -> Iterable[list[str]]:
    for i in range(0, len(texts), size):
        yield texts[i:i + size]


def _report(before: Any, after: Any, texts: list[str], added: list[str]) -> VocabReport:
    def count(tok: Any, batch: list[str]) -> int:
        return sum(len(ids) for ids in tok(batch, add_special_tokens=False).input_ids)

    report = VocabReport(base_size=len(before), new_size=len(after), added=added, texts=len(texts))
    report.tokens_before = count(before, texts)
    report.tokens_after = count(after, texts)
    words = sorted({after.convert_tokens_to_string([t]).strip() for t in added}, key=len, reverse=True)
    for word in [w for w in words if w][:8]:
        report.examples.append({"text": word, "before": count(before, [word]), "after": count(after, [word])})
    return report
