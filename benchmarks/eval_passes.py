"""What the one-pass evaluation saves: accuracy (greedy answers) and NLL of the references on the
held-out support e-mails with the embedded SmolLM2-135M-Instruct, measured four ways in this
process (no Ray, the same batches everywhere):

- generate only (accuracy alone), forward only (NLL alone),
- two passes (a forward for NLL, then generate from scratch: what a plain script does),
- one pass (lmflow-ray: the forward that scores the reference leaves the prompt's KV cache, and
  greedy decoding goes on from it).

    .venv/bin/python benchmarks/eval_passes.py [--n 64] [--batch 16] [--max-new-tokens 16] [--out benchmarks/results/eval_passes.json]

It also checks that the one-pass answers and NLL equal the two-pass ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="held-out e-mails")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_passes.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from lmflow_ray.config import load_recipe
    from lmflow_ray.data.pipeline import Spec, tools_for
    from lmflow_ray.embedded import resolve_model_path
    from lmflow_ray.eval.run import open_eval_dataset, read_instances
    from lmflow_ray.eval.score import generate_answers, prepare, token_logprobs

    torch.set_num_threads(args.threads)
    recipe = load_recipe(str(REPO / "jobs" / "demo_lora.yaml"), [f"max_eval_samples={args.n}"])
    folder = resolve_model_path("default")
    source = open_eval_dataset(recipe)
    kind, instances = source.kind, read_instances(recipe, source)
    spec = Spec(folder, False, recipe.data.conversation_template, kind, recipe.data.block_size, False, False)
    tokenizer, _, _ = tools_for(spec)
    items = sorted(prepare(instances, range(len(instances)), spec, "{input}"), key=lambda it: -len(it.ids))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [items[i: i + args.batch] for i in range(0, len(items), args.batch)]

    def parts(batch):
        return ([it.ids[: it.prompt_len] for it in batch], [it.ids[it.prompt_len:] for it in batch],
                [it.scored for it in batch])

    def gen_only():
        return [a for b in batches for a in generate_answers(model, tokenizer, parts(b)[0], args.max_new_tokens, pad)]

    def nll_only():
        return [lp for b in batches for lp in token_logprobs(model, *parts(b), pad)[0]]

    def one_pass():
        answers, logps = [], []
        for b in batches:
            p, c, s = parts(b)
            lps, cache = token_logprobs(model, p, c, s, pad, keep_cache=True)
            logps += lps
            answers += generate_answers(model, tokenizer, p, args.max_new_tokens, pad, cache=cache)
        return answers, logps

    def timed(fn):
        started = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - started

    gen_only()  # warm up (first-call allocations)
    answers, t_gen = timed(gen_only)
    logps, t_nll = timed(nll_only)
    (answers1, logps1), t_one = timed(one_pass)
    same_answers = answers1 == answers
    max_nll_diff = max(abs(float(a.sum()) - float(b.sum())) for a, b in zip(logps, logps1))
    rows = [
        {"method": "generate only (accuracy)", "seconds": t_gen},
        {"method": "forward only (NLL)", "seconds": t_nll},
        {"method": "two passes (NLL, then generate)", "seconds": t_gen + t_nll},
        {"method": "one pass (lmflow-ray: NLL forward, decode from its cache)", "seconds": t_one},
    ]
    for r in rows:
        r["seconds"] = round(r["seconds"], 2)
        r["items_per_s"] = round(len(items) / r["seconds"], 2)
    result = {
        "benchmark": "eval_passes", "model": "SmolLM2-135M-Instruct (fp32)", "items": len(items),
        "batch": args.batch, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "prompt_tokens": int(sum(it.prompt_len for it in items)), "scored_tokens": int(sum(len(lp) for lp in logps)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
        "rows": rows, "one_pass_saves": round(1 - t_one / (t_gen + t_nll), 3),
        "same_answers": same_answers, "max_nll_sum_difference": max_nll_diff,
        "nll": float(-sum(float(lp.sum()) for lp in logps) / sum(len(lp) for lp in logps)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| method | seconds | items/s |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.1f} | {r['items_per_s']:.2f} |")
    print(f"one pass saves {result['one_pass_saves']:.0%} of two passes; same answers: {same_answers}; "
          f"largest NLL difference {max_nll_diff:.2e}")
    return 0 if same_answers and max_nll_diff < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
