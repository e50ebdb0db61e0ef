"""Compile DeepSpeed's C++ ops for this machine once, at set-up (`make ops`), not inside a run.

deepspeed ships as pure Python; CPUAdam (optimizer offload) and the shared-memory collectives
build on first use (about 90 s and 40 s here) and are cached in ~/.cache/torch_extensions. Each op
builds in its own process, side by side (each compile uses one core).
"""

from __future__ import annotations

import subprocess
import sys
import time

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def build(name: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builder = accelerator.create_op_builder(name)
    if builder is None or not builder.is_compatible(verbose=False):
        print(f"{name}: not used on {accelerator.device_name()}", file=sys.stderr)
        return
    started = time.time()
    builder.load(verbose=False)
    print(f"{name}: ready ({time.time() - started:.0f} s)", file=sys.stderr)


def warm() -> int:
    jobs = [subprocess.Popen([sys.executable, "-m", "lmflow_ray.train.ops", name]) for name in OPS]
    failed = [name for name, job in zip(OPS, jobs) if job.wait() != 0]
    if failed:
        print(f"failed to build: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        build(sys.argv[1])
    else:
        sys.exit(warm())
