"""What one target forward costs for 1 to 16 new positions over a filled KV cache: the price of a
speculative verify step against a plain decode step, for the embedded SmolLM2-135M-Instruct in
fp32 and bf16, on one thread (as the serving benchmarks run).

    .venv/bin/python benchmarks/verify_cost.py [--cache 180] [--out benchmarks/results/verify_cost.json]

Per dtype and width: the median of the forward times in ms, and that over the one-position time.
On CPUs with AVX512-BF16 or AMX, bf16 matmuls with a few rows cost little more than one row; fp32
ones pay for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=int, default=180, help="tokens already in the KV cache")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "verify_cost.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from lmflow_ray.embedded import resolve_model_path

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = resolve_model_path("default")
    widths = [1, 2, 4, 7, 10, 16]
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        prompt = torch.randint(100, 40000, (1, args.cache))
        with torch.inference_mode():
            cache = model(prompt, use_cache=True).past_key_values
            times = {}
            for n in widths:
                step = torch.randint(100, 40000, (1, n))
                samples = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    model(step, past_key_values=cache, use_cache=True)
                    samples.append(time.perf_counter() - started)
                    cache.crop(-n)  # back to the prompt alone
                times[n] = statistics.median(samples) * 1000
        for n in widths:
            rows.append({"dtype": dtype, "positions": n, "ms": round(times[n], 1), "over_one": round(times[n] / times[1], 2)})
            print(json.dumps(rows[-1]), flush=True)
        del model
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": "SmolLM2-135M-Instruct",
              "cache_tokens": args.cache, "threads": 1, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.tmp").write_text(json.dumps(result, indent=1))
    os.replace(f"{args.out}.tmp", args.out)
    print("| dtype | " + " | ".join(f"{n} position{'s' if n > 1 else ''}" for n in widths) + " |")
    print("|---|" + "---:|" * len(widths))
    for dtype in ("float32", "bfloat16"):
        cells = [f"{r['ms']:.0f} ms ({r['over_one']:.2f}x)" for r in rows if r["dtype"] == dtype]
        print(f"| {dtype} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
