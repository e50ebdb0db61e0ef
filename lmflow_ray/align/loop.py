"""`lmflow-ray align`: RAFT and iterative DPO as one Ray job: generate -> score -> keep / pair ->
train -> evaluate, repeated, every stage on the same cluster and its output in the work folder.

The work folder is the run folder (``<output_model_path>/<run_name>``, local or s3://)::

    iteration_N/generations/generations.parquet   K responses per prompt
    iteration_N/scores/scores.parquet              the same rows with their reward
    iteration_N/kept/kept.json                     RAFT: the kept responses (LMFlow conversation JSON)
    iteration_N/pairs/pairs.json                   iterative DPO: the pairs (paired_conversation JSON)
    iteration_N/model/                             the iteration's training run (checkpoints, export)
    iteration_N/policy.json                        which model the next iteration starts from
    iteration_N/eval/                              the new policy on data.eval_dataset_path
    iterations.json, iterations.md, reward.png     the report, rewritten after every iteration

Every stage's output is written whole (a finished folder put in place, or a file written at once),
so a killed run restarts at the stage it was in; ``--fresh`` starts over. Stages take turns on the
cluster: the generation actors are gone before the training workers start.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.align import rollout, scoring
from lmflow_ray.align.select import Scored, adjusted, collect, make_pairs
from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.lease import LEASE, Lease

STAGE_KIND = "align stage"
OBJECTIVE = {"raft": "sft", "iterative_dpo": "dpo"}


class Stopped(Exception):
    """A stage switched off by the recipe: the run ends there, as asked (not an error)."""


@dataclass
class AlignResult:
    work_uri: str
    policy: str
    iterations: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, Any] | None = None


# ---- recipe checks -----------------------------------------------------------------------------


def prompt_sources(recipe: Recipe) -> list[str]:
    """The prompt dataset of each iteration."""
    a = recipe.align
    if a.dataset_path_list:
        return list(a.dataset_path_list)
    if not recipe.data.dataset_path:
        raise UserError("data.dataset_path: required (the prompts), or align.dataset_path_list")
    return [recipe.data.dataset_path] * (a.num_iterations or 3)


def check(recipe: Recipe) -> None:
    """What can be refused before a cluster starts."""
    a = recipe.align
    objective = OBJECTIVE[a.algorithm]
    if recipe.train.objective not in ("sft", objective):
        raise UserError(f"train.objective {recipe.train.objective}: align.algorithm {a.algorithm} trains with "
                        f"objective {objective} (leave train.objective out)")
    scoring.check_reward(recipe)
    if a.algorithm == "iterative_dpo" and a.num_output_sequences < 2:
        raise UserError("align.num_output_sequences: iterative_dpo pairs responses, so it needs at least 2 per prompt")
    if a.dataset_path_list and a.num_iterations not in (None, len(a.dataset_path_list)):
        raise UserError(f"align.num_iterations {a.num_iterations}: dataset_path_list has {len(a.dataset_path_list)} "
                        "datasets, one per iteration (leave num_iterations out)")
    s3 = storage.S3Options.resolve(recipe.storage)
    from lmflow_ray.data.sources import open_dataset

    for uri in sorted(set(prompt_sources(recipe))):
        kind = open_dataset(uri, s3).kind
        if kind not in ("conversation", "text2text"):
            raise UserError(f"{uri}: prompts come from a conversation or text2text dataset, not {kind}")


def stage_recipe(recipe: Recipe, policy: str, dataset: str, out: str, run_name: str, reference: str | None) -> Recipe:
    """The recipe of one iteration's training: from ``policy`` on ``dataset``, into ``out/run_name``."""
    a = recipe.align
    train = {"objective": OBJECTIVE[a.algorithm]}
    if reference and not recipe.train.reference_model_name_or_path:
        train["reference_model_name_or_path"] = reference
    store = {"output_model_path": out, "run_name": run_name,
             "save_aggregated_lora": recipe.model.use_lora or recipe.storage.save_aggregated_lora}
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"model_name_or_path": policy}),
        "data": recipe.data.model_copy(update={"dataset_path": dataset, "eval_dataset_path": None,
                                               "validation_split_percentage": 0}),
        "train": recipe.train.model_copy(update={**train, "eval_steps": None}),
        "storage": recipe.storage.model_copy(update=store),
    })


def train_filling_workers(stage: Recipe, train_run: Callable[..., Any], say: Callable[[str], None]) -> Any:
    """``train_run(stage)``, again on fewer workers when the data packs into less than one step
    for each. An iteration trains on what its rewards kept, which can be little (a few right
    replies early on); a long run should train on that, not stop. Too little for one worker fails."""
    from lmflow_ray.train.plan import TooFewRows

    try:
        return train_run(stage, say=lambda line: say("  " + line))
    except TooFewRows as short:
        workers = stage.train.max_workers
        if short.fits < 1 or short.fits >= workers:
            raise
        say(f"  the data makes a step for {short.fits} of the {workers} workers: training on {short.fits}")
        fewer = stage.model_copy(update={"train": stage.train.model_copy(update={"num_workers": short.fits})})
        return train_run(fewer, say=lambda line: say("  " + line))


# ---- the work folder ---------------------------------------------------------------------------


def _done(uri: str, s3: Any) -> bool:
    return storage.read_bytes(storage.join(uri, storage.OUTPUT_MARK), s3) is not None


def _put_files(target: str, files: dict[str, bytes], s3: Any) -> None:
    tmp = storage.new_output_dir(target)
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        storage.put_output(tmp, target, STAGE_KIND, s3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_rows(target: str, name: str, rows: list[dict[str, Any]], s3: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    _put_files(target, {name: buf.getvalue()}, s3)


def read_rows(target: str, name: str, s3: Any) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    raw = storage.read_bytes(storage.join(target, name), s3)
    if raw is None:
        raise UserError(f"{storage.join(target, name)}: missing (its stage did not finish; run again without --fresh)")
    return pq.read_table(io.BytesIO(raw)).to_pylist()


def write_dataset(target: str, name: str, kind: str, instances: list[dict[str, Any]], s3: Any) -> None:
    body = json.dumps({"type": kind, "instances": instances}, ensure_ascii=False, indent=1).encode()
    _put_files(target, {name: body}, s3)


def read_json(uri: str, s3: Any) -> Any:
    raw = storage.read_bytes(uri, s3)
    return json.loads(raw) if raw is not None else None


# ---- one iteration's stages --------------------------------------------------------------------


def iteration_prompts(recipe: Recipe, n: int, uri: str, policy: str, say: Callable[[str], None]):
    """(kind, prompts) of iteration ``n`` (1-based): the dataset's prompts, or a window of
    prompts_per_iteration taken in turn through them."""
    from lmflow_ray.data.sources import open_dataset
    from lmflow_ray.eval.run import read_instances

    s3 = storage.S3Options.resolve(recipe.storage)
    source = open_dataset(uri, s3)
    unlimited = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"max_eval_samples": None}),
                                          "data": recipe.data.model_copy(update={"eval_dataset_path": uri})})
    instances = read_instances(unlimited, source)
    if recipe.data.max_train_samples:
        instances = instances[:recipe.data.max_train_samples]
    indices = list(range(len(instances)))
    per = recipe.align.prompts_per_iteration
    if per and per < len(instances):
        start = (n - 1) * per % len(instances)
        indices = [(start + i) % len(instances) for i in range(per)]
    spec = rollout.prompt_spec(recipe, policy, source.kind)
    prompts = rollout.make_prompts(source.kind, [instances[i] for i in indices], indices, spec,
                                   recipe.eval.prompt_structure, uri)
    return source.kind, prompts


def generation_rows(prompts: list[rollout.Prompt], samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_index = {p.index: p for p in prompts}
    return [{**s, "prompt": rollout.dumps(by_index[s["index"]].instance), "prompt_text": by_index[s["index"]].text,
             "reference": by_index[s["index"]].reference} for s in samples]


def score_rows(recipe: Recipe, kind: str, rows: list[dict[str, Any]], say: Callable[[str], None]) -> list[dict[str, Any]]:
    conversations = []
    for r in rows:
        prompt = json.loads(r["prompt"])
        if kind == "text2text":  # a reward model reads a conversation: the input as the user's turn
            prompt = {"messages": [{"role": "user", "content": prompt["input"]}]}
        conversations.append(rollout.with_reply("conversation", prompt, r["response"]))
    rewards = scoring.score(recipe, conversations, [r["prompt_text"] for r in rows], [r["response"] for r in rows],
                            [r["reference"] for r in rows], say)
    return [{**r, "reward": float(x)} for r, x in zip(rows, rewards)]


def scored(rows: list[dict[str, Any]], length_penalty: float) -> list[Scored]:
    return adjusted([Scored(r["index"], r["sample"], r["reward"], r["tokens"]) for r in rows], length_penalty)


def keep_rows(recipe: Recipe, kind: str, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Scored]]:
    """RAFT: the kept responses as training instances, and their scores."""
    a = recipe.align
    kept = collect(scored(rows, a.length_penalty), a.collection_strategy, a.top_reward_percentage)
    at = {(r["index"], r["sample"]): r for r in rows}
    return [rollout.with_reply(kind, json.loads(at[(s.prompt, s.sample)]["prompt"]), at[(s.prompt, s.sample)]["response"])
            for s in kept], kept


def pair_rows(recipe: Recipe, kind: str, rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list]:
    """Iterative DPO: one (chosen, rejected) pair per prompt, with its reward gap as the margin."""
    a = recipe.align
    if kind != "conversation":
        raise UserError("align.algorithm iterative_dpo: pairs are paired_conversation data; give a conversation prompt set")
    pairs = make_pairs(scored(rows, a.length_penalty), a.sampling_paired_method, seed)
    at = {(r["index"], r["sample"]): r for r in rows}
    out = []
    for chosen, rejected in pairs:
        c, r = at[(chosen.prompt, chosen.sample)], at[(rejected.prompt, rejected.sample)]
        prompt = json.loads(c["prompt"])
        out.append({"chosen": rollout.with_reply(kind, prompt, c["response"]),
                    "rejected": rollout.with_reply(kind, prompt, r["response"]),
                    "margin": round(chosen.reward - rejected.reward, 6)})
    return out, pairs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---- the job -----------------------------------------------------------------------------------


def run_align(recipe: Recipe, fresh: bool = False, say: Callable[[str], None] = print) -> AlignResult:
    """The whole loop; Ray must be initialised. Returns the report (also in the work folder)."""
    from lmflow_ray.model.locate import exact_uri
    from lmflow_ray.train.trainer import run_folder, unique_run_name

    check(recipe)
    a = recipe.align
    s3 = storage.S3Options.resolve(recipe.storage)
    name = recipe.storage.run_name or unique_run_name(a.algorithm)
    work = run_folder(recipe, name)
    start = exact_uri(recipe.model.model_name_or_path, s3.to_dict(), "model.model_name_or_path")
    sources = prompt_sources(recipe)
    say(f"align {a.algorithm}: {len(sources)} iterations into {work}; to resume: run_name={name}")
    with Lease(work, s3).acquire(say):
        if fresh:
            removed = storage.clear_run(work, s3, keep=(LEASE,))
            if removed:
                say(f"--fresh: removed {len(removed)} earlier files of {work}")
        result = AlignResult(work, start)
        if recipe.data.eval_dataset_path:
            result.base = evaluate_policy(recipe, start, storage.join(work, "iteration_0", "eval"), s3, say, "base")
        policy = start
        for n, source in enumerate(sources, start=1):
            try:
                info, policy = iteration(recipe, n, source, policy, start, work, s3, say)
            except Stopped as stop:  # LMFlow's do_* switches: one stage alone, then a clean stop
                say(str(stop))
                return result
            result.iterations.append(info)
            result.policy = policy
            write_report(result, recipe, s3)
        say(f"align: done; final policy {policy}")
        say(f"report:       {storage.join(work, 'iterations.md')}")
        return result


def iteration(recipe: Recipe, n: int, source: str, policy: str, start: str, work: str, s3: Any,
              say: Callable[[str], None]) -> tuple[dict[str, Any], str]:
    """One iteration's stages, each skipped when its output is already there; returns its report
    line and the next policy."""
    from lmflow_ray.train.trainer import run as train_run

    a = recipe.align
    here = storage.join(work, f"iteration_{n}")
    info: dict[str, Any] = {"iteration": n, "dataset": source, "from": policy, "seconds": {}}
    done_policy = read_json(storage.join(here, "policy.json"), s3)
    seed = recipe.train.seed + n

    t = time.time()
    gen_uri = storage.join(here, "generations")
    kind, prompts = iteration_prompts(recipe, n, source, policy, say)
    if _done(gen_uri, s3):
        say(f"[iteration {n}] generations: already in {gen_uri}")
        rows = read_rows(gen_uri, "generations.parquet", s3)
    else:
        if not a.do_response_generation:
            raise UserError(f"align.do_response_generation false: {gen_uri} holds no generations to score")
        say(f"[iteration {n}] generating {a.num_output_sequences} responses for each of {len(prompts)} prompts "
            f"with {policy}")
        rows = generation_rows(prompts, rollout.generate(recipe, policy, prompts, seed, say))
        write_rows(gen_uri, "generations.parquet", rows, s3)
    info["seconds"]["generate"] = round(time.time() - t, 1)
    info["prompts"], info["responses"] = len(prompts), len(rows)

    t = time.time()
    score_uri = storage.join(here, "scores")
    if _done(score_uri, s3):
        say(f"[iteration {n}] scores: already in {score_uri}")
        rows = read_rows(score_uri, "scores.parquet", s3)
    else:
        if not a.do_scoring:
            raise Stopped(f"align.do_scoring false: stopping after iteration {n}'s generations ({gen_uri})")
        say(f"[iteration {n}] scoring {len(rows)} responses")
        rows = score_rows(recipe, kind, rows, say)
        write_rows(score_uri, "scores.parquet", rows, s3)
    info["seconds"]["score"] = round(time.time() - t, 1)
    info["reward_mean"] = _mean([r["reward"] for r in rows])
    info["response_tokens_mean"] = _mean([float(r["tokens"]) for r in rows])

    raw = {(r["index"], r["sample"]): r["reward"] for r in rows}
    if a.algorithm == "raft":
        data, kept = keep_rows(recipe, kind, rows)
        data_uri, data_name, data_kind = storage.join(here, "kept"), "kept.json", kind
        info["kept"] = len(kept)
        info["reward_kept_mean"] = _mean([raw[(s.prompt, s.sample)] for s in kept])
    else:
        data, pairs = pair_rows(recipe, kind, rows, seed)
        data_uri, data_name, data_kind = storage.join(here, "pairs"), "pairs.json", "paired_conversation"
        info["pairs"] = len(pairs)
        info["reward_chosen_mean"] = _mean([raw[(c.prompt, c.sample)] for c, _ in pairs])
        info["reward_rejected_mean"] = _mean([raw[(r.prompt, r.sample)] for _, r in pairs])
        if not pairs:
            raise UserError(f"[iteration {n}] every prompt's responses scored the same: no pair to train on "
                            "(raise num_output_sequences or temperature, or use a reward that tells them apart)")
    if not _done(data_uri, s3):
        write_dataset(data_uri, data_name, data_kind, data, s3)
    say(f"[iteration {n}] mean reward {info['reward_mean']:.3f}; " + (
        f"kept {info['kept']} (mean reward {info['reward_kept_mean']:.3f})" if a.algorithm == "raft" else
        f"{info['pairs']} pairs (chosen {info['reward_chosen_mean']:.3f}, rejected {info['reward_rejected_mean']:.3f})"))

    t = time.time()
    if done_policy:
        say(f"[iteration {n}] model: already trained ({done_policy['policy']})")
        new_policy, info["train"] = done_policy["policy"], done_policy.get("train", {})
    else:
        if not a.do_dpo_align:
            raise Stopped(f"align.do_dpo_align false: stopping after iteration {n}'s "
                          f"{'kept replies' if a.algorithm == 'raft' else 'pairs'} ({data_uri})")
        reference = None
        if a.algorithm == "iterative_dpo" and a.reference_policy == "initial" and policy != start:
            reference = start  # RLHFlow: every iteration against the starting model
        stage = stage_recipe(recipe, policy, storage.join(data_uri, data_name), here, "model", reference)
        what = "SFT on the kept responses" if a.algorithm == "raft" else "DPO on the pairs"
        say(f"[iteration {n}] {what}, from {policy}")
        ran = train_filling_workers(stage, train_run, say)
        new_policy = ran.merged_uri or ran.run_uri
        m = ran.metrics
        info["train"] = {"steps": ran.steps, **{k: m[k] for k in ("loss", "rewards/accuracies", "rewards/margins")
                                                if isinstance(m.get(k), (int, float))}}
        storage.write_bytes(storage.join(here, "policy.json"), json.dumps(
            {"policy": new_policy, "run": ran.run_uri, "train": info["train"]}, indent=2).encode(), s3)
    info["seconds"]["train"] = round(time.time() - t, 1)
    info["policy"] = new_policy

    if recipe.data.eval_dataset_path:
        t = time.time()
        info["eval"] = evaluate_policy(recipe, new_policy, storage.join(here, "eval"), s3, say, f"iteration {n}")
        info["seconds"]["eval"] = round(time.time() - t, 1)
    return info, new_policy


def evaluate_policy(recipe: Recipe, policy: str, out: str, s3: Any, say: Callable[[str], None], label: str) -> dict[str, Any]:
    """The policy on the held-out set (results read back when they are already there)."""
    from lmflow_ray.eval.run import evaluate

    found = read_json(storage.join(out, "results.json"), s3)
    if found:
        say(f"[{label}] eval: already in {out}")
    else:
        r = recipe.model_copy(update={
            "model": recipe.model.model_copy(update={"model_name_or_path": policy}),
            "eval": recipe.eval.model_copy(update={"eval_output_dir": out, "server_url": None})})
        res = evaluate(r, say=lambda line: say("  " + line))
        found = {"metrics": res.metrics, "correct": res.correct, "count": res.count}
    m = found["metrics"]
    shown = ", ".join(f"{k} {v:.1%}" if k.startswith("acc") else f"{k} {v:.3f}" for k, v in m.items())
    say(f"[{label}] held-out: {shown}")
    return {"metrics": m, "correct": found.get("correct"), "count": found.get("count")}


# ---- the report --------------------------------------------------------------------------------


def table(result: AlignResult, algorithm: str) -> str:
    """The iteration table (Markdown)."""
    def acc(e: dict[str, Any] | None) -> str:
        if not e or "acc" not in e["metrics"]:
            return "-"
        return f"{e['metrics']['acc']:.1%} ({e['correct']}/{e['count']})"

    data_col = "kept (mean reward)" if algorithm == "raft" else "pairs (chosen / rejected reward)"
    lines = [f"| iteration | mean reward | {data_col} | held-out accuracy | train steps | seconds (gen / score / train / eval) |",
             "|---:|---:|---|---:|---:|---|"]
    if result.base is not None:
        lines.append(f"| 0 (start) | - | - | {acc(result.base)} | - | - |")
    for it in result.iterations:
        if algorithm == "raft":
            data = f"{it['kept']} ({it['reward_kept_mean']:.3f})"
        else:
            data = f"{it['pairs']} ({it['reward_chosen_mean']:.3f} / {it['reward_rejected_mean']:.3f})"
        s = it["seconds"]
        secs = " / ".join(f"{s[k]:.0f}" if k in s else "-" for k in ("generate", "score", "train", "eval"))
        lines.append(f"| {it['iteration']} | {it['reward_mean']:.3f} | {data} | {acc(it.get('eval'))} | "
                     f"{it.get('train', {}).get('steps', '-')} | {secs} |")
    return "\n".join(lines)


def write_report(result: AlignResult, recipe: Recipe, s3: Any) -> None:
    a = recipe.align
    md = "\n".join([f"# lmflow-ray align: {a.algorithm}", "",
                    f"{a.num_output_sequences} responses per prompt (temperature {a.temperature}, top_p {a.top_p}), "
                    f"reward {a.reward_function or a.reward_model_name_or_path}", "",
                    table(result, a.algorithm), "", f"Final policy: `{result.policy}`", ""])
    storage.write_bytes(storage.join(result.work_uri, "iterations.md"), md.encode(), s3)
    storage.write_bytes(storage.join(result.work_uri, "iterations.json"), (json.dumps(
        {"algorithm": a.algorithm, "base": result.base, "iterations": result.iterations, "policy": result.policy},
        indent=2) + "\n").encode(), s3)
    png = reward_figure(result, a.algorithm)
    storage.write_bytes(storage.join(result.work_uri, "reward.png"), png, s3)


def reward_figure(result: AlignResult, algorithm: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [it["iteration"] for it in result.iterations]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(its, [it["reward_mean"] for it in result.iterations], "o-", label="mean reward, all samples")
    key = "reward_kept_mean" if algorithm == "raft" else "reward_chosen_mean"
    ax.plot(its, [it[key] for it in result.iterations], "s-", label="kept" if algorithm == "raft" else "chosen")
    ax.set_xlabel("iteration")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("reward")
    accs = [(it["iteration"], it["eval"]["metrics"]["acc"]) for it in result.iterations
            if it.get("eval") and "acc" in it["eval"]["metrics"]]
    if accs:
        base = result.base["metrics"].get("acc") if result.base else None
        xs = ([0] if base is not None else []) + [x for x, _ in accs]
        ys = ([base] if base is not None else []) + [y for _, y in accs]
        right = ax.twinx()
        right.plot(xs, ys, "^--", color="tab:green", label="held-out accuracy")
        right.set_ylabel("held-out accuracy")
        right.set_ylim(0, 1)
        right.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title(f"{algorithm}: reward per iteration")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

