"""Shared real parts: one local Ray cluster and one SeaweedFS S3 server per test session."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Before Ray is imported anywhere: every Ray socket on 127.0.0.1, fast allocator in workers.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "17179869184")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup): tests go out one at a
# time, longest first, so the two finish together; an xdist_group (a module whose tests share
# state or fixtures worth building once) goes to one worker as a whole, in order. Seconds each alone
# on a 2-core box (a clean-clone run); only the order depends on them, and unlisted tests count 1.
TEST_SECONDS = {
    "test_readme_serve_command_runs_on_vllm_with_an_s3_adapter": 340,
    "test_ray_job_submit_trains_into_s3_serves_and_shows_no_credential": 270,
    "test_shortened_demo_runs_the_whole_chain": 230,
    "test_full_dpo_precomputes_the_reference_once_and_resumes_exactly": 100,
    "test_shortened_alignment_demo_runs_the_whole_chain": 210,
    "test_shortened_online_demo_runs_raft_from_the_base_model": 125,
    "test_iterative_dpo_pairs_by_reward_and_keeps_the_start_as_reference": 115,
    "test_raft_killed_while_scoring_restarts_there_and_runs_two_iterations": 105,
    "test_a_killed_worker_resumes_from_the_last_checkpoint": 135,
    "test_two_workers_on_two_nodes_checkpoint_to_s3_and_export_what_one_node_gives": 60,
    "test_eval_scorers_spread_over_nodes": 20,
    "test_two_replicas_on_two_nodes_answer_through_one_address": 25,
    "test_a_node_killed_mid_run_and_the_elastic_run_finishes_on_the_nodes_left": 110,
    "test_workers_the_cluster_cannot_place_stop_the_run_with_what_is_missing": 45,
    "test_lisa_on_deepspeed_zero2_resumes_mid_interval_with_the_same_sampling": 135,
    "test_readme_commands_run_as_written_in_order": 360,
    "test_the_embedded_model_as_gguf_answers_held_out_emails_as_in_transformers_and_in_llama_cpp": 80,
    "test_every_outtype_reads_back_and_reloads_in_transformers_as_the_source": 30,
    "test_lora_zero2_on_s3_resumes_exports_and_merges": 107,
    "test_full_zero3_offload_checkpoints_and_resumes": 92,
    "test_a_served_endpoint_gives_the_same_answers_as_the_folder": 83,
    "test_lisa_on_ddp_samples_the_same_blocks_on_every_rank_and_frees_state": 57,
    "test_a_draft_is_cut_from_its_target_tuned_on_its_replies_and_serves_beside_it": 60,
    "test_qlora_trains_a_4bit_base_exports_and_merges": 51,
    "test_vocab_extension_then_rope_scaled_training_past_the_native_context": 50,
    "test_schemathesis_finds_no_server_error": 45,
    "test_lmflow_scripts_train_as_written": 40,
    "test_ray_train_workers_read_their_shards": 41,
    "test_a_full_disk_at_a_checkpoint_ends_the_run_with_one_line_naming_it": 33,
    "test_bad_row_in_a_ray_task_is_one_clean_line": 33,
    "test_sharded_jsonl_on_ray_equals_one_process": 30,
    "test_openai_client_chat_stream_completion_and_models": 26,
    "test_recipe_validation_renders_every_instance_with_its_template": 26,
    "test_bad_eval_requests_exit_2_naming_the_problem": 25,
    "test_folder_eval_accuracy_nll_and_files": 23,
    "test_a_lora_checkpoint_in_s3": 20,
    "test_readme_local_chat_needs_no_server": 16,
    "test_choice_questions_are_scored_by_option_likelihood": 12,
    "test_text_nll_uses_block_size_windows_like_lmflow": 11,
    "test_math_answers_are_read_as_the_final_number": 11,
    "test_preview_raw_is_the_official_rendering": 11,
    "test_preview_marks_exactly_the_reply": 10,
    "test_web_page_streams_a_reply_in_headless_chromium": 9,
}


def pytest_collection_modifyitems(items):
    def group(item):
        mark = item.get_closest_marker("xdist_group")
        return (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None

    def seconds(item):
        return TEST_SECONDS.get(getattr(item, "originalname", item.name), 1)

    groups: dict = {}
    for item in items:
        if group(item) is not None:
            groups[group(item)] = groups.get(group(item), 0) + seconds(item)
    # Stable: a group's tests keep their order (and stay together, all with the group's total).
    items.sort(key=lambda item: -(groups[group(item)] if group(item) is not None else seconds(item)))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from lmflow_ray.ray_init import WORKER_ENV, start_local

    temp = tempfile.mkdtemp(prefix="lr-ray-")
    start_local(num_cpus=4, include_dashboard=False, object_store_memory=384 << 20, _temp_dir=temp,
                runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
    from lmflow_ray.ray_init import quiet_data_logs

    quiet_data_logs()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer (ChatML template) that Ray workers can load by path."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def orders(tmp_path_factory):
    """240 support e-mails from the shipped task: small enough for quick steps on tiny models."""
    import json

    folder = tmp_path_factory.mktemp("orders")
    data = json.loads((REPO / "jobs" / "data" / "support_orders" / "train" / "train.json").read_text())
    (folder / "orders.json").write_text(json.dumps({"type": "conversation", "instances": data["instances"][:240]}))
    return folder


def trainer_state(checkpoint, s3):
    """trainer_state.json of a checkpoint (local or s3://)."""
    import json

    from lmflow_ray.storage import filesystem, join

    fs, path = filesystem(join(checkpoint.uri, "trainer_state.json"), s3)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


@pytest.fixture
def repo_python():
    """Run `python ARGS...` from the repository root, as a user would; returns the CompletedProcess."""
    import subprocess

    def run(*args, timeout=600, env=None, input=None):
        return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, input=input,
                              timeout=timeout, env={**os.environ, **(env or {})})

    return run
