"""`lmflow-ray <verb> [RECIPE.yaml] [key=value | --key value ...]`.

Verbs so far: train, eval, merge, export, draft, serve, chat, demo, data (validate / preview / stats), model (prepare-default),
vocab (extend), recipe
(show the merged recipe). Bad input prints one line per problem and exits with 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lmflow_ray.errors import DataError, UserError, unwrap_user_error

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def _looks_like_path(arg: str) -> bool:
    return not arg.startswith("-") and "=" not in arg


def _split(extras: list[str]) -> tuple[str | None, list[str]]:
    """(recipe or path, overrides) from what argparse did not know."""
    if extras and _looks_like_path(extras[0]):
        return extras[0], extras[1:]
    return None, extras


def _is_recipe(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def _recipe(path: str | None, overrides: list[str]):
    from lmflow_ray.config import load_recipe

    if path is not None and not _is_recipe(path):
        raise UserError(f"{path}: expected a recipe file (.yaml); LMFlow flags such as --dataset_path work without one")
    notices: list[str] = []
    recipe = load_recipe(path, overrides, notices=notices)
    for line in notices:
        print(f"note: {line}", file=sys.stderr)
    return recipe


# ---- data ------------------------------------------------------------------------------------


def cmd_data_validate(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.data.sources import open_dataset, validate
    from lmflow_ray.storage import S3Options

    target, overrides = _split(extras)
    if target is not None and not _is_recipe(target):
        if overrides:
            raise UserError(f"overrides need a recipe: {' '.join(overrides)}")
        dataset = open_dataset(target, S3Options.resolve())
        _say_ok(dataset, validate(dataset))
        return 0
    from lmflow_ray.data.pipeline import Spec, renders

    recipe = _recipe(target, overrides)
    paths = [p for p in (recipe.data.dataset_path, recipe.data.eval_dataset_path) if p]
    if not paths:
        raise UserError("data.dataset_path: required (a file or folder, local or s3://)")
    for path in paths:  # with a recipe, every instance must also render with its template
        dataset = open_dataset(path, S3Options.resolve(recipe.storage))
        _say_ok(dataset, validate(dataset, renders(Spec.from_recipe(recipe, dataset.kind))))
    return 0


def _say_ok(dataset: Any, good: int) -> None:
    files = dataset.files
    where = files[0] if len(files) == 1 else f"{len(files)} files"
    print(f"ok: {dataset.uri}: {good:,} {dataset.kind} instances ({where})")


def cmd_data_preview(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.data.pipeline import plan, texts_of, tools_for
    from lmflow_ray.data.sources import read_shard
    from lmflow_ray.data.tokenize import render, tokenize_rendered

    target, overrides = _split(extras)
    recipe = _recipe(target, overrides)
    source, spec = plan(recipe)
    tokenizer, template, with_bos = tools_for(spec)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    records = (rec for shard in source.shards for rec in read_shard(shard, source.s3))
    for shown, rec in enumerate(records, 1):
        if rec.problem:
            raise UserError(rec.message())
        for side, kind, part in texts_of(spec.kind, rec.instance):
            rendered = render(kind, part, tokenizer, template, with_bos)
            (tok,) = tokenize_rendered([rendered], tokenizer, spec.train_on_prompt)
            n, block = len(tok.ids), spec.block_size
            cut = int(tok.offsets[block - 1, 1]) if n > block else None
            header = f"── sample {shown}{f' ({side})' if side else ''} · {rec.where} · {n} tokens, "
            header += f"{int(tok.trained[:block].sum())} trained" + (f", cut at block_size={block}" if cut is not None else "")
            if args.raw:
                print(header + " ──", file=sys.stderr)
                sys.stdout.write(rendered.text + "\n")
            else:
                print(header + " ──")
                print(_marked(rendered.text, tok.offsets[tok.trained], cut, color))
                print()
        if shown >= args.n:
            break
    if not args.raw:
        legend = "green" if color else f"{TRAINED_OPEN}like this{TRAINED_CLOSE}"
        print(f"(trained tokens are shown {legend}; template: {template.name if template else 'none'})")
    return 0


def _marked(text: str, trained_offsets: Any, cut: int | None, color: bool) -> str:
    """The rendered text with trained character ranges marked, and the block_size cut shown."""
    marks = [False] * len(text)
    for a, b in trained_offsets:
        for i in range(int(a), int(b)):
            marks[i] = True
    open_, close = ("\033[32m", "\033[0m") if color else (TRAINED_OPEN, TRAINED_CLOSE)
    out, inside = [], False
    for i, ch in enumerate(text):
        if cut is not None and i == cut:
            out.append(close if inside else "")
            out.append("\n✂ ---- truncated here (block_size) ----\n")
            inside = False
            out.append(text[i:])
            return "".join(out)
        if marks[i] != inside:
            out.append(open_ if marks[i] else close)
            inside = marks[i]
        out.append(ch)
    if inside:
        out.append(close)
    return "".join(out)


def cmd_data_stats(args: argparse.Namespace, extras: list[str]) -> int:
    import time

    from lmflow_ray.data.pipeline import dataset_stats
    from lmflow_ray.ray_init import connect, quiet_data_logs

    target, overrides = _split(extras)
    recipe = _recipe(target, overrides)
    print("starting Ray ...", file=sys.stderr)
    connect(args.address)
    quiet_data_logs()
    started = time.time()
    print(f"reading, templating, tokenizing and packing {recipe.data.dataset_path} on Ray ...", file=sys.stderr)
    stats = dataset_stats(recipe)
    print(f"done in {time.time() - started:.1f} s", file=sys.stderr)
    stats["dataset"] = recipe.data.dataset_path
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(_stats_table(stats))
    return 0


def _stats_table(s: dict[str, Any]) -> str:
    share = s["trained_tokens"] / s["tokens"] if s["tokens"] else 0.0
    lines = [
        f"dataset          {s['dataset']} ({s['type']})",
        f"samples          {s['samples']:,}",
        f"tokens           {s['tokens']:,} (trained {s['trained_tokens']:,} = {share:.1%})",
        f"truncated        {s['truncated_share']:.1%} of samples at block_size={s['block_size']}"
        f" ({s['samples_with_nothing_to_learn']} left with nothing to learn)",
        "",
        f"{'layout':<30}{'rows':>10}{'efficiency':>12}",
        f"{'packing (lmflow-ray)':<30}{s['rows_packed']:>10,}{s['packing_efficiency']:>12.3f}",
        f"{'pad-to-block (LMFlow)':<30}{s['rows_pad_to_block']:>10,}{s['pad_to_block_efficiency']:>12.3f}",
        "",
        "efficiency = real tokens / (rows x block_size)" if s["type"] != "paired_conversation" else
        "efficiency = real tokens / (rows x 2 x block_size): a row holds whole pairs, two sides of up to block_size",
    ]
    return "\n".join(lines)


# ---- model / recipe --------------------------------------------------------------------------


def cmd_model_prepare_default(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.embedded import prepare_default_model

    if extras:
        raise UserError(f"model prepare-default takes no arguments (got {' '.join(extras)})")
    path = prepare_default_model(force=args.force, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def cmd_recipe(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.config import recipe_to_yaml

    target, overrides = _split(extras)
    print(recipe_to_yaml(_recipe(target, overrides)), end="")
    return 0


# ---- train / merge -----------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, extras: list[str]) -> int:
    import time
    from pathlib import Path

    from lmflow_ray.ray_init import connect, quiet_data_logs
    from lmflow_ray.storage import join
    from lmflow_ray.train.trainer import preflight, run

    target, overrides = _split(extras)
    recipe = _recipe(target, overrides)
    preflight(recipe)  # what can be refused without a cluster is refused before one starts
    print("starting Ray ...", file=sys.stderr)
    connect(args.address)
    quiet_data_logs()
    started = time.time()
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    result = run(recipe, name_prefix=Path(target).stem if target else "run", fresh=args.fresh, say=say)
    m = result.metrics
    say(f"done in {time.time() - started:.0f} s: step {result.steps}"
        + (f", loss {m['loss']:.4f}, {m['tokens_per_s']:.0f} tokens/s, MFU {m['mfu']:.2%}" if "loss" in m else ""))
    print(f"run folder:   {result.run_uri}")
    print(f"final model:  {result.export_uri}")
    if result.merged_uri:
        print(f"merged model: {result.merged_uri}")
    print(f"loss curve:   {join(result.run_uri, 'loss.png')}")
    print(f"summary:      {join(result.run_uri, 'summary.md')}")
    print(f"tensorboard:  tensorboard --logdir {join(result.run_uri, 'tensorboard')}")
    return 0


def cmd_merge(args: argparse.Namespace, extras: list[str]) -> int:
    import tempfile

    from lmflow_ray.config import StorageSection
    from lmflow_ray.model.adapters import merge_adapter
    from lmflow_ray.storage import S3Options, local_model_folder

    if extras:
        raise UserError(f"merge: unexpected arguments {' '.join(extras)}")
    s3 = S3Options.resolve(StorageSection(endpoint_url=args.endpoint_url))
    with tempfile.TemporaryDirectory(prefix="lmflow-merge-") as cache:
        adapter = local_model_folder(args.lora_model_path, cache, s3)
        out = merge_adapter(adapter, args.output_model_path, base=args.model_name_or_path, s3=s3.to_dict())
    print(f"merged model written to {out}")
    return 0


def cmd_export(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.config import StorageSection
    from lmflow_ray.model.export import export_gguf
    from lmflow_ray.storage import S3Options

    if extras:
        raise UserError(f"export: unexpected arguments {' '.join(extras)}")
    s3 = S3Options.resolve(StorageSection(endpoint_url=args.endpoint_url))
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    done = export_gguf(args.model_name_or_path, args.output_model_path, args.outtype, s3=s3.to_dict(), say=say)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(done.tensors.items()))
    print(f"GGUF ({done.architecture}, {done.outtype}: {kinds}; {done.bytes / 2**20:.1f} MiB) written to {done.path}")
    return 0


def cmd_vocab_extend(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.config import StorageSection
    from lmflow_ray.model.vocab import extend_vocabulary, read_texts
    from lmflow_ray.storage import S3Options

    if extras:
        raise UserError(f"vocab extend: unexpected arguments {' '.join(extras)}")
    s3 = S3Options.resolve(StorageSection(endpoint_url=args.endpoint_url))
    texts = read_texts(args.dataset_path, s3)
    report = extend_vocabulary(args.model_name_or_path, texts, args.vocab_size, args.output_model_path,
                               min_frequency=args.min_frequency)
    saved = 1 - report.tokens_after / max(1, report.tokens_before)
    print(f"vocabulary {report.base_size:,} -> {report.new_size:,} (+{len(report.added):,} tokens); "
          f"the text takes {saved:.1%} fewer tokens")
    for e in report.examples[:5]:
        print(f"  {e['text']!r}: {e['before']} -> {e['after']} tokens")
    print(f"model and tokenizer written to {os.path.abspath(args.output_model_path)} (report: vocab_extension.md)")
    return 0


# ---- align ------------------------------------------------------------------------------------


def cmd_align(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.align.loop import check, run_align, table
    from lmflow_ray.ray_init import connect, quiet_data_logs
    from lmflow_ray.storage import join

    target, overrides = _split(extras)
    recipe = _recipe(target, overrides)
    check(recipe)  # refused before a cluster starts
    print("starting Ray ...", file=sys.stderr)
    connect(args.address)
    quiet_data_logs()
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    result = run_align(recipe, fresh=args.fresh, say=say)
    print(table(result, recipe.align.algorithm))
    print(f"work folder:  {result.work_uri}")
    print(f"final policy: {result.policy}")
    print(f"reward plot:  {join(result.work_uri, 'reward.png')}")
    return 0


# ---- draft ------------------------------------------------------------------------------------


def cmd_draft(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.align.draft import run_draft
    from lmflow_ray.ray_init import connect, quiet_data_logs

    target, overrides = _split(extras)
    recipe = _recipe(target, overrides)
    print("starting Ray ...", file=sys.stderr)
    connect(args.address)
    quiet_data_logs()
    result = run_draft(recipe, fresh=args.fresh, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"work folder: {result.work_uri}")
    print(f"draft model: {result.draft_uri} ({result.layers} of {result.target_layers} decoder blocks, "
          f"tuned on {result.replies} replies)")
    print(f"serve with:  lmflow-ray serve {target or 'RECIPE'} draft_model={result.draft_uri}")
    return 0


# ---- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.demo import main as demo_main

    target, overrides = _split(extras)
    recipe = _recipe(target or "jobs/demo_lora.yaml", overrides)
    if recipe.align.reward_function or recipe.align.reward_model_name_or_path:  # online: RAFT / iterative DPO
        return _online_demo(recipe, args.address)
    if recipe.train.objective == "dpo":  # the alignment demo: a reward model and DPO on preference pairs
        from lmflow_ray.demo_align import run_align_demo

        reward = _recipe(args.reward_recipe, overrides)
        if reward.train.objective != "reward":
            raise UserError(f"--reward_recipe {args.reward_recipe}: train.objective is {reward.train.objective}; the "
                            "alignment demo's reward model needs train.objective: reward")
        run_align_demo(recipe, reward, args.address, say=lambda line: print(line, flush=True, file=sys.stdout))
        return 0
    return demo_main(recipe, args.address)


def _online_demo(recipe: Any, address: str | None) -> int:
    """A RAFT / iterative DPO recipe's demo: the align job from the start (its own run folder
    only), with the held-out set evaluated before and after every iteration, then the table."""
    import time

    from lmflow_ray.align.loop import check, run_align, table
    from lmflow_ray.ray_init import connect, quiet_data_logs
    from lmflow_ray.storage import join

    check(recipe)
    if not recipe.data.eval_dataset_path:
        raise UserError("demo: an online-alignment demo evaluates every iteration; set data.eval_dataset_path")
    started = time.time()
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(f"starting Ray{' at ' + address if address else ' (a local cluster)'}")
    connect(address)
    quiet_data_logs()
    name = recipe.storage.run_name or f"demo-{recipe.align.algorithm.replace('_', '-')}"
    recipe = recipe.model_copy(update={"storage": recipe.storage.model_copy(update={"run_name": name})})
    result = run_align(recipe, fresh=True, say=say)
    say("")
    say(table(result, recipe.align.algorithm))
    say("")
    say(f"reward plot:  {join(result.work_uri, 'reward.png')}")
    say(f"table:        {join(result.work_uri, 'iterations.md')}")
    say(f"done in {time.time() - started:.0f} s")
    return 0


# ---- eval -------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.eval.run import evaluate, markdown, preflight
    from lmflow_ray.ray_init import connect, quiet_data_logs

    target, overrides = _split(extras)
    if args.url:
        overrides = [*overrides, f"eval.server_url={args.url}"]
    recipe = _recipe(target, overrides)
    preflight(recipe)  # bad input fails here, before a cluster starts
    print("starting Ray ...", file=sys.stderr)
    connect(args.address)
    quiet_data_logs()
    key = args.api_key or recipe.serve.api_key or os.environ.get("LMFLOW_RAY_API_KEY")
    result = evaluate(recipe, model_name=args.model, api_key=key, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(result), end="")
    first = next((r for r in result.predictions if "prediction" in r), None)
    if first is not None:
        print(f"first answer: {first['prediction']!r}   reference: {first.get('reference')!r}")
    print(f"results:      {result.output}  (results.json, results.md, benchmark.log, predictions.jsonl)")
    return 0


# ---- serve / chat ------------------------------------------------------------------------------


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace, extras: list[str]) -> int:
    import signal
    import time

    from lmflow_ray.ray_init import connect
    from lmflow_ray.serve.app import APP_NAME, plan_app

    target, overrides = _split(extras)
    recipe = _recipe(target, overrides)
    bind = plan_app(recipe)  # resolves the model and engine first: bad input fails before Ray starts
    section = recipe.serve
    print("starting Ray ...", file=sys.stderr)
    connect(args.address)
    from lmflow_ray.ray_init import check_shared

    # The replicas load the model wherever Serve places them.
    local = {"model.model_name_or_path": recipe.model.model_name_or_path,
             **{f"serve.lora_adapters.{name}": uri for name, uri in (section.lora_adapters or {}).items()}}
    check_shared({key: path for key, path in local.items() if os.path.exists(path)})
    app = bind()
    from ray import serve

    from lmflow_ray.serve.front import start_serve

    private = not (args.address or os.environ.get("RAY_ADDRESS"))
    start_serve(section.host, section.port, section.proxy_location)
    print("deploying (loading the model in each replica) ...", file=sys.stderr, flush=True)
    started = time.time()
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{section.host}:{section.port}"
    print(f"ready in {time.time() - started:.0f} s", file=sys.stderr)
    print(f"OpenAI API:  {url}/v1   (models: {url}/v1/models)")
    print(f"web chat:    {url}/")
    print(f"health:      {url}/health", flush=True)
    if args.detach:
        if private:
            raise UserError("--detach needs a running cluster (--address or RAY_ADDRESS); a private one ends with this command")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
    finally:
        serve.delete(APP_NAME)
        if private:
            serve.shutdown()
    return 0


def cmd_chat(args: argparse.Namespace, extras: list[str]) -> int:
    from lmflow_ray.credentials import reveal
    from lmflow_ray.serve.chat import endpoint_replies, local_replies, run_chat

    target, overrides = _split(extras)
    recipe = _recipe(target, overrides)
    options = {"max_tokens": args.max_new_tokens or recipe.serve.max_new_tokens, "temperature": args.temperature}
    if args.end_string:
        options["stop"] = [args.end_string]
    if args.gguf:
        if target or args.url:
            raise UserError("chat: give a RECIPE (a local model), --url (a running server) or --gguf (llama.cpp), one of them")
        from lmflow_ray.serve.chat import gguf_replies

        reply, close = gguf_replies(args.gguf)
        try:
            return run_chat(reply, options, system=args.system)
        finally:
            close()
    if args.url:
        if target:
            raise UserError("chat: give a RECIPE (a local model) or --url (a running server), not both")
        key = args.api_key or reveal(recipe.serve.api_key) or os.environ.get("LMFLOW_RAY_API_KEY")
        reply = endpoint_replies(args.url, args.model, key)
        return run_chat(reply, options, system=args.system)
    print("loading the model ...", file=sys.stderr, flush=True)
    reply, close = local_replies(recipe)
    try:
        return run_chat(reply, options, system=args.system)
    finally:
        close()


# ---- entry point -----------------------------------------------------------------------------


def _address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="a Ray cluster to use (default: RAY_ADDRESS, else a private local one)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmflow-ray",
        description="Fine-tune, evaluate and serve LLMs on Ray. Recipes are YAML; any key can be "
        "overridden as key=value, section.key=value or --key value (LMFlow's flag names).",
        allow_abbrev=False,
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    data = verbs.add_parser("data", help="check, look at and measure a dataset", allow_abbrev=False)
    data_verbs = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = data_verbs.add_parser("validate", help="check every instance: PATH|RECIPE [overrides]", allow_abbrev=False)
    v.set_defaults(func=cmd_data_validate)
    pv = data_verbs.add_parser("preview", help="render samples with the trained spans marked: RECIPE [overrides]", allow_abbrev=False)
    pv.add_argument("--n", type=int, default=3, help="how many samples (default 3)")
    pv.add_argument("--raw", action="store_true", help="print the exact rendered strings")
    pv.set_defaults(func=cmd_data_preview)
    st = data_verbs.add_parser("stats", help="samples, tokens, truncation, packing efficiency: RECIPE [overrides]", allow_abbrev=False)
    _address_flag(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=cmd_data_stats)

    model = verbs.add_parser("model", help="models", allow_abbrev=False)
    model_verbs = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    pd = model_verbs.add_parser("prepare-default", help="convert the embedded SmolLM2-135M-Instruct once", allow_abbrev=False)
    pd.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    pd.set_defaults(func=cmd_model_prepare_default)

    t = verbs.add_parser("train", help="fine-tune on Ray Train: RECIPE [overrides]", allow_abbrev=False)
    _address_flag(t)
    t.add_argument("--fresh", action="store_true", help="start over: delete this run_name's checkpoints first")
    t.set_defaults(func=cmd_train)

    m = verbs.add_parser("merge", help="base model + LoRA adapter -> one standalone model folder", allow_abbrev=False)
    m.add_argument("--lora_model_path", required=True, help="adapter folder, checkpoint or run folder (local or s3://)")
    m.add_argument("--output_model_path", required=True, help="new local folder for the merged model")
    m.add_argument("--model_name_or_path", default=None, help="base model (default: the adapter's own base)")
    m.add_argument("--endpoint_url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    m.set_defaults(func=cmd_merge)

    x = verbs.add_parser("export", help="a model, run or checkpoint -> one GGUF file for llama.cpp", allow_abbrev=False)
    x.add_argument("--format", choices=["gguf"], default="gguf", help="gguf (llama.cpp), the one format so far")
    x.add_argument("--model_name_or_path", required=True,
                   help="model folder, run or checkpoint (local or s3://) or default; a LoRA adapter is merged first")
    x.add_argument("--output_model_path", required=True, help="the .gguf file to write (local or s3://)")
    x.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"], default="f16",
                   help="tensor type of the matrices (default f16); norms stay f32")
    x.add_argument("--endpoint_url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    x.set_defaults(func=cmd_export)

    vocab = verbs.add_parser("vocab", help="tokenizer vocabulary", allow_abbrev=False)
    vocab_verbs = vocab.add_subparsers(dest="action", required=True, metavar="ACTION")
    ve = vocab_verbs.add_parser("extend", help="learn new BPE tokens from text, add them to a model's tokenizer "
                                "and embeddings", allow_abbrev=False)
    ve.add_argument("--dataset_path", required=True, help="text files (one text per line) or an LMFlow dataset, local or s3://")
    ve.add_argument("--output_model_path", "--output_dir", required=True, help="new local folder for the extended model")
    ve.add_argument("--model_name_or_path", default="default", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    ve.add_argument("--vocab_size", type=int, default=2000, help="size of the BPE learned on the text (default 2000); "
                    "its tokens the base lacks are added")
    ve.add_argument("--min_frequency", type=int, default=2, help="a merge must occur this often in the text (default 2)")
    ve.add_argument("--endpoint_url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    ve.set_defaults(func=cmd_vocab_extend)

    e = verbs.add_parser("eval", help="score a model (folder, run, checkpoint or --url server) on a dataset: RECIPE [overrides]",
                         allow_abbrev=False)
    _address_flag(e)
    e.add_argument("--url", default=None, help="evaluate a running OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    e.add_argument("--model", default=None, help="with --url: the served model name (default: the first listed)")
    e.add_argument("--api_key", default=None, help="with --url: Bearer key (default: serve.api_key or LMFLOW_RAY_API_KEY)")
    e.set_defaults(func=cmd_eval)

    al = verbs.add_parser("align", help="RAFT or iterative DPO: generate -> score -> keep / pair -> train, repeated: "
                          "RECIPE [overrides] (align.algorithm raft | iterative_dpo)", allow_abbrev=False)
    _address_flag(al)
    al.add_argument("--fresh", action="store_true", help="start over: delete this run_name's work folder first")
    al.set_defaults(func=cmd_align)

    dr = verbs.add_parser("draft", help="a draft model for speculative decoding: the target's first draft_layers "
                          "blocks tuned on its greedy replies: RECIPE [overrides]", allow_abbrev=False)
    _address_flag(dr)
    dr.add_argument("--fresh", action="store_true", help="start over: delete this run_name's work folder first")
    dr.set_defaults(func=cmd_draft)

    d = verbs.add_parser("demo", help="base eval -> LoRA train -> tuned eval -> serve -> ask: [RECIPE] [overrides] "
                         "(default jobs/demo_lora.yaml); a DPO recipe (jobs/demo_dpo.yaml) runs the alignment demo: "
                         "base eval -> reward model -> DPO -> tuned eval", allow_abbrev=False)
    _address_flag(d)
    d.add_argument("--reward_recipe", default="jobs/reward_model.yaml",
                   help="the alignment demo's reward-model recipe (default jobs/reward_model.yaml)")
    d.set_defaults(func=cmd_demo)

    sv = verbs.add_parser("serve", help="deploy a model on Ray Serve behind the OpenAI API: RECIPE [overrides]", allow_abbrev=False)
    _address_flag(sv)
    sv.add_argument("--detach", action="store_true", help="deploy into the running cluster and return")
    sv.set_defaults(func=cmd_serve)

    c = verbs.add_parser("chat", help="terminal chat: [RECIPE] for a local model, or --url for a server", allow_abbrev=False)
    c.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    c.add_argument("--model", default=None, help="served model name (default: the first listed)")
    c.add_argument("--gguf", default=None, help="a GGUF file (lmflow-ray export) to chat with in llama.cpp (make llamacpp)")
    c.add_argument("--api_key", default=None, help="Bearer key (default: LMFLOW_RAY_API_KEY)")
    c.add_argument("--system", default=None, help="a system prompt")
    c.add_argument("--max_new_tokens", type=int, default=None, help="tokens per reply (default: serve.max_new_tokens)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    c.add_argument("--end_string", default=None, help="stop a reply at this string (LMFlow's flag)")
    c.set_defaults(func=cmd_chat)

    r = verbs.add_parser("recipe", help="print a recipe with defaults and overrides applied: [RECIPE] [overrides]", allow_abbrev=False)
    r.set_defaults(func=cmd_recipe)
    return p


def _report(err: UserError) -> None:
    """Dataset problems already start with file:line; other errors get an `error:` prefix. Any
    credential this process holds is blanked out of what is printed."""
    from lmflow_ray.credentials import redact

    print(redact(str(err) if isinstance(err, DataError) else f"error: {err}"), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: idle threads spin briefly, then sleep (see ray_init.GOMP_SPINCOUNT).
    from lmflow_ray.ray_init import GOMP_SPINCOUNT

    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    try:
        return args.func(args, extras)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        user_error = unwrap_user_error(err)
        if user_error is None:  # a bug or a failure of ours: the traceback, credentials blanked out
            import traceback

            from lmflow_ray.credentials import redact

            print(redact(traceback.format_exc()), file=sys.stderr, end="")
            return 1
        _report(user_error)
        return user_error.exit_code


if __name__ == "__main__":
    sys.exit(main())
