"""`lmflow-ray eval`: a Ray Data batch job that scores a dataset with a model folder, a training
run or checkpoint (local or s3://), or a running OpenAI-compatible server, and writes
results.json, results.md, benchmark.log (LMFlow's) and predictions.jsonl."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.credentials import Secret, reveal, secret
from lmflow_ray.data.pipeline import Spec, renders, tools_for
from lmflow_ray.data.sources import Dataset, open_dataset, read_shard
from lmflow_ray.errors import DataError, UserError
from lmflow_ray.eval import metrics
from lmflow_ray.eval.score import Item, prepare, prompt_text
from lmflow_ray.model.load import load_for_inference, tokenizer_folder
from lmflow_ray.model.locate import display_name, exact_uri, local_folder, split_adapter
from lmflow_ray.ray_init import check_shared

CHOICE_TYPES = ("multiple_choice", "binary_choice", "pubmedqa")
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
MAX_PROBLEMS = 20
EVAL_OUTPUT = "eval"  # the kind of output folder eval writes (storage.put_output)


@dataclass
class EvalResult:
    model: str
    dataset: str
    kind: str
    answer_type: str
    metrics: dict[str, float]
    count: int
    correct: int | None
    tokens: int
    seconds: float
    workers: int
    output: str
    predictions: list[dict[str, Any]] = field(default_factory=list)


# ---- what to evaluate --------------------------------------------------------------------------


def dataset_uri(recipe: Recipe) -> str:
    uri = recipe.data.eval_dataset_path or recipe.data.dataset_path
    if not uri:
        raise UserError("data.eval_dataset_path: required (or data.dataset_path); pass --dataset_path PATH")
    return uri


def open_eval_dataset(recipe: Recipe) -> Dataset:
    return open_dataset(dataset_uri(recipe), storage.S3Options.resolve(recipe.storage))


def read_instances(recipe: Recipe, source: Dataset, check: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Validated instances in file order, the first ``max_eval_samples`` of them; problems are
    reported all together with file, line and field."""
    limit = recipe.eval.max_eval_samples or sys.maxsize
    instances: list[dict[str, Any]] = []
    problems: list[str] = []
    for shard in source.shards:
        for rec in read_shard(shard, source.s3):
            if rec.problem:
                problems.append(rec.message())
            else:
                try:
                    if check:
                        check(rec.instance)
                except UserError as err:
                    problems.append(f"{rec.where}: {err}")
                instances.append(rec.instance)
            if len(problems) >= MAX_PROBLEMS or len(instances) >= limit:
                break
        if len(problems) >= MAX_PROBLEMS or len(instances) >= limit:
            break
    if problems:
        raise DataError(problems)
    if not instances:
        raise UserError(f"{dataset_uri(recipe)}: no instances to evaluate")
    return instances


def check_request(recipe: Recipe, kind: str, endpoint: bool) -> None:
    """Refuse, before any work, what the dataset or the model source cannot give."""
    wanted = set(recipe.eval.metric)
    if kind == "paired_conversation" and endpoint:
        raise UserError("eval: a paired_conversation dataset is scored by a reward model's pairwise accuracy; a server "
                        "(or a GGUF file) returns text, not rewards: evaluate the reward model's run or folder instead")
    if kind == "text_only" and "acc" in wanted:
        raise UserError("eval.metric acc: a text_only dataset has no answers to check; use metric=nll or metric=ppl")
    if endpoint and not wanted - {"nll", "ppl"}:
        raise UserError("eval.metric nll/ppl: a server (or a GGUF file in llama.cpp) returns text here, not token "
                        "probabilities; evaluate the model folder or checkpoint instead, or use metric=acc")


def preflight(recipe: Recipe) -> None:
    """The checks that need no cluster: the dataset opens, its type suits the metrics and the
    model source, and the model is where the recipe says."""
    check_request(recipe, open_eval_dataset(recipe).kind,
                  endpoint=bool(recipe.eval.server_url) or is_gguf(recipe.model.model_name_or_path))
    s3 = storage.S3Options.resolve(recipe.storage)
    if recipe.eval.eval_output_dir:
        storage.check_output(recipe.eval.eval_output_dir, EVAL_OUTPUT, s3)
    if is_gguf(recipe.model.model_name_or_path):
        gguf_source(recipe)
    elif not recipe.eval.server_url:
        exact_uri(recipe.model.model_name_or_path, s3.to_dict(), "model.model_name_or_path")


def is_gguf(name: str) -> bool:
    return str(name).endswith(".gguf")


def gguf_source(recipe: Recipe) -> str:
    """The local GGUF file the recipe names, checked: llama.cpp reads a file, and must be installed."""
    from lmflow_ray.model.llamacpp import available

    name = recipe.model.model_name_or_path
    if storage.is_remote(name):
        raise UserError(f"model.model_name_or_path: {name}: llama.cpp reads a GGUF file from a local path (or a folder "
                        "every node mounts); copy it there first")
    if not os.path.isfile(name):
        raise UserError(f"model.model_name_or_path: {name} is not a file here")
    if not available():
        raise UserError("model.model_name_or_path: a GGUF file is scored in llama.cpp, which is not installed here: "
                        "run `make llamacpp`")
    return os.path.abspath(name)


def options_for(recipe: Recipe, kind: str, instance: dict[str, Any], index: int) -> list[str]:
    """A choice question's options: listed in the instance, else read from the question's
    "(A) ..." lines; binary questions default to yes / no, PubMedQA's to yes / no / maybe."""
    answer_type = recipe.eval.answer_type
    if answer_type not in CHOICE_TYPES:
        return []
    question = question_of(kind, instance, recipe.eval.prompt_structure)
    found = list(instance.get("options") or []) or metrics.parse_options(question)
    if not found and answer_type == "binary_choice":
        found = list(metrics.BINARY_OPTIONS)
    if not found and answer_type == "pubmedqa":
        found = list(PUBMEDQA_OPTIONS)
    if not found:
        raise UserError(f"eval.answer_type {answer_type}: instance {index} lists no options "
                        "(give an `options` list, or lines such as \"(A) ...\" in the question)")
    return found


def question_of(kind: str, instance: dict[str, Any], prompt_structure: str) -> str:
    """The text a choice question's options are read from: the last user turn, or the prompt."""
    if kind == "conversation":
        return instance["messages"][-2]["content"]  # validation ends a conversation with user, assistant
    return prompt_text(instance, prompt_structure)


def request_rows(recipe: Recipe, kind: str, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for a server: OpenAI chat messages (conversation) or a completion prompt (text2text)."""
    rows = []
    for index, inst in enumerate(instances):
        if kind == "conversation":
            head = [{"role": "system", "content": inst["system"]}] if inst.get("system") is not None else []
            request = {"messages": head + inst["messages"][:-1]}
            reference = inst["messages"][-1]["content"]
        else:
            request = {"prompt": prompt_text(inst, recipe.eval.prompt_structure)}
            reference = inst["output"]
        rows.append({"index": index, "request": json.dumps(request), "reference": reference,
                     "options": options_for(recipe, kind, inst, index)})
    return rows


def item_rows(recipe: Recipe, kind: str, spec: Spec, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Token rows for a model, longest first (batches of like lengths pad least)."""
    items = prepare(instances, range(len(instances)), spec, recipe.eval.prompt_structure)
    if kind != "text_only":  # text_only items are windows, with no question behind them
        for item in items:
            item.options = options_for(recipe, kind, instances[item.index], item.index)
    return sorted((asdict(item) for item in items), key=lambda r: -len(r["ids"]))


# ---- the Ray Data stages -----------------------------------------------------------------------


class ModelScorer:
    """A Ray Data actor: one copy of the model (base + merged LoRA adapter) scoring batches."""

    def __init__(self, base_uri: str, adapter_uri: str | None, s3: dict | None, threads: int, answer_type: str,
                 wanted: list[str], max_new_tokens: int, batch_size: int, torch_dtype: str, trust_remote_code: bool):
        import torch
        from transformers import AutoTokenizer

        torch.set_num_threads(max(1, threads))
        base = local_folder(base_uri, s3)
        adapter = local_folder(adapter_uri, s3) if adapter_uri else None
        model = load_for_inference(base, {"default": adapter} if adapter else None, dtype=torch_dtype,
                                   trust_remote_code=trust_remote_code, merge=True)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(base, adapter), trust_remote_code=trust_remote_code)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.answer_type, self.wanted = answer_type, set(wanted)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from lmflow_ray.eval.score import generate_answers, score_options, token_logprobs

        items = [Item(int(i), list(ids), list(map(bool, sc)), int(pl), str(ref), [str(o) for o in opts])
                 for i, ids, sc, pl, ref, opts in zip(batch["index"], batch["ids"], batch["scored"], batch["prompt_len"],
                                                     batch["reference"], batch["options"])]
        prompts = [it.ids[: it.prompt_len] for it in items]
        conts = [it.ids[it.prompt_len:] for it in items]
        want_nll = bool(self.wanted & {"nll", "ppl"})
        want_acc = "acc" in self.wanted and all(prompts)
        out: dict[str, list] = {"index": [it.index for it in items]}
        cache = None
        if want_nll:
            logps, cache = token_logprobs(self.model, prompts, conts, [it.scored for it in items], self.pad_id,
                                          keep_cache=want_acc)
            out["logprob_sum"] = [float(lp.sum()) for lp in logps]
            out["tokens"] = [int(len(lp)) for lp in logps]
        if want_acc:
            answers = generate_answers(self.model, self.tokenizer, prompts, self.max_new_tokens, self.pad_id, cache=cache)
            out["prediction"] = answers
            if self.answer_type in CHOICE_TYPES:
                sums = score_options(self.model, self.tokenizer, items, [it.options for it in items], self.pad_id,
                                     self.batch_size)
                out["option_logprobs"] = [json.dumps(s) for s in sums]
        return out


class EndpointScorer:
    """A Ray Data actor that asks a running OpenAI-compatible server, a batch of requests at once."""

    def __init__(self, url: str, model: str, api_key: Secret | None, max_new_tokens: int, concurrency: int):
        import openai

        self.client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=reveal(api_key) or "none", max_retries=5,
                                    timeout=600)
        self.model, self.max_new_tokens, self.concurrency = model, max_new_tokens, concurrency

    def _ask(self, request_json: str) -> str:
        request = json.loads(request_json)
        common = dict(model=self.model, max_tokens=self.max_new_tokens, temperature=0.0)
        if "messages" in request:
            reply = self.client.chat.completions.create(messages=request["messages"], **common)
            return (reply.choices[0].message.content or "").strip()
        return (self.client.completions.create(prompt=request["prompt"], **common).choices[0].text or "").strip()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self._ask, list(batch["request"])))
        return {"index": [int(i) for i in batch["index"]], "prediction": answers}


class GgufScorer:
    """A Ray Data actor: a GGUF file in llama.cpp (greedy), the requests rendered with the file's own
    chat template, one after another."""

    def __init__(self, gguf: str, threads: int, max_new_tokens: int, context: int):
        from lmflow_ray.model.llamacpp import LlamaCpp, gguf_tokenizer

        self.tokenizer = gguf_tokenizer(gguf)
        self.model = LlamaCpp(gguf, threads=threads, context=context)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from lmflow_ray.model.llamacpp import render

        answers = []
        for request_json in batch["request"]:
            request = json.loads(request_json)
            prompt = render(self.tokenizer, request["messages"]) if "messages" in request else request["prompt"]
            answers.append(self.model.generate(prompt, self.max_new_tokens)[0].strip())
        return {"index": [int(i) for i in batch["index"]], "prediction": answers}


def workers_for(recipe: Recipe) -> tuple[int, float, float]:
    """(model copies, CPUs each, GPUs each): one copy per GPU, else one per 4 CPUs, unless
    eval_num_workers says otherwise."""
    from lmflow_ray.ray_init import model_copies

    return model_copies(recipe.eval.eval_num_workers)


def evaluate_pairs(recipe: Recipe, source: Dataset, shown: str, name: str, s3: dict, started: float,
                   say: Callable[[str], None]) -> EvalResult:
    """A reward model on held-out pairs: both sides scored (the reward-scoring job), accuracy is
    the share of pairs whose chosen side scores higher; also the mean margin and rewards."""
    from lmflow_ray.ray_init import model_copies
    from lmflow_ray.train.rewards import reward_model_uris, score_conversations

    reward_model_uris(recipe, s3)  # refused before any instance is read, unless it has a score head
    output = recipe.eval.eval_output_dir or _default_output(recipe, name)
    storage.check_output(output, EVAL_OUTPUT, s3)
    instances = read_instances(recipe, source)
    say(f"eval: {len(instances)} pairs of {dataset_uri(recipe)} with the reward model {shown}")
    rewards = score_conversations(recipe, [inst[side] for inst in instances for side in ("chosen", "rejected")], say)
    records = [{"index": i, "reward_chosen": c, "reward_rejected": r, "correct": c > r}
               for i, (c, r) in enumerate(zip(rewards[0::2], rewards[1::2]))]
    n = len(records)
    correct = sum(r["correct"] for r in records)
    chosen = sum(r["reward_chosen"] for r in records) / n
    rejected = sum(r["reward_rejected"] for r in records) / n
    result = EvalResult(model=shown, dataset=dataset_uri(recipe), kind="paired_conversation", answer_type="pairwise",
                        metrics={"acc": correct / n, "margin": chosen - rejected, "reward_chosen": chosen,
                                 "reward_rejected": rejected},
                        count=n, correct=correct, tokens=0, seconds=round(time.time() - started, 1),
                        workers=model_copies(recipe.eval.eval_num_workers)[0], output=output, predictions=records)
    write_outputs(result, s3)
    return result


# ---- results -----------------------------------------------------------------------------------


def aggregate(recipe: Recipe, rows: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> tuple[dict[str, float], int | None, int, list[dict]]:
    """Per-item records and the dataset's metrics from the scorer outputs."""
    by_index = {o["index"]: o for o in outputs}
    answer_type = recipe.eval.answer_type
    records, correct, loglik_correct, nll_sum, tokens = [], 0, 0, 0.0, 0
    for row in sorted(rows, key=lambda r: r["index"]):
        o = by_index[row["index"]]
        rec: dict[str, Any] = {"index": row["index"]}
        if row["reference"]:  # text_only windows have none
            rec["reference"] = row["reference"]
        if "prediction" in o:
            ok = metrics.judge(answer_type, o["prediction"], row["reference"], row["options"])
            rec.update(prediction=o["prediction"], correct=ok)
            correct += ok
        if "option_logprobs" in o:
            scores = json.loads(o["option_logprobs"])
            picked = metrics.pick_option([[s] for s in scores])  # summed log-likelihoods
            want = metrics.reference_option(answer_type, row["reference"], row["options"])
            rec.update(option_logprobs=scores, loglik_pick=picked, loglik_correct=picked == want)
            loglik_correct += picked == want
        if "tokens" in o:
            rec.update(nll=-o["logprob_sum"] / max(1, o["tokens"]), tokens=o["tokens"])
            nll_sum -= o["logprob_sum"]
            tokens += o["tokens"]
        records.append(rec)
    n = len(records)
    out: dict[str, float] = {}
    judged = "prediction" in outputs[0]
    if judged:
        out["acc"] = correct / n
    if "option_logprobs" in outputs[0]:
        out["acc_loglik"] = loglik_correct / n
    if "tokens" in outputs[0] and tokens:
        out["nll"] = nll_sum / tokens
        out["ppl"] = math.exp(out["nll"])
    return out, (correct if judged else None), tokens, records


def markdown(result: EvalResult) -> str:
    names = {"acc": "pairwise accuracy" if result.answer_type == "pairwise" else "accuracy", "acc_loglik": "accuracy (option log-likelihood)", "nll": "NLL per token", "ppl": "perplexity"}
    lines = [f"# Evaluation: {result.model}", "", f"dataset `{result.dataset}` ({result.kind}, {result.count} instances), "
             f"answer type `{result.answer_type}`", "", "| metric | value |", "|---|---:|"]
    for key, value in result.metrics.items():
        shown = f"{value:.2%}" if key.startswith("acc") else f"{value:.4f}"
        if key == "acc" and result.correct is not None:
            shown += f" ({result.correct}/{result.count})"
        lines.append(f"| {names.get(key, key)} | {shown} |")
    lines += ["", f"{result.seconds:.1f} s with {result.workers} worker(s)"]
    return "\n".join(lines) + "\n"


def benchmark_log(result: EvalResult) -> str:
    """LMFlow's benchmark.log: one line per fact, metrics as `name: value`."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    lines = [f"lmflow-ray eval  {stamp}", f"model: {result.model}", f"dataset: {result.dataset}",
             f"type: {result.kind}", f"answer_type: {result.answer_type}", f"instances: {result.count}"]
    for key, value in result.metrics.items():
        lines.append(f"{key}: {value:.6f}")
    if result.correct is not None:
        lines.append(f"correct: {result.correct}/{result.count}")
    if result.tokens:
        lines.append(f"scored_tokens: {result.tokens}")
    lines.append(f"seconds: {result.seconds:.1f}")
    return "\n".join(lines) + "\n"


def write_outputs(result: EvalResult, s3: dict | None) -> None:
    """results.json, results.md, benchmark.log and predictions.jsonl, written to a temporary
    folder and put in place (renamed, or uploaded) only when complete. The target must be new, or
    an earlier eval output: a folder with anything else in it is refused, never replaced."""
    target = result.output
    tmp = storage.new_output_dir(target)
    try:
        summary = {k: v for k, v in asdict(result).items() if k != "predictions"}
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(markdown(result))
        with open(os.path.join(tmp, "benchmark.log"), "w") as f:
            f.write(benchmark_log(result))
        with open(os.path.join(tmp, "predictions.jsonl"), "w") as f:
            for rec in result.predictions:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        storage.put_output(tmp, target, EVAL_OUTPUT, s3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_output(recipe: Recipe, model_name: str) -> str:
    name = os.path.basename(dataset_uri(recipe).rstrip("/")) or "dataset"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model_name}-{name}")
    return storage.join(recipe.storage.output_model_path, "eval", safe)


# ---- the job -----------------------------------------------------------------------------------


def _collect(ds: Any, total: int, say: Callable[[str], None], label: str) -> list[dict[str, Any]]:
    """Pull the results as they stream out, with a progress line every 10% or so."""
    out: list[dict[str, Any]] = []
    started, shown = time.time(), -1
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        out.extend(batch.to_dict("records"))
        step = int(10 * len(out) / max(1, total))
        if step != shown:
            shown = step
            say(f"{label}: {len(out)}/{total} scored ({time.time() - started:.0f} s)")
    return out


def evaluate(recipe: Recipe, model_name: str | None = None, api_key: Secret | str | None = None,
             say: Callable[[str], None] = print) -> EvalResult:
    """Score the recipe's eval dataset with its model, or with ``eval.server_url``; Ray must be
    initialised. Writes the results folder and returns what it holds."""
    import ray

    section = recipe.eval
    url = section.server_url
    s3 = storage.S3Options.resolve(recipe.storage).to_dict()
    started = time.time()
    if url or is_gguf(recipe.model.model_name_or_path):
        if url:
            import openai

            name = model_name or recipe.serve.served_model_name
            api_key = secret(api_key)  # the scoring actors get it as a reference, not in Ray Data's plan
            client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=reveal(api_key) or "none", max_retries=2,
                                   timeout=30)
            try:
                served = [m.id for m in client.models.list().data]
            except openai.APIError as err:
                raise UserError(f"eval.server_url: {url} did not list its models ({type(err).__name__}: {err})") from None
            name = name or served[0]
            if name not in served:
                raise UserError(f"--model {name!r}: {url} serves {', '.join(served)}")
            shown = f"{name} at {url}"
        else:
            gguf = gguf_source(recipe)
            name = os.path.basename(gguf)[: -len(".gguf")]
            shown = f"{os.path.basename(gguf)} in llama.cpp"
        source = open_eval_dataset(recipe)
        kind = source.kind
        check_request(recipe, kind, endpoint=True)
        instances = read_instances(recipe, source)
        if set(section.metric) & {"nll", "ppl"}:
            say(f"eval: nll/ppl left out: {'a server' if url else 'llama.cpp'} returns text here, not token probabilities "
                "(evaluate the checkpoint for them)")
        rows = request_rows(recipe, kind, instances)
        if url:
            workers, stage = 1, EndpointScorer
            stage_args = dict(url=url, model=name, api_key=api_key, max_new_tokens=recipe.serve.max_new_tokens,
                              concurrency=section.inference_batch_size_per_device)
            resources: dict[str, Any] = dict(num_cpus=0)
        else:
            workers, cpus, _ = workers_for(recipe)
            workers = min(workers, max(1, math.ceil(len(rows) / section.inference_batch_size_per_device)))
            check_shared({"model.model_name_or_path": gguf})
            stage = GgufScorer
            stage_args = dict(gguf=gguf, threads=max(1, int(cpus) - 1), max_new_tokens=recipe.serve.max_new_tokens,
                              context=max(recipe.data.block_size, 2048))
            resources = dict(num_cpus=cpus)
    else:
        source = recipe.model.model_name_or_path
        uri = exact_uri(source, s3, "model.model_name_or_path")
        base_uri, adapter_uri = split_adapter(uri, s3)
        shown = display_name(uri) if uri == base_uri else f"{uri} (LoRA on {display_name(base_uri)})"
        name = display_name(source)
        # The tokenizer and template come from the model itself, as the scorer loads them.
        adapter = local_folder(adapter_uri, s3) if adapter_uri else None
        local = tokenizer_folder(local_folder(base_uri, s3), adapter)
        source = open_eval_dataset(recipe)
        kind = source.kind
        check_request(recipe, kind, endpoint=False)
        if kind == "paired_conversation":
            return evaluate_pairs(recipe, source, shown, name, s3, started, say)
        spec = Spec(model_name_or_path=local, trust_remote_code=recipe.model.trust_remote_code,
                    conversation_template=recipe.data.conversation_template, kind=kind, block_size=recipe.data.block_size,
                    train_on_prompt=False, packing=False)
        tools_for(spec)  # a bad template fails here, before any instance is read
        instances = read_instances(recipe, source, renders(spec))
        rows = item_rows(recipe, kind, spec, instances)
        workers, cpus, gpus = workers_for(recipe)
        workers = min(workers, max(1, math.ceil(len(rows) / section.inference_batch_size_per_device)))
        # The rows travel from here; the scorers load the model wherever they run.
        check_shared({key: uri for key, uri in (("model.model_name_or_path", base_uri),
                                                ("model.model_name_or_path (its adapter)", adapter_uri))
                      if uri and os.path.isabs(uri)})
        stage = ModelScorer
        stage_args = dict(base_uri=base_uri, adapter_uri=adapter_uri, s3=s3, threads=int(cpus), answer_type=section.answer_type,
                          wanted=list(section.metric), max_new_tokens=recipe.serve.max_new_tokens,
                          batch_size=section.inference_batch_size_per_device, torch_dtype=recipe.model.torch_dtype,
                          trust_remote_code=recipe.model.trust_remote_code)
        resources = dict(num_cpus=cpus, num_gpus=gpus)
    output = section.eval_output_dir or _default_output(recipe, name)
    storage.check_output(output, EVAL_OUTPUT, s3)  # refused before the scoring, not after
    say(f"eval: {len(rows)} {'windows' if kind == 'text_only' else 'instances'} of {dataset_uri(recipe)} "
        f"with {shown}, {workers} worker(s)")
    # One block per batch: a block split into a batch and a remainder would run two short batches.
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / section.inference_batch_size_per_device))
    # max_restarts=0: a scorer that dies fails the eval with its cause (a restarted one would need its
    # constructor arguments from the object store; Ray warns of that once per pool, which reads as an error).
    ds = ds.map_batches(stage, fn_constructor_kwargs=stage_args, batch_size=section.inference_batch_size_per_device,
                        concurrency=workers, batch_format="numpy", max_restarts=0, **resources)
    outputs = _collect(ds, len(rows), say, "eval")
    values, correct, tokens, records = aggregate(recipe, rows, outputs)
    result = EvalResult(
        model=shown, dataset=dataset_uri(recipe), kind=kind, answer_type=section.answer_type, metrics=values,
        count=len(records), correct=correct, tokens=tokens, seconds=round(time.time() - started, 1), workers=workers,
        output=output, predictions=records,
    )
    write_outputs(result, s3)
    return result
