"""Preference training end to end on the session's Ray cluster, 2 Ray Train workers, a tiny Llama:
full-weight DPO on DDP with the reference's log-probs precomputed once by a Ray Data pass (train
and held-out rows), kept with the run and read back when the run resumes, which then repeats the
uninterrupted losses. The LoRA reward model and LoRA DPO on DeepSpeed ZeRO-2 (pair metrics, the
export reloading as a sequence classifier with its score head) run in the shortened alignment demo
(tests/test_demo.py), on the embedded model."""

import json
import math
import shutil

import pytest

from lmflow_ray import storage
from lmflow_ray.config import load_recipe
from lmflow_ray.storage import S3Options, list_checkpoints, local_model_folder
from lmflow_ray.train.reference import REFERENCE_FILE
from lmflow_ray.train.trainer import run

from conftest import trainer_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs(orders, tmp_path_factory):
    """The support e-mails as preference pairs: chosen is the right order number, rejected a wrong one."""
    data = json.loads((orders / "orders.json").read_text())["instances"]
    out = []
    for i, conv in enumerate(data[:160]):
        wrong = {**conv, "messages": conv["messages"][:-1] + [{"role": "assistant", "content": f"ORD-{100000 + i * 7}"}]}
        out.append({"chosen": conv, "rejected": wrong, **({"margin": 0.5} if i % 4 == 0 else {})})
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "pairs.json").write_text(json.dumps({"type": "paired_conversation", "instances": out}))
    return folder


def recipe(model, data, output, *overrides):
    return load_recipe(None, [f"model_name_or_path={model}", f"dataset_path={data}", "conversation_template=chatml",
                              "block_size=256", "num_workers=2", "per_device_train_batch_size=1",
                              "lr_scheduler_type=constant", "logging_steps=1", f"output_model_path={output}",
                              *overrides])


def history(run_uri):
    return trainer_state(list_checkpoints(run_uri, S3Options())[-1], S3Options())["log_history"]


def test_full_dpo_precomputes_the_reference_once_and_resumes_exactly(ray_local, tiny_model_dir, pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    said = []
    base = recipe(tiny_model_dir, pairs, tmp_path, "objective=dpo", "beta=0.5", "learning_rate=5e-4", "max_steps=4",
                  "save_steps=2", "validation_split_percentage=20", "eval_steps=2")
    whole = run(base.model_copy(update={"storage": base.storage.model_copy(update={"run_name": "dpo"})}),
                say=said.append)
    assert any("reference log-probs: scoring" in line for line in said), said
    log = history(whole.run_uri)
    assert [h["step"] for h in log] == [1, 2, 3, 4]
    for h in log:
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"} <= set(h)
    # Step 1's policy is the reference: every implicit reward is 0 (the precomputed log-probs match),
    # so a pair's loss is -log σ(-margin): ln 2, or softplus(0.5) for the pairs with margin 0.5. The
    # step's mean is ln 2 + f·(softplus(0.5) - ln 2), f the share of margin pairs it drew.
    for key in ("rewards/chosen", "rewards/rejected"):
        assert log[0][key] == pytest.approx(0.0, abs=1e-4), key  # fp32 sums on other thread counts
    plain, with_margin = math.log(2), math.log1p(math.exp(0.5))
    share = (log[0]["loss"] - plain) / (with_margin - plain)
    assert -1e-3 <= share <= 1 + 1e-3, log[0]["loss"]
    assert log[-1]["rewards/margins"] > 0
    held = [h for h in log if "eval_loss" in h]
    assert [h["step"] for h in held] == [2, 4]
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"} <= set(held[-1])
    saved = json.loads((tmp_path / "dpo" / REFERENCE_FILE).read_text())
    assert saved["model"] == str(tiny_model_dir) and len(saved["rows"]) > 0

    # A run stopped after step 2: its folder holds checkpoint 2 and the reference file.
    cut = tmp_path / "cut"
    cut.mkdir()
    checkpoint_2 = list_checkpoints(whole.run_uri, S3Options())[0]
    assert checkpoint_2.step == 2
    storage.copy(checkpoint_2.uri, str(cut / storage.checkpoint_name(2)))
    shutil.copy(tmp_path / "dpo" / REFERENCE_FILE, cut / REFERENCE_FILE)
    said.clear()
    resumed = run(base.model_copy(update={"storage": base.storage.model_copy(update={"run_name": "cut"})}),
                  say=said.append)
    assert (resumed.resumed_from, resumed.steps) == (2, 4)
    assert any("reference log-probs" in line and "read from" in line for line in said), said
    again = history(resumed.run_uri)
    for a, b in zip(log[2:], again[2:]):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    tuned = AutoModelForCausalLM.from_pretrained(local_model_folder(resumed.run_uri, tmp_path / "tuned", S3Options()))
    assert tuned.config.architectures == ["LlamaForCausalLM"]
    manifest = list_checkpoints(resumed.run_uri, S3Options())[-1].manifest
    assert (manifest["objective"], manifest["method"], manifest["strategy"]) == ("dpo", "full", "ddp")
