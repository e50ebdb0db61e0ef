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

# `make test` runs the suite on two pytest-xdist workers, a module to a worker (--dist loadscope:
# module fixtures are built once). Modules go out slowest first (seconds alone on a 2-core box, a
# clean-clone run), so the two workers finish at about the same time; unlisted ones follow.
MODULE_SECONDS = {
    "test_methods": 455, "test_train": 365, "test_serve_cli": 360, "test_readme": 275, "test_job_submit": 270,
    "test_demo": 230, "test_eval": 200, "test_pipeline": 110, "test_serve": 85, "test_embedded": 60,
    "test_bad_data": 30,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.module.__name__.rpartition(".")[2], 0))  # stable


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from lmflow_ray.ray_init import WORKER_ENV

    temp = tempfile.mkdtemp(prefix="lr-ray-")
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=384 << 20,
             _temp_dir=temp, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
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

    def run(*args, timeout=600, env=None):
        return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})

    return run
