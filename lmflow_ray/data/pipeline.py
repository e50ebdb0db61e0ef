"""The Ray Data pipeline: read -> validate -> template + tokenize -> pack, ready for
``ray.train.get_dataset_shard``. Each shard of the input is one map task, run in parallel on every
node of the cluster, so no training rank tokenizes while the others wait.

The batch functions here are pure and also serve `data preview` and the tests without Ray.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmflow_ray.config import Recipe
from lmflow_ray.data.packing import group_texts, one_per_row, pack, pack_pairs, prepare_side
from lmflow_ray.data.sources import Dataset, open_dataset, read_shard
from lmflow_ray.data.templates import get_template
from lmflow_ray.data.tokenize import IGNORE_INDEX, Encoded, adds_bos, encode_rendered, load_tokenizer, render
from lmflow_ray.errors import DataError, UserError
from lmflow_ray.storage import S3Options

MAX_PROBLEMS_PER_SHARD = 20
OUTPUT_BLOCK_BYTES = 2 << 20


@dataclass(frozen=True)
class Spec:
    """Everything a worker needs to turn instances into token rows (plain data, travels to tasks)."""

    model_name_or_path: str
    trust_remote_code: bool
    conversation_template: str | None
    kind: str
    block_size: int
    train_on_prompt: bool
    packing: bool
    holdout: int = 0  # percent of the samples held out for validation (a fixed hash split)
    side: str = "train"  # with a holdout: which side to read, train or validation
    mask_prompt: bool = True  # preference pairs: train on the final replies only
    max_prompt_length: int | None = None  # preference pairs: the prompt's last N tokens

    @classmethod
    def from_recipe(cls, recipe: Recipe, kind: str, side: str = "train", split: bool = True) -> "Spec":
        return cls(
            model_name_or_path=recipe.model.model_name_or_path,
            trust_remote_code=recipe.model.trust_remote_code,
            conversation_template=recipe.data.conversation_template,
            kind=kind,
            block_size=recipe.data.block_size,
            train_on_prompt=recipe.data.train_on_prompt,
            packing=recipe.data.packing,
            holdout=recipe.data.validation_split_percentage if split else 0,
            side=side,
            mask_prompt=recipe.data.mask_prompt,
            max_prompt_length=recipe.data.max_prompt_length,
        )


def held_out(shard: dict, index: int, percent: int) -> bool:
    """Whether the ``index``-th sample of a shard is in the validation split: a fixed hash of where
    it is (file, shard, position), so every run, resume and worker count splits alike."""
    import hashlib

    digest = hashlib.blake2b(f"{shard['uri']}|{shard['start']}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < percent


@functools.lru_cache(maxsize=8)
def tools_for(spec: Spec):
    """Tokenizer, template and bos rule for a spec, once per worker process."""
    tokenizer = load_tokenizer(spec.model_name_or_path, spec.trust_remote_code)
    needs_template = spec.kind in ("conversation", "paired_conversation")
    template = get_template(spec.conversation_template, tokenizer) if needs_template else None
    return tokenizer, template, adds_bos(tokenizer)


def texts_of(kind: str, instance: dict[str, Any]) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(side, type to render it as, part) for each text an instance holds: a pair holds two."""
    if kind == "paired_conversation":
        return [(side, "conversation", instance[side]) for side in ("chosen", "rejected")]
    return [(None, kind, instance)]


def renders(spec: Spec):
    """A check for sources.validate: every text of the instance renders with the spec's template."""
    tokenizer, template, with_bos = tools_for(spec)

    def check(instance: dict[str, Any]) -> None:
        for _, kind, part in texts_of(spec.kind, instance):
            render(kind, part, tokenizer, template, with_bos)

    return check


def encode(instances: list[dict[str, Any]], spec: Spec, side: str | None = None) -> list[Encoded]:
    """A batch of instances (or one side of each pair) -> input ids and labels."""
    tokenizer, template, with_bos = tools_for(spec)
    kind = "conversation" if side else spec.kind
    convs = [inst[side] for inst in instances] if side else instances
    rendered = [render(kind, c, tokenizer, template, with_bos) for c in convs]
    # text_only documents are never cut here: group_texts splits the concatenation into blocks;
    # nor are pair sides: their prompt is cut first (prepare_side).
    limit = sys.maxsize if kind == "text_only" or side else spec.block_size
    return encode_rendered(rendered, tokenizer, limit, spec.train_on_prompt)


def process(instances: list[dict[str, Any]], spec: Spec) -> dict[str, list]:
    """One batch of validated instances -> columns of token rows."""
    if spec.kind == "paired_conversation":
        sides = [[prepare_side(e, spec.block_size, spec.mask_prompt, spec.max_prompt_length) for e in encode(instances, spec, side)]
                 for side in ("chosen", "rejected")]
        pairs = [(c, r, inst.get("margin", 0.0)) for c, r, inst in zip(*sides, instances)]
        # A pair row holds up to two sides of block_size tokens each.
        rows = pack_pairs(pairs, 2 * spec.block_size if spec.packing else None)
        return {
            "input_ids": [r.input_ids for r in rows],
            "labels": [r.labels for r in rows],
            "lengths": [r.lengths for r in rows],
            "margins": [r.margins for r in rows],
            "num_truncated": [r.truncated for r in rows],
        }
    encoded = encode(instances, spec)
    if spec.kind == "text_only":
        rows = group_texts(encoded, spec.block_size)
    else:
        rows = pack(encoded, spec.block_size) if spec.packing else one_per_row(encoded)
    return {
        "input_ids": [r.input_ids for r in rows],
        "labels": [r.labels for r in rows],
        "lengths": [r.lengths for r in rows],
        "num_truncated": [r.truncated for r in rows],
    }


class ShardToRows:
    """The Ray stage: one shard description in, packed token rows out, a batch at a time.

    Reading, validating, templating, tokenizing and packing happen in the same task (one task per
    shard, all shards in parallel across the cluster), so instances never cross the object store.
    """

    def __init__(self, s3: dict, spec: Spec, batch_size: int):
        self.s3, self.spec, self.batch_size = s3, spec, batch_size

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        for shard_json in batch["shard"]:
            shard = json.loads(shard_json)
            limit = shard.pop("limit", None)
            for instances in shard_instances(shard, self.spec, self.s3, self.batch_size, limit):
                # pyarrow converts lists of Python ints fastest when it infers the type itself.
                yield pa.table(process(instances, self.spec))


def shard_instances(shard: dict, spec: Spec, s3: dict, batch_size: int,
                    limit: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """A shard's validated instances of the spec's side of the split (the first ``limit`` of them),
    in batches; a problem stops the shard (its first problems reported)."""
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    kept = 0
    for index, rec in enumerate(read_shard(shard, s3)):
        if rec.problem:
            problems.append(rec.message())
            if len(problems) >= MAX_PROBLEMS_PER_SHARD:
                break
        elif not problems:
            if spec.holdout and held_out(shard, index, spec.holdout) != (spec.side == "validation"):
                continue
            if limit is not None and kept >= limit:
                break
            kept += 1
            out.append(rec.instance)
            if len(out) >= batch_size:
                yield out
                out = []
    if problems:
        raise DataError(problems)
    if out:
        yield out


def _count_shard(shard: dict, spec: Spec, s3: dict) -> int:
    return sum(len(batch) for batch in shard_instances(shard, spec, s3, 4096))


def first_samples(source: Dataset, spec: Spec, limit: int) -> list[dict]:
    """Shard descriptions reading only the first ``limit`` samples of the dataset, in file order:
    the shards are counted in order (one Ray task each, as many at once as the cluster has CPUs),
    until the limit is reached; then each reads its share."""
    import ray

    shards = [s.to_dict() for s in source.shards]
    count = ray.remote(num_cpus=1)(_count_shard)
    window = max(1, int(ray.cluster_resources().get("CPU", 1)))
    refs: list = []
    out = []
    for i, shard in enumerate(shards):
        while len(refs) < min(len(shards), i + window):
            refs.append(count.remote(shards[len(refs)], spec, source.s3))
        n = ray.get(refs[i])
        if n:
            out.append({**shard, "limit": min(n, limit)})
            limit -= n
        if limit <= 0:
            for ref in refs[i + 1:]:
                ray.cancel(ref)
            break
    return out


def open_source(recipe: Recipe, path: str | None = None) -> Dataset:
    """The recipe's dataset (or ``path``), opened: its files, their type and shards (headers only,
    no Ray), so a driver can check it before it starts anything."""
    uri = path or recipe.data.dataset_path
    if not uri:
        raise UserError("data.dataset_path: required (a file or folder, local or s3://); pass --dataset_path PATH")
    return open_dataset(uri, S3Options.resolve(recipe.storage))


def plan(recipe: Recipe, path: str | None = None, side: str = "train") -> tuple[Dataset, Spec]:
    """Open the dataset (headers only) and check model + template, in the driver. The validation
    split applies to the recipe's dataset_path only, not to another ``path``."""
    source = open_source(recipe, path)
    spec = Spec.from_recipe(recipe, source.kind, side, split=path is None)
    tools_for(spec)  # a bad model or template fails here, in the driver, not in a Ray task
    return source, spec


def to_ray(source: Dataset, spec: Spec, batch_size: int, limit: int | None = None, tasks: int | None = None):
    """A lazy ray.data.Dataset of token rows for a planned source (its first ``limit`` samples),
    with at most ``tasks`` shards tokenized at once (empty: as many as the cluster has CPUs for);
    Ray must be initialised."""
    import ray

    described = first_samples(source, spec, limit) if limit else [s.to_dict() for s in source.shards]
    if not described:
        raise UserError(f"data.dataset_path {source.uri}: no samples to read" +
                        (f" on the {spec.side} side of validation_split_percentage={spec.holdout}" if spec.holdout else ""))
    shards = [{"shard": json.dumps(s)} for s in described]
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    # This pipeline's own context (a copy): small output blocks stream out of a task as soon as a
    # batch is packed, instead of after the whole shard.
    ds.context.target_max_block_size = OUTPUT_BLOCK_BYTES
    return ds.map_batches(ShardToRows(source.s3, spec, batch_size), batch_size=1, concurrency=tasks)


def build_dataset(recipe: Recipe, path: str | None = None, side: str = "train"):
    """The recipe's dataset (or ``path``) as token rows, ready for ray.train.get_dataset_shard: the
    train side of the validation split, cut at max_train_samples, or the validation side."""
    source, spec = plan(recipe, path, side)
    return _rows(recipe, source, spec, path, side)


def _rows(recipe: Recipe, source: Dataset, spec: Spec, path: str | None, side: str):
    limit = recipe.data.max_train_samples if path is None and side == "train" else None
    return to_ray(source, spec, recipe.data.preprocessing_batch_size, limit, recipe.data.preprocessing_num_workers)


def batch_stats(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Per-batch totals for `data stats` (one row out per batch in). ``pad_rows`` is how many rows
    LMFlow's layout (one sample per block_size row) would need for the same samples."""
    paired = "margins" in batch  # preference rows: a sample is a pair (two segments)
    samples = tokens = trained = untrained = 0
    for labels, lengths in zip(batch["labels"], batch["lengths"]):
        labels = np.asarray(labels)
        samples += len(lengths) // 2 if paired else len(lengths)
        tokens += len(labels)
        mask = labels != IGNORE_INDEX
        trained += int(mask.sum())
        bounds = np.cumsum([0, *lengths])
        untrained += sum(1 for a, b in zip(bounds[:-1], bounds[1:]) if not mask[a + 1 : b].any())
    return {"rows": [len(batch["labels"])], "pad_rows": [samples], "samples": [samples], "tokens": [tokens],
            "trained": [trained], "truncated": [int(np.sum(batch["num_truncated"]))], "untrained": [untrained]}


def summarize(totals: dict[str, int], block_size: int, kind: str) -> dict[str, Any]:
    """The totals as `data stats` shows them; a preference row holds two sides of block_size, so
    its efficiency is against twice that (the widest micro-batch the row can be padded to)."""
    samples, tokens, rows, pad_rows = totals["samples"], totals["tokens"], totals["rows"], totals["pad_rows"]
    width = block_size * (2 if kind == "paired_conversation" else 1)
    return {
        "type": kind,
        "samples": samples,
        "tokens": tokens,
        "trained_tokens": totals["trained"],
        "truncated_share": totals["truncated"] / samples if samples else 0.0,
        "samples_with_nothing_to_learn": totals["untrained"],
        "block_size": block_size,
        "rows_packed": rows,
        "packing_efficiency": tokens / (rows * width) if rows else 0.0,
        "rows_pad_to_block": pad_rows,
        "pad_to_block_efficiency": tokens / (pad_rows * width) if pad_rows else 0.0,
    }


STAT_KEYS = ("rows", "pad_rows", "samples", "tokens", "trained", "truncated", "untrained")


def dataset_stats(recipe: Recipe, path: str | None = None) -> dict[str, Any]:
    """Samples, tokens, truncation and packing efficiency, computed by the pipeline itself."""
    source, spec = plan(recipe, path)
    ds = _rows(recipe, source, spec, path, "train")
    parts = ds.map_batches(batch_stats, batch_size=4096).take_all()
    totals = {k: sum(int(p[k]) for p in parts) for k in STAT_KEYS}
    return summarize(totals, spec.block_size, spec.kind)
