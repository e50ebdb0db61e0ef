"""Data into the training workers: streaming against packing every row first, on a generated chat
set 20x the shipped one (40,000 support e-mails), training the embedded SmolLM2-135M-Instruct with
LoRA on one Ray Train worker of a 2-CPU local cluster.

    .venv/bin/python benchmarks/streaming_ingest.py [--scale 20] [--steps 6] [--repeats 2] [--out benchmarks/results/streaming_ingest.json]

Three ways, the same steps in the same row order (each run twice, the second round reported):
- ``pack first``: every row packed (and kept in the object store) before the workers start:
  lmflow-ray's way before the feed, and still its way when the epochs must be counted or every
  CPU goes to a worker (forced here by telling the trainer no CPU is spare);
- ``stream (max_steps)``: the rows are packed while the workers start and train, and kept as read;
- ``data.streaming``: the same, keeping no rows (each epoch reads the pipeline again).

Time to the first optimizer step is from the call to train.run to step 1's log entry (its
wall_time): Ray Train's start and the model's load are in it for every way; ``before_workers_s``
is the part before the workers start (the data line: the plan is made). Peak object-store
memory is polled from Ray's memory summary every 0.5 s. Steady-state tokens/s is the mean over
the steps after the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from lmflow_ray.config import load_recipe  # noqa: E402
from lmflow_ray.storage import latest_checkpoint  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from data_pipeline import make_rows  # noqa: E402

WAYS = ("pack first", "stream (max_steps)", "data.streaming")


class StorePeak:
    """The object store's peak use on the cluster, polled from Ray's memory summary."""

    def __init__(self) -> None:
        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        from ray._private.internal_api import memory_summary

        while not self.stop.is_set():
            try:
                text = memory_summary(stats_only=True)
                used = sum(float(m) for m in re.findall(r"Plasma memory usage ([\d.]+) MiB", text))
                self.peak = max(self.peak, used)
            except Exception:
                pass
            self.stop.wait(0.5)

    def end(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


def one(way: str, data: Path, steps: int, out: str) -> dict:
    from lmflow_ray.train import trainer

    recipe = load_recipe(REPO / "jobs" / "finetune_lora.yaml", [
        f"dataset_path={data}", "num_workers=1", "per_device_train_batch_size=1", "gradient_accumulation_steps=1",
        f"max_steps={steps}", "logging_steps=1", f"save_steps={steps}", f"output_model_path={out}",
        "lora_dropout=0.0", f"streaming={'true' if way == 'data.streaming' else 'false'}"])
    spare = trainer.spare_cpus
    if way == "pack first":
        trainer.spare_cpus = lambda _recipe: 0.0
    lines: list[tuple[float, str]] = []
    peak = StorePeak()
    started = time.time()
    try:
        result = trainer.run(recipe, name_prefix="bench-stream", progress=False,
                             say=lambda line: lines.append((time.time() - started, line)))
    finally:
        trainer.spare_cpus = spare
        store = peak.end()
    ckpt = latest_checkpoint(result.run_uri, None)
    state = json.loads((Path(ckpt.uri) / "trainer_state.json").read_text())
    history = state["log_history"]
    planned = next((at, line) for at, line in lines if line.startswith("data: ") and "packed rows" in line)
    return {"way": way, "first_step_s": history[0]["wall_time"] - started,
            "before_workers_s": planned[0],  # the data line: the plan is made, the workers start
            "run_s": history[-1]["wall_time"] - started, "object_store_peak_mib": store,
            "steady_tokens_per_s": statistics.mean(h["tokens_per_s"] for h in history[2:]),
            "losses": [round(h["loss"], 4) for h in history], "rows_trained": state["rows"],
            "data_line": planned[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=20, help="times the shipped 2,000 e-mails")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three ways; the last is reported")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "streaming_ingest.json"))
    args = parser.parse_args()

    from lmflow_ray.ray_init import connect, quiet_data_logs

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    data = work / "emails.jsonl"
    make_rows(2000 * args.scale, data, seed=11)  # the set the README's figures were measured on
    connect(num_cpus=os.cpu_count())
    quiet_data_logs()
    rounds = []
    for _ in range(args.repeats):  # the first round also warms the caches (files, worker processes)
        rounds.append([])
        for way in WAYS:
            row = one(way, data, args.steps, str(work / "runs"))
            print(json.dumps(row), flush=True)
            rounds[-1].append(row)
    results = rounds[-1]
    base = results[0]
    for row in results:
        row["first_step_vs_pack_first"] = row["first_step_s"] / base["first_step_s"]
        row["tokens_per_s_vs_pack_first"] = row["steady_tokens_per_s"] / base["steady_tokens_per_s"]
    same = all(r["losses"] == base["losses"] for r in results)
    report = {"benchmark": "streaming_ingest", "samples": 2000 * args.scale, "steps": args.steps,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "same_losses_every_way": same, "results": results, "earlier_rounds": rounds[:-1]}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({r["way"]: {k: round(r[k], 3) for k in ("first_step_s", "first_step_vs_pack_first", "before_workers_s",
                                                               "object_store_peak_mib", "steady_tokens_per_s",
                                                               "tokens_per_s_vs_pack_first")} for r in results},
                     indent=1))
    print(f"same losses every way: {same}")


if __name__ == "__main__":
    main()
