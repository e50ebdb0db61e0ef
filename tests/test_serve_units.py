"""Pure parts of serving: request parsing, model naming and sources, engine choice, Serve options."""

import json

import pytest

from lmflow_ray.config import load_recipe
from lmflow_ray.errors import UserError
from lmflow_ray.serve import engines
from lmflow_ray.serve.front import deployment_options
from lmflow_ray.serve.openai_api import APIError, ChatRequest, CompletionRequest, parse
from lmflow_ray.serve.sources import EMBEDDED_NAME, resolve, served_name


def test_chat_request_becomes_a_conversation_with_one_system_prompt():
    req = parse(ChatRequest, json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}], "stop": "END"}).encode())
    assert req.conversation() == {"system": "Be brief.", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]}
    assert req.stops() == ["END"] and req.token_limit() is None
    late_system = parse(ChatRequest, json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}).encode())
    with pytest.raises(APIError, match="only come first") as err:
        late_system.conversation()
    assert err.value.param == "messages[1].role"


@pytest.mark.parametrize("body,param", [
    (b"\xff\xfe", None), (b'"text"', None), (b'{"model": "m", "prompt": "x", "max_tokens": -1}', "max_tokens"),
    (b'{"model": "m", "prompt": "x", "top_p": 0}', "top_p"), (b'{"model": "", "prompt": "x"}', "model"),
])
def test_bad_completion_bodies_name_the_field(body, param):
    with pytest.raises(APIError) as err:
        parse(CompletionRequest, body)
    assert err.value.status == 400 and err.value.param == param and err.value.message


def test_completion_defaults_follow_openai():
    req = parse(CompletionRequest, b'{"model": "m", "prompt": ["only one"], "user": "ignored"}')
    assert req.prompts() == ["only one"] and req.max_tokens == 16 and req.temperature == 1.0


@pytest.mark.parametrize("prompt,expected", [
    ("one", ["one"]), (["a", "b"], ["a", "b"]), ([5, 6, 7], [[5, 6, 7]]), ([[5], [6, 7]], [[5], [6, 7]]),
])
def test_a_completion_prompt_is_a_string_strings_ids_or_id_lists(prompt, expected):
    assert parse(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode()).prompts() == expected


DEEP = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE = [  # (raw body, param): each once gave a 500
    (DEEP, None),
    (b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None),
    (b'{"model": "m", "prompt": "\\ud800"}'.replace(b"\\\\", b"\\"), "prompt"),
    (b'{"model": "m", "prompt": ["ok", "\\udfff x"]}'.replace(b"\\\\", b"\\"), "prompt.1"),
    (b'{"model": "m", "prompt": "x", "seed": 18446744073709551616}', "seed"),
    (b'{"model": "m", "prompt": "x", "seed": 9223372036854775808}', "seed"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', None),
    (b'{"model": "m", "prompt": "x", "top_p": Infinity}', None),
    (b'{"model": "m", "prompt": [""]}', "prompt"),
    (b'{"model": "m", "prompt": [[]]}', "prompt"),
    (b'{"model": "m", "prompt": [1, true]}', "prompt"),
    (b'{"model": "m", "prompt": "x", "logprobs": 21}', "logprobs"),
]


@pytest.mark.parametrize("raw,param", HOSTILE)
def test_hostile_bodies_get_400_naming_the_field(raw, param):
    with pytest.raises(APIError) as err:
        parse(CompletionRequest, raw)
    assert err.value.status == 400 and err.value.param == param and err.value.message


def test_a_lone_surrogate_in_a_message_is_named():
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}'.replace(b"\\\\", b"\\")
    with pytest.raises(APIError) as err:
        parse(ChatRequest, raw)
    assert err.value.param == "messages.0.content"
    with pytest.raises(APIError, match="top_logprobs needs logprobs"):
        parse(ChatRequest, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}')


def test_served_names_come_from_the_run():
    assert served_name("default") == EMBEDDED_NAME
    assert served_name("s3://bucket/runs/support-bot/checkpoint_000040/hf") == "support-bot"
    assert served_name("s3://bucket/runs/support-bot/") == "support-bot"
    assert served_name("/models/Qwen2-0.5B") == "Qwen2-0.5B"


def test_sources_reject_missing_folders_and_non_adapters(tmp_path):
    with pytest.raises(UserError, match="model.model_name_or_path: .*not a folder"):
        resolve(load_recipe(None, [f"model_name_or_path={tmp_path / 'nope'}"]))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="serve.lora_adapters.x: .* is not a LoRA adapter"):
        resolve(load_recipe(None, [f"lora_adapters={{x: {tmp_path / 'plain'}}}"]))


def test_engine_choice(monkeypatch):
    monkeypatch.setattr(engines, "vllm_installed", lambda: False)
    assert engines.choose_engine("auto") == "transformers"
    with pytest.raises(UserError, match="vllm is not installed"):
        engines.choose_engine("vllm")
    monkeypatch.setattr(engines, "vllm_installed", lambda: True)
    assert engines.choose_engine("auto") == "vllm" and engines.choose_engine("transformers") == "transformers"


def test_deployment_options_autoscale_and_leave_room_for_the_guard():
    fixed = deployment_options(load_recipe(None, ["max_ongoing_requests=2"]).serve)
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] > 2 and fixed["max_queued_requests"] > 0
    scaled = deployment_options(load_recipe(None, ["min_replicas=0", "max_replicas=3", "target_ongoing_requests=4"]).serve)
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4.0}
