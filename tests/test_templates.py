"""Presets render byte-for-byte what the official chat templates render; labels cover replies only."""

import json
from pathlib import Path

import pytest

from lmflow_ray.data.formats import check_instance
from lmflow_ray.data.templates import PRESETS, TokenizerTemplate, get_template
from lmflow_ray.data.tokenize import IGNORE_INDEX, encode_rendered
from lmflow_ray.errors import UserError
from tiny import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIAL = json.loads((FIXTURES / "special_tokens.json").read_text(encoding="utf-8"))

SYSTEM = "You are a friendly assistant who answers briefly."
TURNS = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And the order number ORD-12345?"},
    {"role": "assistant", "content": "Your order ORD-12345 ships tomorrow."},
]

# LMFlow's own definitions (src/lmflow/utils/conversation_template/base.py): no model ships these.
LMFLOW_EMPTY = {
    "empty": "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + m['content'] }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
    "empty_no_special_tokens": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


def official(name: str):
    tokens = SPECIAL.get(name, {"bos_token": "<s>", "eos_token": "</s>"})
    text = LMFLOW_EMPTY.get(name) or (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    return tiny_tokenizer(tokens["bos_token"], tokens["eos_token"], chat_template=text)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("system", [None, SYSTEM, ""], ids=["no-system", "system", "empty-system"])
def test_preset_matches_official_template(name, system):
    """An absent system prompt is none (or the model's default); an explicit empty one is an empty
    system prompt, rendered as the official template renders it (qwen2 / qwen2_5: no default)."""
    if system is not None and name.startswith("empty"):
        pytest.skip("LMFlow's empty templates have no system slot (tested below)")
    tok = official(name)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + TURNS
    expected = tok.apply_chat_template(messages, tokenize=False)
    conv = {"system": system, "messages": TURNS}
    assert get_template(name, tok).render(conv).text == expected
    assert TokenizerTemplate(tok).render(conv).text == expected


@pytest.mark.parametrize("name", ["qwen2", "qwen2_5"])
def test_empty_system_in_data_means_no_default_prompt(name):
    """From a data row to the text: "system": "" (or an empty system message) reaches the template."""
    tok = official(name)
    default = PRESETS[name].default_system
    expected = tok.apply_chat_template([{"role": "system", "content": ""}] + TURNS, tokenize=False)
    assert default not in expected
    rows = [{"system": "", "messages": TURNS}, {"messages": [{"role": "system", "content": ""}] + TURNS},
            {"system": "", "messages": [{"role": "system", "content": ""}] + TURNS},
            {"system": "", "conversations": [{"from": "system", "value": ""}] + [
                {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in TURNS]}]
    for row in rows:
        conv = check_instance("conversation", row)
        assert conv["system"] == ""
        assert get_template(name, tok).render(conv).text == expected
        assert TokenizerTemplate(tok).render(conv).text == expected
    absent = check_instance("conversation", {"messages": TURNS})
    assert absent["system"] is None
    assert default in get_template(name, tok).render(absent).text


@pytest.mark.parametrize("name", ["empty", "empty_no_special_tokens"])
def test_empty_system_on_a_template_without_a_system_slot_renders_nothing(name):
    tok = official(name)
    template = get_template(name, tok)
    assert template.render({"system": "", "messages": TURNS}).text == template.render({"system": None, "messages": TURNS}).text


# Text that looks like a format string: it is data, never a template.
BRACES = "Answer as {content} or {system}, {{like this}} and {{ \"a\": 1 }}; a stray } and { and {0} too."
BRACE_TURNS = [
    {"role": "user", "content": "Fill in {content} and {system}: {{x}} } {"},
    {"role": "assistant", "content": "Here: {content} {system} {{ }} } {bos_token} {eos_token}"},
    {"role": "user", "content": "{system}"},
    {"role": "assistant", "content": "{content}"},
]


@pytest.mark.parametrize("name", sorted(PRESETS) + ["tokenizer"])
@pytest.mark.parametrize("system", [None, BRACES], ids=["no-system", "braces-system"])
def test_braces_in_system_and_messages_render_literally(name, system):
    if system is not None and name.startswith("empty"):
        pytest.skip("LMFlow's empty templates have no system slot")
    tok = official("chatml" if name == "tokenizer" else name)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + BRACE_TURNS
    conv = {"system": system, "messages": BRACE_TURNS}
    for generation in (False, True):
        rendered = get_template(name, tok).render(conv, add_generation_prompt=generation)
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert rendered.text == expected
        # Each text appears exactly as written, once (no first user message pasted into the system prompt).
        for text in ([system] if system else []) + [m["content"] for m in BRACE_TURNS]:
            assert text in rendered.text
        assert rendered.text.count(BRACE_TURNS[0]["content"]) == 1
    replies = [m["content"] for m in BRACE_TURNS if m["role"] == "assistant"]
    for (a, b), reply in zip(rendered.spans, replies):
        assert rendered.text[a:b].strip().startswith(reply)


@pytest.mark.parametrize("name", sorted(PRESETS) + ["tokenizer"])
def test_generation_prompt_matches_official(name):
    tok = official(name if name != "tokenizer" else "chatml")
    messages = [{"role": "system", "content": SYSTEM}] if not name.startswith("empty") else []
    messages = messages + TURNS[:3]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    conv = {"system": messages[0]["content"] if messages[0]["role"] == "system" else None,
            "messages": [m for m in messages if m["role"] != "system"]}
    template = get_template(name, tok)
    assert template.render(conv, add_generation_prompt=True).text == expected
    # What serving renders: the text alone, without the per-prefix renders that find the spans.
    assert template.render(conv, add_generation_prompt=True, spans=False) == type(template.render(conv))(expected)


@pytest.mark.parametrize("name", sorted(PRESETS) + ["tokenizer"])
def test_labels_cover_exactly_the_replies(name):
    tok = official("chatml" if name == "tokenizer" else name)
    template = get_template(name, tok)
    conv = {"system": None if name.startswith("empty") else SYSTEM, "messages": TURNS}
    rendered = template.render(conv)
    (encoded,) = encode_rendered([rendered], tok, block_size=4096)
    trained_ids = [i for i, lab in zip(encoded.input_ids, encoded.labels) if lab != IGNORE_INDEX]
    # The trained tokens decode to the replies, each with its end-of-turn text, and nothing else.
    replies = [m["content"] for m in TURNS if m["role"] == "assistant"]
    trained = tok.decode(trained_ids)
    assert trained == rendered.trained_text()
    for reply in replies:
        assert reply in trained
    for m in TURNS:
        if m["role"] == "user":
            assert m["content"] not in trained
    assert SYSTEM not in trained
    # Every span ends with the template's end of turn (not a bare reply).
    for (a, b), reply in zip(rendered.spans, replies):
        assert rendered.text[a:b].strip().startswith(reply)
        assert len(rendered.text[a:b].strip()) > len(reply) or name == "empty_no_special_tokens"


def test_train_on_prompt_trains_everything():
    tok = official("chatml")
    rendered = get_template("chatml", tok).render({"system": None, "messages": TURNS})
    (encoded,) = encode_rendered([rendered], tok, block_size=4096, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids


def test_tokenizer_template_ids_equal_apply_chat_template():
    tok = official("qwen2_5")  # a template with a default system prompt and a tools branch
    conv = {"system": SYSTEM, "messages": TURNS}
    rendered = TokenizerTemplate(tok).render(conv)
    (encoded,) = encode_rendered([rendered], tok, block_size=4096)
    messages = [{"role": "system", "content": SYSTEM}] + TURNS
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert encoded.input_ids == list(ids)
    assert rendered.text == get_template("qwen2_5", tok).render(conv).text


def test_tokenizer_template_renders_tools():
    tok = official("qwen2_5")
    tools = [{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}]
    rendered = TokenizerTemplate(tok).render({"system": None, "tools": tools, "messages": TURNS[:2]})
    assert "lookup_order" in rendered.text and "# Tools" in rendered.text
    assert rendered.trained_text() == TURNS[1]["content"] + "<|im_end|>"


def test_tools_with_a_preset_is_a_clear_error():
    with pytest.raises(UserError, match="does not render tools"):
        get_template("chatml", official("chatml")).render({"tools": [{"name": "x"}], "messages": TURNS})


def test_empty_template_refuses_a_system_prompt():
    with pytest.raises(UserError, match="no place for a system prompt"):
        get_template("empty", official("empty")).render({"system": SYSTEM, "messages": TURNS})


def test_unknown_template_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean llama3"):
        get_template("llama_3", official("chatml"))


def test_template_that_rewrites_history_is_refused():
    # Like Qwen3's template, which drops earlier reasoning: the prefix property breaks.
    rewriting = ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'][:3] }}"
                 "{% endif %}|{% endfor %}")
    tok = tiny_tokenizer(chat_template=rewriting)
    with pytest.raises(UserError, match="rewrites earlier turns"):
        TokenizerTemplate(tok).render({"system": None, "messages": TURNS})
