"""Dataset types and row validation. Every problem names the file, the line (or row), and the field.

Accepted shapes (LMFlow's vocabulary):
  - a JSON file ``{"type": T, "instances": [...]}``, or a folder of them;
  - JSONL or parquet with one instance per row (the type is inferred from the keys);
  - a JSON array of instances (type inferred, like JSONL);
  - FastChat / Aquila ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``.
T is text_only ``{"text"}``, text2text ``{"input", "output"}``, conversation
``{"messages": [{"role", "content"}], "system"?, "tools"?}`` or paired_conversation
``{"chosen": conversation, "rejected": conversation}``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

TYPES = ("text_only", "text2text", "conversation", "paired_conversation")
REQUIRED = {
    "text_only": ("text",),
    "text2text": ("input", "output"),
    "conversation": ("messages",),
    "paired_conversation": ("chosen", "rejected"),
}
ROLES = ("system", "user", "assistant", "tool")
FASTCHAT_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
EXTENSIONS = (".json", ".jsonl", ".parquet")


class Invalid(Exception):
    """One problem with one instance: the dotted field and what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


def infer_type(row: dict[str, Any]) -> str:
    """The dataset type a JSONL / parquet row belongs to, from its keys."""
    keys = set(row)
    if "messages" in keys or "conversations" in keys:
        return "conversation"
    if {"chosen", "rejected"} <= keys:
        return "paired_conversation"
    if {"input", "output"} <= keys:
        return "text2text"
    if "text" in keys:
        return "text_only"
    found = ", ".join(sorted(keys)) or "none"
    raise Invalid("", f"cannot tell the dataset type from the keys (found: {found}); expected text, input+output, messages, conversations, or chosen+rejected")


def _typo_hint(row: dict[str, Any], missing: str) -> str:
    close = difflib.get_close_matches(missing, [str(k) for k in row], n=1, cutoff=0.7)
    return f" (found '{close[0]}': a typo?)" if close else ""


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise Invalid(field, f"expected a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise Invalid(field, "is empty")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _turns(raw: Any, field: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """A list of turns -> [(field path, {"role", "content"})], for OpenAI-style messages
    (role/content) and FastChat conversations (from/value, speakers mapped to roles)."""
    if not isinstance(raw, list):
        raise Invalid(field, f"expected a list of turns, got {_kind(raw)}")
    out = []
    for i, turn in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise Invalid(where, f"expected an object with '{role_key}' and '{text_key}', got {_kind(turn)}")
        for key in (role_key, text_key):
            if key not in turn:
                raise Invalid(f"{where}.{key}", f"missing{_typo_hint(turn, key)}")
        if turn[role_key] not in roles:
            what = "role" if role_key == "role" else "speaker"
            raise Invalid(f"{where}.{role_key}", f"unknown {what} {turn[role_key]!r} (expected one of {', '.join(dict.fromkeys(roles))})")
        role = roles[turn[role_key]]  # an empty system prompt is a prompt (see check_conversation)
        out.append((where, {"role": role, "content": _text(turn[text_key], f"{where}.{text_key}", allow_empty=role == "system")}))
    return out


def check_conversation(row: Any, field: str = "") -> dict[str, Any]:
    """Validate one conversation; return it normalised to {"system", "tools", "messages"}."""
    at = f"{field}." if field else ""
    if isinstance(row, list):  # a bare message list (allowed inside paired_conversation)
        row = {"messages": row}
    if not isinstance(row, dict):
        raise Invalid(field, f"expected a conversation object, got {_kind(row)}")
    if "messages" in row:
        turns = _turns(row["messages"], f"{at}messages", "role", "content", {r: r for r in ROLES})
    elif "conversations" in row:
        turns = _turns(row["conversations"], f"{at}conversations", "from", "value", FASTCHAT_SPEAKERS)
    else:
        raise Invalid(f"{at}messages", f"missing{_typo_hint(row, 'messages')}")
    listed = f"{at}messages" if "messages" in row else f"{at}conversations"

    system = row.get("system")
    if system is not None:
        system = _text(system, f"{at}system", allow_empty=True)
    if turns and turns[0][1]["role"] == "system":
        if system:
            raise Invalid(turns[0][0], "a system message and a 'system' field: give the system prompt once")
        system = turns.pop(0)[1]["content"]
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise Invalid(f"{at}tools", f"expected a list of tool definitions, got {_kind(tools)}")

    if not turns:
        raise Invalid(listed, "no messages")
    expected = "user"
    for where, msg in turns:
        role = msg["role"]
        if role == "system":
            raise Invalid(f"{where}.role", "a system message may only come first")
        if role == "tool":
            continue
        if role != expected:
            what = "start with a user message" if expected == "user" and where == turns[0][0] else f"alternate user/assistant (two {role} messages in a row)"
            raise Invalid(f"{where}.role", f"messages must {what}")
        expected = "assistant" if role == "user" else "user"
    if turns[-1][1]["role"] != "assistant":
        raise Invalid(turns[-1][0], "the conversation must end with an assistant reply (nothing to learn after it)")
    # "system": "" stays "": an explicit empty system prompt renders as the official templates render
    # it (an empty system block; no default prompt); only an absent one (None) means none / the default.
    return {"system": system, "tools": tools or None, "messages": [m for _, m in turns]}


def _with_options(instance: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Evaluation sets may list the answer options of a question (multiple / binary choice)."""
    if "options" in row:
        options = row["options"]
        if not isinstance(options, list) or len(options) < 2:
            raise Invalid("options", f"expected a list of at least two answer options, got {_kind(options)}")
        instance["options"] = [_text(o, f"options[{i}]") for i, o in enumerate(options)]
    return instance


def check_instance(kind: str, row: Any) -> dict[str, Any]:
    """Validate one instance of a dataset type; return it normalised."""
    if not isinstance(row, dict):
        raise Invalid("", f"expected an object, got {_kind(row)}")
    if kind == "conversation":
        return _with_options(check_conversation(row), row)
    for key in REQUIRED[kind]:
        if key not in row:
            raise Invalid(key, f"missing{_typo_hint(row, key)}")
    if kind == "text_only":
        return {"text": _text(row["text"], "text")}
    if kind == "text2text":
        return _with_options({"input": _text(row["input"], "input", allow_empty=True), "output": _text(row["output"], "output")}, row)
    pair = {"chosen": check_conversation(row["chosen"], "chosen"), "rejected": check_conversation(row["rejected"], "rejected")}
    if row.get("margin") is not None:  # how much better chosen is (TRL / OpenRLHF's per-pair margin)
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin or abs(margin) == float("inf"):
            raise Invalid("margin", f"expected a finite number, got {_kind(margin)}")
        pair["margin"] = float(margin)
    return pair


def check_type_name(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("type", f"expected one of {', '.join(TYPES)}, got {_kind(value)}")
    if value not in TYPES:
        close = difflib.get_close_matches(value, TYPES, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (expected one of {', '.join(TYPES)})"
        raise Invalid("type", f"unknown dataset type {value!r}{hint}")
    return value


# ---- locating instances in text -------------------------------------------------------------


@dataclass
class Record:
    """One validated instance, or the problem that stopped it, with where it came from."""

    path: str
    line: int | None = None  # 1-based line (JSON, JSONL)
    row: int | None = None  # 0-based row (parquet)
    kind: str | None = None
    instance: dict[str, Any] | None = None
    problem: str | None = None  # "field: problem", without the location

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path}:row {self.row}"
        return self.path

    def message(self) -> str:
        return f"{self.where}: {self.problem}"


def line_of(data: bytes | str, offset: int) -> int:
    return data.count(b"\n" if isinstance(data, bytes) else "\n", 0, offset) + 1


class LineCounter:
    """Line numbers for increasing offsets into one text, counting each newline once."""

    def __init__(self, text: str):
        self.text, self.offset, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def decode_utf8(path: str, data: bytes, base_line: int = 1) -> str | Record:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = base_line + line_of(data, err.start) - 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        return Record(path, line, problem=f"not valid UTF-8 (byte 0x{data[err.start]:02x} at column {col})")


def _json_error(path: str, err: json.JSONDecodeError, base_line: int = 1) -> Record:
    return Record(path, base_line + err.lineno - 1, problem=f"not valid JSON: {err.msg} (column {err.colno})")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _array_items(text: str, start: int) -> Iterator[tuple[int, Any]]:
    """Yield (offset, value) for each element of the JSON array opening at ``text[start]``."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, start + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        value, end = decoder.raw_decode(text, i)
        yield i, value
        i = _skip_ws(text, end)
        if text[i] == "]":
            return
        i = _skip_ws(text, i + 1)  # past the comma


def value_offset(text: str, key: str) -> int | None:
    """Offset of the value of ``key`` in the top-level JSON object of ``text``. ``text`` may be a
    prefix of the document as long as it holds every key before ``key`` (ValueError otherwise)."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        return None
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] != "}":
        name, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the colon
        if name == key:
            return i
        _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return None


def header_type(text: str) -> str | None:
    """The dataset type of a JSON document (its "type", or its first row's keys for an array),
    read from the document or a prefix of it; None when the prefix does not reach it."""
    decoder = json.JSONDecoder()
    try:
        i = _skip_ws(text, 0)
        if text[i] == "[":
            first, _ = decoder.raw_decode(text, _skip_ws(text, i + 1))
            return infer_type(first) if isinstance(first, dict) else None
        at = value_offset(text, "type")
        return None if at is None else check_type_name(decoder.raw_decode(text, at)[0])
    except (ValueError, IndexError, Invalid):
        return None


def _instance_offsets(text: str) -> list[int] | None:
    """Offsets of each element of the top-level "instances" array (the file already parsed)."""
    at = value_offset(text, "instances")
    if at is None or text[at] != "[":
        return None
    return [offset for offset, _ in _array_items(text, at)]


def _part(n: int, part: tuple[int, int]) -> range:
    """Instance indexes of part i of k (contiguous, near-equal)."""
    i, k = part
    return range(i * n // k, (i + 1) * n // k)


def records_from_json(path: str, data: bytes, part: tuple[int, int] = (0, 1), kind: str = "") -> Iterator[Record]:
    """A .json file: ``{"type", "instances"}`` or an array of instances; ``part`` = (i, k) reads the
    i-th of k slices of the instances (file-level problems are reported by part 0 only); ``kind``,
    when known, is the type an array's rows must have."""
    first = part[0] == 0
    text = decode_utf8(path, data)
    if isinstance(text, Record):
        yield from [text] if first else []
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        yield from [_json_error(path, err)] if first else []
        return
    if isinstance(doc, list):
        typer, lines = RowTyper(kind), LineCounter(text)
        offsets = [o for o, _ in _array_items(text, _skip_ws(text, 0))]
        for index in _part(len(doc), part):
            yield typer.check(Record(path, lines.at(offsets[index])), doc[index])
        return
    if not first:
        if isinstance(doc, dict) and isinstance(doc.get("instances"), list) and doc.get("type") in TYPES:
            yield from _lmflow_instances(path, text, doc["type"], doc["instances"], part)
        return
    if not isinstance(doc, dict):
        yield Record(path, 1, problem=f'expected an object {{"type": ..., "instances": [...]}}, got {_kind(doc)}')
        return
    if "type" not in doc:
        yield Record(path, 1, problem=f'type: missing (expected {{"type": one of {", ".join(TYPES)}, "instances": [...]}}){_typo_hint(doc, "type")}')
        return
    try:
        kind = check_type_name(doc["type"])
    except Invalid as err:
        yield Record(path, _key_line(text, "type"), problem=str(err))
        return
    instances = doc.get("instances")
    if not isinstance(instances, list):
        problem = "missing" + _typo_hint(doc, "instances") if "instances" not in doc else f"expected a list, got {_kind(instances)}"
        yield Record(path, _key_line(text, "instances"), problem=f"instances: {problem}")
        return
    yield from _lmflow_instances(path, text, kind, instances, part)


def _lmflow_instances(path: str, text: str, kind: str, instances: list, part: tuple[int, int]) -> Iterator[Record]:
    offsets = _instance_offsets(text) or [0] * len(instances)
    lines = LineCounter(text)
    for index in _part(len(instances), part):
        row = instances[index]
        line = lines.at(offsets[index])
        try:
            yield Record(path, line, kind=kind, instance=check_instance(kind, row))
        except Invalid as err:
            field = f"instances[{index}].{err.field}" if err.field else f"instances[{index}]"
            yield Record(path, line, kind=kind, problem=f"{field}: {err.problem}")


def _key_line(text: str, key: str) -> int:
    at = text.find(f'"{key}"')
    return line_of(text, at) if at >= 0 else 1


class RowTyper:
    """Checks rows whose type comes from their keys; the first row fixes the type for the rest."""

    def __init__(self, kind: str = ""):
        self.kind = kind
        self.first_where = ""

    def check(self, at: Record, row: Any) -> Record:
        """Fill ``at`` (a Record holding only the location) with the checked instance or problem."""
        try:
            if not isinstance(row, dict):
                raise Invalid("", f"expected an object (one instance per row), got {_kind(row)}")
            row_kind = infer_type(row)
            if not self.kind:
                self.kind, self.first_where = row_kind, at.where
            elif row_kind != self.kind:
                first = self.first_where or "the dataset"
                raise Invalid("", f"a {row_kind} instance, but {first} is {self.kind}: one dataset has one type")
            at.kind, at.instance = self.kind, check_instance(self.kind, row)
        except Invalid as err:
            at.kind, at.problem = self.kind or None, str(err)
        return at


def records_from_jsonl(path: str, data: bytes, first_line: int = 1, kind: str = "") -> Iterator[Record]:
    """JSON lines; ``data`` may be a slice of a file starting at line ``first_line``."""
    typer = RowTyper(kind)
    for n, raw in enumerate(data.split(b"\n")):
        line = first_line + n
        if not raw.strip():
            continue
        text = decode_utf8(path, raw, line)
        if isinstance(text, Record):
            yield text
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            yield _json_error(path, err, line)
            continue
        yield typer.check(Record(path, line), row)


def records_from_table(path: str, rows: list[dict[str, Any]], first_row: int = 0, kind: str = "") -> Iterator[Record]:
    """Parquet rows (row numbers are 0-based, as pandas and pyarrow count them)."""
    typer = RowTyper(kind)
    for i, row in enumerate(rows):
        yield typer.check(Record(path, row=first_row + i), {k: v for k, v in row.items() if v is not None})
