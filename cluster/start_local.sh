#!/usr/bin/env bash
# Start a single-node Ray cluster on loopback for `ray job submit` and `lmflow-ray ... --address`.
#   cluster/start_local.sh            # head on 127.0.0.1, dashboard on http://127.0.0.1:8265
#   .venv/bin/ray stop                # stop it
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # bind every Ray socket to 127.0.0.1
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184
export PATH="$PWD/.venv/bin:$PATH"           # `ray job submit -- lmflow-ray ...` finds the CLI
exec .venv/bin/ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
  --num-cpus="${NUM_CPUS:-$(nproc)}" "$@"
