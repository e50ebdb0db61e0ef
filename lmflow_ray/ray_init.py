"""Join the Ray cluster the user points at, or start a private local one for this command.

An address comes from ``--address`` or RAY_ADDRESS (set by ``ray job submit``). Without one the
command starts its own single-node cluster on loopback and stops it when it exits.
"""

from __future__ import annotations

import os

# OpenMP threads that wait for work spin only briefly, then sleep. libgomp's default spins for
# 300,000 rounds after each parallel region, so torch processes that share cores (an eval actor
# next to a replica, CPU training next to anything) burn each other's time: two 2-thread processes
# on 2 cores ran a tiny model's steps 19x slower than with 1,000 rounds, and alone the two are
# within 10% (benchmarks/omp_wait_policy.py). A value the user set wins.
GOMP_SPINCOUNT = os.environ.get("GOMP_SPINCOUNT", "1000")

# Worker processes inherit these: without the malloc ones glibc page-faults element-wise ops 50x
# slower here.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "TOKENIZERS_PARALLELISM": "false",
    "GOMP_SPINCOUNT": GOMP_SPINCOUNT,
}


_joined = False  # whether connect() started or joined the Ray this process uses


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """ray.init once per process, with a runtime env that every worker gets. Worker output stays
    in Ray's log files (the dashboard shows it), not on this terminal."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or on_loopback(address):
        # A private local cluster, or one on loopback: keep every socket on 127.0.0.1 (must be set
        # before import). Otherwise Ray swaps a 127.0.0.1 address for this machine's external one
        # and looks for the cluster there, where a cluster on loopback does not listen.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    global _joined
    if ray.is_initialized():
        if _joined:
            return
        # Something read Ray's runtime context first, which starts a default Ray: the address and
        # the runtime env below would be ignored. A bug of ours, not of the user's input.
        raise RuntimeError("Ray was started in this process before connect(); connect() must come first")
    from lmflow_ray.credentials import publish_pending

    kwargs = dict(runtime_env=_runtime_env(), log_to_driver=False, logging_level="ERROR")
    if address:
        if on_loopback(address):
            # Ray would take this machine's external address as the driver's own and look for the
            # cluster there (it hangs): a cluster on loopback is joined from loopback.
            kwargs["_node_ip_address"] = "127.0.0.1"
        ray.init(address=address, **kwargs)
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        start_local(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                    object_store_memory=int(min(2 << 30, total * 0.15)), **kwargs)
    _joined = True
    publish_pending()  # credentials read before Ray started (a Serve app built first) reach the cluster


def start_local(**kwargs) -> None:
    """ray.init of a private single-node cluster, started once more if its node does not register
    in time: Ray waits a fixed 30 s for that, which a machine busy with other work can miss."""
    import sys

    import ray

    # Ray Train's preemption watcher polls for node drains from an actor of its own in every run; a
    # private single-node cluster has no nodes to lose (a cluster you join keeps it on).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for attempt in (1, 2):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as err:  # Ray raises a bare Exception for it
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
            print("Ray's local node did not come up within Ray's 30 s (a busy machine?); starting it once more",
                  file=sys.stderr, flush=True)
            ray.shutdown()


def on_loopback(address: str) -> bool:
    """Whether a GCS address (``HOST:PORT``, not ``ray://`` or ``auto``) names this machine's loopback."""
    import ipaddress

    if "://" in address or ":" not in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _runtime_env() -> dict | None:
    """WORKER_ENV for the workers; under `ray job submit` only the keys the job's own runtime env
    lacks (Ray refuses a driver runtime env that repeats the job's keys)."""
    import json

    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job:
        return {"env_vars": WORKER_ENV}
    have = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
    missing = {k: v for k, v in WORKER_ENV.items() if k not in have}
    return {"env_vars": missing} if missing else None


def quiet_data_logs() -> None:
    """Ray Data logs every failed task's traceback itself; the CLI reports the cause in one line."""
    import logging

    import ray.data  # noqa: F401  (configures its loggers on import; override after)

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    # Our model actors pass max_restarts=0 to map_batches, which Ray 2.60 takes only through its
    # deprecated ray_remote_args (it names no parameter for it yet); its warning is for us, not users.
    import warnings

    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")


def model_copies(asked: int = 0) -> tuple[int, float, float]:
    """(model copies, CPUs each, GPUs each) for a batch-inference job on this cluster: ``asked``
    copies, or else one per GPU, or one per 4 CPUs; a copy never asks for more CPUs than the
    largest node has (it could not be placed)."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    n = asked or (gpus if gpus else max(1, cpus // 4))
    if gpus:
        return n, 1.0, 1.0
    largest = max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]), default=cpus)
    return n, float(max(1, min(cpus // n, largest))), 0.0


def _local_fingerprint(path: str) -> list | None:
    """What a local path holds, as names and sizes (not times: copies on other nodes differ in
    those); None when it is not there."""
    if os.path.isfile(path):
        return [["", os.path.getsize(path)]]
    if not os.path.isdir(path):
        return None
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()  # the same first files on every node, whatever order its filesystem lists them in
        for name in sorted(files):
            full = os.path.join(root, name)
            found.append([os.path.relpath(full, path), os.path.getsize(full) if os.path.isfile(full) else -1])
            if len(found) >= 2000:  # enough to tell another copy apart
                return sorted(found)
    return sorted(found)


def _fingerprints(paths: list[tuple[str, bool]]) -> list:
    """``_local_fingerprint`` of each (path, presence only) pair: presence only gives True or None."""
    return [(True if os.path.exists(p) else None) if only else _local_fingerprint(p) for p, only in paths]


def check_shared(paths: dict[str, str], present: dict[str, str] | None = None) -> None:
    """On a cluster of several nodes, every local path here (``{recipe key: path}``) must hold the
    same on every node: Ray tasks and workers read them wherever they run. Object-storage URIs
    travel by themselves and are not checked (nor may callers pass hub ids or `default`). One tiny
    task per node. ``present`` paths need only be there on every node (files that change, such as
    a run folder's lease)."""
    import ray

    from lmflow_ray import storage
    from lmflow_ray.errors import UserError

    asked = {**paths, **(present or {})}
    local = {key: (os.path.abspath(p), key in (present or {})) for key, p in asked.items()
             if p and not storage.is_remote(p)}
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not local or len(nodes) < 2:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    order = list(local)
    here = _fingerprints([local[k] for k in order])
    probe = ray.remote(num_cpus=0, max_retries=0)(_fingerprints)
    futures = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote([local[k] for k in order]) for n in nodes}
    where = {n["NodeID"]: n["NodeManagerAddress"] for n in nodes}
    seen = {}
    for node_id, future in futures.items():
        try:
            seen[f"{where[node_id]} ({node_id[:12]})"] = ray.get(future, timeout=120)
        except (ray.exceptions.RayError, TimeoutError):  # the node went away meanwhile: Ray places nothing there
            continue
    problem = first_difference({k: asked[k] for k in order}, here, seen)
    if problem:
        raise UserError(problem)


def first_difference(asked: dict[str, str], here: list, seen: dict[str, list]) -> str | None:
    """The message for the first node whose view of a path (``seen``: node -> one fingerprint per
    key of ``asked``) is not this machine's (``here``), or None when every node sees the same."""
    for node, theirs in seen.items():
        for (key, path), mine, its in zip(asked.items(), here, theirs):
            if its != mine:
                what = "does not have it" if its is None else "holds other files there"
                return (f"{key}: {path} is a local path, and node {node} {what}; on a cluster of several nodes "
                        "every worker reads it where it runs: give an s3:// URI, a folder every node mounts, or "
                        "a relative path inside `ray job submit --working-dir`")
    return None
