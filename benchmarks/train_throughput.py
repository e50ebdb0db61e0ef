"""Training throughput of the embedded SmolLM2-135M-Instruct on the shipped support-e-mail task:
tokens/s and MFU for LoRA and full fine-tuning, packed rows vs LMFlow-style pad-to-block, and Ray
Train (2 workers, DeepSpeed ZeRO-2) vs a plain single-process HF Trainer on the same token rows.

    .venv/bin/python benchmarks/train_throughput.py [--steps 5] [--out benchmarks/results/train_throughput.json]

tokens/s counts real tokens only (padding is work that teaches nothing). MFU divides model FLOPs/s
(PaLM's formula, see lmflow_ray/train/observe.py) by a bf16/fp32 matmul peak this script measures
on this machine with all its cores. Step 1 of every run is left out (warm-up).
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
from lmflow_ray.data.packing import collate  # noqa: E402
from lmflow_ray.storage import latest_checkpoint  # noqa: E402
from lmflow_ray.train.observe import flops_per_token, measure_matmul_peak  # noqa: E402

LORA = ["use_lora=true", "lora_r=16", "lora_alpha=32", "lora_dropout=0.0",
        "lora_target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]


def recipe(method: str, packing: bool, steps: int, out: str):
    return load_recipe(REPO / "jobs" / "finetune_lora.yaml", [
        *(LORA if method == "lora" else ["use_lora=false"]), f"packing={str(packing).lower()}",
        f"max_steps={steps}", "per_device_train_batch_size=1", "logging_steps=1", f"save_steps={steps}",
        "deepspeed=zero2", "warmup_steps=0", "learning_rate=1e-4", f"output_model_path={out}",
        "gradient_checkpointing=false", "save_total_limit=1", "max_failures=0"])


def ray_run(method: str, packing: bool, steps: int, out: str, machine_peak: float) -> dict:
    from lmflow_ray.train.trainer import run

    r = recipe(method, packing, steps, out)
    started = time.perf_counter()
    result = run(r, name_prefix=f"bench-{method}-{'packed' if packing else 'pad'}", progress=False, say=lambda _: None)
    wall = time.perf_counter() - started
    ckpt = latest_checkpoint(result.run_uri)
    history = json.loads((Path(ckpt.uri) / "trainer_state.json").read_text())["log_history"][1:]
    tps = statistics.median(h["tokens_per_s"] for h in history)
    flops = statistics.median(h["flops_per_s"] for h in history)
    return {"runner": "Ray Train, 2 workers, ZeRO-2", "method": method, "layout": "packed" if packing else "pad-to-block",
            "steps_timed": len(history), "tokens_per_s": tps, "step_time_s": statistics.median(h["step_time"] for h in history),
            "mfu": flops / machine_peak, "loss_last": history[-1]["loss"], "wall_s_with_setup": wall}


def hf_run(method: str, packing: bool, steps: int, machine_peak: float) -> dict:
    """transformers.Trainer in this process (2 threads) on the same packed (or padded) rows."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lmflow_ray.data.pipeline import build_dataset
    from lmflow_ray.data.tokenize import load_tokenizer
    from lmflow_ray.model.adapters import apply_lora
    from lmflow_ray.model.load import load_model, matmul_parameters

    r = recipe(method, packing, steps, tempfile.mkdtemp())
    rows = build_dataset(r).take(2 * steps)  # as many rows as the 2 Ray workers used
    tok = load_tokenizer(r.model.model_name_or_path)
    pad_to = None if packing else r.data.block_size
    model = load_model(r.model)
    if r.model.use_lora:
        model = apply_lora(model, r.model)
    cfg, n_matmul = model.config, matmul_parameters(model)

    def collate_fn(batch):
        arrays = collate(batch, tok.pad_token_id, pad_to)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    class Timer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    torch.set_num_threads(os.cpu_count())
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, max_steps=steps,
                             learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                             remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, lr_scheduler_type="cosine")
    timer = Timer()
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate_fn, callbacks=[timer]).train()
    per_step_tokens = [sum(len(x["input_ids"]) for x in rows[2 * i: 2 * i + 2]) for i in range(steps)]
    widths = [pad_to or max(len(x["input_ids"]) for x in rows[2 * i: 2 * i + 2]) for i in range(steps)]
    tps = [t / s for t, s in zip(per_step_tokens[1:], timer.times[1:])]
    flops = [t * flops_per_token(n_matmul, r.model.use_lora, cfg.num_hidden_layers, cfg.hidden_size, w) / s
             for t, w, s in zip(per_step_tokens[1:], widths[1:], timer.times[1:])]
    return {"runner": "HF Trainer, 1 process", "method": method, "layout": "packed" if packing else "pad-to-block",
            "steps_timed": steps - 1, "tokens_per_s": statistics.median(tps),
            "step_time_s": statistics.median(timer.times[1:]), "mfu": statistics.median(flops) / machine_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args()

    import torch

    from lmflow_ray.ray_init import connect, quiet_data_logs

    torch.set_num_threads(os.cpu_count())
    machine_peak = measure_matmul_peak(torch.device("cpu"), torch.float32, size=2048, repeats=6)
    print(f"fp32 matmul peak, {os.cpu_count()} threads: {machine_peak / 1e9:.1f} GFLOP/s", flush=True)
    connect(num_cpus=4)
    quiet_data_logs()
    out_dir = tempfile.mkdtemp(prefix="bench-train-")
    results = []
    for method in ("lora", "full"):
        for packing in (True, False):
            row = ray_run(method, packing, args.steps, out_dir, machine_peak)
            print(json.dumps(row), flush=True)
            results.append(row)
    for packing in (True, False):
        row = hf_run("lora", packing, args.steps, machine_peak)
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {"benchmark": "train_throughput", "model": "SmolLM2-135M-Instruct (embedded)", "block_size": 1024,
              "rows_per_step": 2, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                              "fp32_matmul_peak_gflops": machine_peak / 1e9},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
