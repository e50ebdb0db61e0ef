"""`lmflow-ray eval` end to end on the session's Ray cluster, against answers worked out here
with plain transformers (one sample at a time, no batching, no Ray): accuracy for each answer
type, NLL / perplexity, LMFlow's block-window NLL on text, a checkpoint in the S3 server, and a
served endpoint giving the same answers as the folder."""

import json
import math
from pathlib import Path

import pytest
import requests

from s3server import free_ports

pytestmark = pytest.mark.slow

SYSTEM = "Answer briefly."
QUESTIONS = [
    "What is the order number?", "Where is Paris?", "How are you today?", "Convert the date please.",
    "Hello there, can you help?", "The capital of France?", "Please answer politely.", "Is ORD-12345 mine?",
]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """The tiny model and tokenizer, used directly as the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _chat_prompt(tok, question):
    return tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                                   tokenize=False, add_generation_prompt=True)


def _greedy(plain, prompt_text):
    import torch

    model, tok = plain
    ids = tok(prompt_text, add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True).strip()


def _logprobs(plain, prompt_text, continuation):
    """Log-probabilities of the continuation's tokens after the prompt, one unbatched forward."""
    import torch

    model, tok = plain
    p = tok(prompt_text, add_special_tokens=False).input_ids
    c = tok(continuation, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logp = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
    return [logp[len(p) + i - 1, t].item() for i, t in enumerate(c)]


def _write(folder: Path, kind: str, instances: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.json").write_text(json.dumps({"type": kind, "instances": instances}))
    return folder


def _recipe(model, data, out, *extra):
    from lmflow_ray.config import load_recipe

    return load_recipe(None, [f"model_name_or_path={model}", f"eval_dataset_path={data}", f"eval_output_dir={out}",
                              f"max_new_tokens={NEW_TOKENS}", "inference_batch_size_per_device=3",
                              "conversation_template=tokenizer", *extra])


def evaluate_quiet(recipe):
    from lmflow_ray.eval.run import evaluate

    return evaluate(recipe, say=lambda _: None)


@pytest.fixture(scope="module")
def chat_set(plain, tmp_path_factory):
    """Conversations whose reference is the model's own greedy answer for even items and a wrong
    one for odd items: accuracy must be exactly 1/2. Also the expected NLL of the references."""
    _, tok = plain
    instances, nll_sum, tokens = [], 0.0, 0
    for i, q in enumerate(QUESTIONS):
        said = _greedy(plain, _chat_prompt(tok, q))
        reference = said if i % 2 == 0 else f"not {said} {i}"
        instances.append({"system": SYSTEM, "messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": reference}]})
        lp = _logprobs(plain, _chat_prompt(tok, q), reference + "<|im_end|>")  # the reply and its end-of-turn
        nll_sum -= sum(lp)
        tokens += len(lp)
    folder = _write(tmp_path_factory.mktemp("chat") / "heldout", "conversation", instances)
    return folder, nll_sum / tokens


def test_folder_eval_accuracy_nll_and_files(ray_local, tiny_model_dir, chat_set, tmp_path):
    data, expected_nll = chat_set
    result = evaluate_quiet(_recipe(tiny_model_dir, data, tmp_path / "out", "metric=acc,nll"))
    assert result.count == len(QUESTIONS) and result.correct == len(QUESTIONS) // 2
    assert result.metrics["acc"] == 0.5
    assert result.metrics["nll"] == pytest.approx(expected_nll, rel=1e-4)
    assert result.metrics["ppl"] == pytest.approx(math.exp(expected_nll), rel=1e-4)
    assert [p["correct"] for p in result.predictions] == [i % 2 == 0 for i in range(len(QUESTIONS))]

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".lmflow-ray-output.json", "benchmark.log", "predictions.jsonl",
                                                     "results.json", "results.md"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["acc"] == 0.5 and saved["count"] == len(QUESTIONS)
    log = (out / "benchmark.log").read_text()
    assert "acc: 0.500000" in log and f"correct: {len(QUESTIONS) // 2}/{len(QUESTIONS)}" in log
    assert "| accuracy | 50.00% (4/8) |" in (out / "results.md").read_text()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(QUESTIONS) and all("prediction" in json.loads(x) for x in lines)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".lmflow-ray-tmp-")]  # nothing half-written left


# multiple_choice (options listed or read from "(A) ..." lines) is checked with lm-eval in
# test_a_served_endpoint_gives_the_same_answers_as_the_folder, item by item.
@pytest.mark.parametrize("answer_type", ["binary_choice", "pubmedqa"])
def test_choice_questions_are_scored_by_option_likelihood(ray_local, tiny_model_dir, plain, answer_type, tmp_path):
    """text2text questions with options (listed, or read from "(A) ..." lines); the reference is
    the most likely option for even items and another for odd ones: acc_loglik is exactly 1/2."""
    _, tok = plain
    colours = [["red", "blue", "green"], ["Paris", "London", "Rome"], ["yes please", "no thanks", "maybe later"]]
    instances = []
    defaults = {"binary_choice": ["yes", "no"], "pubmedqa": ["yes", "no", "maybe"]}
    for i in range(6):
        options = defaults.get(answer_type) or colours[i % 3]
        if answer_type == "multiple_choice":
            question = f"Question {i}: pick one.\n" + "".join(f"({chr(65 + k)}) {o}\n" for k, o in enumerate(options)) + "Answer:"
        else:  # no options written out: the answer type's defaults apply
            question = f"Question {i}: is it so? Answer:"
        scores = [sum(_logprobs(plain, question, " " + o)) for o in options]
        best = max(range(len(options)), key=lambda k: scores[k])
        pick = best if i % 2 == 0 else (best + 1) % len(options)
        reference = options[pick] if answer_type in defaults else f"({chr(65 + pick)})"
        row = {"input": question, "output": reference}
        if i % 3 == 0 and answer_type == "multiple_choice":
            row["options"] = options  # listed; the others are read from the question's lines
        instances.append(row)
    data = _write(tmp_path / "choice", "text2text", instances)
    result = evaluate_quiet(_recipe(tiny_model_dir, data, tmp_path / "out", f"answer_type={answer_type}"))
    assert result.metrics["acc_loglik"] == 0.5
    assert [p["loglik_correct"] for p in result.predictions] == [i % 2 == 0 for i in range(6)]
    # Generated answers are judged too: each as the metric reads that answer type.
    from lmflow_ray.eval.metrics import judge, parse_options

    for p, inst in zip(result.predictions, instances):
        options = inst.get("options") or parse_options(inst["input"]) or defaults[answer_type]
        assert p["correct"] == judge(answer_type, p["prediction"], inst["output"], options)
    assert result.metrics["acc"] == sum(p["correct"] for p in result.predictions) / 6


def test_math_answers_are_read_as_the_final_number(ray_local, tiny_model_dir, plain, tmp_path):
    from lmflow_ray.eval.metrics import extract_number
    prompts = [f"Q: {a} plus {b}?\nA:" for a, b in [(1, 2), (3, 4), (10, 5), (7, 7)]]
    said = [_greedy(plain, p) for p in prompts]
    # A reference that agrees with the model's final number where it gave one, else a number it did not give.
    references = [f"#### {extract_number(s):g}" if extract_number(s) is not None else "#### 123456789" for s in said]
    references[1] = "#### 987654321"  # one certainly wrong
    data = _write(tmp_path / "math", "text2text", [{"input": p, "output": r} for p, r in zip(prompts, references)])
    result = evaluate_quiet(_recipe(tiny_model_dir, data, tmp_path / "out", "answer_type=math"))
    assert [p["prediction"] for p in result.predictions] == said
    expected = [extract_number(s) is not None and i != 1 for i, s in enumerate(said)]
    assert [p["correct"] for p in result.predictions] == expected


def test_text_nll_uses_block_size_windows_like_lmflow(ray_local, tiny_model_dir, plain, tmp_path):
    """text_only: documents joined (each closed by eos) and cut into block_size windows; every token
    but a window's first is scored."""
    import torch

    model, tok = plain
    texts = ["Hello, how are you? I'm doing great.", "The capital of France is Paris.", "Please convert the date to ISO format."]
    data = _write(tmp_path / "text", "text_only", [{"text": t} for t in texts])
    result = evaluate_quiet(_recipe(tiny_model_dir, data, tmp_path / "out", "metric=nll", "block_size=16"))
    stream = []
    for t in texts:  # the tiny tokenizer puts no bos before plain text, so neither does the pipeline
        stream += tok(t + tok.eos_token, add_special_tokens=False).input_ids
    total, count = 0.0, 0
    for at in range(0, len(stream), 16):
        window = stream[at: at + 16]
        if len(window) < 2:
            continue
        with torch.inference_mode():
            logp = model(torch.tensor([window])).logits[0].log_softmax(-1)
        total -= sum(logp[i - 1, window[i]].item() for i in range(1, len(window)))
        count += len(window) - 1
    assert result.tokens == count
    assert result.metrics["nll"] == pytest.approx(total / count, rel=1e-4)
    assert "acc" not in result.metrics



def test_a_lora_checkpoint_in_s3(ray_local, s3_server, tiny_model_dir, chat_set, tmp_path):
    """A LoRA run in the S3 server: the newest complete checkpoint is found, downloaded, merged on
    its base; the results go to S3 too. Its answers equal PeftModel.generate's."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray import storage

    torch.manual_seed(3)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                     task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    checkpoint = tmp_path / storage.checkpoint_name(2)
    peft.save_pretrained(checkpoint / storage.EXPORT_DIR)
    storage.write_manifest(checkpoint, storage.list_local_files(checkpoint), {"step": 2})
    s3 = {"endpoint_url": s3_server.endpoint, "access_key": s3_server.access_key, "secret_key": s3_server.secret_key}
    run_uri = "s3://lmflow-eval/runs/tuned"
    storage.upload(checkpoint, storage.join(run_uri, checkpoint.name), s3)

    data, _ = chat_set
    creds = [f"endpoint_url={s3_server.endpoint}", f"aws_access_key_id={s3_server.access_key}",
             f"aws_secret_access_key={s3_server.secret_key}"]
    result = evaluate_quiet(_recipe(run_uri, data, "s3://lmflow-eval/results/tuned", *creds))
    assert "LoRA on" in result.model and "checkpoint_000002" in result.model

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint / storage.EXPORT_DIR).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = [_greedy((model, tok), _chat_prompt(tok, q)) for q in QUESTIONS]
    assert [p["prediction"] for p in result.predictions] == want
    fs, path = storage.filesystem("s3://lmflow-eval/results/tuned", s3)
    with fs.open_input_stream(f"{path}/results.json") as f:
        assert json.loads(f.read())["count"] == len(QUESTIONS)


def test_a_served_endpoint_gives_the_same_answers_as_the_folder(ray_local, tiny_model_dir, plain, chat_set, tmp_path,
                                                                repo_python):
    """The tiny model on Ray Serve (transformers engine) asked through the openai client by a Ray
    Data job: the same predictions and accuracy as evaluating the folder. Then lm-eval against the
    same endpoint: its generate_until answers are eval's, and its multiple-choice accuracy (by
    log-likelihood, from the endpoint's echoed prompt log-probs) is eval's acc_loglik."""
    from ray import serve

    from lmflow_ray.config import load_recipe
    from lmflow_ray.serve.app import APP_NAME, build_app
    from lmflow_ray.serve.front import start_serve

    data, _ = chat_set
    folder = evaluate_quiet(_recipe(tiny_model_dir, data, tmp_path / "folder"))
    items = _choice_items(plain)  # scored on the folder before the replica takes a CPU
    # Options listed for every third question, read from its "(A) ..." lines for the others.
    choices = _write(tmp_path / "choice", "text2text", [{"input": q, "output": f"({chr(65 + g)})", **({"options": o} if i % 3 == 0 else {})}
                                                        for i, (q, o, g) in enumerate(items)])
    by_loglik = evaluate_quiet(_recipe(tiny_model_dir, choices, tmp_path / "choice-out", "answer_type=multiple_choice"))
    port = free_ports(1)[0]
    app = build_app(load_recipe(None, [f"model_name_or_path={tiny_model_dir}", "engine=transformers",
                                       "served_model_name=tiny", f"port={port}", "max_new_tokens=32"]))
    start_serve("127.0.0.1", port)
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        url = f"http://127.0.0.1:{port}"
        served = evaluate_quiet(_recipe(tiny_model_dir, data, tmp_path / "served", f"server_url={url}"))
        assert [p["prediction"] for p in served.predictions] == [p["prediction"] for p in folder.predictions]
        assert served.metrics["acc"] == folder.metrics["acc"] == 0.5
        assert served.model == f"tiny at {url}"
        # The CLI refuses what a server cannot give, before any work, naming the metric.
        proc = repo_python("-m", "lmflow_ray.cli", "eval", "--url", url, f"eval_dataset_path={data}", "metric=nll")
        assert proc.returncode == 2 and "eval.metric nll/ppl" in proc.stderr
        _lm_eval_agrees(url, tiny_model_dir, plain, items, by_loglik, data, folder, tmp_path)
        serve.delete(APP_NAME)  # now Serve's proxy answers by itself: in OpenAI's shape too (ProxyErrors)
        gone = requests.get(f"{url}/v1/models", timeout=30)
        assert gone.status_code == 404 and "not found" in gone.json()["error"]["message"], gone.text
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()


def _choice_items(plain, n=6):
    """Lettered questions whose reference is the most likely option for even items and another
    for odd ones (acc_loglik exactly 1/2)."""
    colours = [["red", "blue", "green"], ["Paris", "London", "Rome"], ["yes please", "no thanks", "maybe later"]]
    items = []
    for i in range(n):
        options = colours[i % 3]
        question = f"Question {i}: pick one.\n" + "".join(f"({chr(65 + k)}) {o}\n" for k, o in enumerate(options)) + "Answer:"
        scores = [sum(_logprobs(plain, question, " " + o)) for o in options]
        best = max(range(len(options)), key=lambda k: scores[k])
        items.append((question, options, best if i % 2 == 0 else (best + 1) % len(options)))
    return items


def _lm_eval_agrees(url, tiny_model_dir, plain, items, ours, chat_data, folder_result, tmp_path):
    from clients import run_lm_eval

    _, tok = plain
    chats = json.loads((chat_data / "data.json").read_text())["instances"]
    gen = [(_chat_prompt(tok, c["messages"][0]["content"]), c["messages"][1]["content"]) for c in chats]
    got = run_lm_eval(url, "tiny", tiny_model_dir, tmp_path / "lm-eval", items, gen, NEW_TOKENS, "<|im_end|>")

    # Multiple choice: lm-eval's acc is eval's acc_loglik on the same items, item by item.
    assert got["results"]["lmflow_mc"]["acc,none"] == ours.metrics["acc_loglik"] == 0.5
    assert [p["loglik_correct"] for p in ours.predictions] == [i % 2 == 0 for i in range(len(items))]
    for theirs, mine in zip(got["mc"], ours.predictions):
        assert max(abs(a - b) for a, b in zip(theirs, mine["option_logprobs"])) < 1e-3, (theirs, mine)
    from lmflow_ray.eval.metrics import judge  # the generated answers are judged too, as letters or text

    for p, (_, options, gold) in zip(ours.predictions, items):
        assert p["correct"] == judge("multiple_choice", p["prediction"], f"({chr(65 + gold)})", options)
    # generate_until: the same greedy answers as eval of the folder (its stop: the end of turn).
    assert [a.strip() for a in got["gen"]] == [p["prediction"] for p in folder_result.predictions]
    assert got["results"]["lmflow_gen"]["exact_match,none"] == folder_result.metrics["acc"] == 0.5


def test_bad_eval_requests_exit_2_naming_the_problem(repo_python, tiny_model_dir, tmp_path):
    text = _write(tmp_path / "text", "text_only", [{"text": "hello"}])
    proc = repo_python("-m", "lmflow_ray.cli", "eval", f"model_name_or_path={tiny_model_dir}", f"eval_dataset_path={text}")
    assert proc.returncode == 2 and "eval.metric acc: a text_only dataset has no answers" in proc.stderr
    proc = repo_python("-m", "lmflow_ray.cli", "eval", f"model_name_or_path={tmp_path / 'nowhere'}", f"eval_dataset_path={text}",
                       "metric=ppl")
    assert proc.returncode == 2 and "model.model_name_or_path" in proc.stderr and "nowhere" in proc.stderr
    proc = repo_python("-m", "lmflow_ray.cli", "eval", f"eval_dataset_path={text}", "metric=bleu")
    assert proc.returncode == 2 and "metric" in proc.stderr
    choice = _write(tmp_path / "choice", "text2text", [{"input": "Pick (A) or (B)?", "output": "A"}])
    proc = repo_python("-m", "lmflow_ray.cli", "eval", f"model_name_or_path={tiny_model_dir}", f"eval_dataset_path={choice}",
                       "answer_type=multiple_choice", f"eval_output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "instance 0 lists no options" in proc.stderr
    assert not (tmp_path / "out").exists()
