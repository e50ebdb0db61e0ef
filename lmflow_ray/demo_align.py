"""`lmflow-ray demo jobs/demo_dpo.yaml`: the alignment demo, end to end on one Ray cluster.

Evaluate the base model on the held-out e-mails, train a reward model on the preference pairs and
score its held-out pairwise accuracy, DPO-tune the base model on the same pairs (no SFT first),
evaluate again, then print and write the before/after table and the curves. The DPO recipe is the
demo's recipe; the reward model's is ``--reward_recipe`` (default jobs/reward_model.yaml). Command
line overrides apply to both.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.demo import _metric, write_report
from lmflow_ray.eval.run import EvalResult, evaluate, open_eval_dataset, read_instances
from lmflow_ray.lease import LEASE, Lease
from lmflow_ray.model.locate import display_name

STAGES = 6


def align_table(base_name: str, before: EvalResult, tuned_name: str, after: EvalResult, rm_name: str,
                rm: EvalResult) -> str:
    lines = ["| model | held-out accuracy | NLL per answer token | reward model pairwise accuracy |",
             "|---|---:|---:|---:|",
             f"| {base_name} | {_metric(before, 'acc')} | {_metric(before, 'nll')} | - |",
             f"| {tuned_name} | {_metric(after, 'acc')} | {_metric(after, 'nll')} | - |",
             f"| {rm_name} | - | - | {rm.metrics['acc']:.1%} ({rm.correct}/{rm.count}) |"]
    return "\n".join(lines)


def run_align_demo(recipe: Recipe, reward: Recipe, address: str | None = None,
                   say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole job; returns what it printed as data (also written as demo.json in the DPO run)."""
    from lmflow_ray.ray_init import connect, quiet_data_logs
    from lmflow_ray.train.trainer import run as train_run, run_folder

    started = time.time()
    timings: dict[str, float] = {}
    dpo_name, rm_name = recipe.storage.run_name or "demo-dpo", reward.storage.run_name or "demo-reward"
    recipe = recipe.model_copy(update={"storage": recipe.storage.model_copy(update={"run_name": dpo_name})})
    reward = reward.model_copy(update={"storage": reward.storage.model_copy(update={"run_name": rm_name})})
    s3 = storage.S3Options.resolve(recipe.storage)
    run_uri, rm_uri = run_folder(recipe, dpo_name), run_folder(reward, rm_name)
    base = recipe.model.model_name_or_path

    def stage(n: int, text: str) -> float:
        say(f"[{n}/{STAGES}] {text}")
        return time.time()

    def indent(line: str) -> None:
        say("  " + line)

    t = stage(1, "starting Ray" + (f" at {address}" if address else " (a local cluster)"))
    connect(address)
    quiet_data_logs()
    # The demo starts over each time: its own two run folders only, and never under another live run.
    with Lease(run_uri, s3).acquire(say) as lease, Lease(rm_uri, storage.S3Options.resolve(reward.storage)).acquire(say) as rm_lease:
        storage.clear_run(run_uri, s3, keep=(LEASE,))
        storage.clear_run(rm_uri, storage.S3Options.resolve(reward.storage), keep=(LEASE,))
        heldout = read_instances(recipe, open_eval_dataset(recipe))
        timings["ray"] = time.time() - t

        def with_eval(r: Recipe, model: str, folder: str) -> Recipe:
            return r.model_copy(update={
                "model": r.model.model_copy(update={"model_name_or_path": model}),
                "eval": r.eval.model_copy(update={"eval_output_dir": storage.join(run_uri, "eval", folder),
                                                  "server_url": None})})

        t = stage(2, f"evaluating the base model {display_name(base)} on {len(heldout)} held-out instances")
        before = evaluate(with_eval(recipe, base, "base"), say=indent)
        timings["eval_base"] = time.time() - t
        say(f"  base: accuracy {_metric(before, 'acc')} ({timings['eval_base']:.0f} s)")

        t = stage(3, f"training a reward model ({_how(reward)}) into {rm_uri}, then scoring held-out pairs")
        rm_run = train_run(reward, name_prefix="demo-reward", say=indent, lease=rm_lease)
        # As many held-out pairs as the demo's held-out e-mails (unless the reward recipe says).
        limit = reward.eval.max_eval_samples or recipe.eval.max_eval_samples
        rm = evaluate(with_eval(reward.model_copy(update={"eval": reward.eval.model_copy(
            update={"max_eval_samples": limit})}), rm_uri, "reward_model"), say=indent)
        timings["reward_model"] = time.time() - t
        say(f"  reward model: {rm_run.steps} steps, held-out pairwise accuracy {rm.metrics['acc']:.1%} "
            f"({rm.correct}/{rm.count}) ({timings['reward_model']:.0f} s)")

        t = stage(4, f"DPO on the base model ({_how(recipe)}, beta {recipe.train.beta}, {recipe.train.loss_type}) "
                     f"into {run_uri}")
        tuned = train_run(recipe, name_prefix="demo-dpo", say=indent, lease=lease)
        timings["dpo"] = time.time() - t
        m = tuned.metrics
        say(f"  DPO: {tuned.steps} steps, final loss {m.get('loss', float('nan')):.4f}, pairwise accuracy "
            f"{m.get('rewards/accuracies', float('nan')):.0%}, margin {m.get('rewards/margins', float('nan')):.3f} "
            f"({timings['dpo']:.0f} s)")

        t = stage(5, f"evaluating the DPO-tuned model {tuned.export_uri}")
        after = evaluate(with_eval(recipe, run_uri, "tuned"), say=indent)
        timings["eval_tuned"] = time.time() - t
        say(f"  tuned: accuracy {_metric(after, 'acc')} ({timings['eval_tuned']:.0f} s)")

        stage(6, "before / after")
        base_name = display_name(base)
        tuned_name = f"{base_name} + DPO `{dpo_name}` ({tuned.steps} steps)"
        md_table = align_table(base_name, before, tuned_name, after, f"reward model `{rm_name}` ({rm_run.steps} steps)", rm)
        timings["total"] = time.time() - started
        report = {
            "dpo_run": run_uri, "reward_run": rm_uri, "dataset": before.dataset, "heldout": len(heldout),
            "pairs_heldout": rm.count, "dpo_steps": tuned.steps, "reward_steps": rm_run.steps,
            "before": before.metrics, "after": after.metrics, "before_correct": before.correct,
            "after_correct": after.correct, "reward_model": rm.metrics, "dpo_final": m,
            "curves": [storage.join(run_uri, "loss.png"), storage.join(rm_uri, "loss.png")],
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        }
        markdown = "\n".join([
            f"# lmflow-ray alignment demo: `{dpo_name}`", "",
            f"Held-out e-mails `{before.dataset}` ({len(heldout)}, never trained on), exact match of the reply; "
            f"held-out pairs `{rm.dataset}` ({rm.count}) for the reward model.", "", md_table, "",
            f"DPO's last logged step: loss {m.get('loss', float('nan')):.4f}, rewards/accuracies "
            f"{m.get('rewards/accuracies', float('nan')):.2f}, rewards/margins {m.get('rewards/margins', float('nan')):.3f}.",
            "", "Stage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), "",
            f"Curves: `{report['curves'][0]}` (DPO), `{report['curves'][1]}` (reward model); per-instance results "
            "under `eval/`.", "",
        ])
        write_report(run_uri, s3, markdown, report)
        say("")
        say(md_table)
        say("")
        say(f"curves:       {report['curves'][0]}  {report['curves'][1]}")
        say(f"table:        {storage.join(run_uri, 'demo.md')}")
        say(f"done in {timings['total']:.0f} s")
        return report


def _how(recipe: Recipe) -> str:
    tr = recipe.train
    method = "LoRA" if recipe.model.use_lora else "full"
    return f"{method}, {tr.num_workers} Ray Train workers, " + (f"DeepSpeed {tr.deepspeed}" if tr.deepspeed else "DDP")
