"""The loop every Ray Train worker runs: load, restore, step, report, checkpoint. Read it top to bottom.

Every step takes the next rows of the run's one ordered stream of packed rows (train/feed.py), each
rank its own contiguous part; the rows trained so far are kept with every checkpoint, so a resumed
or restarted run, on any number of workers, goes on with exactly the rows after them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from lmflow_ray import storage
from lmflow_ray.config import Recipe, recipe_to_yaml
from lmflow_ray.data.tokenize import load_tokenizer
from lmflow_ray.errors import CheckpointWriteError
from lmflow_ray.model.adapters import apply_lora
from lmflow_ray.model.load import ROPE_MARK, load_model, matmul_parameters, parameter_counts
from lmflow_ray.model.locate import model_folder
from lmflow_ray.train.deepspeed import deepspeed_config
from lmflow_ray.train.feed import rank_steps
from lmflow_ray.model.lisa import Lisa
from lmflow_ray.train.objectives import Objective, make_objective
from lmflow_ray.train.observe import (BlockWatch, MemoryPeak, Meter, TensorBoard, flops_per_token, hardware_peak,
                                      plot_loss, summary_markdown)
from lmflow_ray.train.plan import Plan
from lmflow_ray.train.strategy import DDPStrategy, DeepSpeedStrategy, load_plain


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    recipe = Recipe.model_validate(config["recipe"])
    plan = Plan(**config["plan"])
    run_uri, s3, board = config["run_uri"], config["s3"], config.get("board")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    transformers_quiet()
    objective = make_objective(recipe.train, recipe.model.use_lora)  # what the steps train for

    # Model: the same seed on every rank, so LoRA's random init (and a new score head) agree everywhere.
    seed_everything(recipe.train.seed)
    base = model_folder(recipe.model.model_name_or_path, s3)  # the pinned URI, fetched once per node
    tokenizer = load_tokenizer(base, recipe.model.trust_remote_code)
    model = load_model(recipe.model, device=device, s3=s3, folder=base, head=objective.head,
                       pad_token_id=tokenizer.pad_token_id)
    if recipe.model.use_lora:
        model = apply_lora(model, recipe.model, gradient_checkpointing=recipe.train.gradient_checkpointing,
                           head=objective.head)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total_params, trainable_params = parameter_counts(model)
    n_matmul, cfg = matmul_parameters(model), model.config
    if not recipe.model.use_qlora:  # a quantized model was placed on its device as it loaded
        model.to(device)

    # The newest complete checkpoint in the run folder: after a worker-group restart, on a re-run
    # with the same name, and also when a checkpoint finished uploading just before a crash but Ray
    # had not yet registered it (ray.train.get_checkpoint() would miss that one).
    latest = storage.latest_checkpoint(run_uri, s3, say=print)  # complete by its manifest; unreadable raises
    start = latest.step if latest is not None else 0
    # The plan at this worker group's size (elastic: it may differ from the last group's), from the
    # rows trained so far; older checkpoints did not keep them: their steps were all of one size.
    rows_done = 0 if latest is None else int(latest.manifest.get(
        "rows", start * plan.micro_batch * plan.accumulation * latest.manifest.get("world_size", world)))
    plan = plan.for_world(world, start, rows_done)

    # LISA: the blocks the checkpoint's optimizer state belongs to (those of its last step).
    lisa = None
    if recipe.train.use_lisa:
        lisa = Lisa(model, recipe.train.lisa_activated_layers, recipe.train.lisa_interval_steps, recipe.train.seed)
        lisa.activate(lisa.schedule.layers_at(max(0, start - 1)))
        trainable_params = parameter_counts(model)[1]

    ds_config = deepspeed_config(recipe.train, world)
    if ds_config is not None:
        strategy = DeepSpeedStrategy(model, ds_config, plan, recipe.train.learning_rate,
                                     recipe.train.weight_decay, lora=recipe.model.use_lora, lisa=lisa)
    else:
        strategy = DDPStrategy(model, plan, recipe.train.learning_rate, recipe.train.weight_decay,
                               recipe.train.max_grad_norm, recipe.train.bf16, lisa=lisa)
    objective.attach(strategy.module)

    state = {"step": 0, "rows": 0, "log_history": [], "resumed_at": []}
    if latest is None:
        seed_everything(recipe.train.seed + rank)
    else:
        fs, path = storage.filesystem(latest.uri, s3)
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
            storage.verify_local(folder, latest.manifest, latest.uri)  # before any (pickled) file is loaded
            state = restore(folder, strategy, rank)  # also each rank's RNG (dropout) as it was
        state["rows"] = rows_done
    # Where this worker group runs, from each worker's own context: one entry per start or restart.
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    state["worker_groups"] = [*state.get("worker_groups", []),
                              {"from_step": state["step"], "world_size": world, "worker_nodes": nodes}]
    if board is not None and rank == 0:
        board.started.remote(state["worker_groups"][-1])
    peak = hardware_peak(device, torch.bfloat16 if recipe.train.bf16 else torch.float32)  # the whole run's
    tb = TensorBoard(tempfile.mkdtemp(prefix="lmflow-tb-")) if rank == 0 else None
    meter = Meter()
    memory = MemoryPeak(device)
    watch = BlockWatch(lisa) if lisa is not None else None
    # Without packing, LMFlow's layout: every row padded to block_size (a pair row holds two sides).
    pad_to = None if recipe.data.packing else recipe.data.block_size * (2 if objective.paired else 1)
    eval_every = config.get("eval_every")
    held = ray.train.get_dataset_shard("eval") if eval_every else None
    eval_batch = recipe.train.per_device_eval_batch_size or recipe.train.per_device_train_batch_size
    strategy.module.train()

    # The loop.
    for step, micro_batches, rows in rank_steps(config["feed"], plan, state["step"], state["rows"], rank):
        if lisa is not None and (layers := lisa.schedule.layers_at(step)) != lisa.active:
            strategy.switch(layers)
        for batch in micro_batches:
            inputs = to_device(objective.collate(batch, tokenizer.pad_token_id, pad_to), device)
            loss, tally = objective.loss(strategy.model, inputs)
            strategy.backward(loss)
            width = inputs["input_ids"].shape[1]
            real = int(sum(len(ids) for ids in batch["input_ids"]))
            meter.add(tally, real,
                      real * flops_per_token(n_matmul, recipe.model.use_lora, cfg.num_hidden_layers, cfg.hidden_size, width))
        grad_norm = strategy.finish_step()
        meter.steps += 1
        state["step"], state["rows"] = step + 1, rows
        done = state["step"] == plan.total_steps
        if board is not None and rank == 0:
            board.update.remote({"step": state["step"]})

        evaluate_now = held is not None and (state["step"] % eval_every == 0 or done)
        if state["step"] % recipe.train.logging_steps and state["step"] % recipe.train.save_steps and not done \
                and not evaluate_now:
            continue
        metrics = gather_metrics(meter, objective, plan, state, strategy.lr(), grad_norm, peak, world,
                                 memory.take(), strategy.optimizer_bytes())
        if evaluate_now:  # after the step metrics are taken: eval time is not counted as training time
            metrics.update(eval_metrics(strategy, objective, held, eval_batch, tokenizer.pad_token_id, pad_to, device,
                                        rank, world))
        if watch is not None:
            metrics.update(lisa_metrics(watch, strategy, lisa, world))
        state["log_history"].append(metrics)
        if tb is not None:
            tb.log(metrics, state["step"])
            if board is not None:
                board.update.remote(metrics)
        if state["step"] % recipe.train.save_steps == 0 or done:
            save_checkpoint(strategy, tokenizer, recipe, plan, state, metrics, rank, world, tb, run_uri, s3)
        else:
            ray.train.report(metrics)
        meter.reset()  # after the save and the report: the next steps' time is theirs alone

    if rank == 0:
        finish(recipe, plan, state, run_uri, s3, total_params, trainable_params, strategy, world, device, tb)


# ---- the pieces the loop calls -------------------------------------------------------------------


def transformers_quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # no save/load progress bars in the workers' logs
    logging.set_verbosity_error()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def eval_metrics(strategy, objective: Objective, shard: Any, batch_size: int, pad_id: int, pad_to: int | None,
                 device: Any, rank: int = 0, world: int = 1) -> dict[str, float]:
    """The objective's metrics over every held-out row (rank r takes batches r, r + world, ...,
    summed over ranks), in eval mode without gradients; the model is back in train mode after.
    Every rank runs as many forward passes (a rank one batch short repeats one and counts nothing
    from it): DDP and ZeRO-3 forwards talk to every rank."""
    strategy.module.eval()
    sums: dict[str, float] = {}
    batches = list(shard.iter_batches(batch_size=batch_size, batch_format="numpy"))
    mine = batches[rank::world]
    passes = -(-len(batches) // world)
    try:
        with torch.no_grad():
            for i in range(passes):
                batch = mine[i] if i < len(mine) else batches[0]
                _, tally = objective.loss(strategy.model, to_device(objective.collate(batch, pad_id, pad_to), device))
                if i >= len(mine):
                    continue  # a repeat for the forward count only
                for key, value in tally.items():
                    sums[key] = sums.get(key, 0.0) + value
    finally:
        strategy.module.train()
    return objective.eval_metrics(all_ranks(sums, objective.tally_keys))


def all_ranks(sums: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """Each key's sum over every rank (a key a rank never saw counts 0 there)."""
    total = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return dict(zip(keys, total.tolist()))


def to_device(arrays: dict[str, np.ndarray], device: Any) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def gather_metrics(meter: Meter, objective: Objective, plan: Plan, state: dict, lr: float, grad_norm: float,
                   peak: float, world: int, memory: float, optimizer_bytes: float) -> dict[str, float]:
    """Sums over every rank: the objective's sums (its loss per trained token or per pair), tokens
    and FLOPs since the last logging step; the highest worker's memory peak and optimizer state;
    MFU against ``peak``, the run's hardware peak."""
    elapsed = meter.elapsed()
    totals = all_ranks({**meter.sums, "tokens": meter.tokens, "flops": meter.flops},
                       (*objective.tally_keys, "tokens", "flops"))
    highest = torch.tensor([memory, optimizer_bytes], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
    tokens, trained, flops = totals["tokens"], totals["trained"], totals["flops"]
    return {
        "step": state["step"],
        "epoch": round(plan.epoch_at(state["rows"]), 4),
        "rows": state["rows"],  # rows of the run's stream trained so far (train/feed.py)
        "wall_time": time.time(),  # when the step was logged (unix seconds, as TensorBoard's events)
        **objective.metrics(totals),  # loss: per trained token (SFT) or per pair, over every rank and micro-batch
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        "trained_tokens_per_s": trained / elapsed,
        "step_time": elapsed / max(1, meter.steps),
        "flops_per_s": flops / elapsed,
        "mfu": flops / elapsed / peak if peak else 0.0,  # peak: the hardware of every rank (hardware_peak)
        "peak_flops_per_s": peak,
        "peak_memory_mb": highest[0].item() / 2**20,  # CUDA allocator peak, or resident size on CPU
        "optimizer_state_mb": highest[1].item() / 2**20,
    }


def lisa_metrics(watch: BlockWatch, strategy, lisa: Lisa, world: int) -> dict[str, Any]:
    """Per rank: the blocks sampled, the blocks whose weights changed since the last logging step
    and the blocks the optimizer holds state for. Ranks that disagree on the sample stop the run
    (they would silently train different models)."""
    mine = {"layers": list(lisa.active), "updated": watch.changed(), "state": strategy.state_blocks()}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
    if any(r["layers"] != mine["layers"] for r in everyone):
        raise RuntimeError(f"LISA: ranks sampled different blocks: {[r['layers'] for r in everyone]}")
    return {"lisa_layers": mine["layers"], "lisa_updated_layers": [r["updated"] for r in everyone],
            "lisa_state_layers": [r["state"] for r in everyone]}


def save_checkpoint(strategy, tokenizer, recipe: Recipe, plan: Plan, state: dict, metrics: dict, rank: int,
                    world: int, tb: TensorBoard | None, run_uri: str, s3: dict) -> None:
    """Every rank writes its part into a temp folder; rank 0 adds the HF export and a manifest of
    every rank's files; Ray merges the folders into checkpoint_NNNNNN in storage."""
    import ray.train

    step = state["step"]
    folder = tempfile.mkdtemp(prefix=f"lmflow-ckpt-{step}-")
    try:
        strategy.save(folder, tag=f"step_{step}")
        os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(folder, "rng", f"rank{rank}.pt"))
        weights = strategy.full_state_dict()  # collective under ZeRO-3
        if rank == 0:
            export(strategy.module, weights, tokenizer, os.path.join(folder, storage.EXPORT_DIR))
            with open(os.path.join(folder, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "rows": state["rows"], "epoch": plan.epoch_at(state["rows"]), "world_size": world,
                           "lisa_layers": list(strategy.lisa.active) if strategy.lisa is not None else None,
                           "plan": plan.to_dict(), "log_history": state["log_history"],
                           "resumed_at": state["resumed_at"], "worker_groups": state["worker_groups"]}, f, indent=1)
            with open(os.path.join(folder, "recipe.yaml"), "w") as f:
                f.write(recipe_to_yaml(recipe))
        mine = storage.list_local_files(folder, hashes=True)
        everyone: list[Any] = [mine]
        if world > 1:
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, mine)
        if rank == 0:
            files = {k: v for part in everyone for k, v in part.items()}
            storage.write_manifest(folder, files, {
                "step": step, "rows": state["rows"], "world_size": world, "strategy": strategy.name,
                "zero_stage": strategy.stage,
                "method": recipe.method, "objective": recipe.train.objective,
                "base_model": recipe.model.model_name_or_path,
                "export": storage.EXPORT_DIR, "quantized_layers": quantized_layers(strategy.module)})
        target = storage.join(run_uri, storage.checkpoint_name(step))
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=storage.checkpoint_name(step))
            if tb is not None:
                storage.upload(tb.folder, storage.join(run_uri, "tensorboard"), s3)
        except Exception as err:  # disk full, storage unreachable after its retries: one line, not a traceback
            cause = _os_error(err)
            if cause is None:
                raise
            from lmflow_ray.credentials import redact

            raise CheckpointWriteError(target, redact(f"{type(cause).__name__}: {cause}")[:500]) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _os_error(err: BaseException) -> OSError | None:
    """The storage error (OSError: pyarrow's, the disk's) behind ``err``, through any wrapper."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def export(module: Any, weights: dict | None, tokenizer: Any, folder: str) -> None:
    """The standard export: a save_pretrained folder (for LoRA, the adapter) plus the tokenizer. A
    LoRA run with RoPE scaling also writes its scaled base config, which merge applies."""
    module.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)
    if hasattr(module, "peft_config") and getattr(module.config, ROPE_MARK, None):
        module.config.save_pretrained(folder)


def quantized_layers(model: Any) -> int:
    """Linear layers bitsandbytes holds in 4 or 8 bits (QLoRA's base)."""
    return sum(1 for m in model.modules()
               if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ in ("Linear4bit", "Linear8bitLt"))


def method_label(recipe: Recipe) -> str:
    """How the run tuned the weights, and for what: `LoRA`, `DPO (sigmoid, beta 0.1), LoRA`, ..."""
    train = recipe.train
    goal = {"sft": "", "reward": "reward model (score head), ",
            "dpo": f"DPO ({train.loss_type}, beta {train.beta}), "}[train.objective]
    return goal + _weights_label(recipe)


def _weights_label(recipe: Recipe) -> str:
    model, train = recipe.model, recipe.train
    if model.use_lora:
        return (f"QLoRA ({model.quant_bit}-bit base)" if model.use_qlora else "LoRA") + (" (DoRA)" if model.use_dora else "")
    if train.use_lisa:
        return f"LISA ({train.lisa_activated_layers} blocks every {train.lisa_interval_steps} steps)"
    return "full fine-tuning"


def rng_state() -> dict:
    """Every generator's state as tensors and numbers only, so it loads with weights_only=True (a
    pickle in a shared checkpoint folder would run whatever code its writer put in it)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python_version": version, "python_state": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
            "numpy_kind": kind, "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    random.setstate((rng["python_version"], tuple(rng["python_state"].tolist()), rng["python_gauss"]))
    np.random.set_state((rng["numpy_kind"], rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"],
                         rng["numpy_has_gauss"], rng["numpy_gauss"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def restore(folder: str, strategy, rank: int) -> dict:
    """Optimizer, schedule, weights, this rank's RNG and the step count from a complete checkpoint."""
    strategy.load(folder)
    with open(os.path.join(folder, "trainer_state.json")) as f:
        state = json.load(f)
    rng_file = os.path.join(folder, "rng", f"rank{rank % state['world_size']}.pt")
    set_rng_state(load_plain(rng_file, "rng/" + os.path.basename(rng_file)))
    return {"step": state["step"], "log_history": state["log_history"],
            "resumed_at": [*state.get("resumed_at", []), state["step"]], "worker_groups": state.get("worker_groups", [])}


def finish(recipe: Recipe, plan: Plan, state: dict, run_uri: str, s3: dict, total_params: int,
           trainable_params: int, strategy, world: int, device: Any, tb: TensorBoard | None) -> None:
    """loss.png and summary.md next to the checkpoints; the TensorBoard events copied up."""
    folder = tempfile.mkdtemp(prefix="lmflow-summary-")
    try:
        plot_loss(state["log_history"], os.path.join(folder, "loss.png"))
        info = {"run_name": run_uri.rstrip("/").rsplit("/", 1)[-1], "model": recipe.model.model_name_or_path,
                "method": method_label(recipe),
                "strategy": strategy.label, "world_size": world, "device": device.type, "steps": state["step"],
                "total_steps": plan.total_steps, "total_params": total_params, "trainable_params": trainable_params,
                "export": storage.join(run_uri, storage.checkpoint_name(state["step"]), storage.EXPORT_DIR)}
        with open(os.path.join(folder, "summary.md"), "w") as f:
            f.write(summary_markdown(info, state["log_history"]))
        storage.upload(folder, run_uri, s3)
        if tb is not None:
            tb.close()
            storage.upload(tb.folder, storage.join(run_uri, "tensorboard"), s3)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
