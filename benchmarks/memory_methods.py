"""Peak memory and step time of full fine-tuning, LoRA, QLoRA and LISA on the embedded
SmolLM2-135M-Instruct, with one Ray Train worker and with two, on the shipped support-e-mail task
(Aquila2 publishes the same kind of table for its 7B/34B models).

    .venv/bin/python benchmarks/memory_methods.py [--steps 6] [--block_size 512]
        [--out benchmarks/results/memory_methods.json]

Every run is a real `lmflow-ray train` (recipe jobs/finetune_lora.yaml, plain DDP so the methods
are compared without ZeRO's partitioning, plus ZeRO-2 rows for full and LISA with two workers),
batch 1 per worker, fp32. Peak memory is the highest worker's during the training steps: on a GPU
torch's allocator peak; on CPU the worker's resident size sampled every 20 ms (weights, gradients,
optimizer state, activations, and the Python/torch/Ray process itself). So that the
resident size follows what is in use, the workers run with glibc's static allocator thresholds
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 128 KiB): freed tensors go back to the system
instead of staying in the heap. Optimizer state is counted exactly from the optimizer's tensors. Step time is the median after the first step. Writes JSON
and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from lmflow_ray.config import load_recipe  # noqa: E402
from lmflow_ray.storage import latest_checkpoint  # noqa: E402

ALL_LINEAR = "lora_target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
METHODS = {
    "full": ["use_lora=false"],
    "LoRA": ["use_lora=true", "lora_r=16", "lora_alpha=32", "lora_dropout=0.0", ALL_LINEAR],
    "QLoRA (4-bit nf4)": ["use_qlora=true", "quant_bit=4", "lora_r=16", "lora_alpha=32", "lora_dropout=0.0", ALL_LINEAR],
    "LISA (2 of 30 blocks)": ["use_lora=false", "use_lisa=true", "lisa_activated_layers=2", "lisa_interval_steps=2"],
}
RUNS = [(method, workers, None) for workers in (1, 2) for method in METHODS] + [
    ("full", 2, "zero2"), ("LISA (2 of 30 blocks)", 2, "zero2")]


def one_run(method: str, workers: int, deepspeed: str | None, args, out: str) -> dict:
    from lmflow_ray.train.trainer import run

    recipe = load_recipe(REPO / "jobs" / "finetune_lora.yaml", [
        *METHODS[method], f"num_workers={workers}", f"deepspeed={deepspeed or ''}", f"block_size={args.block_size}",
        f"max_steps={args.steps}", "per_device_train_batch_size=1", "gradient_accumulation_steps=1",
        "logging_steps=1", f"save_steps={args.steps}", "warmup_steps=0", "learning_rate=1e-4",
        "gradient_checkpointing=false", f"output_model_path={out}", "save_total_limit=1", "max_failures=0"])
    started = time.perf_counter()
    result = run(recipe, name_prefix="bench-memory", progress=False, say=lambda _: None)
    wall = time.perf_counter() - started
    log = json.loads((Path(latest_checkpoint(result.run_uri).uri) / "trainer_state.json").read_text())["log_history"]
    timed = log[1:]
    return {"method": method, "workers": workers, "strategy": f"DeepSpeed {deepspeed}" if deepspeed else "DDP",
            "peak_memory_mb": max(h["peak_memory_mb"] for h in log),
            "optimizer_state_mb": max(h["optimizer_state_mb"] for h in log),
            "step_time_s": statistics.median(h["step_time"] for h in timed),
            "tokens_per_s": statistics.median(h["tokens_per_s"] for h in timed),
            "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "steps": len(log), "wall_s": wall}


def markdown(report: dict) -> str:
    rows = report["results"]
    full = {(r["workers"], r["strategy"]): r["peak_memory_mb"] for r in rows if r["method"] == "full"}
    lines = [
        f"# Memory and speed by method: {report['model']}", "",
        f"{report['machine']['cpus']} CPUs, {report['device']}, block_size {report['block_size']}, batch 1 per worker, "
        f"fp32, {report['steps']} steps (step time: median after the first).", "",
        "| method | workers | strategy | peak memory per worker | vs full | optimizer state | step time | tokens/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = full.get((r["workers"], r["strategy"]))
        ratio = f"{r['peak_memory_mb'] / base:.0%}" if base else "-"
        lines.append(f"| {r['method']} | {r['workers']} | {r['strategy']} | {r['peak_memory_mb'] / 1024:.2f} GB | {ratio} | "
                     f"{r['optimizer_state_mb']:,.0f} MB | {r['step_time_s']:.2f} s | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--only", default=None, help="run only methods whose name starts with this")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory_methods.json"))
    args = parser.parse_args()

    import torch

    from lmflow_ray.ray_init import connect, quiet_data_logs

    os.environ.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")  # inherited by the workers
    connect(num_cpus=4)
    quiet_data_logs()
    out_dir = tempfile.mkdtemp(prefix="bench-memory-")
    results = []
    for method, workers, deepspeed in RUNS:
        if args.only and not method.startswith(args.only):
            continue
        row = one_run(method, workers, deepspeed, args, out_dir)
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {"benchmark": "memory_methods", "model": "SmolLM2-135M-Instruct (embedded)", "block_size": args.block_size,
              "steps": args.steps, "device": "CUDA GPU" if torch.cuda.is_available() else "CPU",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
