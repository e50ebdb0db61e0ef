"""LISA (layerwise importance sampled AdamW): which decoder blocks train in which interval.

Every ``lisa_interval_steps`` steps all decoder blocks are frozen and ``lisa_activated_layers`` of
them, sampled afresh, are unfrozen; everything outside the blocks (embeddings, final norm, LM
head) trains throughout. The sample for interval ``k`` is a pure function of (seed, k), so every
rank draws the same blocks without talking and a resumed run draws the same sequence again.

The block list is found by the model's structure, not by a table of class names: the
``ModuleList`` of identical modules holding most of the parameters, one per hidden layer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lmflow_ray.errors import UserError


def find_blocks(model: Any) -> tuple[str, Any]:
    """(dotted name, ModuleList) of the decoder blocks: the ModuleList of same-class modules with
    the most parameters, as long as ``config.num_hidden_layers`` when the config says."""
    import torch

    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[int, str, Any] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 1:
            continue
        if len({type(child) for child in module}) != 1 or (expected and len(module) != expected):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise UserError(
            f"train.use_lisa: found no list of decoder blocks in {type(model).__name__} (looked for a "
            f"ModuleList of {expected or 'N'} identical layers holding parameters); LISA needs one, "
            "use full fine-tuning or LoRA for this model")
    return best[1], best[2]


def block_of(names: list[str], prefix: str) -> dict[str, int]:
    """Parameter name -> its block index, for names under ``prefix`` (the block list)."""
    out = {}
    lead = prefix + "."
    for name in names:
        if name.startswith(lead):
            out[name] = int(name[len(lead):].split(".", 1)[0])
    return out


@dataclass(frozen=True)
class LisaSchedule:
    num_blocks: int
    activated: int
    interval: int
    seed: int

    def __post_init__(self) -> None:
        if self.activated > self.num_blocks:
            raise UserError(f"train.lisa_activated_layers: {self.activated} is more than the model's "
                            f"{self.num_blocks} decoder blocks")

    def interval_of(self, step: int) -> int:
        return step // self.interval

    def layers_at(self, step: int) -> tuple[int, ...]:
        """The blocks that train at optimizer step ``step`` (0-based), sorted."""
        rng = random.Random(f"lisa:{self.seed}:{self.interval_of(step)}")
        return tuple(sorted(rng.sample(range(self.num_blocks), self.activated)))


class Lisa:
    """The model's blocks plus the schedule; ``activate`` sets requires_grad for a set of blocks."""

    def __init__(self, model: Any, activated: int, interval: int, seed: int):
        self.prefix, self.blocks = find_blocks(model)
        self.schedule = LisaSchedule(len(self.blocks), activated, interval, seed)
        self.block_of = block_of([n for n, _ in model.named_parameters()], self.prefix)
        self.active: tuple[int, ...] = ()

    def activate(self, layers: tuple[int, ...]) -> None:
        for index, block in enumerate(self.blocks):
            block.requires_grad_(index in layers)
        self.active = tuple(layers)

    def is_block_param(self, name: str) -> bool:
        return name in self.block_of
