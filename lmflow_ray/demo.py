"""`lmflow-ray demo`: the main job, end to end on one Ray cluster. Evaluate the base model on the
held-out split, LoRA fine-tune it (Ray Train + DeepSpeed), evaluate the tuned checkpoint, deploy it
on Ray Serve and ask it one held-out question through the OpenAI API, then print and write the
before/after table."""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.eval.run import EvalResult, evaluate, open_eval_dataset, read_instances
from lmflow_ray.lease import LEASE, Lease
from lmflow_ray.model.locate import display_name

STAGES = 6


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _metric(result: EvalResult, key: str) -> str:
    value = result.metrics.get(key)
    if value is None:
        return "-"
    if key == "acc":
        return f"{value:.1%} ({result.correct}/{result.count})"
    return f"{value:.3f}"


def table(before: EvalResult, after: EvalResult, base_name: str, tuned_name: str) -> str:
    rows = [("model", "held-out accuracy", "NLL per answer token", "perplexity")]
    for name, r in ((base_name, before), (tuned_name, after)):
        rows.append((name, _metric(r, "acc"), _metric(r, "nll"), _metric(r, "ppl")))
    lines = [f"| {' | '.join(rows[0])} |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(r)} |" for r in rows[1:]]
    return "\n".join(lines)


def ask_one(recipe: Recipe, run_uri: str, question: dict[str, Any], say: Callable[[str], None]) -> tuple[str, str, float]:
    """Deploy the run on Ray Serve (this cluster) and ask one question with the openai client;
    returns (served model name, answer, seconds to deploy)."""
    import logging

    import openai
    from ray import serve

    from lmflow_ray.serve.app import APP_NAME, build_app
    from lmflow_ray.serve.front import start_serve
    from lmflow_ray.serve.sources import resolve

    port = _free_port(recipe.serve.port)
    served = recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"model_name_or_path": run_uri}),
        "serve": recipe.serve.model_copy(update={"port": port, "api_key": None}),
    })
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the stage lines say what happens
    started = time.time()
    app = build_app(served)
    start_serve("127.0.0.1", port)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    deployed = time.time() - started
    try:
        names = resolve(served).names()
        model = names[-1]  # the LoRA run, served on its base as BASE:RUN
        say(f"  serving {', '.join(names)} at http://127.0.0.1:{port}/v1 (ready in {deployed:.0f} s)")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        head = [{"role": "system", "content": question["system"]}] if question.get("system") is not None else []
        reply = client.chat.completions.create(model=model, messages=head + question["messages"][:-1], temperature=0.0)
        return model, (reply.choices[0].message.content or "").strip(), deployed
    finally:
        serve.delete(APP_NAME)  # Serve itself goes with the cluster when the demo exits


def write_report(run_uri: str, s3: Any, markdown: str, report: dict[str, Any]) -> None:
    """demo.md and demo.json in the run folder (local or s3://)."""
    storage.write_bytes(storage.join(run_uri, "demo.md"), markdown.encode(), s3)
    storage.write_bytes(storage.join(run_uri, "demo.json"), (json.dumps(report, indent=2) + "\n").encode(), s3)


def run_demo(recipe: Recipe, address: str | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole job; returns what it printed as data (also written as demo.json next to the run)."""
    from lmflow_ray.ray_init import connect, quiet_data_logs
    from lmflow_ray.train.trainer import run as train_run, run_folder

    started = time.time()
    timings: dict[str, float] = {}
    run_name = recipe.storage.run_name or "demo"
    recipe = recipe.model_copy(update={"storage": recipe.storage.model_copy(update={"run_name": run_name})})
    s3 = storage.S3Options.resolve(recipe.storage)
    run_uri = run_folder(recipe, run_name)
    base = recipe.model.model_name_or_path

    def stage(n: int, text: str) -> float:
        say(f"[{n}/{STAGES}] {text}")
        return time.time()

    t = stage(1, "starting Ray" + (f" at {address}" if address else " (a local cluster)"))
    connect(address)
    quiet_data_logs()
    # The demo starts over each time: its own run folder only, and never under another live run.
    with Lease(run_uri, s3).acquire(say) as lease:
        storage.clear_run(run_uri, s3, keep=(LEASE,))
        heldout = read_instances(recipe, open_eval_dataset(recipe))
        timings["ray"] = time.time() - t

        def with_eval(model: str, name: str) -> Recipe:
            return recipe.model_copy(update={
                "model": recipe.model.model_copy(update={"model_name_or_path": model}),
                "eval": recipe.eval.model_copy(update={"eval_output_dir": storage.join(run_uri, "eval", name), "server_url": None}),
            })

        t = stage(2, f"evaluating the base model {display_name(base)} on {len(heldout)} held-out instances")
        before = evaluate(with_eval(base, "base"), say=lambda line: say("  " + line))
        timings["eval_base"] = time.time() - t
        say(f"  base: accuracy {_metric(before, 'acc')}, NLL {_metric(before, 'nll')} ({timings['eval_base']:.0f} s)")

        tr = recipe.train
        method = "LoRA" if recipe.model.use_lora else "full"
        engine = f"DeepSpeed {tr.deepspeed}" if tr.deepspeed else "DDP"
        t = stage(3, f"{method} fine-tuning with {tr.num_workers} Ray Train workers and {engine} into {run_uri}")
        trained = train_run(recipe, name_prefix="demo", say=lambda line: say("  " + line), lease=lease)
        timings["train"] = time.time() - t
        say(f"  trained {trained.steps} steps, final loss {trained.metrics.get('loss', float('nan')):.4f} ({timings['train']:.0f} s)")

        t = stage(4, f"evaluating the tuned checkpoint {trained.export_uri}")
        after = evaluate(with_eval(run_uri, "tuned"), say=lambda line: say("  " + line))
        timings["eval_tuned"] = time.time() - t
        say(f"  tuned: accuracy {_metric(after, 'acc')}, NLL {_metric(after, 'nll')} ({timings['eval_tuned']:.0f} s)")

        question = heldout[0]
        t = stage(5, "deploying the tuned model on Ray Serve and asking it one held-out question (OpenAI API)")
        served_as, answer, _ = ask_one(recipe, run_uri, question, say)
        timings["serve"] = time.time() - t

        stage(6, "before / after")
        tuned_name = f"{display_name(base)} + LoRA `{run_name}` ({trained.steps} steps)"
        md_table = table(before, after, display_name(base), tuned_name)
        reference = question["messages"][-1]["content"]
        timings["total"] = time.time() - started
        report = {
            "run": run_uri, "dataset": before.dataset, "heldout": len(heldout), "steps": trained.steps,
            "before": before.metrics, "after": after.metrics, "before_correct": before.correct, "after_correct": after.correct,
            "question": question["messages"][-2]["content"], "reference": reference, "answer": answer, "served_model": served_as,
            "loss_png": storage.join(run_uri, "loss.png"), "timings_s": {k: round(v, 1) for k, v in timings.items()},
        }
        markdown = "\n".join([
            f"# lmflow-ray demo: `{run_name}`", "",
            f"Held-out split `{before.dataset}` ({len(heldout)} instances, never trained on), answer type "
            f"`{before.answer_type}`.", "", md_table, "",
            f"One held-out question, asked through the OpenAI API (model `{served_as}` on Ray Serve):", "",
            "```", report["question"], "```", "", f"answer: `{answer}` (reference `{reference}`)", "",
            "Stage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), "",
            "Loss curve: `loss.png`; per-instance results: `eval/base/predictions.jsonl`, `eval/tuned/predictions.jsonl`.", "",
        ])
        write_report(run_uri, s3, markdown, report)
        say("")
        say(md_table)
        say("")
        say("held-out question:")
        say("\n".join("    " + line for line in report["question"].splitlines()))
        say(f"answer from Ray Serve ({served_as}): {answer!r}   reference: {reference!r}")
        say("")
        say(f"loss curve:   {report['loss_png']}")
        say(f"table:        {storage.join(run_uri, 'demo.md')}")
        say(f"eval results: {storage.join(run_uri, 'eval', 'base')}  {storage.join(run_uri, 'eval', 'tuned')}")
        say(f"done in {timings['total']:.0f} s")
        return report


def main(recipe: Recipe, address: str | None = None) -> int:
    run_demo(recipe, address, say=lambda line: print(line, flush=True, file=sys.stdout))
    return 0
