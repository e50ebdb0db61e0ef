"""Conversation templates: LMFlow's presets by name, plus `tokenizer` (the tokenizer's own jinja).

A template renders a conversation to one string and reports the character spans the model is
trained on (each assistant reply with its end-of-turn token). Tokenization happens once, on the
whole string, so the ids equal what the model's official chat template produces at inference.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmflow_ray.errors import UserError

Span = tuple[int, int]


@dataclass
class Rendered:
    text: str
    spans: list[Span] = field(default_factory=list)  # trained character spans, sorted

    def trained_text(self) -> str:
        return "".join(self.text[a:b] for a, b in self.spans)


class Template(Protocol):
    name: str

    def render(self, conv: dict[str, Any], add_generation_prompt: bool = False, spans: bool = True) -> Rendered: ...


@dataclass(frozen=True)
class Preset:
    """A chat format as pieces. ``{content}``, ``{system}``, ``{bos_token}`` and ``{eos_token}`` are
    filled in, in one pass over each piece (text filled in is never read as a template)."""

    name: str
    user: str
    assistant: str  # trained: the reply and its end-of-turn marker
    assistant_prefix: str = ""  # untrained lead-in; also the generation prompt
    assistant_suffix: str = ""  # untrained separator after each reply
    system: str | None = None  # a block of its own
    system_fold: str | None = None  # or folded into the first user turn: "...{system}...{content}"
    default_system: str | None = None
    prefix: str = ""  # once, before everything
    suffix: str = ""  # once, after a finished conversation
    strip: frozenset[str] = frozenset()  # roles whose content is .strip()ped
    fold_then_strip: bool = False  # llama2 strips the folded text; gemma folds after stripping


CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    assistant_suffix="\n",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("chatml", **CHATML),
        Preset(
            "llama2",
            system_fold="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
            user="{bos_token}[INST] {content} [/INST]",
            assistant=" {content} {eos_token}",
            strip=frozenset({"user", "assistant"}),
            fold_then_strip=True,
        ),
        Preset(
            "llama3",
            prefix="{bos_token}",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant="{content}<|eot_id|>",
            strip=frozenset({"system", "user", "assistant"}),
        ),
        Preset(
            "phi3",
            prefix="{bos_token}",
            system="<|system|>\n{content}<|end|>\n",
            user="<|user|>\n{content}<|end|>\n",
            assistant_prefix="<|assistant|>\n",
            assistant="{content}<|end|>",
            assistant_suffix="\n",
            suffix="{eos_token}",
        ),
        Preset("qwen2", default_system="You are a helpful assistant.", **CHATML),
        Preset("qwen2_5", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", **CHATML),
        Preset(
            "gemma",
            prefix="{bos_token}",
            system_fold="{system}\n\n{content}",
            user="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_prefix="<start_of_turn>model\n",
            assistant="{content}<end_of_turn>",
            assistant_suffix="\n",
            strip=frozenset({"user", "assistant"}),
        ),
        Preset(
            "deepseek",
            prefix="{bos_token}",
            system="{content}\n\n",
            user="User: {content}\n\n",
            assistant_prefix="Assistant:",
            assistant=" {content}{eos_token}",
        ),
        Preset("yi", **CHATML),
        Preset(
            "yi1_5",
            system="{content}",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant="{content}<|im_end|>",
            assistant_suffix="\n",
        ),
        Preset(
            "zephyr",
            system="<|system|>\n{content}{eos_token}\n",
            user="<|user|>\n{content}{eos_token}\n",
            assistant_prefix="<|assistant|>\n",
            assistant="{content}{eos_token}",
            assistant_suffix="\n",
        ),
        Preset("internlm2", prefix="{bos_token}", **CHATML),
        Preset("empty", user="{bos_token}{content}", assistant="{content}{eos_token}"),
        Preset("empty_no_special_tokens", user="{content}", assistant="{content}"),
    ]
}

NAMES = sorted(PRESETS) + ["tokenizer"]
_PLACEHOLDER = re.compile(r"\{(content|system|bos_token|eos_token)\}")


class BoundPreset:
    """A preset with the tokenizer's bos/eos strings filled in."""

    def __init__(self, preset: Preset, bos_token: str | None, eos_token: str | None):
        self.name = preset.name
        self.preset = preset
        self._tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def _fill(self, piece: str, content: str = "", system: str = "") -> str:
        """The piece's placeholders filled in one pass over the piece: what is filled in (user
        text, a system prompt, a token) is never scanned again, so braces in it stay as they are."""
        values = {**self._tokens, "content": content, "system": system}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], piece)

    def render(self, conv: dict[str, Any], add_generation_prompt: bool = False, spans: bool = True) -> Rendered:
        p = self.preset
        if conv.get("tools"):
            raise UserError(f"conversation_template {p.name} does not render tools; use conversation_template: tokenizer")
        # Only an absent system prompt (None) means "none" (or the preset's default); an explicit
        # empty one renders an empty system block, as the official templates do.
        system = conv.get("system")
        if system is None:
            system = p.default_system
        if system is not None and p.system is None and p.system_fold is None:
            if system:
                raise UserError(f"conversation_template {p.name} has no place for a system prompt; drop it or pick another template")
            system = None  # an empty one has nothing to place
        out: list[str] = [self._fill(p.prefix)]
        marked: list[Span] = []
        size = len(out[0])

        def add(text: str, trained: bool = False) -> None:
            nonlocal size
            if trained:
                marked.append((size, size + len(text)))
            out.append(text)
            size += len(text)

        if system is not None and p.system is not None:
            add(self._fill(p.system, system.strip() if "system" in p.strip else system))
        first_user = True
        for msg in conv["messages"]:
            role, content = msg["role"], msg["content"]
            if role == "tool":
                raise UserError(f"conversation_template {p.name} has no tool role; use conversation_template: tokenizer")
            if role == "user":
                fold = first_user and system is not None and p.system_fold is not None
                if fold and p.fold_then_strip:
                    content = self._fill(p.system_fold, content, system)
                if "user" in p.strip:
                    content = content.strip()
                if fold and not p.fold_then_strip:
                    content = self._fill(p.system_fold, content, system)
                add(self._fill(p.user, content))
                first_user = False
            else:
                if "assistant" in p.strip:
                    content = content.strip()
                add(self._fill(p.assistant_prefix))
                add(self._fill(p.assistant, content), trained=True)
                add(self._fill(p.assistant_suffix))
        add(self._fill(p.assistant_prefix if add_generation_prompt else p.suffix))
        return Rendered("".join(out), marked if spans else [])


class TokenizerTemplate:
    """The tokenizer's own jinja chat template. Assistant spans are found by rendering prefixes:
    reply i is what ``messages[:i+1]`` adds to ``messages[:i]`` rendered with a generation prompt."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "conversation_template: the tokenizer has no chat template of its own; "
                f"name a preset ({', '.join(sorted(PRESETS))})"
            )
        self.tokenizer = tokenizer

    def _apply(self, messages: list[dict[str, str]], tools: Any, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(self, conv: dict[str, Any], add_generation_prompt: bool = False, spans: bool = True) -> Rendered:
        # An explicit empty system prompt goes to the template too: it decides what "" renders.
        head = [{"role": "system", "content": conv["system"]}] if conv.get("system") is not None else []
        messages = head + list(conv["messages"])
        tools = conv.get("tools")
        text = self._apply(messages, tools, add_generation_prompt)
        if not spans:  # inference: the text alone (finding spans renders every prefix again)
            return Rendered(text)
        found: list[Span] = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self._apply(messages[:i], tools, True)
            if not text.startswith(before):
                raise UserError(
                    "conversation_template tokenizer: this chat template rewrites earlier turns "
                    f"(the render up to message {i} is not a prefix of the whole); name a preset instead"
                )
            upto = self._apply(messages[: i + 1], tools, False)
            end = _common_prefix(text, upto)
            while end > len(before) and text[end - 1].isspace():
                end -= 1
            found.append((len(before), end))
        return Rendered(text, found)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def get_template(name: str | None, tokenizer: Any) -> Template:
    """A template by name; empty = the tokenizer's own chat template."""
    if name in (None, "", "tokenizer"):
        return TokenizerTemplate(tokenizer)
    if name not in PRESETS:
        close = difflib.get_close_matches(name, NAMES, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(NAMES)})"
        raise UserError(f"conversation_template: unknown template {name!r}{hint}")
    return BoundPreset(PRESETS[name], tokenizer.bos_token, tokenizer.eos_token)
