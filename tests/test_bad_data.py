"""Every kind of bad data gives one clear line naming file and line (or row), exit code 2, no traceback."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def lmflow(doc):
    return json.dumps(doc, indent=1)


def conv_file(*instances):
    return lmflow({"type": "conversation", "instances": list(instances)})


# name -> (files to write, expected location, expected words in the message)
CASES = {
    "bad JSON": ({"a.json": '{"type": "conversation",\n "instances": [\n  {"messages": [}\n ]}'}, "a.json:3:", "not valid JSON"),
    "unknown type": ({"a.json": lmflow({"type": "conversations", "instances": [GOOD]})}, "a.json:2:", "did you mean conversation"),
    "type missing": ({"a.json": lmflow({"instances": [GOOD]})}, "a.json:1:", "type: missing"),
    "instances not a list": ({"a.json": lmflow({"type": "conversation", "instances": {"x": 1}})}, "a.json:3:", "instances: expected a list"),
    "missing messages": ({"a.json": conv_file(GOOD, {"mesages": GOOD["messages"]})}, "a.json:16:", "instances[1].messages: missing (found 'mesages'"),
    "unknown role": ({"a.json": conv_file(GOOD, {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]})}, "a.json:16:", "messages[0].role: unknown role 'human'"),
    "empty content": ({"a.json": conv_file({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]})}, "a.json:4:", "messages[1].content: is empty"),
    "content not a string": ({"d.jsonl": json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}) + "\n"}, "d.jsonl:2:", "messages[0].content: expected a string, got int"),
    "non-UTF-8 bytes": ({"d.jsonl": (json.dumps(GOOD) + "\n" + '{"text": "caf').encode() + b"\xe9" + b'"}\n'}, "d.jsonl:2:", "not valid UTF-8 (byte 0xe9"),
    "mixed types in one folder": ({"a.json": conv_file(GOOD), "b.json": lmflow({"type": "text_only", "instances": [{"text": "x"}]})}, "b.json:1:", "one dataset (folder) holds one type"),
    "mixed types in one JSONL": ({"d.jsonl": json.dumps(GOOD) + "\n" + json.dumps({"text": "plain"}) + "\n"}, "d.jsonl:2:", "a text_only instance, but the dataset is conversation"),
    "assistant speaks first": ({"d.jsonl": json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}) + "\n"}, "d.jsonl:1:", "messages[0].role: messages must start with a user message"),
    "ends with a user turn": ({"d.jsonl": json.dumps({"messages": GOOD["messages"] + [{"role": "user", "content": "and?"}]}) + "\n"}, "d.jsonl:1:", "must end with an assistant reply"),
    "two system prompts": ({"d.jsonl": json.dumps({"system": "a", "messages": [{"role": "system", "content": "b"}] + GOOD["messages"]}) + "\n"}, "d.jsonl:1:", "give the system prompt once"),
    "unknown FastChat speaker": ({"d.jsonl": json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}) + "\n"}, "d.jsonl:1:", "conversations[1].from: unknown speaker 'bot'"),
    "paired without rejected": ({"a.json": lmflow({"type": "paired_conversation", "instances": [{"chosen": GOOD}]})}, "a.json:4:", "instances[0].rejected: missing"),
    "text2text output missing": ({"a.json": lmflow({"type": "text2text", "instances": [{"input": "q", "outptu": "a"}]})}, "a.json:4:", "instances[0].output: missing (found 'outptu'"),
    "row type unknowable": ({"d.jsonl": json.dumps({"prompt": "q", "answer": "a"}) + "\n"}, "d.jsonl:1:", "cannot tell the dataset type"),
    "parquet bad row": ("parquet", "d.parquet:row 1:", "messages[1].content: is empty"),
    "empty folder": ({}, "", "no .json, .jsonl or .parquet files"),
}


def write_case(root, files):
    if files == "parquet":
        table = pa.table({"messages": [GOOD["messages"], [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]]})
        pq.write_table(table, root / "d.parquet")
        return
    for name, text in files.items():
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("name", list(CASES))
def test_bad_data_gives_one_clear_line(tmp_path, name):
    files, where, words = CASES[name]
    write_case(tmp_path, files)
    proc = subprocess.run([sys.executable, "-m", "lmflow_ray.cli", "data", "validate", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert words in lines[0]
    if where:
        assert lines[0].startswith(str(tmp_path / where.split(":")[0]) + ":" + where.split(":", 1)[1]), lines[0]


def test_all_problems_are_listed_not_just_the_first(tmp_path):
    bad = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in [GOOD, bad, GOOD, bad]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "lmflow_ray.cli", "data", "validate", str(tmp_path / "d.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert [ln.split(": ")[0] for ln in proc.stderr.strip().splitlines()] == [f"{tmp_path}/d.jsonl:2", f"{tmp_path}/d.jsonl:4"]


def test_good_data_in_every_shape_validates(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text(conv_file(GOOD, GOOD))
    (tmp_path / "a" / "y.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n")
    pq.write_table(pa.table({"messages": [GOOD["messages"]]}), tmp_path / "a" / "z.parquet")
    proc = subprocess.run([sys.executable, "-m", "lmflow_ray.cli", "data", "validate", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 conversation instances (3 files)" in proc.stdout


def test_recipe_validation_renders_every_instance_with_its_template(tmp_path, tiny_model_dir):
    tools = {"tools": [{"type": "function", "function": {"name": "lookup"}}], **GOOD}
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(tools) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  model_name_or_path: {tiny_model_dir}\ndata:\n  dataset_path: {tmp_path / 'd.jsonl'}\n"
                      "  conversation_template: chatml\n")
    proc = subprocess.run([sys.executable, "-m", "lmflow_ray.cli", "data", "validate", str(recipe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"{tmp_path}/d.jsonl:2: conversation_template chatml does not render tools; "
                                   "use conversation_template: tokenizer")
    ok = subprocess.run([sys.executable, "-m", "lmflow_ray.cli", "data", "validate", str(recipe),
                         "conversation_template=tokenizer"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
