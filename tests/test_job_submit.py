"""`ray job submit -- lmflow-ray train` against a `ray start --head` cluster on loopback, as the
README shows it, with checkpoints going to the SeaweedFS S3 server."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO
from s3server import free_ports
from lmflow_ray.storage import S3Options, list_checkpoints

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture
def head_cluster(tmp_path):
    """A separate Ray head with its dashboard (the job server), own ports, own token, own temp dir."""
    temp = Path("/tmp") / f"lr-head-{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    gcs, dashboard, client, manager, objects, metrics, agent, agent_grpc, runtime_env = free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--node-manager-port={manager}",
             f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", "--min-worker-port=20002", "--max-worker-port=20999",
             "--num-cpus=4", "--object-store-memory=400000000", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(tmp_path / "head.log", "wb")
    proc = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True)
        if ok.returncode == 0:
            break
        assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        time.sleep(2)
    else:
        pytest.fail("the Ray head's job server did not come up")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # `ray start --block` sits out SIGTERM for about 30 s; its state is thrown away anyway
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    for p in psutil.process_iter(["cmdline"]):  # workers of this head only: they name its temp dir
        if any(str(temp) in part for part in (p.info["cmdline"] or [])):
            p.kill()
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_into_s3(head_cluster, s3_server, tiny_model_dir, tmp_path):
    address, env = head_cluster
    overrides = [f"model_name_or_path={tiny_model_dir}", "conversation_template=chatml", "block_size=256",
                 "max_steps=2", "save_steps=2", "per_device_train_batch_size=2", "run_name=from-job",
                 "output_model_path=s3://lmflow-jobs/runs", f"endpoint_url={s3_server.endpoint}",
                 f"aws_access_key_id={s3_server.access_key}", f"aws_secret_access_key={s3_server.secret_key}"]
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env", "jobs/runtime_env.yaml", "--", "lmflow-ray", "train", "jobs/finetune_lora.yaml", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "final model:  s3://lmflow-jobs/runs/from-job/checkpoint_000002/hf" in proc.stdout
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    checkpoints = list_checkpoints("s3://lmflow-jobs/runs/from-job", s3)
    assert [(c.step, c.complete) for c in checkpoints] == [(2, True)]
