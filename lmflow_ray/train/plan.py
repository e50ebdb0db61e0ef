"""Pure step arithmetic: how many optimizer steps, where each epoch starts, the LR multiplier."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmflow_ray.config import TrainSection
from lmflow_ray.errors import UserError


@dataclass(frozen=True)
class Plan:
    rows_per_rank: int
    world_size: int
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    scheduler: str

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)


class TooFewRows(UserError):
    """The data packs into less than one step per worker; ``fits`` workers would each get one."""

    def __init__(self, message: str, fits: int):
        super().__init__(message)
        self.fits = fits


def make_plan(rows_per_rank: int, world_size: int, train: TrainSection, total_rows: int | None = None) -> Plan:
    """A step takes ``accumulation`` full micro-batches on every rank; leftovers at an epoch's end
    are skipped (as HF does), so every step has the same size. ``total_rows`` (before the split
    among workers) tells a TooFewRows how many workers the data would fill."""
    micro, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    steps_per_epoch = rows_per_rank // (micro * accum)
    if steps_per_epoch == 0:
        total = rows_per_rank * world_size if total_rows is None else total_rows
        raise TooFewRows(
            f"train: {rows_per_rank} packed rows per worker is less than one step "
            f"(per_device_train_batch_size {micro} x gradient_accumulation_steps {accum}); "
            "lower them, use fewer workers or add data", fits=total // (micro * accum))
    total = train.max_steps if train.max_steps > 0 else math.ceil(train.num_train_epochs * steps_per_epoch)
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total)
    return Plan(rows_per_rank, world_size, micro, accum, steps_per_epoch, total, min(warmup, total),
                train.lr_scheduler_type)


def lr_multiplier(plan: Plan, step: int) -> float:
    """Linear warmup, then cosine / linear decay to 0 or constant (HF's schedules)."""
    if step < plan.warmup_steps:
        return (step + 1) / (plan.warmup_steps + 1)
    if plan.scheduler == "constant":
        return 1.0
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    progress = min(1.0, progress)
    if plan.scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
