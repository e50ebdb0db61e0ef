"""The cluster half of the product on one box: a head (no CPUs, as KubeRay heads often have) and
three two-CPU worker nodes, each its own raylet, all on 127.0.0.1. Training spreads its workers
over nodes and checkpoints to S3, eval spreads its scorers, Serve its replicas; a node killed
mid-run leaves a run that finishes on the nodes left. One cluster for the module; the node kill
comes last."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmflow_ray import storage
from lmflow_ray.storage import S3Options, list_checkpoints
from multinode import LoopbackCluster
from s3server import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multinode")]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKER_NODES = {"node_1", "node_2", "node_3"}


@pytest.fixture(scope="module")
def cluster(s3_server):
    env = {**os.environ, **s3_server.env()}  # the nodes' environment: a KubeRay Secret's place
    c = LoopbackCluster(workers=3, cpus=2, env=env)
    nodes = c.nodes()
    assert {n["name"] for n in nodes} == {"head", *WORKER_NODES} and all(n["alive"] for n in nodes)
    assert {n["address"] for n in nodes} == {"127.0.0.1"}  # no traffic to the machine's external address
    yield c
    c.stop()


def lmflow(cluster, s3_server, *args, timeout=600):
    env = {**os.environ, **s3_server.env(), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([str(BIN / "lmflow-ray"), *args, "--address", cluster.address], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def state_of(uri, s3):
    return json.loads(storage.read_bytes(storage.join(uri, "trainer_state.json"), s3))


def train_args(tiny_model_dir, orders, *more):
    return ["train", f"model_name_or_path={tiny_model_dir}", f"dataset_path={orders}", "conversation_template=chatml",
            "block_size=256", "per_device_train_batch_size=2", "num_workers=2", "learning_rate=1e-3",
            "resources_per_worker={CPU: 1, worker_slot: 1}", *more]


def test_two_workers_on_two_nodes_checkpoint_to_s3_and_export_what_one_node_gives(cluster, s3_server, tiny_model_dir,
                                                                               orders, tmp_path):
    from safetensors.torch import load_file

    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    run = "s3://lmflow-multinode/runs/spread"
    spread = lmflow(cluster, s3_server, *train_args(tiny_model_dir, orders, "max_steps=4", "save_steps=2", "run_name=spread",
                                           "output_model_path=s3://lmflow-multinode/runs"))
    checkpoints = list_checkpoints(run, s3)
    assert [(c.step, c.complete) for c in checkpoints] == [(2, True), (4, True)]
    assert "workers: 2 workers on 2 nodes" in spread.stderr
    group = state_of(checkpoints[-1].uri, s3)["worker_groups"]
    assert len(group) == 1 and group[0]["world_size"] == 2
    where = [cluster.node_name(n) for n in group[0]["worker_nodes"]]  # from each worker's own context
    assert len(set(where)) == 2 and set(where) <= WORKER_NODES, where

    # The same recipe on one node (a private local cluster): the same model.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    here = [a for a in train_args(tiny_model_dir, orders, "max_steps=4", "save_steps=2", "run_name=alone",
                                  f"output_model_path={tmp_path}") if not a.startswith("resources_per_worker")]
    alone = subprocess.run([str(BIN / "lmflow-ray"), *here],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, (alone.stdout + alone.stderr)[-4000:]
    local_export = tmp_path / "alone" / "checkpoint_000004" / "hf"
    spread_export = storage.local_model_folder(storage.join(checkpoints[-1].uri, "hf"), str(tmp_path / "fetched"), s3)
    one, many = load_file(local_export / "model.safetensors"), load_file(Path(spread_export) / "model.safetensors")
    assert one.keys() == many.keys()
    worst = max(float((one[k].float() - many[k].float()).abs().max()) for k in one)
    assert worst < 1e-5, worst
    losses = [h["loss"] for h in state_of(str(tmp_path / "alone" / "checkpoint_000004"), None)["log_history"]]
    assert losses == pytest.approx([h["loss"] for h in state_of(checkpoints[-1].uri, s3)["log_history"]], rel=1e-5)


def test_eval_scorers_spread_over_nodes(cluster, s3_server, tiny_model_dir, orders, tmp_path):
    out = lmflow(cluster, s3_server, "eval", f"model_name_or_path={tiny_model_dir}", f"dataset_path={orders}",
                 "conversation_template=chatml", "max_eval_samples=8", "inference_batch_size_per_device=2",
                 "eval_num_workers=2", "max_new_tokens=4", f"eval_output_dir={tmp_path / 'eval'}")
    assert "2 worker(s)" in out.stderr
    scorers = cluster.actors("ModelScorer")
    assert len(scorers) == 2 and len({a["node"] for a in scorers}) == 2, scorers
    assert {a["node"] for a in scorers} <= WORKER_NODES
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["count"] == 8


def test_two_replicas_on_two_nodes_answer_through_one_address(cluster, s3_server, tiny_model_dir):
    import openai

    port = free_ports(1)[0]
    lmflow(cluster, s3_server, "serve", "--detach", f"model_name_or_path={tiny_model_dir}", "engine=transformers",
           "served_model_name=tiny", f"port={port}", "proxy_location=HeadOnly", "min_replicas=2", "max_replicas=2",
           "max_new_tokens=4", timeout=400)
    replicas = [a for a in cluster.actors("ServeReplica") if a["state"] == "ALIVE"]
    assert len(replicas) == 2 and len({a["node"] for a in replicas}) == 2, replicas
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2)
    replies = [client.completions.create(model="tiny", prompt=f"hello {i}", max_tokens=2, temperature=0)
               for i in range(6)]
    assert all(r.usage.completion_tokens >= 1 for r in replies)
    stop = subprocess.run([sys.executable, "-c", (
        "import os, ray; os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0');"
        f"ray.init(address='{cluster.address}', _node_ip_address='127.0.0.1', log_to_driver=False);"
        "from ray import serve; serve.shutdown()")], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]  # the replicas' CPUs back for the node-kill run


def test_a_node_killed_mid_run_and_the_elastic_run_finishes_on_the_nodes_left(cluster, s3_server, tiny_model_dir,
                                                                              orders):
    """num_workers: [2, 3]: 3 workers on the 3 nodes, then 2 once a node is gone; the rows go on
    from the checkpoint's row count (6 a step, then 4)."""
    s3 = S3Options(s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    run = "s3://lmflow-multinode/runs/lose-a-node"
    killed = {}

    def kill_at_step_6():  # the node of rank 1, once the step-6 checkpoint is complete
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            done = [c for c in list_checkpoints(run, s3) if c.complete and c.step >= 6]
            if done:
                node = cluster.node_name(state_of(done[0].uri, s3)["worker_groups"][-1]["worker_nodes"][1])
                killed.update(cluster.kill(node), name=node, at=done[0].step)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=kill_at_step_6, daemon=True)
    watcher.start()
    out = lmflow(cluster, s3_server, *train_args(tiny_model_dir, orders, "max_steps=30", "save_steps=3", "max_failures=3",
                                                 "num_workers=2,3", "run_name=lose-a-node",
                                                 "output_model_path=s3://lmflow-multinode/runs"))
    watcher.join(timeout=5)
    assert killed, out.stdout[-3000:]
    assert "final model:  s3://lmflow-multinode/runs/lose-a-node/checkpoint_000030/hf" in out.stdout
    assert "workers: 3 workers on 3 nodes" in out.stderr
    assert "a worker or node failed: the workers restarted (2 workers on 2 nodes), resuming from step" in out.stderr
    state = state_of(storage.join(run, "checkpoint_000030"), s3)
    assert state["step"] == 30 and state["resumed_at"] and state["resumed_at"][0] >= killed["at"]
    first, *later = state["worker_groups"]
    assert later and killed["node_id"] in first["worker_nodes"]
    assert first["world_size"] == 3 and len(set(first["worker_nodes"])) == 3
    assert all(killed["node_id"] not in g["worker_nodes"] and g["world_size"] == 2 for g in later)
    steps = [h["step"] for h in state["log_history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # one entry per step: none trained twice
    print("worker groups:", json.dumps(state["worker_groups"]), "killed:", killed["name"], "after step", killed["at"])
    print("steps and losses:", [(h["step"], h["rows"], round(h["loss"], 4)) for h in state["log_history"]])
    resumed = later[0]["from_step"]  # (a later restart, if any, also on 2 workers)
    assert state["rows"] == resumed * 6 + (30 - resumed) * 4  # every step took the rows after the last
