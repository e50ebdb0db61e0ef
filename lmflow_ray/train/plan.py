"""Pure step arithmetic: how many optimizer steps, where each epoch starts, the LR multiplier."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from lmflow_ray.config import TrainSection
from lmflow_ray.errors import UserError


@dataclass(frozen=True)
class Plan:
    """A step takes ``step_rows`` rows of the run's one ordered stream (train/feed.py), every rank
    its contiguous ``micro_batch x accumulation``; ``rows`` per epoch (0: not counted, the run
    ends at max_steps)."""

    rows: int
    world_size: int
    micro_batch: int
    accumulation: int
    total_steps: int
    warmup_steps: int
    scheduler: str
    train_rows: int = 0  # rows the whole run trains on: num_train_epochs x rows (0 with max_steps)

    @property
    def step_rows(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> float:
        return self.rows / self.step_rows if self.rows else 0.0

    @property
    def left_out(self) -> int:
        """Rows of the last epoch no whole step is left for (0 with max_steps)."""
        return self.train_rows - self.total_steps * self.step_rows if self.train_rows else 0

    def epoch_at(self, rows_done: int) -> float:
        return rows_done / self.rows if self.rows else 0.0

    def for_world(self, world: int, step: int, rows_done: int) -> "Plan":
        """The plan of a worker group of ``world`` workers that starts at ``step`` with
        ``rows_done`` rows trained: the same rows and warmup; without max_steps, the steps
        that the rows left make at the new size."""
        if world == self.world_size:
            return self
        total = self.total_steps
        if self.train_rows:
            total = step + max(0, self.train_rows - rows_done) // (self.micro_batch * self.accumulation * world)
        return replace(self, world_size=world, total_steps=total)

    def to_dict(self) -> dict:
        return asdict(self)


class TooFewRows(UserError):
    """The data packs into less than one step per worker; ``fits`` workers would each get one."""

    def __init__(self, message: str, fits: int):
        super().__init__(message)
        self.fits = fits


def make_plan(rows: int | None, world_size: int, train: TrainSection) -> Plan:
    """The steps for ``rows`` packed rows per epoch (None: not counted; max_steps ends the run).
    Epochs follow each other with no gap, so only the end of the last epoch can leave rows out
    (fewer than one step's), and the plan says how many."""
    micro, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    step_rows = micro * accum * world_size
    if rows is not None and rows < step_rows:
        raise TooFewRows(
            f"train: {rows} packed rows make less than one step of {world_size} workers "
            f"(per_device_train_batch_size {micro} x gradient_accumulation_steps {accum} each); "
            "lower them, use fewer workers or add data", fits=rows // (micro * accum))
    if train.max_steps > 0:
        total, train_rows = train.max_steps, 0
    elif rows is None:
        raise ValueError("make_plan: without max_steps the rows must be counted")
    else:
        train_rows = math.floor(train.num_train_epochs * rows)
        total = train_rows // step_rows
        if total == 0:
            raise UserError(f"train: num_train_epochs {train.num_train_epochs} of {rows} packed rows is less than one "
                            f"step of {step_rows} rows; train longer or on smaller steps")
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total)
    return Plan(rows or 0, world_size, micro, accum, total, min(warmup, total), train.lr_scheduler_type, train_rows)


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
