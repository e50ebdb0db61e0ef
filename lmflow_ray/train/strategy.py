"""How gradients become updates: DeepSpeed (ZeRO 0/2/3, offload) or plain DDP, behind one face.

Both take a micro-batch loss, step the optimizer and LR schedule every ``accumulation`` micro
batches, save/load everything needed to resume exactly, and hand rank 0 a full state dict for
the standard export.

Under LISA both keep optimizer state only for what trains now: ``switch`` drops the state of the
blocks going frozen and starts the newly sampled blocks fresh, while the embeddings, final norm
and head keep theirs. DDP keeps one torch optimizer and swaps its block groups; DeepSpeed (ZeRO
1/2) rebuilds its engine around the new blocks and carries the other groups' partitions over.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lmflow_ray.errors import UserError
from lmflow_ray.model.lisa import Lisa
from lmflow_ray.train.deepspeed import offloads_optimizer, zero_stage
from lmflow_ray.train.plan import Plan, lr_multiplier


def load_plain(path: str, name: str) -> Any:
    """A torch file of tensors and numbers only (weights_only=True); anything else is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{name}: holds more than tensors and numbers (an older lmflow-ray wrote it, or someone "
                        "changed it); refusing to unpickle it. Start over with --fresh or another run_name") from None


def _optimizer_groups(model: Any, weight_decay: float, lisa: Lisa | None = None) -> list[dict]:
    """decay / no_decay groups of the trainable parameters; under LISA the decoder blocks get groups
    of their own (``block_decay`` / ``block_no_decay``), swapped whenever the active blocks change."""
    groups: dict[str, list] = {"decay": [], "no_decay": []}
    if lisa is not None:
        groups.update(block_decay=[], block_no_decay=[])
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "no_decay" if p.ndim < 2 or "norm" in name or name.endswith("bias") else "decay"
            groups[("block_" if lisa is not None and lisa.is_block_param(name) else "") + kind].append(p)
    return [{"params": params, "weight_decay": 0.0 if kind.endswith("no_decay") else weight_decay, "name": kind}
            for kind, params in groups.items() if params or lisa is None]


def _is_block_group(group: dict) -> bool:
    return group.get("name", "").startswith("block_")


def _state_bytes(states: Any) -> int:
    return sum(t.numel() * t.element_size() for state in states for t in state.values() if torch.is_tensor(t))


def _schedule(plan: Plan):
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(plan, step))


class DeepSpeedStrategy:
    name = "deepspeed"

    def __init__(self, model: Any, ds_config: dict, plan: Plan, lr: float, weight_decay: float, lora: bool,
                 lisa: Lisa | None = None):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.ds_config, self.plan, self.base_lr, self.weight_decay = ds_config, plan, lr, weight_decay
        self.stage = zero_stage(ds_config)
        self.lora, self.lisa = lora, lisa
        self._build(model)
        self.label = f"DeepSpeed ZeRO-{self.stage}" + (" + optimizer offload" if offloads_optimizer(ds_config) else "")

    def _build(self, model: Any) -> None:
        import deepspeed

        groups = _optimizer_groups(model, self.weight_decay, self.lisa)
        if offloads_optimizer(self.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=self.base_lr, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.base_lr)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=_schedule(self.plan), config=self.ds_config,
            dist_init_required=False)

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

    # -- LISA ------------------------------------------------------------------------------------

    def switch(self, layers: tuple[int, ...]) -> None:
        """Rebuild the engine around ``layers``: the frozen blocks' partitions and optimizer state
        go with the old engine; the always-trained groups' fp32 partitions and state carry over
        (the same parameters in the same order partition the same way)."""
        import gc

        zero = self.engine.optimizer
        carried = {}
        for i, group in enumerate(zero.optimizer.param_groups):
            if not _is_block_group(group):
                master = zero.single_partition_of_fp32_groups[i]
                carried[group["name"]] = (master.detach(), zero.optimizer.state.get(master))
        lr, schedule, steps = self.lr(), self.scheduler.state_dict(), self.engine.global_steps
        for group in zero.bit16_groups:  # params are views into the old flat buffers: own copies
            for p in group:
                p.data = p.data.clone()
                p.grad = None
        model = self.engine.module
        self.engine.destroy()  # removes the old engine's gradient hooks
        self.engine = self.optimizer = self.scheduler = zero = None
        gc.collect()

        self.lisa.activate(layers)
        self._build(model)
        zero = self.engine.optimizer
        for i, group in enumerate(zero.optimizer.param_groups):
            group["lr"] = lr
            if group["name"] in carried:
                master, state = carried[group["name"]]
                fresh = zero.single_partition_of_fp32_groups[i]
                fresh.data.copy_(master)
                if state:
                    zero.optimizer.state[fresh] = state
        self.scheduler.load_state_dict(schedule)
        self.engine.global_steps = steps

    def state_blocks(self) -> list[int]:
        """Blocks whose parameters the optimizer holds state for (on this rank)."""
        zero = self.engine.optimizer
        names = {id(p): n for n, p in self.module.named_parameters()}
        return sorted({self.lisa.block_of[names[id(p)]] for i, group in enumerate(zero.optimizer.param_groups)
                       if _is_block_group(group) for p in zero.bit16_groups[i]})

    def optimizer_bytes(self) -> int:
        """This rank's optimizer memory: the fp32 partitions and the Adam moments."""
        opt = self.engine.optimizer
        masters = getattr(opt, "single_partition_of_fp32_groups", [])
        inner = getattr(opt, "optimizer", opt)
        return sum(t.numel() * t.element_size() for t in masters) + _state_bytes(inner.state.values())

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, folder: str, tag: str) -> None:
        # LoRA: the frozen base is re-read from model_name_or_path; only adapter + optimizer saved.
        if not self.lora:
            self.engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag=tag)
            return
        # DeepSpeed drops frozen weights by named_parameters(), which names a tied weight once: the
        # tied lm_head (the size of the embedding) stayed in every LoRA checkpoint. Drop every name.
        frozen = {n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        whole = self.engine.module_state_dict

        def trainable_only(*args: Any, **kwargs: Any) -> dict:
            state = whole(*args, **kwargs)
            return {k: v for k, v in state.items() if k not in frozen}

        self.engine.module_state_dict = trainable_only
        try:
            self.engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag=tag, exclude_frozen_parameters=True)
        finally:
            del self.engine.module_state_dict  # the class's own again

    def load(self, folder: str) -> None:
        # DeepSpeed loads its own files with torch.load(weights_only=False), pickles that can run code:
        # the worker has checked every file's sha256 against the manifest before this is called.
        path, _ = self.engine.load_checkpoint(os.path.join(folder, "deepspeed"), load_module_strict=not self.lora)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/deepspeed")

    def full_state_dict(self) -> dict | None:
        """Collective under ZeRO-3 (every rank must call it); the weights on rank 0, None elsewhere."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if torch.distributed.get_rank() == 0 else None


class DDPStrategy:
    """Plain data parallel. Under LISA the set of trained parameters changes, which DDP's reducer
    cannot follow, so the gradients of what trains are averaged by hand at each step instead."""

    name = "ddp"
    label = "DDP"
    stage = 0  # no ZeRO partitioning

    def __init__(self, model: Any, plan: Plan, lr: float, weight_decay: float, max_grad_norm: float, bf16: bool,
                 lisa: Lisa | None = None):
        import ray.train.torch

        self.lisa = lisa
        if lisa is None:
            self.ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        else:
            self.ddp = model
        self.raw = model
        self.weight_decay = weight_decay
        self.optimizer = torch.optim.AdamW(_optimizer_groups(model, weight_decay, lisa), lr=lr)
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

    def _average_gradients(self, params: list) -> None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        grads = [p.grad for p in params if p.grad is not None]
        if world == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= world
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def finish_step(self) -> float:
        params = [p for p in self.raw.parameters() if p.requires_grad]
        if self.lisa is not None:
            self._average_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # -- LISA ------------------------------------------------------------------------------------

    def switch(self, layers: tuple[int, ...]) -> None:
        """Drop the frozen blocks' optimizer state and put the new blocks in their groups."""
        for group in self.optimizer.param_groups:
            if _is_block_group(group):
                for p in group["params"]:
                    self.optimizer.state.pop(p, None)
                    p.grad = None
        self.lisa.activate(layers)
        fresh = {g["name"]: g["params"] for g in _optimizer_groups(self.raw, self.weight_decay, self.lisa)}
        for group in self.optimizer.param_groups:
            if _is_block_group(group):
                group["params"] = fresh[group["name"]]

    def state_blocks(self) -> list[int]:
        names = {id(p): n for n, p in self.raw.named_parameters()}
        return sorted({self.lisa.block_of[names[id(p)]] for p, state in self.optimizer.state.items()
                       if state and names[id(p)] in self.lisa.block_of})

    def optimizer_bytes(self) -> int:
        return _state_bytes(self.optimizer.state.values())

    # -- checkpoints -----------------------------------------------------------------------------

    def _saved_state(self) -> dict:
        """LoRA: the trainable weights; everything else (full, LISA): the whole model."""
        names = {n for n, p in self.raw.named_parameters() if p.requires_grad}
        state = self.raw.state_dict()
        return state if self.lisa is not None else {k: v for k, v in state.items() if k in names}

    def save(self, folder: str, tag: str) -> None:
        if torch.distributed.get_rank() == 0:
            torch.save({"model": self._saved_state(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "tag": tag}, os.path.join(folder, "ddp_state.pt"))

    def load(self, folder: str) -> None:
        # Tensors, numbers and strings only: a pickle that would run code is refused.
        state = load_plain(os.path.join(folder, "ddp_state.pt"), "ddp_state.pt")
        missing = set(self._saved_state()) - set(state["model"])
        if missing:
            raise RuntimeError(f"checkpoint lacks trainable weights: {sorted(missing)[:3]}")
        self.raw.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict | None:
        return self.raw.state_dict() if torch.distributed.get_rank() == 0 else None
