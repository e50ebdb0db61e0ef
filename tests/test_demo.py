"""The two demos, shortened, so CI proves each whole chain. The main job (4 training steps, 8
held-out e-mails): base eval -> LoRA on 2 Ray Train workers with DeepSpeed -> tuned eval -> Ray
Serve -> one question through the OpenAI API -> before/after table, loss curve and results written
next to the run. The alignment demo (3 steps each, 8 held-out e-mails and pairs): base eval -> LoRA
reward model on ZeRO-2 -> its held-out pairwise accuracy -> LoRA DPO on ZeRO-2 (the reference: the
adapter disabled) -> tuned eval -> table and curves."""

import json

import pytest

from conftest import trainer_state


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



@pytest.mark.slow
def test_shortened_alignment_demo_trains_a_reward_model_and_dpo(repo_python, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmflow_ray.embedded import resolve_model_path
    from lmflow_ray.storage import S3Options, list_checkpoints, local_model_folder

    out = tmp_path / "runs"
    proc = repo_python("-m", "lmflow_ray.cli", "demo", "jobs/demo_dpo.yaml", "max_steps=3", "max_eval_samples=8",
                       f"output_model_path={out}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line[:5] for line in lines if line.startswith("[")] == [f"[{n}/6]" for n in range(1, 7)]
    dpo, rm = out / "demo-dpo", out / "demo-reward"
    report = json.loads((dpo / "demo.json").read_text())
    assert (report["dpo_steps"], report["reward_steps"], report["heldout"], report["pairs_heldout"]) == (3, 3, 8, 8)
    assert report["before"]["acc"] < 0.1  # untuned, the model never answers with the bare order number
    assert set(report["reward_model"]) == {"acc", "margin", "reward_chosen", "reward_rejected"}
    assert report["dpo_final"]["rewards/margins"] > 0  # DPO moved chosen above rejected
    table = (dpo / "demo.md").read_text()
    assert "+ DPO `demo-dpo` (3 steps)" in table and "reward model `demo-reward` (3 steps)" in table
    for run in (dpo, rm):
        assert (run / "loss.png").stat().st_size > 1000
    summary = (rm / "summary.md").read_text()
    assert "reward model (score head), LoRA" in summary and "pairwise accuracy" in summary
    assert "DPO (sigmoid, beta 0.1), LoRA" in (dpo / "summary.md").read_text()
    results = json.loads((dpo / "eval" / "reward_model" / "results.json").read_text())
    assert results["answer_type"] == "pairwise" and results["count"] == 8

    # The reward model's run: pair metrics at every logged step, a ZeRO-2 LoRA checkpoint.
    checkpoint = list_checkpoints(str(rm), S3Options())[-1]
    assert (checkpoint.manifest["objective"], checkpoint.manifest["method"], checkpoint.manifest["zero_stage"]) == (
        "reward", "lora", 2)
    log = trainer_state(checkpoint, S3Options())["log_history"]
    assert [h["step"] for h in log] == [2, 3]
    for h in log:
        assert {"loss", "accuracy", "margin", "reward_chosen", "reward_rejected"} <= set(h)
        assert 0 <= h["accuracy"] <= 1 and h["margin"] == pytest.approx(h["reward_chosen"] - h["reward_rejected"])
    dpo_log = trainer_state(list_checkpoints(str(dpo), S3Options())[-1], S3Options())["log_history"]
    for h in dpo_log:
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"} <= set(h)
    # Its export: a LoRA adapter with the trained score head, loaded by transformers + peft.
    export = local_model_folder(str(rm), tmp_path / "rm", S3Options())
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("default"), num_labels=1)
    model = PeftModel.from_pretrained(base, export).eval()
    assert any("score" in name for name, _ in model.named_parameters())  # the head travels with the adapter
    assert f"table:        {dpo / 'demo.md'}" in proc.stdout
