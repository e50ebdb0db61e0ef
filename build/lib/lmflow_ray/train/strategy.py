"""How gradients become updates: DeepSpeed (ZeRO 0/2/3, offload) or plain DDP, behind one face.

Both take a micro-batch loss, step the optimizer and LR schedule every ``accumulation`` micro
batches, save/load everything needed to resume exactly, and hand rank 0 a full state dict for
the standard export.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lmflow_ray.train.deepspeed import offloads_optimizer, zero_stage
from lmflow_ray.train.plan import Plan, lr_multiplier


def _optimizer_groups(model: Any, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(plan: Plan):
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(plan, step))


class DeepSpeedStrategy:
    name = "deepspeed"

    def __init__(self, model: Any, ds_config: dict, plan: Plan, lr: float, weight_decay: float, lora: bool):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        groups = _optimizer_groups(model, weight_decay)
        if offloads_optimizer(ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=_schedule(plan), config=ds_config,
            dist_init_required=False)
        self.stage = zero_stage(ds_config)
        self.lora = lora
        self.label = f"DeepSpeed ZeRO-{self.stage}" + (" + optimizer offload" if offloads_optimizer(ds_config) else "")

    @property
    def model(self) -> Any:
        return self.engine

    @property
    def module(self) -> Any:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/accumulation itself
        self.engine.step()  # steps optimizer + schedule only at accumulation boundaries

    def finish_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: str, tag: str) -> None:
        # LoRA: the frozen base is re-read from model_name_or_path; only adapter + optimizer saved.
        self.engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag=tag, exclude_frozen_parameters=self.lora)

    def load(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(os.path.join(folder, "deepspeed"), load_module_strict=not self.lora)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/deepspeed")

    def full_state_dict(self) -> dict | None:
        """Collective under ZeRO-3 (every rank must call it); the weights on rank 0, None elsewhere."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if torch.distributed.get_rank() == 0 else None


class DDPStrategy:
    name = "ddp"
    label = "DDP"
    stage = 0  # no ZeRO partitioning

    def __init__(self, model: Any, plan: Plan, lr: float, weight_decay: float, max_grad_norm: float, bf16: bool):
        import ray.train.torch

        self.ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        self.raw = model
        self.optimizer = torch.optim.AdamW(_optimizer_groups(model, weight_decay), lr=lr)
        self.scheduler = _schedule(plan)(self.optimizer)
        self.accumulation = plan.accumulation
        self.max_grad_norm = max_grad_norm
        self.micro = 0
        self.bf16 = bf16

    @property
    def model(self) -> Any:
        return self._autocast_forward

    @property
    def module(self) -> Any:
        return self.raw

    def _autocast_forward(self, **batch: Any) -> Any:
        device = next(self.raw.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.ddp(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.micro += 1
        last = self.micro % self.accumulation == 0
        if last or not hasattr(self.ddp, "no_sync"):
            (loss / self.accumulation).backward()
        else:
            with self.ddp.no_sync():
                (loss / self.accumulation).backward()

    def finish_step(self) -> float:
        params = [p for p in self.raw.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def _trainable_state(self) -> dict:
        names = {n for n, p in self.raw.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.raw.state_dict().items() if k in names}

    def save(self, folder: str, tag: str) -> None:
        if torch.distributed.get_rank() == 0:
            torch.save({"model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "tag": tag}, os.path.join(folder, "ddp_state.pt"))

    def load(self, folder: str) -> None:
        state = torch.load(os.path.join(folder, "ddp_state.pt"), map_location="cpu", weights_only=False)
        missing = set(self._trainable_state()) - set(state["model"])
        if missing:
            raise RuntimeError(f"checkpoint lacks trainable weights: {sorted(missing)[:3]}")
        self.raw.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict | None:
        return self.raw.state_dict() if torch.distributed.get_rank() == 0 else None
