"""Compile DeepSpeed's C++ ops for this machine once, at set-up (`make ops`), not inside a run.

deepspeed ships as pure Python; CPUAdam (optimizer offload) and the shared-memory collectives
build on first use (about 90 s and 40 s here) and are cached in ~/.cache/torch_extensions.
"""

from __future__ import annotations

import sys
import time

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def warm() -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"{name}: not used on {accelerator.device_name()}", file=sys.stderr)
            continue
        started = time.time()
        builder.load(verbose=False)
        print(f"{name}: ready ({time.time() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    warm()
