"""The main job, shortened (4 training steps, 8 held-out e-mails) so CI proves the whole chain:
base eval -> LoRA on 2 Ray Train workers with DeepSpeed -> tuned eval -> Ray Serve -> one question
through the OpenAI API -> before/after table, loss curve and results written next to the run."""

import json

import pytest


@pytest.mark.slow
def test_shortened_demo_runs_the_whole_chain(repo_python, tmp_path):
    out = tmp_path / "runs"
    proc = repo_python("-m", "lmflow_ray.cli", "demo", "jobs/demo_lora.yaml", "max_steps=4", "max_eval_samples=8",
                       f"output_model_path={out}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line[:5] for line in lines if line.startswith("[")] == [f"[{n}/6]" for n in range(1, 7)]
    run = out / "demo"
    report = json.loads((run / "demo.json").read_text())
    assert report["steps"] == 4 and report["heldout"] == 8
    # Untuned, the model never answers with the bare order number; four steps already teach it some.
    assert report["before"]["acc"] < 0.1
    assert report["after"]["acc"] > report["before"]["acc"]
    assert report["after"]["nll"] < report["before"]["nll"] / 2
    # The question went to Ray Serve through the openai client and came back from the LoRA run.
    assert report["served_model"] == "SmolLM2-135M-Instruct:demo"
    assert report["answer"] and f"answer from Ray Serve (SmolLM2-135M-Instruct:demo): {report['answer']!r}" in proc.stdout
    table = (run / "demo.md").read_text()
    assert "| SmolLM2-135M-Instruct |" in table and "+ LoRA `demo` (4 steps)" in table
    assert (run / "loss.png").stat().st_size > 1000
    for stage in ("base", "tuned"):
        results = json.loads((run / "eval" / stage / "results.json").read_text())
        assert results["count"] == 8 and set(results["metrics"]) == {"acc", "nll", "ppl"}
        assert (run / "eval" / stage / "benchmark.log").is_file()
    assert f"table:        {run / 'demo.md'}" in proc.stdout


