"""Training end to end on the session's real Ray cluster and the real SeaweedFS S3 server:
LoRA + ZeRO-2 resume/export/merge, full + ZeRO-3 offload resume, a killed worker, ray job submit."""

import io
import os
import signal
import threading
import time

import psutil
import pytest
import torch

from lmflow_ray.config import load_recipe
from lmflow_ray.errors import UserError
from lmflow_ray.storage import S3Options, filesystem, join, list_checkpoints, local_model_folder
from lmflow_ray.train.trainer import prepare, run

from conftest import trainer_state

pytestmark = pytest.mark.slow

def recipe(tiny_model_dir, orders, output, *overrides):
    return load_recipe(None, [f"model_name_or_path={tiny_model_dir}", f"dataset_path={orders}",
                              "conversation_template=chatml", "block_size=256", "num_workers=2",
                              "per_device_train_batch_size=2", "learning_rate=1e-3", "logging_steps=1",
                              f"output_model_path={output}", *overrides])


def s3_keys(server):
    return [f"endpoint_url={server.endpoint}", f"aws_access_key_id={server.access_key}",
            f"aws_secret_access_key={server.secret_key}"]


def _tied_copy(model_dir, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, tie_word_embeddings=True)
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def _gguf_of_the_run(repo_python, s3_server, run_uri, s3, model, ids, tmp_path):
    """The LoRA run (on S3) exported to one GGUF file on S3: merged first, tied head left to the
    embedding, and the same logits when transformers reads the file back."""
    from transformers import AutoModelForCausalLM

    target = "s3://lmflow-train/exports/lora-run.f32.gguf"
    proc = repo_python("-m", "lmflow_ray", "export", "--format", "gguf", "--model_name_or_path", run_uri,
                       "--outtype", "f32", "--output_model_path", target, env=s3_server.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merging its adapter into s3://lmflow-train/bases/tied" in proc.stderr
    assert f"written to {target}" in proc.stdout
    fs, path = filesystem(target, s3)
    (tmp_path / "gguf").mkdir()
    with fs.open_input_stream(path) as f:
        (tmp_path / "gguf" / "run.gguf").write_bytes(f.read())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="run.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_zero2_on_s3_resumes_exports_and_merges(ray_local, s3_server, tiny_model_dir, orders, tmp_path, repo_python):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmflow_ray.storage import upload

    tied = _tied_copy(tiny_model_dir, tmp_path / "tied")  # as SmolLM2: lm_head is the embedding
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    upload(tied, "s3://lmflow-train/bases/tied", s3)  # the base itself comes from object storage
    base = recipe("s3://lmflow-train/bases/tied", orders, "s3://lmflow-train/runs", *s3_keys(s3_server), "use_lora=true",
                  "lora_r=4", "lora_target_modules=q_proj,v_proj", "deepspeed=zero2", "save_steps=2", "run_name=lora")
    first = run(base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 4})}))
    assert (first.steps, first.resumed_from) == (4, 0)
    checkpoints = list_checkpoints(first.run_uri, s3)
    assert [(c.step, c.complete) for c in checkpoints] == [(2, True), (4, True)]
    manifest = checkpoints[-1].manifest
    assert (manifest["world_size"], manifest["zero_stage"], manifest["method"]) == (2, 2, "lora")
    assert manifest["base_model"] == "s3://lmflow-train/bases/tied"
    assert {"hf/adapter_model.safetensors", "hf/adapter_config.json", "hf/tokenizer.json", "rng/rank1.pt",
            "deepspeed/step_4/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(manifest["files"])

    # A LoRA checkpoint holds no frozen weight, tied ones (lm_head = embed_tokens) included.
    fs, path = filesystem(join(checkpoints[-1].uri, "deepspeed/step_4/mp_rank_00_model_states.pt"), s3)
    with fs.open_input_stream(path) as f:
        module = torch.load(io.BytesIO(f.read()), weights_only=False)["module"]
    assert module and all("lora_" in k for k in module), sorted(k for k in module if "lora_" not in k)[:5]

    second = run(base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 6})}))
    assert (second.steps, second.resumed_from, second.metrics["step"]) == (6, 4, 6)
    state = trainer_state(list_checkpoints(second.run_uri, s3)[-1], s3)
    assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4, 5, 6]  # 1-4 not trained again
    assert state["resumed_at"] == [4]
    assert all(h["mfu"] > 0 and h["tokens_per_s"] > 0 for h in state["log_history"])
    for name in ("loss.png", "summary.md"):
        fs, path = filesystem(join(second.run_uri, name), s3)
        assert fs.get_file_info(path).size > 100, name
    fs, path = filesystem(join(checkpoints[-1].uri, "recipe.yaml"), s3)
    with fs.open_input_stream(path) as f:
        saved = f.read().decode()
    assert "aws_secret_access_key: null" in saved and s3_server.secret_key not in saved  # keys came from the recipe

    adapter = local_model_folder(second.run_uri, tmp_path / "adapter", s3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied), adapter).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained away from peft's zero init
    ids = torch.tensor([[3, 10, 20, 30]])
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, 9)

    merged_dir = tmp_path / "merged"
    proc = repo_python("-m", "lmflow_ray", "merge", "--lora_model_path", second.run_uri,
                       "--output_model_path", str(merged_dir), env=s3_server.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    _gguf_of_the_run(repo_python, s3_server, second.run_uri, s3, model, ids, tmp_path)


def test_full_zero3_offload_checkpoints_and_resumes(ray_local, s3_server, tiny_model_dir, orders, tmp_path):
    from transformers import AutoModelForCausalLM

    base = recipe(tiny_model_dir, orders, "s3://lmflow-train/runs", *s3_keys(s3_server), "deepspeed=zero3_offload",
                  "save_steps=2", "run_name=full-zero3")
    s3 = S3Options.resolve(base.storage)
    first = run(base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 2})}))
    manifest = list_checkpoints(first.run_uri, s3)[-1].manifest
    assert (manifest["zero_stage"], manifest["method"]) == (3, "full")
    assert {"deepspeed/step_2/zero_pp_rank_0_mp_rank_00_model_states.pt",
            "deepspeed/step_2/zero_pp_rank_1_mp_rank_00_model_states.pt", "hf/model.safetensors"} <= set(manifest["files"])

    with pytest.raises(UserError, match="written by 2 workers with ZeRO-3.*num_workers=2"):
        prepare(base, first.run_uri, s3, 1, False, print)

    second = run(base.model_copy(update={"train": base.train.model_copy(update={"max_steps": 4})}))
    assert (second.steps, second.resumed_from) == (4, 2)
    state = trainer_state(list_checkpoints(second.run_uri, s3)[-1], s3)
    assert [h["step"] for h in state["log_history"]] == [1, 2, 3, 4]
    tuned = AutoModelForCausalLM.from_pretrained(local_model_folder(second.run_uri, tmp_path / "full", s3))
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def _train_workers(since: float):
    """This run's Ray Train worker processes: children of this session's raylet (another test
    session's cluster may train beside it) started since the run began (earlier runs' workers may
    still be shutting down)."""
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    found = []
    for p in raylet.children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::RayTrainWorker") and p.create_time() >= since:
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, s3_server, tiny_model_dir, orders):
    base = recipe(tiny_model_dir, orders, "s3://lmflow-train/runs", *s3_keys(s3_server), "max_steps=40",
                  "save_steps=5", "logging_steps=5", "max_failures=1", "run_name=fault")
    s3 = S3Options.resolve(base.storage)
    run_uri = join("s3://lmflow-train/runs", "fault")
    killed = []
    started = time.time()

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if any(c.complete for c in list_checkpoints(run_uri, s3)):
                workers = _train_workers(started)
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = run(base)
    killer.join(timeout=5)
    assert killed, "no train worker was found to kill"
    assert result.steps == 40 and result.metrics["step"] == 40
    checkpoints = list_checkpoints(run_uri, s3)
    assert checkpoints and all(c.complete for c in checkpoints), [(c.step, c.problem) for c in checkpoints]
    state = trainer_state(checkpoints[-1], s3)
    assert state["resumed_at"] and state["resumed_at"][0] % 5 == 0
    assert [h["step"] for h in state["log_history"]] == list(range(5, 41, 5))
    assert all(h["loss"] == h["loss"] for h in state["log_history"])  # no NaN

    # Exact resume: the same data order, RNG and optimizer state give an uninterrupted run's losses.
    clean = run(base.model_copy(update={"storage": base.storage.model_copy(update={"run_name": "no-fault"})}))
    clean_state = trainer_state(list_checkpoints(clean.run_uri, s3)[-1], s3)
    assert clean_state["resumed_at"] == []
    assert [h["loss"] for h in state["log_history"]] == pytest.approx([h["loss"] for h in clean_state["log_history"]], rel=1e-5)



@pytest.fixture
def small_disk(tmp_path):
    """A 320 KB tmpfs: room for a run folder's lease, not for a checkpoint (disk full mid-run)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()[:200]})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_at_a_checkpoint_ends_the_run_with_one_line_naming_it(ray_local, tiny_model_dir, orders, small_disk):
    from lmflow_ray.errors import CheckpointWriteError, unwrap_user_error

    with pytest.raises(BaseException) as raised:
        run(recipe(tiny_model_dir, orders, small_disk, "max_steps=2", "save_steps=2", "run_name=full-disk"))
    err = unwrap_user_error(raised.value)
    assert isinstance(err, CheckpointWriteError), raised.value
    assert err.uri == f"{small_disk}/full-disk/checkpoint_000002"
    message = str(err)
    assert "\n" not in message and "No space left on device" in message and err.exit_code == 1
    assert message.startswith(f"writing checkpoint {small_disk}/full-disk/checkpoint_000002 failed: ")


@pytest.mark.slow
def test_workers_the_cluster_cannot_place_stop_the_run_with_what_is_missing(repo_python, tmp_path):
    """Ray Train would wait for them without a word; the CLI stops after placement_timeout_s."""
    proc = repo_python("-m", "lmflow_ray.cli", "train", "jobs/finetune_lora.yaml", "max_steps=1", "block_size=256",
                       "per_device_train_batch_size=1", "resources_per_worker={CPU: 64}", "placement_timeout_s=15",
                       f"output_model_path={tmp_path}", "run_name=unplaced", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "error: train: the workers could not be placed for " in out
    assert "2 workers of {CPU: 64} fit 0 at most on this cluster's 1 node(s)" in out
    assert not list((tmp_path / "unplaced").glob("checkpoint_*"))
