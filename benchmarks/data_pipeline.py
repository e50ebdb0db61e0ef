"""Throughput of the data pipeline: Ray Data vs `datasets.map` (one process, and num_proc = all
cores) on the same chat rows, doing the same work per row (validate -> chat template -> tokenize ->
labels -> pack into block_size rows). Also the time until the first packed batch is ready.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 100000] [--out benchmarks/results/data_pipeline.json]

Ray's cluster start is reported apart; each Ray run starts cold workers (tokenizer loads included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmflow_ray.config import load_recipe  # noqa: E402
from lmflow_ray.data.formats import check_instance  # noqa: E402
from lmflow_ray.data.pipeline import Spec, plan, process, to_ray  # noqa: E402


def make_rows(n: int, path: Path, seed: int = 7) -> None:
    """n support e-mails with their answers (the demo task's generator, another seed), one JSON a line."""
    spec = importlib.util.spec_from_file_location("gen", REPO / "jobs" / "data" / "make_support_orders.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            text, answer = gen.email(rng)
            f.write(json.dumps(gen.instance(text, answer)) + "\n")


def hf_map_fn(spec: Spec):
    def fn(batch):
        instances = [check_instance("conversation", {"system": s, "messages": m})
                     for s, m in zip(batch["system"], batch["messages"])]
        return process(instances, spec)

    return fn


def run_datasets(path: Path, spec: Spec, num_proc: int | None, batch_size: int) -> dict:
    import datasets

    datasets.disable_caching()
    datasets.logging.set_verbosity_error()
    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    loaded = time.perf_counter()
    out = ds.map(hf_map_fn(spec), batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                 num_proc=num_proc, keep_in_memory=True, desc=f"datasets.map num_proc={num_proc or 1}")
    done = time.perf_counter()
    return {"seconds": done - started, "load_seconds": loaded - started, "first_batch_seconds": done - started,
            "packed_rows": len(out), "tokens": int(sum(len(x) for x in out["input_ids"]))}


def run_ray(recipe, batch_size: int) -> dict:
    source, spec = plan(recipe)
    started = time.perf_counter()
    ds = to_ray(source, spec, batch_size)
    first = None
    rows = tokens = 0
    import pyarrow.compute as pc

    # A light consumer (Arrow counts, no per-row Python) so the driver leaves the cores to Ray.
    for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
        if first is None:
            first = time.perf_counter() - started
        rows += batch.num_rows
        tokens += int(pc.sum(pc.list_value_length(batch["input_ids"])).as_py())
    return {"seconds": time.perf_counter() - started, "first_batch_seconds": first, "packed_rows": rows,
            "tokens": tokens, "shards": len(source.shards)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per tokenize/pack batch, both sides")
    parser.add_argument("--template", default="chatml", help="chatml renders SmolLM2's own format (system given)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_pipeline.json"))
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="lmflow-bench-"))
    path = work / "chat.jsonl"
    print(f"making {args.rows:,} chat rows in {path} ...", file=sys.stderr)
    make_rows(args.rows, path)
    recipe = load_recipe(None, [f"dataset_path={path}", "model_name_or_path=default", f"conversation_template={args.template}",
                                f"block_size={args.block_size}", f"preprocessing_batch_size={args.batch_size}"])
    _, spec = plan(recipe)

    results: dict[str, dict] = {}
    for name, num_proc in (("datasets.map, 1 process", None), (f"datasets.map, num_proc={cores}", cores)):
        print(f"{name} ...", file=sys.stderr)
        results[name] = run_datasets(path, spec, num_proc, args.batch_size)

    from lmflow_ray.ray_init import connect, quiet_data_logs

    t = time.perf_counter()
    connect()
    quiet_data_logs()
    ray_start = time.perf_counter() - t
    for attempt in ("cold", "warm"):
        print(f"Ray Data ({attempt} workers) ...", file=sys.stderr)
        results[f"Ray Data ({attempt} workers)"] = run_ray(recipe, args.batch_size)

    for r in results.values():
        r["rows_per_second"] = args.rows / r["seconds"]
    out = {
        "benchmark": "data_pipeline",
        "rows": args.rows,
        "block_size": args.block_size,
        "template": args.template,
        "model": "default (SmolLM2-135M-Instruct tokenizer)",
        "machine": {"cpus": cores, "python": platform.python_version(), "platform": platform.platform()},
        "ray_cluster_start_seconds": ray_start,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{'method':<34}{'rows/s':>10}{'total s':>10}{'first batch s':>15}")
    for name, r in results.items():
        print(f"{name:<34}{r['rows_per_second']:>10,.0f}{r['seconds']:>10.1f}{r['first_batch_seconds']:>15.1f}")
    print(f"(Ray cluster start {ray_start:.1f} s, not included)  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
