"""Memory-efficient methods end to end on the session's Ray cluster, 2 Ray Train workers, tiny
models: LISA on DDP and on DeepSpeed ZeRO-2 (same blocks on every rank, frozen blocks' optimizer
state gone, resume with the same sampling), QLoRA on a 4-bit base, RoPE scaling past the native
context, and fine-tuning a model whose vocabulary was extended."""

import json
from pathlib import Path

import pytest
import torch

from lmflow_ray.config import load_recipe
from lmflow_ray.model.lisa import LisaSchedule
from lmflow_ray.storage import S3Options, list_checkpoints, local_model_folder
from lmflow_ray.train.trainer import run

from conftest import trainer_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    """A tiny Llama with 6 decoder blocks (hidden 64, so bitsandbytes can quantize it too)."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("six-blocks"), layers=6, hidden=64)


def recipe(model, orders, output, *overrides):
    return load_recipe(None, [f"model_name_or_path={model}", f"dataset_path={orders}", "conversation_template=chatml",
                              "block_size=256", "num_workers=2", "per_device_train_batch_size=2",
                              "learning_rate=1e-3", "lr_scheduler_type=constant", "logging_steps=1",
                              f"output_model_path={output}", *overrides])


def history(result):
    return trainer_state(list_checkpoints(result.run_uri, S3Options())[-1], S3Options())["log_history"]


def check_lisa(log, schedule):
    """Every step trained exactly the sampled blocks, on every rank, and only they had state."""
    for h in log:
        sampled = list(schedule.layers_at(h["step"] - 1))
        assert h["lisa_layers"] == sampled, h["step"]
        assert h["lisa_updated_layers"] == [sampled, sampled], h["step"]  # weights moved: these, no others
        assert h["lisa_state_layers"] == [sampled, sampled], h["step"]  # frozen blocks' state is gone
    assert len({tuple(h["lisa_layers"]) for h in log}) >= 2


LISA = ["use_lisa=true", "lisa_activated_layers=2", "lisa_interval_steps=3"]


def test_lisa_on_ddp_samples_the_same_blocks_on_every_rank_and_frees_state(ray_local, six_blocks, orders, tmp_path):
    result = run(recipe(six_blocks, orders, tmp_path, *LISA, "max_steps=7", "save_steps=7"))
    log = history(result)
    assert [h["step"] for h in log] == [1, 2, 3, 4, 5, 6, 7]
    check_lisa(log, LisaSchedule(6, 2, 3, 42))
    state_mb = [h["optimizer_state_mb"] for h in log]
    assert max(state_mb) < 1.2 * min(state_mb)  # does not creep as blocks come and go
    assert log[-1]["loss"] < log[0]["loss"]
    manifest = list_checkpoints(result.run_uri, S3Options())[-1].manifest
    assert (manifest["method"], manifest["strategy"]) == ("lisa", "ddp")


def test_lisa_on_deepspeed_zero2_resumes_mid_interval_with_the_same_sampling(ray_local, six_blocks, orders, tmp_path):
    base = recipe(six_blocks, orders, tmp_path, *LISA, "deepspeed=zero2", "save_steps=4", "run_name=lisa")
    schedule = LisaSchedule(6, 2, 3, 42)
    first = run(base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 4})}))
    check_lisa(history(first), schedule)
    second = run(base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 8})}))
    assert (second.resumed_from, second.steps) == (4, 8)
    log = history(second)
    assert [h["step"] for h in log] == [1, 2, 3, 4, 5, 6, 7, 8]
    check_lisa(log, schedule)  # step 5 finishes interval 1 with its restored state, then 2 begins
    state_mb = [h["optimizer_state_mb"] for h in log]
    assert max(state_mb) < 1.2 * min(state_mb)
    manifest = list_checkpoints(second.run_uri, S3Options())[-1].manifest
    assert (manifest["method"], manifest["zero_stage"], manifest["world_size"]) == ("lisa", 2, 2)


def test_qlora_trains_a_4bit_base_exports_and_merges(ray_local, six_blocks, orders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmflow_ray.model.adapters import merge_adapter

    result = run(recipe(six_blocks, orders, tmp_path, "use_qlora=true", "quant_bit=4", "lora_r=8", "learning_rate=3e-3",
                        "gradient_checkpointing=true", "max_steps=8", "save_steps=8",
                        "block_size=512"))  # the tiny tokenizer's e-mails: at 256 most replies are cut off
    manifest = list_checkpoints(result.run_uri, S3Options())[-1].manifest
    assert (manifest["method"], manifest["quantized_layers"]) == ("qlora", 6 * 7)  # q k v o gate up down per block
    log = history(result)
    assert sum(h["loss"] for h in log[-3:]) < sum(h["loss"] for h in log[:3])
    adapter = Path(local_model_folder(result.run_uri, tmp_path / "adapter", S3Options()))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}

    merged = merge_adapter(adapter, tmp_path / "merged")
    ids = torch.tensor([[5, 17, 42, 99, 7, 64]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(six_blocks), adapter).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(six_blocks).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter changed the model


def test_vocab_extension_then_rope_scaled_training_past_the_native_context(ray_local, orders, tmp_path, repo_python):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny import save_tiny

    base = save_tiny(tmp_path / "base", positions=64)  # native context: 64 positions
    extended = tmp_path / "extended"
    done = repo_python("-m", "lmflow_ray", "vocab", "extend", "--dataset_path", str(orders), "--model_name_or_path",
                       str(base), "--output_dir", str(extended), "--vocab_size", "700")
    assert done.returncode == 0, done.stderr
    assert "fewer tokens" in done.stdout and (extended / "vocab_extension.md").is_file()

    # New tokens are reached by ordinary BPE: each encodes as its own single id.
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(extended)
    added = json.loads((extended / "vocab_extension.json").read_text())["added"]
    assert len(added) >= 50 and len(new) == len(old) + len(added)
    for token in added:
        text = new.convert_tokens_to_string([token])
        assert new(text, add_special_tokens=False).input_ids == [new.convert_tokens_to_ids(token)], token
    # Embeddings resized; each new row is the mean of the rows of the pieces the old tokenizer made.
    before = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    after = AutoModelForCausalLM.from_pretrained(extended).get_input_embeddings().weight
    assert after.shape[0] == len(new)
    torch.testing.assert_close(after[: before.shape[0]], before)
    for token in added[:20]:
        pieces = old(new.convert_tokens_to_string([token]), add_special_tokens=False).input_ids
        torch.testing.assert_close(after[new.convert_tokens_to_ids(token)], before[pieces].mean(0))

    # Full fine-tuning of the extended model on 256-token rows with 4x linear position interpolation.
    result = run(recipe(extended, orders, tmp_path / "runs", "rope_pi_ratio=4", "max_steps=3", "save_steps=3"))
    assert result.steps == 3
    export = Path(local_model_folder(result.run_uri, tmp_path / "export", S3Options()))
    config = json.loads((export / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    assert config["vocab_size"] == len(new)
    tuned = AutoModelForCausalLM.from_pretrained(export).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    # Position 4k of the scaled model turns like position k of the native one: 256 positions fit in 64.
    x = torch.zeros(1, 1, 1)
    positions = torch.arange(0, 256, 4)[None]
    cos_scaled, _ = tuned.model.rotary_emb(x, positions)
    cos_native, _ = plain.model.rotary_emb(x, positions // 4)
    torch.testing.assert_close(cos_scaled, cos_native)
    ids = new(" ".join(["order ORD-123456 shipped"] * 40), return_tensors="pt").input_ids[:, :240]
    assert ids.shape[1] == 240 > 64
    with torch.no_grad():
        logits = tuned(ids).logits
    assert logits.shape[1] == 240 and torch.isfinite(logits).all()



@pytest.mark.parametrize("script,method", [("run_finetune", "full"), ("run_finetune_with_lora", "lora"),
                                           ("run_finetune_with_qlora", "qlora"), ("run_finetune_with_lisa", "lisa")])
def test_lmflow_scripts_train_as_written(ray_local, six_blocks, orders, tmp_path, script, method):
    """LMFlow's own script arguments, as its shell passes them, with a small model, our data and
    --max_steps 2. The LoRA script also asks for LMFlow's eval / sampling / merge flags."""
    from transformers import AutoModelForCausalLM

    from test_config import lmflow_script_args

    here = {"--model_name_or_path": str(six_blocks), "--dataset_path": str(orders), "--output_dir": str(tmp_path / "out")}
    written = lmflow_script_args(script)
    args = [here.get(before, arg) for before, arg in zip(["", *written], written)] + ["--max_steps", "2"]
    extra = ["--validation_split_percentage", "10", "--eval_steps", "1", "--max_train_samples", "100",
             "--save_aggregated_lora", "1"] if method == "lora" else []
    result = run(load_recipe(None, args + extra, notices=[]), fresh=True)
    assert result.steps == 2
    checkpoint = list_checkpoints(result.run_uri, S3Options())[-1]
    assert checkpoint.manifest["method"] == method
    state = trainer_state(checkpoint, S3Options())
    # --logging_steps 20: the last step is logged (and with --eval_steps 1 every step, with its eval loss).
    assert [h["step"] for h in state["log_history"]] == ([1, 2] if method == "lora" else [2])
    if method != "lora":
        assert "eval_loss" not in state["log_history"][-1] and not result.merged_uri
        return
    # --max_train_samples 100 of the train side; --disable_group_texts 1: one sample per row.
    plan = state["plan"]
    assert plan["rows"] == 0 and state["rows"] == 2 * plan["micro_batch"] * plan["accumulation"] * plan["world_size"]
    from lmflow_ray.data.pipeline import dataset_stats  # max_steps: the rows streamed uncounted; count them here

    assert dataset_stats(load_recipe(None, args + extra, notices=[]))["rows_packed"] == 100
    for held in state["log_history"]:
        assert held["eval_tokens"] > 0 and 0 < held["eval_loss"] < 20 and held["eval_ppl"] > 1
    assert state["log_history"][0]["eval_tokens"] == state["log_history"][1]["eval_tokens"]  # the same held-out rows
    assert "| eval loss |" in (Path(result.run_uri) / "summary.md").read_text()
    # --save_aggregated_lora 1: the adapter merged into its base, next to the checkpoints.
    assert result.merged_uri == f"{result.run_uri}/merged"
    assert not (Path(result.merged_uri) / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(result.merged_uri).config.num_hidden_layers == 6
