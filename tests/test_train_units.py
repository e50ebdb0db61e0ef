"""Pure parts of training: step plan, LR schedule, DeepSpeed config derivation, FLOPs, manifests."""

import json
import subprocess
import sys

import pytest

from lmflow_ray.config import TrainSection
from lmflow_ray.errors import UserError
from lmflow_ray.storage import inspect_checkpoint, latest_checkpoint, list_local_files, write_manifest
from lmflow_ray.train.deepspeed import deepspeed_config, offloads_optimizer, zero_stage
from lmflow_ray.train.observe import flops_per_token, loss_figure, plot_loss, summary_markdown
from lmflow_ray.train.plan import lr_multiplier, make_plan


def test_plan_counts_steps_over_epochs_with_no_gap_and_says_what_it_leaves_out():
    train = TrainSection(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_train_epochs=2.5)
    plan = make_plan(103, 2, train)
    assert plan.step_rows == 24 and plan.train_rows == 257  # floor(2.5 x 103)
    assert plan.total_steps == 257 // 24 == 10 and plan.left_out == 257 - 240 == 17
    assert plan.steps_per_epoch == pytest.approx(103 / 24) and plan.epoch_at(206) == 2.0
    assert make_plan(103, 2, TrainSection(max_steps=50)).total_steps == 50
    assert make_plan(None, 2, TrainSection(max_steps=50)).left_out == 0  # not counted: max_steps ends it


def test_a_worker_group_of_another_size_goes_on_with_the_rows_left():
    plan = make_plan(100, 2, TrainSection(per_device_train_batch_size=2, num_train_epochs=2))  # 200 rows, 4 a step
    assert plan.total_steps == 50
    three = plan.for_world(3, step=10, rows_done=40)  # 160 rows left, 6 a step: 26 more steps
    assert (three.world_size, three.step_rows, three.total_steps) == (3, 6, 36)
    assert three.warmup_steps == plan.warmup_steps and plan.for_world(2, 10, 40) is plan
    capped = make_plan(100, 2, TrainSection(per_device_train_batch_size=2, max_steps=30))
    assert capped.for_world(1, 10, 40).total_steps == 30  # max_steps counts steps, whatever their size


def test_plan_refuses_data_smaller_than_a_step():
    with pytest.raises(UserError, match="less than one step"):
        make_plan(3, 2, TrainSection(per_device_train_batch_size=4))
    with pytest.raises(UserError, match="num_train_epochs 0.1 of 10 packed rows is less than one step"):
        make_plan(10, 1, TrainSection(per_device_train_batch_size=4, num_train_epochs=0.1))


def test_lr_schedules_warm_up_then_decay():
    plan = make_plan(100, 1, TrainSection(per_device_train_batch_size=1, max_steps=100, warmup_steps=10))
    assert lr_multiplier(plan, 0) == pytest.approx(1 / 11)
    assert lr_multiplier(plan, 10) == pytest.approx(1.0)
    assert lr_multiplier(plan, 55) == pytest.approx(0.5)
    assert lr_multiplier(plan, 100) == pytest.approx(0.0, abs=1e-12)
    linear = make_plan(100, 1, TrainSection(per_device_train_batch_size=1, max_steps=100, lr_scheduler_type="linear", warmup_ratio=0.1))
    assert linear.warmup_steps == 10 and lr_multiplier(linear, 55) == pytest.approx(0.5)
    const = make_plan(100, 1, TrainSection(per_device_train_batch_size=1, max_steps=100, lr_scheduler_type="constant"))
    assert lr_multiplier(const, 99) == 1.0


def test_deepspeed_presets_take_batch_and_precision_from_the_recipe():
    assert deepspeed_config(TrainSection(), 2) is None  # plain DDP
    cfg = deepspeed_config(TrainSection(deepspeed="zero3_offload", per_device_train_batch_size=2,
                                        gradient_accumulation_steps=4, bf16=True, max_grad_norm=0.5), 3)
    assert zero_stage(cfg) == 3 and offloads_optimizer(cfg)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": True}
    assert zero_stage(deepspeed_config(TrainSection(deepspeed="zero2"), 2)) == 2
    assert not offloads_optimizer(deepspeed_config(TrainSection(deepspeed="zero2"), 2))


def test_deepspeed_json_auto_values_are_filled_and_conflicts_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
                                "optimizer": {"type": "Adam"}}))
    cfg = deepspeed_config(TrainSection(deepspeed=str(path), per_device_train_batch_size=3), 2)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and "optimizer" not in cfg
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu is 16"):
        deepspeed_config(TrainSection(deepspeed=str(path)), 2)
    path.write_text("{ not json")
    with pytest.raises(UserError, match=r"ds.json:1: not valid JSON"):
        deepspeed_config(TrainSection(deepspeed=str(path)), 2)
    with pytest.raises(UserError, match="neither a preset"):
        deepspeed_config(TrainSection(deepspeed="zero9"), 2)


def test_a_deepspeed_file_travels_to_the_workers_as_its_content(tmp_path):
    from lmflow_ray.config import load_recipe, recipe_to_yaml
    from lmflow_ray.train.deepspeed import inline_file

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}))
    train = TrainSection(deepspeed=str(path), per_device_train_batch_size=3)
    inline = inline_file(train)
    path.unlink()  # as on a node that never had the file
    assert inline.deepspeed == {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    assert deepspeed_config(inline, 2)["train_micro_batch_size_per_gpu"] == 3 and inline.deepspeed["train_micro_batch_size_per_gpu"] == "auto"
    assert inline_file(TrainSection(deepspeed="zero2")).deepspeed == "zero2"
    # an inline config in a recipe: what the checkpoint's recipe.yaml holds loads again
    recipe = load_recipe(None, []).model_copy(update={"train": inline})
    again = tmp_path / "recipe.yaml"
    again.write_text(recipe_to_yaml(recipe))
    assert zero_stage(deepspeed_config(load_recipe(str(again), []).train, 2)) == 2
    inline.deepspeed["train_micro_batch_size_per_gpu"] = 16
    with pytest.raises(UserError, match="is 16 in the inline config"):
        deepspeed_config(inline, 2)


def test_flops_per_token_counts_weight_gradients_only_when_trained():
    full = flops_per_token(1000, False, layers=2, hidden=8, width=16)
    lora = flops_per_token(1000, True, layers=2, hidden=8, width=16)
    assert full == 6000 + 12 * 2 * 8 * 16 and lora == 4000 + 12 * 2 * 8 * 16


def test_manifest_tells_complete_from_partial(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        ckpt = run / f"checkpoint_{step:06d}"
        (ckpt / "hf").mkdir(parents=True)
        (ckpt / "hf" / "model.safetensors").write_bytes(b"x" * 100)
        (ckpt / "rank1.pt").write_bytes(b"y" * 10)
        write_manifest(ckpt, list_local_files(ckpt), {"step": step})
    assert inspect_checkpoint(str(run / "checkpoint_000004")).complete
    (run / "checkpoint_000004" / "rank1.pt").unlink()  # a rank's upload never arrived
    partial = inspect_checkpoint(str(run / "checkpoint_000004"))
    assert not partial.complete and "rank1.pt: missing" in partial.problem
    (run / "checkpoint_000002" / "hf" / "model.safetensors").write_bytes(b"x" * 50)  # cut short
    assert "50 bytes, expected 100" in inspect_checkpoint(str(run / "checkpoint_000002")).problem
    (run / "checkpoint_000006").mkdir()  # no manifest at all
    assert latest_checkpoint(str(run)) is None
    (run / "checkpoint_000002" / "hf" / "model.safetensors").write_bytes(b"x" * 100)
    assert latest_checkpoint(str(run)).step == 2


def test_summary_markdown_has_the_table():
    history = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "step_time": 0.5, "mfu": 0.1},
               {"step": 2, "loss": 1.5, "learning_rate": 5e-4, "grad_norm": 0.8, "tokens_per_s": 120.0, "step_time": 0.4, "mfu": 0.12}]
    info = {"run_name": "r", "model": "m", "method": "LoRA", "strategy": "DDP", "world_size": 2, "device": "cpu",
            "steps": 2, "total_steps": 2, "total_params": 1000, "trainable_params": 10, "export": "out/hf"}
    text = summary_markdown(info, history)
    assert "| loss | 2.0000 at step 1 -> 1.5000 at step 2 |" in text
    assert "| 2 | 1.5000 | 0.0005 | 0.800 | 120 | 0.400 |" in text


def test_driver_inside_a_job_adds_only_env_vars_the_job_lacks(monkeypatch):
    from lmflow_ray.ray_init import WORKER_ENV, _runtime_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _runtime_env() == {"env_vars": WORKER_ENV}
    job = {"runtime_env": {"env_vars": {"MALLOC_MMAP_THRESHOLD_": "1", "MALLOC_TRIM_THRESHOLD_": "2"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _runtime_env() == {"env_vars": {k: v for k, v in WORKER_ENV.items() if not k.startswith("MALLOC_")}}
    job["runtime_env"]["env_vars"] = dict(WORKER_ENV)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _runtime_env() is None


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
PAIR = {"chosen": GOOD, "rejected": {"messages": [GOOD["messages"][0], {"role": "assistant", "content": "Go away."}]}}

# preflight on a recipe, in a fresh interpreter: prints the refusal and whether Ray was ever imported.
PREFLIGHT = """
import sys
from lmflow_ray.config import load_recipe
from lmflow_ray.errors import UserError
from lmflow_ray.train.trainer import preflight
try:
    preflight(load_recipe(None, sys.argv[1:]))
    print("ok")
except UserError as err:
    print("refused:", err)
print("ray imported:", "ray" in sys.modules)
"""


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_paired_data_is_refused_for_sft_before_ray(tmp_path, fmt):
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({"type": "paired_conversation", "instances": [PAIR]}))
    else:
        path.write_text(json.dumps(PAIR) + "\n")
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT, f"dataset_path={path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"refused: data.dataset_path {path}: a paired_conversation dataset"), out
    assert "needs a preference objective: train.objective=reward (a reward model) or train.objective=dpo" in out
    assert "ray imported: False" in out  # refused from the file headers, no cluster started


def test_preflight_passes_sft_data_and_refuses_a_missing_dataset(tmp_path):
    from lmflow_ray.config import load_recipe
    from lmflow_ray.train.trainer import preflight

    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    preflight(load_recipe(None, [f"dataset_path={path}"]))
    with pytest.raises(UserError, match="data.dataset_path: required"):
        preflight(load_recipe(None, []))
    with pytest.raises(UserError, match="train.use_lisa"):  # the method checks are part of it
        preflight(load_recipe(None, [f"dataset_path={path}", "use_lisa=true", "deepspeed=zero3"]))


def test_loss_plot_legend_covers_no_axis_and_no_label(tmp_path):
    import matplotlib.pyplot as plt

    history = [{"step": s, "loss": 3.0 / (1 + s / 5), "learning_rate": 2e-4 * min(1.0, (s + 1) / 5) * (1 - s / 45),
                **({"eval_loss": 3.2 / (1 + s / 6)} if s % 10 == 0 else {})} for s in range(0, 41, 2)]
    fig = loss_figure(history)
    try:
        renderer = fig.canvas.get_renderer()
        fig.canvas.draw()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        assert len(legends) == 1  # one legend, naming every curve
        (legend,) = legends
        assert [t.get_text() for t in legend.get_texts()] == ["training loss", "eval loss", "learning rate"]
        box = legend.get_window_extent(renderer)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # not cut off
        for ax in fig.axes:  # the loss axes and its learning-rate twin
            covered = [ax.get_window_extent(renderer), ax.yaxis.label.get_window_extent(renderer),
                       ax.xaxis.label.get_window_extent(renderer)]
            covered += [t.get_window_extent(renderer) for t in ax.get_yticklabels() + ax.get_xticklabels() if t.get_text()]
            for other in covered:
                assert not box.overlaps(other), (box, other)
    finally:
        plt.close(fig)
    plot_loss(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_a_checkpoint_write_error_is_one_line_found_through_ray_trains_worker_errors():
    import pickle

    from ray.train import WorkerGroupError

    from lmflow_ray.errors import CheckpointWriteError, unwrap_user_error
    from lmflow_ray.train.worker import _os_error

    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as disk:
            raise RuntimeError("Ray Train could not persist the checkpoint") from disk
    except RuntimeError as wrapped:
        cause = _os_error(wrapped)
    assert isinstance(cause, OSError) and cause.errno == 28
    err = pickle.loads(pickle.dumps(CheckpointWriteError("s3://b/runs/x/checkpoint_000004", f"OSError: {cause}")))
    failed = WorkerGroupError("Training failed due to worker errors", {0: err, 1: RuntimeError("peer gone")})
    found = unwrap_user_error(failed)
    assert isinstance(found, CheckpointWriteError) and found.exit_code == 1
    assert str(found).startswith("writing checkpoint s3://b/runs/x/checkpoint_000004 failed: OSError: [Errno 28]")
    assert "\n" not in str(found)


def test_mfu_peak_counts_each_machine_once():
    """Two ranks on one 2-core box (two one-CPU Ray nodes there): their single-thread peaks add up,
    but never past the box's all-core peak; GPUs and other machines count in full."""
    from lmflow_ray.train.observe import machine_totals

    box = [("box", 60e9, 100e9), ("box", 55e9, 0.0)]
    assert machine_totals(box) == 100e9
    assert machine_totals([("box", 40e9, 100e9), ("box", 45e9, 0.0)]) == 85e9
    assert machine_totals(box + [("other", 70e9, 120e9)]) == 170e9
    assert machine_totals([("n1:cuda:0", 900e12, 0.0), ("n1:cuda:1", 910e12, 0.0)]) == 1810e12


def test_summary_and_loss_png_show_the_eval_loss_when_there_is_one(tmp_path):
    from lmflow_ray.train.observe import loss_figure

    history = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3, "tokens_per_s": 100.0, "step_time": 0.5},
               {"step": 2, "loss": 1.5, "learning_rate": 5e-4, "tokens_per_s": 120.0, "step_time": 0.4,
                "eval_loss": 1.7, "eval_ppl": 5.47, "eval_tokens": 900}]
    info = {"run_name": "r", "model": "m", "method": "LoRA", "strategy": "DDP", "world_size": 2, "device": "cpu",
            "steps": 2, "total_steps": 2, "total_params": 1000, "trainable_params": 10, "export": "out/hf"}
    text = summary_markdown(info, history)
    assert "| eval loss | 1.7000 at step 2 -> 1.7000 at step 2 (900 held-out tokens) |" in text
    assert "| step | loss | eval loss |" in text and "| 1 | 2.0000 | | 0.001 |" in text and "| 2 | 1.5000 | 1.7000 | 0.0005 |" in text
    fig = loss_figure(history)
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert labels == ["training loss", "eval loss", "learning rate"]


def test_preference_objectives_refuse_unpaired_data_and_a_live_reference_without_lora(tmp_path):
    from lmflow_ray.config import load_recipe
    from lmflow_ray.train.trainer import preflight

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"type": "conversation", "instances": [GOOD]}))
    for objective in ("reward", "dpo"):
        with pytest.raises(UserError, match=f"a conversation dataset; train.objective={objective} learns from "
                                            "paired_conversation data"):
            preflight(load_recipe(None, [f"dataset_path={chat}", f"objective={objective}"]))
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"type": "paired_conversation", "instances": [PAIR]}))
    preflight(load_recipe(None, [f"dataset_path={pairs}", "objective=dpo"]))  # full: the reference is precomputed
    with pytest.raises(UserError, match="precompute_ref_log_probs: false needs LoRA"):
        preflight(load_recipe(None, [f"dataset_path={pairs}", "objective=dpo", "precompute_ref_log_probs=false"]))
    preflight(load_recipe(None, [f"dataset_path={pairs}", "objective=dpo", "precompute_ref_log_probs=false",
                                 "use_lora=true"]))
    with pytest.raises(UserError, match="eval_dataset_path .*a conversation dataset"):
        preflight(load_recipe(None, [f"dataset_path={pairs}", "objective=reward", f"eval_dataset_path={chat}",
                                     "eval_steps=2"]))


def test_restarts_after_failures_and_after_preemptions_are_counted_apart():
    from lmflow_ray.config import load_recipe
    from lmflow_ray.train.trainer import failure_config

    default = failure_config(TrainSection())
    assert (default.max_failures, default.max_preemption_failures) == (0, -1)  # Ray's defaults
    r = load_recipe(None, ["max_failures=3", "--max_preemption_failures", "0"])
    chosen = failure_config(r.train)
    assert (chosen.max_failures, chosen.max_preemption_failures) == (3, 0)
    with pytest.raises(UserError, match="max_preemption_failures"):
        load_recipe(None, ["max_preemption_failures=-2"])


def test_unplaced_workers_get_a_notice_then_an_error_naming_what_is_missing():
    from lmflow_ray.train.placement import PlacementWatch, group_placed, shortfall, worker_resources

    assert worker_resources(None, False) == {"CPU": 1.0} and worker_resources(None, True) == {"CPU": 1.0, "GPU": 1.0}
    pending = {"a": {"state": "PENDING", "bundles": {0: {"CPU": 8.0}, 1: {"CPU": 8.0}}}}
    created = {"a": {"state": "CREATED", "bundles": {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}}}
    assert not group_placed(pending, 2) and group_placed(created, 2) and not group_placed(created, 3)
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 4.0}]
    why = shortfall(2, {"CPU": 1.0, "GPU": 1.0}, nodes)
    assert "2 workers of {CPU: 1, GPU: 1} fit 1 at most on this cluster's 2 node(s)" in why
    assert "(the roomiest has {CPU: 2, GPU: 1}, all together {CPU: 6, GPU: 1})" in why

    now, said = [0.0], []
    watch = PlacementWatch(2, {"CPU": 1.0, "GPU": 1.0}, 300, said.append, notice_s=60, poll_s=5, clock=lambda: now[0])
    table = [pending]
    for t in range(0, 295, 5):  # placed at 30 s, a node lost at 40 s: unplaced since the 35 s poll
        now[0] = float(t)
        if t == 30:
            table[0] = created
        if t == 40:
            table[0] = pending
        watch.check(lambda: table[0], lambda: nodes)
    assert len(said) == 1 and said[0].startswith("train: waiting 60 s to place the workers: 2 workers")
    now[0] = 345.0
    with pytest.raises(UserError, match=r"could not be placed for 310 s: 2 workers of \{CPU: 1, GPU: 1\} fit 1"):
        watch.check(lambda: table[0], lambda: nodes)
    forever = PlacementWatch(2, {"CPU": 1.0}, 0, said.append, clock=lambda: now[0])
    now[0] = 10_000.0
    forever.check(lambda: pending, lambda: nodes)  # 0: for an autoscaler, a notice and no error
    assert "waiting as long as it takes" in said[-1]


def test_a_local_path_some_node_lacks_or_sees_otherwise_is_named_with_the_node(tmp_path):
    from lmflow_ray.ray_init import _fingerprints, first_difference

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text("{}")
    asked = {"data.dataset_path": str(data), "storage.output_model_path": str(tmp_path / "run" / ".lease.json")}
    here = _fingerprints([(str(data), False), (str(tmp_path / "run" / ".lease.json"), True)])
    assert here == [[["a.json", 2]], None]
    assert first_difference(asked, here, {"127.0.0.1 (aaa)": here, "127.0.0.1 (bbb)": here}) is None
    lacks = first_difference(asked, here, {"127.0.0.1 (aaa)": here, "10.0.0.7 (bbb)": [None, None]})
    assert lacks.startswith(f"data.dataset_path: {data} is a local path, and node 10.0.0.7 (bbb) does not have it")
    other = first_difference(asked, here, {"10.0.0.8 (ccc)": [[["a.json", 3]], None]})
    assert "node 10.0.0.8 (ccc) holds other files there" in other and "s3://" in other


def test_placed_workers_that_make_no_step_get_a_line_every_notice_period():
    from lmflow_ray.train.placement import StallWatch

    now = [0.0]
    said = []
    watch = StallWatch(said.append, notice_s=600, clock=lambda: now[0])
    for t, seen in [(0, None), (900, None), (901, (1, 0)), (1500, (1, 0)), (1501, (1, 0))]:
        now[0] = t
        watch.check(seen)  # no group yet: nothing; then a group at step 0 that stays there
    assert said == ["train: no step for 600 s (at step 0): the workers may be waiting for data a lost node held "
                    "(Ray rebuilds it when a CPU is free: leave CPUs beside resources_per_worker) or for each other; "
                    "the dashboard's Train view and the workers' logs tell which"]
    for t, seen in [(1600, (1, 1)), (2100, (1, 2)), (2600, (2, 2)), (3100, (2, 2))]:
        now[0] = t
        watch.check(seen)  # steps (and a restarted group at the same step) reset the clock
    assert len(said) == 1
    for t in (3201, 3700, 3801, 4000):
        now[0] = t
        watch.check((2, 2))
    assert [line.split(":")[1] for line in said[1:]] == [" no step for 601 s (at step 2)", " no step for 1201 s (at step 2)"]
