"""What OpenMP's wait policy does to torch processes that share a CPU's cores.

Each process trains a tiny Llama (4 blocks, width 64, 2 x 256 tokens) for a number of steps with
as many torch threads as the machine has cores, the default. It runs alone and with others beside
it under three policies: libgomp's default (idle threads spin 300,000 rounds after each parallel
region), GOMP_SPINCOUNT=1000 (what lmflow-ray sets for itself, its Ray workers and `make test`),
and OMP_WAIT_POLICY=PASSIVE (no spinning).

    .venv/bin/python benchmarks/omp_wait_policy.py [--steps 40] [--procs 1,2,3] [--out benchmarks/results/omp_wait_policy.json]

Seconds per process (the slowest of a group) and each policy against the default per group size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STEPS = """
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2))
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x = torch.randint(0, 512, (2, 256))
started = time.perf_counter()
for _ in range(int(sys.argv[1])):
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
print(time.perf_counter() - started)
"""


POLICIES = {"default": {}, "spin_1000": {"GOMP_SPINCOUNT": "1000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def group(procs: int, steps: int, policy: dict[str, str]) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(policy)
    running = [subprocess.Popen([sys.executable, "-c", STEPS, str(steps)], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in running]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--procs", default="1,2,3")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/omp_wait_policy.json"))
    args = parser.parse_args()
    rows = []
    for procs in [int(p) for p in args.procs.split(",")]:
        row = {"processes": procs}
        for name, policy in POLICIES.items():
            seconds = group(procs, args.steps, policy)
            row[f"{name}_s"] = round(max(seconds), 2)
            print(f"{procs} process(es), {name}: {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
        for name in ("spin_1000", "passive"):
            row[f"{name}_speedup"] = round(row["default_s"] / row[f"{name}_s"], 2)
        rows.append(row)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "command": "benchmarks/omp_wait_policy.py " + " ".join(sys.argv[1:]), "steps": args.steps,
           "torch_threads_per_process": os.cpu_count(), "when": time.strftime("%Y-%m-%d"), "groups": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
