"""A Ray cluster of several nodes on this one machine, the way Ray's own tests build one
(ray.cluster_utils.Cluster): a head and worker nodes, each a raylet of its own with its own temp
dir, a custom resource that names it (and a worker_slot on worker nodes), and every address on 127.0.0.1.

The cluster lives in a process of its own (``python multinode.py``), so the test process may also
hold the single-node test cluster; it takes one JSON command per line on stdin and answers one
JSON line on stdout:
  {"do": "nodes"}                 the nodes: name, node_id, address, alive
  {"do": "actors", "like": TEXT}  actors whose class name contains TEXT: class, node_id, state
  {"do": "kill", "name": NAME}    kill -9 a worker node (its raylet and its workers)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def serve(workers: int, cpus: int) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every address Ray picks by itself: loopback
    from ray.cluster_utils import Cluster

    def node_args(name: str, num_cpus: int) -> dict:
        # worker_slot: one training worker per node (resources_per_worker {CPU: 1, worker_slot: 1}),
        # which leaves a CPU on each node for Ray Data and for rebuilding what a lost node held.
        slots = {"worker_slot": 1} if name != "head" else {}
        return dict(num_cpus=num_cpus, resources={name: 1, **slots}, node_ip_address=LOOPBACK, include_dashboard=False,
                    object_store_memory=192 << 20, temp_dir=tempfile.mkdtemp(prefix=f"lr-{name}-"))

    # The head holds no CPUs (as KubeRay heads often do): drivers, Ray Train's controller and Serve's
    # controller live there; every worker, task and replica runs on a worker node.
    cluster = Cluster(initialize_head=True, head_node_args=node_args("head", 0))
    nodes = {"head": cluster.head_node}
    for i in range(1, workers + 1):
        nodes[f"node_{i}"] = cluster.add_node(**node_args(f"node_{i}", cpus))
    cluster.wait_for_nodes()
    names = {node.node_id: name for name, node in nodes.items()}
    say({"address": cluster.address, "nodes": list(nodes)})

    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "nodes":
            say([{"name": names.get(n["NodeID"]), "node_id": n["NodeID"], "address": n["NodeManagerAddress"],
                  "alive": n["Alive"]} for n in cluster.global_state.node_table()])
        elif command["do"] == "actors":
            table = cluster.global_state.actor_table(None)
            say([{"class": a["ActorClassName"], "node_id": a["Address"]["NodeID"], "node": names.get(a["Address"]["NodeID"]),
                  "state": a["State"]} for a in table.values() if command["like"] in (a["ActorClassName"] or "")])
        elif command["do"] == "kill":
            node = nodes[command["name"]]
            cluster.remove_node(node, allow_graceful=False)
            say({"killed": command["name"], "node_id": node.node_id})
    cluster.shutdown()


def say(value) -> None:
    print(json.dumps(value), flush=True)


class LoopbackCluster:
    """The test side: starts ``multinode.py`` and talks to it."""

    def __init__(self, workers: int = 3, cpus: int = 1, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(workers), str(cpus)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        first = self._read(timeout=180)
        self.address, self.names = first["address"], first["nodes"]

    def _read(self, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the cluster process ended (rc {self.proc.poll()})")
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # Ray's own output
        raise TimeoutError("the cluster process did not answer")

    def ask(self, **command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout=120)

    def nodes(self) -> list[dict]:
        return self.ask(do="nodes")

    def actors(self, like: str) -> list[dict]:
        return self.ask(do="actors", like=like)

    def kill(self, name: str) -> dict:
        return self.ask(do="kill", name=name)

    def node_name(self, node_id: str) -> str | None:
        return next((n["name"] for n in self.nodes() if n["node_id"] == node_id), None)

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
