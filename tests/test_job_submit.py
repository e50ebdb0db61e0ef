"""`ray job submit -- lmflow-ray train`, then `lmflow-ray train --address` and `lmflow-ray serve
--address --detach` straight from a shell, against a `ray start --head` cluster on loopback, as the
README shows it, with checkpoints going to the SeaweedFS S3
server and the credentials in the nodes' environment (as a KubeRay Secret puts them). Afterwards no
credential shows anywhere: the dashboard's and state API's answers, Ray's log files, the run folder."""

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


API_KEY = "sk-job-submit-" + secrets.token_hex(8)


@pytest.fixture
def head_cluster(tmp_path, s3_server):
    """A separate Ray head with its dashboard (the job server), own ports, own token, own temp dir."""
    temp = Path("/tmp") / f"lr-head-{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    gcs, dashboard, client, manager, objects, metrics, agent, agent_grpc, runtime_env = free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           **s3_server.env(), "LMFLOW_RAY_API_KEY": API_KEY,  # the node environment: a KubeRay Secret's place
           "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}  # the dashboard's Train view (it shows train_loop_config)
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
    yield address, env, temp, f"127.0.0.1:{gcs}"
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


def _external_ip():
    """The address Ray would pick for this machine (the one it must not be sent to here)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet leaves: only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def _submit(address, env, *command, timeout=600):
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env", "jobs/runtime_env.yaml", "--", *command],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    return proc.stdout


def test_ray_job_submit_trains_into_s3_serves_and_shows_no_credential(head_cluster, s3_server, tiny_model_dir, tmp_path):
    import openai
    import requests

    from lmflow_ray import storage

    address, env, temp, gcs = head_cluster
    out = _submit(address, env, "lmflow-ray", "train", "jobs/finetune_lora.yaml", f"model_name_or_path={tiny_model_dir}",
                  "conversation_template=chatml", "block_size=256", "max_steps=2", "save_steps=2",
                  "per_device_train_batch_size=2", "run_name=from-job", "output_model_path=s3://lmflow-jobs/runs")
    assert "final model:  s3://lmflow-jobs/runs/from-job/checkpoint_000002/hf" in out
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    assert [(c.step, c.complete) for c in list_checkpoints("s3://lmflow-jobs/runs/from-job", s3)] == [(2, True)]

    # The same cluster joined straight from a shell with --address (its GCS on loopback): the run
    # resumes at step 2 and trains one more, then the checkpoint is served, detached.
    external = _external_ip()
    direct = subprocess.run([str(BIN / "lmflow-ray"), "train", "jobs/finetune_lora.yaml", "--address", gcs,
                             f"model_name_or_path={tiny_model_dir}", "conversation_template=chatml", "block_size=256",
                             "max_steps=3", "save_steps=2", "per_device_train_batch_size=2", "run_name=from-job",
                             "output_model_path=s3://lmflow-jobs/runs"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=400)
    assert direct.returncode == 0, (direct.stdout + direct.stderr)[-4000:]
    assert "final model:  s3://lmflow-jobs/runs/from-job/checkpoint_000003/hf" in direct.stdout
    checkpoints = list_checkpoints("s3://lmflow-jobs/runs/from-job", s3)
    assert [(c.step, c.complete) for c in checkpoints] == [(2, True), (3, True)]

    port = free_ports(1)[0]
    served = subprocess.run([str(BIN / "lmflow-ray"), "serve", "jobs/serve_checkpoint.yaml", "--address", gcs, "--detach",
                             "engine=transformers", "model_name_or_path=s3://lmflow-jobs/runs/from-job",
                             "served_model_name=tiny", f"port={port}", "max_new_tokens=8"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, (served.stdout + served.stderr)[-4000:]
    for said in (direct, served):  # nothing tried the machine's external address
        assert external is None or external not in said.stdout + said.stderr
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=2)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny:from-job"]
    reply = client.chat.completions.create(model="tiny:from-job", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}

    # Everything Ray keeps and shows about the job, the run and the app, and everything written.
    secrets_ = [s3_server.secret_key, API_KEY]
    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    seen = {}
    # Ray Train V2's runs are served at /api/train/v2/runs/v1 (/api/train/v2/runs is Train V1's).
    for path in ["/api/train/v2/runs/v1", "/api/serve/applications/", "/api/jobs/", "/api/v0/actors?detail=1&limit=1000",
                 "/api/v0/tasks?detail=1&limit=1000", "/api/v0/placement_groups?detail=1", "/nodes?view=summary",
                 "/api/cluster_status", "/api/v0/logs?node_ip=127.0.0.1"]:
        r = requests.get(f"{address}{path}", headers=headers, timeout=60)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        seen[path] = r.text
    runs = seen["/api/train/v2/runs/v1"]
    assert "from-job" in runs and "train_loop_config" in runs and "Secret('***')" in runs
    assert "lmflow-ray" in seen["/api/serve/applications/"]
    for path, text in seen.items():
        for value in secrets_:
            assert value not in text, f"a credential in the answer of {path}"
    logs = [p for p in Path(temp).rglob("*") if p.is_file() and "runtime_resources" not in p.parts]
    assert len(logs) > 20
    for p in logs:
        data = p.read_bytes()
        for value in secrets_:
            assert value.encode() not in data, f"a credential in {p}"
    run = tmp_path / "run"
    storage.download("s3://lmflow-jobs/runs/from-job", run, s3)
    assert (run / "checkpoint_000002" / "recipe.yaml").is_file()
    for p in run.rglob("*"):
        if p.is_file():
            for value in secrets_:
                assert value.encode() not in p.read_bytes(), f"a credential in {p}"
