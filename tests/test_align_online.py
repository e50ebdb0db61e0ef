"""RAFT and iterative DPO end to end on the session's Ray cluster, a tiny Llama, S3 storage: two
iterations each of generate -> score -> keep / pair -> train, every stage's output in the work
folder. The RAFT driver is killed (SIGKILL) in its first scoring stage and run again: it restarts
there, without generating again."""

import io
import json
import signal

import pyarrow.parquet as pq
import pytest

from lmflow_ray import storage
from lmflow_ray.align.loop import run_align
from lmflow_ray.align.select import Scored, keep_top
from lmflow_ray.config import load_recipe
from lmflow_ray.storage import S3Options

pytestmark = pytest.mark.slow

REWARD = '''
import os, signal

def reward(prompt, response):
    marker = os.environ.get("ALIGN_KILL_MARKER")
    if marker and os.path.exists(marker):  # the first scoring of a marked run: its driver dies here
        os.remove(marker)
        os.kill(os.getpid(), signal.SIGKILL)
    return -abs(len(response) - 12) / 10.0   # replies of about 12 characters are best
'''


def overrides(model, data, output, reward, *more):
    return [f"model_name_or_path={model}", f"dataset_path={data}", "conversation_template=chatml", "block_size=256",
            "num_workers=1", "per_device_train_batch_size=2", "learning_rate=1e-3", "lr_scheduler_type=constant",
            "logging_steps=1", f"output_model_path={output}", f"reward_function={reward}:reward",
            "num_iterations=2", "prompts_per_iteration=6", "num_output_sequences=4", "output_max_length=8",
            "inference_batch_size_per_device=8", *more]


def read(uri, s3):
    raw = storage.read_bytes(uri, s3)
    assert raw is not None, uri
    return raw


def parquet(uri, s3):
    return pq.read_table(io.BytesIO(read(uri, s3))).to_pylist()


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text(REWARD)
    return path


def test_raft_killed_while_scoring_restarts_there_and_runs_two_iterations(ray_local, s3_server, tiny_model_dir, orders,
                                                                          reward_file, tmp_path, repo_python):
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    args = overrides(tiny_model_dir, orders, "s3://lmflow-align/raft", reward_file, "run_name=raft",
                     "collection_strategy=top", "top_reward_percentage=0.25")
    work = "s3://lmflow-align/raft/raft"
    marker = tmp_path / "kill-once"
    marker.write_text("")
    address = ray_local.get_runtime_context().gcs_address
    killed = repo_python("-m", "lmflow_ray.cli", "align", "--address", address, *args, timeout=600,
                         env={**s3_server.env(), "ALIGN_KILL_MARKER": str(marker)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert not marker.exists()
    generations = read(storage.join(work, "iteration_1/generations/generations.parquet"), s3)
    assert storage.read_bytes(storage.join(work, "iteration_1/scores/scores.parquet"), s3) is None

    said = []
    result = run_align(load_recipe(None, args + [f"endpoint_url={s3_server.endpoint}",
                                                 f"aws_access_key_id={s3_server.access_key}",
                                                 f"aws_secret_access_key={s3_server.secret_key}"]), say=said.append)
    text = "\n".join(said)
    assert "driver is gone" in text  # the killed driver's lease is taken at once
    assert "[iteration 1] generations: already in" in text and "[iteration 1] generating" not in text
    assert "[iteration 2] generating 4 responses for each of 6 prompts" in text
    assert read(storage.join(work, "iteration_1/generations/generations.parquet"), s3) == generations

    rows = parquet(storage.join(work, "iteration_1/scores/scores.parquet"), s3)
    assert len(rows) == 24 and {r["sample"] for r in rows} == {0, 1, 2, 3}
    for r in rows:  # every reward is the function's, of that row's response
        assert r["reward"] == pytest.approx(-abs(len(r["response"]) - 12) / 10.0)
    picked = keep_top([Scored(r["index"], r["sample"], r["reward"]) for r in rows], 0.25)  # 6 of 24
    best = [r for r in rows if (r["index"], r["sample"]) in {(s.prompt, s.sample) for s in picked}]
    kept = json.loads(read(storage.join(work, "iteration_1/kept/kept.json"), s3))
    assert kept["type"] == "conversation" and len(kept["instances"]) == 6
    assert sorted(i["messages"][-1]["content"] for i in kept["instances"]) == sorted(r["response"] for r in best)
    assert all(i["messages"][-2]["role"] == "user" for i in kept["instances"])

    assert [it["iteration"] for it in result.iterations] == [1, 2]
    first, second = result.iterations
    assert first["kept"] == second["kept"] == 6
    assert first["reward_kept_mean"] >= first["reward_mean"]
    assert second["from"] == first["policy"] and result.policy == second["policy"]
    assert first["policy"] == storage.join(work, "iteration_1/model")  # full fine-tuning: the run is the policy
    assert storage.list_checkpoints(first["policy"], s3) and storage.list_checkpoints(second["policy"], s3)
    report = json.loads(read(storage.join(work, "iterations.json"), s3))
    assert [it["iteration"] for it in report["iterations"]] == [1, 2]
    assert "| 2 |" in read(storage.join(work, "iterations.md"), s3).decode()
    assert read(storage.join(work, "reward.png"), s3)[:4] == b"\x89PNG"

    # Run again: every stage is there, nothing is generated, scored or trained again.
    again = []
    run_align(load_recipe(None, args + [f"endpoint_url={s3_server.endpoint}", f"aws_access_key_id={s3_server.access_key}",
                                        f"aws_secret_access_key={s3_server.secret_key}"]), say=again.append)
    assert sum("already" in line for line in again) == 6, again  # 2 x (generations, scores, model)


def test_iterative_dpo_pairs_by_reward_and_keeps_the_start_as_reference(ray_local, s3_server, tiny_model_dir, orders,
                                                                       reward_file, tmp_path):
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    args = overrides(tiny_model_dir, orders, "s3://lmflow-align/dpo", reward_file, "run_name=dpo",
                     "algorithm=iterative_dpo", "sampling_paired_method=max_min", "use_lora=true", "lora_r=4",
                     "lora_target_modules=q_proj,v_proj", "beta=0.1", f"endpoint_url={s3_server.endpoint}",
                     f"aws_access_key_id={s3_server.access_key}", f"aws_secret_access_key={s3_server.secret_key}")
    said = []
    result = run_align(load_recipe(None, args), say=said.append)
    work = "s3://lmflow-align/dpo/dpo"
    text = "\n".join(said)
    assert [it["iteration"] for it in result.iterations] == [1, 2]
    # Iteration 1 starts from the start model: LoRA's disabled adapter is the reference. Iteration 2
    # starts from iteration 1's merged policy, so the start model's log-probs are scored once.
    assert text.count("reference log-probs: scoring") == 1
    assert f"copies of {tiny_model_dir}" in text
    first, second = result.iterations
    assert first["policy"] == storage.join(work, "iteration_1/model/merged") == second["from"]
    rows = {(r["index"], r["sample"]): r["reward"]
            for r in parquet(storage.join(work, "iteration_1/scores/scores.parquet"), s3)}
    pairs = json.loads(read(storage.join(work, "iteration_1/pairs/pairs.json"), s3))
    assert pairs["type"] == "paired_conversation" and len(pairs["instances"]) == first["pairs"] > 0
    by_prompt = {}
    for (index, _), reward in rows.items():
        by_prompt.setdefault(index, []).append(reward)
    gaps = sorted(round(max(v) - min(v), 6) for v in by_prompt.values() if max(v) > min(v))
    assert sorted(p["margin"] for p in pairs["instances"]) == pytest.approx(gaps)  # max_min: best minus worst
    for p in pairs["instances"]:
        assert p["chosen"]["messages"][:-1] == p["rejected"]["messages"][:-1]  # one prompt, two replies
    assert first["reward_chosen_mean"] > first["reward_rejected_mean"]
    assert "rewards/accuracies" in first["train"] and first["train"]["steps"] >= 1
    # One more iteration with LMFlow's do_dpo_align off: iterations 1-2 are read back, iteration 3
    # generates, scores and writes its pairs, and the run stops there, as asked.
    said = []
    more = run_align(load_recipe(None, args + ["num_iterations=3", "do_dpo_align=false"]), say=said.append)
    assert len(more.iterations) == 2 and more.policy == second["policy"]
    assert "align.do_dpo_align false: stopping after iteration 3's pairs" in "\n".join(said)
    assert read(storage.join(work, "iteration_3/pairs/pairs.json"), s3)
    assert storage.read_bytes(storage.join(work, "iteration_3/policy.json"), s3) is None
