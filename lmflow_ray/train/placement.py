"""Whether the run's Ray Train workers are placed, and what is missing when they cannot be.

Ray Train waits for its worker group's placement group without end (it retries every 60 s), so a
run that asks for more than the cluster has, or that lost a node it cannot do without, would wait
with no word. The driver watches: after ``notice_s`` unplaced it says what is missing, and after
``timeout_s`` it stops the run with that message (0 = wait for an autoscaler as long as it takes).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from lmflow_ray.errors import UserError


def worker_resources(asked: dict[str, float] | None, use_gpu: bool) -> dict[str, float]:
    """What Ray Train asks for each worker: the recipe's, or 1 CPU (+ 1 GPU)."""
    if asked:
        return dict(asked)
    return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}


def group_placed(table: dict[str, dict], world: int | tuple[int, int]) -> bool:
    """A placement group of ``world`` bundles (elastic: between min and max) is created (Ray
    Train's worker group holds one)."""
    low, high = world if isinstance(world, tuple) else (world, world)
    return any(pg.get("state") == "CREATED" and low <= len(pg.get("bundles") or {}) <= high for pg in table.values())


def _shown(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def shortfall(world: int, per_worker: dict[str, float], nodes: list[dict[str, float]]) -> str:
    """Why ``world`` workers of ``per_worker`` do not fit on ``nodes`` (each node's total resources)."""
    def fit(node: dict[str, float]) -> int:
        return min(int(node.get(k, 0.0) // v) if v else world for k, v in per_worker.items())

    best = max(nodes, key=lambda n: (fit(n), tuple(n.get(k, 0.0) for k in per_worker)), default={})
    whole = {k: sum(n.get(k, 0.0) for n in nodes) for k in per_worker}
    return (f"{world} workers of {_shown(per_worker)} fit {sum(fit(n) for n in nodes)} at most on this cluster's "
            f"{len(nodes)} node(s) (the roomiest has {_shown({k: best.get(k, 0.0) for k in per_worker})}, all "
            f"together {_shown(whole)})")


class PlacementWatch:
    """Polled by the driver while fit() runs; raises UserError once the workers have gone
    unplaced for ``timeout_s``."""

    def __init__(self, world: int | tuple[int, int], per_worker: dict[str, float], timeout_s: float, say: Callable[[str], None],
                 notice_s: float = 60.0, poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.world, self.per_worker, self.timeout_s, self.say = world, per_worker, timeout_s, say
        self.notice_s = min(notice_s, timeout_s) if timeout_s else notice_s
        self.poll_s, self.clock = poll_s, clock
        self.since = self.clock()  # unplaced since
        self.next_poll = self.since
        self.noticed = False

    def check(self, table: Callable[[], dict] | None = None, nodes: Callable[[], list[dict]] | None = None) -> None:
        now = self.clock()
        if now < self.next_poll:
            return
        self.next_poll = now + self.poll_s
        if group_placed((table or _placement_groups)(), self.world):
            self.since, self.noticed = now, False
            return
        waited = now - self.since
        if waited < self.notice_s:
            return
        why = shortfall(self.world[0] if isinstance(self.world, tuple) else self.world, self.per_worker, (nodes or _alive_nodes)())
        if self.timeout_s and waited >= self.timeout_s:
            raise UserError(f"train: the workers could not be placed for {waited:.0f} s: {why}. Lower num_workers or "
                            "resources_per_worker, or add nodes; placement_timeout_s sets how long to wait "
                            "(0 = as long as it takes, for an autoscaler)")
        if not self.noticed:
            self.noticed = True
            limit = f"stopping after {self.timeout_s:g} s" if self.timeout_s else "waiting as long as it takes"
            self.say(f"train: waiting {waited:.0f} s to place the workers: {why}; {limit} (train.placement_timeout_s)")


def _placement_groups() -> dict[str, dict]:
    from ray.util import placement_group_table

    return placement_group_table()


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


class StallWatch:
    """Placed workers that make no step for ``notice_s`` get a line (again every ``notice_s``): a
    worker group can wait without end for data a lost node held (Ray rebuilds it only when a CPU is
    free) or for a peer stuck in a collective, and Ray says nothing of it."""

    def __init__(self, say: Callable[[str], None], notice_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.say, self.notice_s, self.clock = say, notice_s, clock
        self.step: tuple[int, int] | None = None  # (worker group, step)
        self.since = self.clock()
        self.told = 0  # notices given for this step

    def check(self, step: tuple[int, int] | None) -> None:
        """``step``: (worker group, its last step) while a group runs, else None."""
        now = self.clock()
        if step != self.step:
            self.step, self.since, self.told = step, now, 0
            return
        waited = now - self.since
        if step is None or waited < self.notice_s * (self.told + 1):
            return
        self.told += 1
        self.say(f"train: no step for {waited:.0f} s (at step {step[1]}): the workers may be waiting for data "
                 "a lost node held (Ray rebuilds it when a CPU is free: leave CPUs beside resources_per_worker) or "
                 "for each other; the dashboard's Train view and the workers' logs tell which")
