"""MFU on two one-CPU Ray nodes of this one machine (issue 14: it read 104-110% there).

A head with no CPUs and two worker nodes with one CPU each (separate raylets on loopback, as
Ray's own tests build clusters), one training worker on each, a tiny Llama, DDP, 8 steps logged
every step. MFU's denominator is the peak of the hardware the ranks use: each rank measures alone,
and ranks on one machine count it once at most. Writes the per-step MFU, the peaks and where the
workers ran.

    .venv/bin/python benchmarks/mfu_two_nodes.py [--steps 8] [--out benchmarks/results/mfu_two_nodes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mfu_two_nodes.json"))
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from conftest import trainer_state
    from lmflow_ray.config import load_recipe
    from lmflow_ray.ray_init import WORKER_ENV
    from lmflow_ray.storage import S3Options, list_checkpoints
    from lmflow_ray.train.observe import measure_matmul_peak
    from lmflow_ray.train.trainer import run
    from tiny import save_tiny

    import torch

    work = Path(tempfile.mkdtemp(prefix="lmflow-mfu-"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        model = save_tiny(work / "model", layers=4, hidden=128)
        data = json.loads((REPO / "jobs/data/support_orders/train/train.json").read_text())
        (work / "data").mkdir()
        (work / "data" / "orders.json").write_text(json.dumps({"type": "conversation", "instances": data["instances"][:400]}))
        recipe = load_recipe(None, [f"model_name_or_path={model}", f"dataset_path={work / 'data'}",
                                    "conversation_template=chatml", "block_size=256", "num_workers=2",
                                    "per_device_train_batch_size=4", "logging_steps=1", f"max_steps={args.steps}",
                                    f"save_steps={args.steps}", f"output_model_path={work / 'runs'}", "run_name=mfu"])
        result = run(recipe, progress=False, say=lambda line: print(line, flush=True))
        history = trainer_state(list_checkpoints(result.run_uri, S3Options())[-1], S3Options())["log_history"]
        torch.set_num_threads(1)
        one_core = measure_matmul_peak(torch.device("cpu"), torch.float32)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        all_cores = measure_matmul_peak(torch.device("cpu"), torch.float32)
    finally:
        ray.shutdown()
        cluster.shutdown()
    mfu = [h["mfu"] for h in history]
    out = {
        "command": "python benchmarks/mfu_two_nodes.py", "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)), "nodes": "head (0 CPUs) + 2 nodes x 1 CPU, one training worker each",
        "steps": len(mfu), "mfu_per_step": [round(m, 4) for m in mfu], "mfu_max": round(max(mfu), 4),
        "mfu_median": round(sorted(mfu)[len(mfu) // 2], 4),
        "gflops_per_s_per_step": [round(h["flops_per_s"] / 1e9, 2) for h in history],
        "peak_gflops_used_for_mfu": round(history[-1]["peak_flops_per_s"] / 1e9, 2),
        "matmul_peak_gflops_one_core_after": round(one_core / 1e9, 2),
        "matmul_peak_gflops_all_cores_after": round(all_cores / 1e9, 2),
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
