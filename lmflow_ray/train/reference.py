"""DPO's reference log-probs, computed once before training, so no second model is ever resident in
the training workers (TRL's ``precompute_ref_log_probs``, as a Ray Data pass over the cluster).

Model actors score the packed pair rows (every side's summed log-prob over its trained tokens,
the number the DPO loss compares against) and the results are kept in the run folder as
``reference_logps.json``, keyed by each row's content: a resumed run, or one restarted after a
crash, reads them back instead of scoring again. The rows then carry a ``ref_logps`` column that
the DPO objective reads.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

import numpy as np

from lmflow_ray import storage
from lmflow_ray.config import Recipe

REFERENCE_FILE = "reference_logps.json"


def row_key(input_ids: Any, lengths: Any) -> str:
    """A packed row's identity: its tokens and how they split into segments."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(lengths, dtype=np.int64).tobytes())
    return h.hexdigest()


class ReferenceScorer:
    """A Ray Data actor: the reference model (the run's starting weights) in eval mode, giving
    every segment of a batch of rows its summed log-prob."""

    def __init__(self, recipe: dict, folder_uri: str, s3: dict, batch_size: int, threads: int):
        import torch

        from lmflow_ray.data.tokenize import load_tokenizer
        from lmflow_ray.model.load import load_model
        from lmflow_ray.model.locate import model_folder

        torch.set_num_threads(max(1, threads))
        self.recipe = Recipe.model_validate(recipe)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        folder = model_folder(folder_uri, s3)
        self.pad_id = load_tokenizer(folder, self.recipe.model.trust_remote_code).pad_token_id
        # The dtype the training forward runs in: bf16 autocast on a GPU with --bf16, else fp32.
        model = load_model(self.recipe.model, device=self.device, s3=s3, folder=folder)
        self.model = model.to(self.device).eval()
        self.bf16 = self.recipe.train.bf16 and self.device.type == "cuda"
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from lmflow_ray.train.objectives import collate_pairs, segment_logps

        keys, logps = [], []
        rows = len(batch["input_ids"])
        for start in range(0, rows, self.batch_size):
            part = {k: batch[k][start:start + self.batch_size] for k in ("input_ids", "labels", "lengths")}
            arrays = collate_pairs(part, self.pad_id)
            inputs = {k: torch.from_numpy(arrays[k]).to(self.device) for k in ("input_ids", "position_ids", "labels", "segments")}
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                    attention_mask=None, use_cache=False).logits
                sums, _ = segment_logps(logits, inputs["labels"], inputs["segments"], len(arrays["ends"]))
            sums = sums.double().cpu().numpy()
            at = 0
            for ids, lengths in zip(part["input_ids"], part["lengths"]):
                keys.append(row_key(ids, lengths))
                logps.append(sums[at:at + len(lengths)].tolist())
                at += len(lengths)
        return {"key": keys, "ref_logps": logps}


def add_reference(batch: dict[str, Any], table: dict[str, list[float]]) -> dict[str, Any]:
    """Puts each row's reference log-probs on it (a row the table lacks is a bug: it stops)."""
    batch["ref_logps"] = [np.asarray(table[row_key(ids, lengths)], dtype=np.float64)
                          for ids, lengths in zip(batch["input_ids"], batch["lengths"])]
    return batch


def reference_table(datasets: list, recipe: Recipe, base_uri: str, run_uri: str, s3: dict,
                    say: Callable[[str], None]) -> dict[str, list[float]]:
    """Reference log-probs for every row of ``datasets`` (materialised pair rows): read from the
    run folder when it holds them for this base, else scored by model actors and written there."""
    import ray

    where = storage.join(run_uri, REFERENCE_FILE)
    raw = storage.read_bytes(where, s3)
    table: dict[str, list[float]] = {}
    if raw:
        saved = json.loads(raw)
        if saved.get("model") == base_uri:
            table = saved["rows"]
    wanted = [ds for ds in datasets]
    # Keys are made where the rows are; only they come to the driver.
    missing = sum(1 for ds in wanted for row in ds.map_batches(_keys, batch_format="numpy").iter_rows()
                  if row["key"] not in table)
    if not missing:
        say(f"reference log-probs: {len(table):,} rows, read from {where}")
        return table
    started = time.perf_counter()
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0)) if recipe.train.use_gpu is not False else 0
    workers = max(1, min(recipe.train.max_workers, gpus or int(res.get("CPU", 1))))
    cpus = 1.0 if gpus else max(1.0, float(int(res.get("CPU", 1)) // workers))
    batch = recipe.train.per_device_eval_batch_size or recipe.train.per_device_train_batch_size
    say(f"reference log-probs: scoring {missing:,} rows with {workers} copies of {base_uri} (once; kept in {where})")
    for ds in wanted:
        scored = ds.map_batches(ReferenceScorer, fn_constructor_kwargs=dict(
            recipe=recipe.model_dump(), folder_uri=base_uri, s3=s3, batch_size=batch, threads=int(cpus)),
            batch_size=max(batch, 8), concurrency=workers, batch_format="numpy", max_restarts=0,
            num_cpus=0 if gpus else cpus, num_gpus=1 if gpus else 0)
        for row in scored.iter_rows():
            table[row["key"]] = [float(x) for x in row["ref_logps"]]
    storage.write_bytes(where, json.dumps({"model": base_uri, "rows": table}).encode(), s3)
    say(f"reference log-probs: {len(table):,} rows in {time.perf_counter() - started:.1f}s")
    return table


def with_reference(ds: Any, table: dict[str, list[float]]) -> Any:
    """The rows with a ``ref_logps`` column, in the same order, materialised."""
    ds = ds.map_batches(add_reference, fn_kwargs={"table": table}, batch_format="numpy", batch_size=256)
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def _keys(batch: dict[str, Any]) -> dict[str, Any]:
    return {"key": [row_key(ids, lengths) for ids, lengths in zip(batch["input_ids"], batch["lengths"])]}
