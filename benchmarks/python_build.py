"""What the interpreter's build does to lmflow-ray's fixed costs.

Much of a small job's time on a few cores is Python itself: imports in every Ray worker (torch,
transformers, peft, Ray Train), Ray's own Python side and the driver. Debian's python3.11 (one
static executable, built optimized) runs that faster than pyenv's default build (a small
launcher over a position-independent libpython.so). `make install` makes the venv from Debian's python3.11 where the system
has one; this measures the difference, each venv given made from one interpreter.

    python benchmarks/python_build.py VENV [VENV ...] [--repeats 3] [--out benchmarks/results/python_build.json]

e.g. one venv from `make install PYTHON=python3 VENV=/tmp/venv-pyenv` and the project's own .venv.
Per venv: a pure-Python loop, the CPU seconds of importing what a training worker imports (the
best of --repeats fresh processes), and a small fit on a local Ray cluster (tiny Llama, LoRA,
ZeRO-2, 2 workers, 2 steps): the second of two fits on one cluster, as tests and notebooks run
them (the first also rebuilds DeepSpeed's cached ops when another venv built them last), and the
cluster's start. Ratios are against the first venv given.
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

LOOP = """
import time
started = time.perf_counter()
s = 0
for i in range(10_000_000):
    s += i * 2
print(time.perf_counter() - started)
"""

IMPORTS = """
import resource
import torch, transformers.modeling_utils, peft, deepspeed, ray.train.torch
from transformers.models.llama import modeling_llama
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_utime + usage.ru_stime)
"""

FIT = """
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from tiny import save_tiny
from lmflow_ray.config import load_recipe
from lmflow_ray.ray_init import WORKER_ENV, start_local
from lmflow_ray.train.trainer import run
out = Path(tempfile.mkdtemp(prefix="python-build-"))
model = save_tiny(out / "tiny")
rows = json.loads(Path(sys.argv[1], "jobs/data/support_orders/train/train.json").read_text())["instances"][:240]
(out / "data").mkdir()
(out / "data" / "orders.json").write_text(json.dumps({"type": "conversation", "instances": rows}))
started = time.perf_counter()
start_local(num_cpus=4, include_dashboard=False, object_store_memory=384 << 20,
            _temp_dir=tempfile.mkdtemp(prefix="lr-ray-"), runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
times = {"ray_start_s": time.perf_counter() - started}
for i in range(2):
    recipe = load_recipe(None, [f"model_name_or_path={model}", f"dataset_path={out / 'data'}",
                                "conversation_template=chatml", "block_size=256", "num_workers=2",
                                "per_device_train_batch_size=2", "use_lora=true", "deepspeed=zero2", "max_steps=2",
                                "save_steps=2", f"output_model_path={out / 'runs'}", f"run_name=fit{i}"])
    started = time.perf_counter()
    run(recipe, say=lambda line: None, progress=False)
    times[f"fit_{i}_s"] = time.perf_counter() - started
print(json.dumps(times))
"""


def python_of(venv: str) -> str:
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{venv}: no bin/python (give a venv folder)")
    return str(python)


def probe(python: str, code: str, *args: str) -> str:
    env = {**os.environ, "GOMP_SPINCOUNT": "1000", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{python}: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def measure(venv: str, repeats: int) -> dict:
    python = python_of(venv)
    info = json.loads(probe(python, "import json, os, platform, sys; print(json.dumps({'version': platform.python_version(), "
                                    "'exe': os.path.realpath(sys.executable)}))"))
    linked = subprocess.run(["ldd", info["exe"]], capture_output=True, text=True).stdout
    loop = min(float(probe(python, LOOP)) for _ in range(repeats))
    imports = min(float(probe(python, IMPORTS)) for _ in range(repeats))
    fit = json.loads(probe(python, FIT, str(REPO)))
    return {"venv": Path(venv).name, "python": info["version"], "libpython_shared": "libpython" in linked,
            "loop_s": round(loop, 3), "imports_cpu_s": round(imports, 2),
            **{k: round(v, 1) for k, v in fit.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venvs", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/python_build.json"))
    args = parser.parse_args()
    rows = []
    for venv in args.venvs:
        row = measure(venv, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    first = rows[0]
    for row in rows:
        row["vs_first"] = {k: round(row[k] / first[k], 2) for k in ("loop_s", "imports_cpu_s", "ray_start_s", "fit_1_s")}
    result = {"benchmark": "python_build", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "command": "python benchmarks/python_build.py " + " ".join(Path(v).name for v in args.venvs), "rows": rows,
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'venv':<28} {'python':<8} {'loop s':>7} {'imports cpu s':>14} {'ray start s':>12} {'fit s':>6}")
    for row in rows:
        print(f"{row['venv']:<28} {row['python']:<8} {row['loop_s']:>7.2f} {row['imports_cpu_s']:>14.2f} "
              f"{row['ray_start_s']:>12.1f} {row['fit_1_s']:>6.1f}   x{row['vs_first']['fit_1_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
