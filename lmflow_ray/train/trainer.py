"""The driver side of `lmflow-ray train`: data -> plan -> TorchTrainer -> checkpoints in storage.

The token pipeline runs as Ray tasks across the cluster (never on a rank while the others wait).
One small actor, the feed (train/feed.py), reads its rows in a fixed order and hands every step its
rows by number, so a resumed run, on any number of workers, reads exactly the rows it would have
read. The rows are counted first (the LR schedule's length) unless max_steps gives the length; then
the first step starts as soon as the first rows are packed, while the pipeline goes on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.data.pipeline import build_dataset, open_source
from lmflow_ray.errors import UserError
from lmflow_ray.lease import LEASE, Lease
from lmflow_ray.model.locate import exact_uri, model_folder
from lmflow_ray.ray_init import check_shared
from lmflow_ray.storage import S3Options
from lmflow_ray.train.deepspeed import deepspeed_config, inline_file, offloads_optimizer, zero_stage
from lmflow_ray.train.objectives import needs_reference_pass
from lmflow_ray.train.placement import PlacementWatch, StallWatch, worker_resources
from lmflow_ray.train.plan import Plan, make_plan


@dataclass
class RunResult:
    run_name: str
    run_uri: str
    steps: int
    resumed_from: int
    metrics: dict[str, Any]
    export_uri: str
    merged_uri: str = ""  # save_aggregated_lora: the final adapter merged into its base


def unique_run_name(prefix: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in prefix).lstrip("._-")[:100] or "run"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def _use_gpu(recipe: Recipe) -> bool:
    import ray

    if recipe.train.use_gpu is not None:
        return recipe.train.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def check_method(recipe: Recipe, world: int) -> None:
    """Combinations of method and DeepSpeed config that cannot work, refused before a cluster starts."""
    config = deepspeed_config(recipe.train, world)
    stage, offload = zero_stage(config), offloads_optimizer(config)
    if recipe.train.elastic and stage > 0:
        raise UserError(f"train.num_workers: {list(recipe.train.num_workers)} (elastic) needs an optimizer state every "
                        f"worker holds whole, to go on at another number of workers: plain DDP (leave train.deepspeed "
                        f"empty) or zero0; {recipe.train.deepspeed!r} (ZeRO-{stage}) partitions it per worker")
    if recipe.train.use_lisa and config is not None and (stage not in (1, 2) or offload):
        raise UserError(f"train.use_lisa: LISA swaps the optimizer's blocks as it goes, which works on DDP (leave "
                        f"train.deepspeed empty) or DeepSpeed ZeRO-1/2 without offload (zero2); "
                        f"got {recipe.train.deepspeed!r}")
    if recipe.model.use_qlora and stage == 3:
        raise UserError(f"model.use_qlora: a quantized base cannot be partitioned by ZeRO-3 ({recipe.train.deepspeed!r}); "
                        "use zero2 or DDP")
    train = recipe.train
    if train.objective == "dpo" and train.precompute_ref_log_probs is False and not recipe.model.use_lora \
            and train.loss_type != "simpo":
        raise UserError("train.precompute_ref_log_probs: false needs LoRA (the reference is the base with the adapter "
                        "disabled); full fine-tuning precomputes the reference's log-probs, so no second model sits "
                        "in the training workers (leave it empty or true)")


# The dataset types each objective learns from: supervised fine-tuning from texts (each renders to
# one text with trained spans), reward models and DPO from chosen / rejected pairs.
SFT_TYPES = ("text_only", "text2text", "conversation")
PAIR_TYPES = ("paired_conversation",)


def data_types(recipe: Recipe) -> tuple[str, ...]:
    return SFT_TYPES if recipe.train.objective == "sft" else PAIR_TYPES


def check_kind(recipe: Recipe, kind: str, where: str) -> None:
    """A dataset's type must suit the objective, found from the file headers before a cluster
    starts (not as a KeyError on a worker)."""
    objective = recipe.train.objective
    if kind in data_types(recipe):
        return
    if objective == "sft":
        raise UserError(f"{where}: a paired_conversation dataset (chosen / rejected pairs) needs a preference "
                        "objective: train.objective=reward (a reward model) or train.objective=dpo; supervised "
                        f"fine-tuning (train.objective=sft) learns from {', '.join(SFT_TYPES)} data")
    raise UserError(f"{where}: a {kind} dataset; train.objective={objective} learns from paired_conversation data "
                    "(instances with `chosen` and `rejected` conversations)")


def check_data(recipe: Recipe) -> None:
    source = open_source(recipe)
    check_kind(recipe, source.kind, f"data.dataset_path {source.uri}")


def heldout_source(recipe: Recipe) -> tuple[str | None, str] | None:
    """Where the eval loss during training comes from: (None, "validation") for the validation
    split of dataset_path, (eval_dataset_path, "train") when eval_steps asks for it, else None."""
    if recipe.data.validation_split_percentage:
        return None, "validation"
    if recipe.train.eval_steps is None:
        return None
    if not recipe.data.eval_dataset_path:
        raise UserError("train.eval_steps: needs held-out data: set data.eval_dataset_path, or "
                        "data.validation_split_percentage to hold out part of dataset_path")
    return recipe.data.eval_dataset_path, "train"


def eval_every(recipe: Recipe) -> int | None:
    """Steps between eval losses (HF's default: the logging interval), or None for no eval."""
    if heldout_source(recipe) is None:
        return None
    return recipe.train.eval_steps or recipe.train.logging_steps


def preflight(recipe: Recipe) -> None:
    """Everything about a recipe that can be refused without Ray, before a cluster starts: the method
    with its DeepSpeed config, and the datasets' types. Needs no Ray (call it before connecting)."""
    check_method(recipe, recipe.train.max_workers)
    check_data(recipe)
    held = heldout_source(recipe)
    if held is not None and held[0] is not None:
        check_kind(recipe, open_source(recipe, held[0]).kind, f"data.eval_dataset_path {held[0]}")


def prepare(recipe: Recipe, run_uri: str, s3: S3Options, world: int, fresh: bool, say) -> storage.CheckpointInfo | None:
    """Start over (``fresh``) or find the checkpoint to resume, refusing ones that cannot load. The
    caller holds the run's lease. Only a checkpoint whose manifest is missing or whose files are
    short counts as partial and is removed; storage that fails stops the run, deleting nothing."""
    if fresh:
        if storage.clear_run(run_uri, s3, keep=(LEASE,)):
            say(f"--fresh: removed everything in {run_uri}")
        return None
    checkpoints = storage.list_checkpoints(run_uri, s3)
    for partial in [c for c in checkpoints if not c.complete]:
        say(f"removing incomplete checkpoint {partial.uri} ({partial.problem})")
        storage.remove_in_run(partial.uri, run_uri, s3)
    complete = [c for c in checkpoints if c.complete]
    if not complete:
        return None
    latest = complete[-1]
    saved_world, saved_stage = latest.manifest.get("world_size"), latest.manifest.get("zero_stage", 0)
    stage = zero_stage(deepspeed_config(recipe.train, world))
    if saved_world != world and max(stage, saved_stage) > 0 and not recipe.train.elastic:
        raise UserError(
            f"{latest.uri}: written by {saved_world} workers with ZeRO-{saved_stage}, whose optimizer state is "
            f"partitioned per worker; resume with num_workers={saved_world}, or start over with --fresh")
    if latest.manifest.get("objective", "sft") != recipe.train.objective:
        raise UserError(f"{latest.uri}: a {latest.manifest.get('objective', 'sft')} run; the recipe asks for "
                        f"train.objective={recipe.train.objective} (use --fresh or another run_name)")
    if latest.manifest.get("method") != recipe.method:
        raise UserError(f"{latest.uri}: a {latest.manifest.get('method')} checkpoint; the recipe asks for "
                        f"{recipe.method} (use --fresh or another run_name)")
    return latest


def eval_rows(recipe: Recipe) -> Any:
    """The held-out rows for the eval loss, materialised in a fixed order (every rank reads them all
    and scores its share of the batches), or None for no eval."""
    held = heldout_source(recipe)
    if held is None:
        return None
    path, side = held
    ds = build_dataset(recipe, path, side)
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    if ds.count() == 0:
        where = path or f"{recipe.data.validation_split_percentage}% of {recipe.data.dataset_path}"
        raise UserError(f"eval loss: {where} gives no packed rows; hold out more")
    return ds


def with_model(recipe: Recipe, model_name_or_path: str) -> Recipe:
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"model_name_or_path": model_name_or_path})})


def token_rows(recipe: Recipe) -> Any:
    """The packed rows as a lazy dataset in a fixed order (nothing runs yet)."""
    ds = build_dataset(recipe)
    ds.context.execution_options.preserve_order = True
    return ds


def spare_cpus(recipe: Recipe) -> float:
    """The cluster's CPUs left to Ray Data beside the training workers (at their most)."""
    import ray

    per_worker = worker_resources(recipe.train.resources_per_worker, _use_gpu(recipe)).get("CPU", 0.0)
    return ray.cluster_resources().get("CPU", 0.0) - per_worker * recipe.train.max_workers


def feed_rows(recipe: Recipe, rows_ds: Any, say) -> tuple[Any, int | None, str]:
    """The feed over the packed rows, the rows per epoch (None: not counted) and how it reads:

    - ``streaming`` keeps no rows: it counts them first (unless max_steps), then packs them again
      while the workers train;
    - with max_steps and a CPU beside the workers, it packs while they train, keeping the rows;
    - otherwise (the epochs must be counted, or every CPU goes to a worker) it packs and keeps
      every row before the workers start, one pass.
    """
    import ray

    from lmflow_ray.train.feed import make_feed

    spare, max_steps = spare_cpus(recipe), recipe.train.max_steps > 0
    if recipe.data.streaming:
        if spare < 1:
            raise UserError(f"data.streaming: the rows are packed while the workers train, which takes a CPU beside "
                            f"them; the cluster has {spare:g} left (lower train.num_workers or the CPU in "
                            "train.resources_per_worker, or leave data.streaming off)")
        per_epoch = None
        if not max_steps:
            say("data: counting the packed rows (a pass that keeps none; max_steps skips it)")
            per_epoch = rows_ds.count()
        return make_feed(rows_ds, recipe.train.seed, keep=False, per_epoch=per_epoch), per_epoch, "stream"
    feed = make_feed(rows_ds, recipe.train.seed, keep=True)
    if max_steps and spare >= 1:
        feed.prime.remote()  # the pipeline starts now, while the workers start
        return feed, None, "stream"
    if max_steps:
        say(f"data: every CPU goes to a training worker ({spare:g} left): packing every row before they start")
    return feed, ray.get(feed.fill.remote()), "fill"


def failure_config(train: Any) -> Any:
    """Ray Train's restarts: ``max_failures`` after a worker or node fails, and apart from those
    ``max_preemption_failures`` after a node is preempted."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=train.max_failures, max_preemption_failures=train.max_preemption_failures)


def run_folder(recipe: Recipe, run_name: str) -> str:
    out = recipe.storage.output_model_path
    return storage.join(out if storage.is_remote(out) else os.path.abspath(out), run_name)


def run(recipe: Recipe, name_prefix: str = "run", fresh: bool = False, say=print, progress: bool = True,
        lease: Lease | None = None) -> RunResult:
    """Train to the end (resuming when the run folder has a checkpoint); returns where it went.
    The run holds the run folder's lease throughout (or uses the caller's ``lease``)."""
    s3 = S3Options.resolve(recipe.storage)
    run_name = recipe.storage.run_name or unique_run_name(name_prefix)
    run_uri = run_folder(recipe, run_name)
    preflight(recipe)
    held = lease or Lease(run_uri, s3).acquire(say)
    try:
        result = _run(recipe, run_name, run_uri, s3, fresh, say, progress)
        if recipe.storage.save_aggregated_lora:
            result.merged_uri = merge_at_end(recipe, result, s3, say)
    finally:
        if lease is None:
            held.release()
    if held.lost:
        say(f"warning: another run took over {run_uri} while this one trained; check its checkpoints")
    return result


def merge_at_end(recipe: Recipe, result: RunResult, s3: S3Options, say) -> str:
    """LMFlow's save_aggregated_lora: the run's final adapter merged into its base, written whole
    as <run folder>/merged (replacing an earlier merge of this run)."""
    import tempfile

    from lmflow_ray.model.adapters import merge_adapter

    if not recipe.model.use_lora:
        say("save_aggregated_lora: nothing to merge (no LoRA adapter: the export is the whole model)")
        return ""
    target = storage.join(result.run_uri, "merged")
    say(f"save_aggregated_lora: merging the adapter into its base -> {target}")
    with tempfile.TemporaryDirectory(prefix="lmflow-merge-") as cache:
        adapter = storage.local_model_folder(result.export_uri, cache, s3)
        return merge_adapter(adapter, target, s3=s3.to_dict())


def _run(recipe: Recipe, run_name: str, run_uri: str, s3: S3Options, fresh: bool, say, progress: bool) -> RunResult:
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lmflow_ray.train.worker import train_loop

    world = recipe.train.max_workers
    # The base pinned to one exact URI (a run: its newest checkpoint now), so every worker, a resume
    # and the adapter's base_model_name_or_path name the same weights; data reads its tokenizer here.
    resume = prepare(recipe, run_uri, s3, world, fresh, say)
    base = exact_uri(recipe.model.model_name_or_path, s3.to_dict(), "model.model_name_or_path")
    started_on = (resume.manifest or {}).get("base_model") if resume else None
    pinned = started_on and (storage.is_remote(started_on) or os.path.isabs(started_on))  # older runs kept it as typed
    if pinned and started_on != base:
        say(f"resuming on the base this run started with, {started_on} (model_name_or_path now means {base})")
        base = started_on
    recipe = with_model(recipe, base)
    tokens_from = model_folder(base, s3.to_dict())
    say(f"run {run_name}: " + (f"resuming from step {resume.step} ({resume.uri})" if resume else "starting") +
        f"; to resume later: run_name={run_name}")

    ref = recipe.train.reference_model_name_or_path
    held_path = (heldout_source(recipe) or (None,))[0]  # eval_dataset_path only when training reads it
    check_shared({"data.dataset_path": recipe.data.dataset_path, "data.eval_dataset_path": held_path,
                  **{key: uri for key, uri in (("model.model_name_or_path", base),
                                               ("train.reference_model_name_or_path", ref)) if uri and os.path.exists(uri)}},
                 present={"storage.output_model_path": storage.join(run_uri, LEASE)})

    started = time.perf_counter()
    rows_ds = token_rows(with_model(recipe, tokens_from))
    held_ds = eval_rows(with_model(recipe, tokens_from))
    if needs_reference_pass(recipe.train, recipe.model.use_lora):  # DPO without a live reference
        from lmflow_ray.train.reference import reference_table, with_reference

        ref = recipe.train.reference_model_name_or_path
        ref_uri = exact_uri(ref, s3.to_dict(), "train.reference_model_name_or_path") if ref else base
        # The rows packed first: the scorers hold the CPUs the packing tasks would need.
        rows_ds = rows_ds.materialize()
        table = reference_table([d for d in (rows_ds, held_ds) if d is not None], recipe, ref_uri, run_uri,
                                s3.to_dict(), say)
        rows_ds = with_reference(rows_ds, table)
        held_ds = with_reference(held_ds, table) if held_ds is not None else None
    feed, per_epoch, how = feed_rows(recipe, rows_ds, say)
    plan = make_plan(per_epoch, world, recipe.train)
    width = recipe.data.block_size * (2 if recipe.train.objective != "sft" else 1)  # a pair row holds two sides
    size = f"{plan.micro_batch}x{plan.accumulation}x{world} rows" + (
        f" (from {recipe.train.min_workers} to {world} workers: a step takes "
        f"{plan.micro_batch}x{plan.accumulation} rows per worker)" if recipe.train.elastic else "")
    if per_epoch is None:
        say(f"data: packed rows of up to {width} tokens stream into the workers as they are made; "
            f"{plan.total_steps} steps (max_steps) of {size}")
    else:
        say(f"data: {per_epoch:,} packed rows of up to {width} tokens per epoch "
            f"({time.perf_counter() - started:.1f}s{', streamed again each epoch' if how == 'stream' else ''}); "
            f"{plan.total_steps} steps of {size}, {plan.steps_per_epoch:.4g} per epoch" +
            (f"; the last {plan.left_out} rows of the last epoch make no whole step and are left out" if plan.left_out else ""))
    if held_ds is not None:
        say(f"eval: {held_ds.count():,} held-out rows, eval loss every {eval_every(recipe)} steps and at the end")
    if resume and resume.step >= plan.total_steps:
        say(f"nothing to do: the run already reached step {resume.step} of {plan.total_steps}")

    storage_fs, storage_path = storage.filesystem(recipe.storage.output_model_path, s3)
    board = _progress_board() if progress else None
    recipe = recipe.model_copy(update={"train": inline_file(recipe.train)})  # the JSON itself goes to the workers
    trainer = TorchTrainer(
        train_loop,
        # Python values, not JSON: credentials stay Secrets, which travel (and show) as references.
        train_loop_config={"recipe": recipe.model_dump(), "plan": plan.to_dict(), "run_uri": run_uri,
                           "s3": s3.to_dict(), "board": board, "eval_every": eval_every(recipe), "feed": feed},
        scaling_config=ScalingConfig(num_workers=recipe.train.num_workers, use_gpu=_use_gpu(recipe),
                                     resources_per_worker=recipe.train.resources_per_worker),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.storage.save_total_limit),
            failure_config=failure_config(recipe.train)),
        datasets={"eval": held_ds} if held_ds is not None else {},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    watch = PlacementWatch((recipe.train.min_workers, world), worker_resources(recipe.train.resources_per_worker, _use_gpu(recipe)),
                           recipe.train.placement_timeout_s, say)
    result = _fit_with_progress(trainer, board, plan, resume.step if resume else 0, progress, watch)
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    step = int(metrics.get("step", resume.step if resume else 0))
    latest = storage.latest_checkpoint(run_uri, s3)
    return RunResult(run_name, run_uri, step, resume.step if resume else 0, metrics,
                     latest.export_uri if latest else "")


def _fit_with_progress(trainer, board, plan: Plan, start: int, progress: bool, watch: PlacementWatch | None = None):
    """fit() in a thread; the terminal gets a progress bar fed by rank 0 through a tiny actor."""
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # surfaced in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    bar = _bar(plan.total_steps, start) if progress else None
    stall = StallWatch(lambda line: print(line, file=sys.stderr, flush=True))
    while thread.is_alive():
        thread.join(timeout=1.0)
        if bar is not None:
            stall.check(bar.show(board))
        if watch is not None and thread.is_alive():
            watch.check()  # raises when the workers stay unplaced too long; the driver's exit ends the run
    if bar is not None:
        bar.show(board, final=True)
    if "error" in box:
        raise box["error"]
    return box["result"]


class _bar:
    def __init__(self, total: int, start: int) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.tqdm = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not self.tty)
        self.last_logged = -1
        self.groups = 0  # worker groups already told of
        self.seen: tuple[int, int] | None = None  # what show() last read

    def show(self, board, final: bool = False) -> tuple[int, int] | None:
        import ray

        try:
            state = ray.get(board.read.remote(), timeout=5)
        except Exception:  # the bar is best effort; training goes on
            return self.seen
        step, metrics = state["step"], state["metrics"]
        for group in state["groups"][self.groups:]:
            self.groups += 1
            nodes = len(set(group["worker_nodes"]))
            where = f"{group['world_size']} workers on {nodes} node{'s' if nodes > 1 else ''}"
            line = (f"workers: {where}" if self.groups == 1 else
                    f"a worker or node failed: the workers restarted ({where}), resuming from step {group['from_step']}")
            if self.tty:
                self.tqdm.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        if self.tty:
            self.tqdm.n = step  # may go back after a restart from a checkpoint
            if metrics:
                shown = {"eval_loss": f"{metrics['eval_loss']:.4f}"} if "eval_loss" in metrics else {}
                self.tqdm.set_postfix(loss=f"{metrics['loss']:.4f}", **shown, lr=f"{metrics['learning_rate']:.2e}",
                                      tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            self.tqdm.refresh()
            if final:
                self.tqdm.close()
        elif metrics and metrics["step"] != self.last_logged:
            self.last_logged = metrics["step"]
            print(f"step {metrics['step']}/{self.tqdm.total}  loss {metrics['loss']:.4f}  "
                  f"lr {metrics['learning_rate']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
                  f"tokens/s {metrics['tokens_per_s']:.0f}  mfu {metrics['mfu']:.2%}" +
                  (f"  eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""), file=sys.stderr, flush=True)
        # (the group number, the step) once a worker group runs: what a stall is measured on
        self.seen = (len(state["groups"]), step) if state["groups"] else None
        return self.seen


def _progress_board():
    """A tiny actor: rank 0 posts its step and latest metrics; the driver reads them for the bar."""
    import ray

    from lmflow_ray.credentials import HEAD_RESOURCE

    @ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001})  # on the head: it outlives a lost worker node
    class ProgressBoard:
        def __init__(self) -> None:
            self.state = {"step": 0, "metrics": None, "groups": []}

        def started(self, group: dict) -> None:  # a worker group began (again): where and from which step
            self.state["groups"].append(group)
            self.state["step"] = group["from_step"]

        def update(self, metrics: dict) -> None:
            self.state["step"] = int(metrics["step"])
            if len(metrics) > 1:
                self.state["metrics"] = metrics

        def read(self) -> dict:
            return self.state

    return ProgressBoard.remote()
