"""Shards read every instance exactly once, and problems carry the file's true line numbers."""

import json

import lmflow_ray.data.sources as sources
from lmflow_ray.data.sources import open_dataset, read_shard, validate


def row(i):
    return {"messages": [{"role": "user", "content": f"question {i} " + "x" * (i % 37)},
                         {"role": "assistant", "content": f"answer {i}"}]}


def read_all(uri):
    ds = open_dataset(uri)
    return ds, [r for shard in ds.shards for r in read_shard(shard, ds.s3)]


def test_jsonl_byte_ranges_cover_every_line_once(tmp_path, monkeypatch):
    lines = [json.dumps(row(i)) for i in range(500)]
    lines.insert(311, "")  # blank lines are skipped, not counted as rows
    (tmp_path / "d.jsonl").write_text("\n".join(lines))  # no final newline
    monkeypatch.setattr(sources, "SHARD_BYTES", 997)  # borders fall mid-line
    ds, recs = read_all(str(tmp_path / "d.jsonl"))
    assert len(ds.shards) > 20
    answers = [r.instance["messages"][1]["content"] for r in recs]
    assert answers == [f"answer {i}" for i in range(500)]


def test_problem_in_a_late_jsonl_shard_has_the_true_line(tmp_path, monkeypatch):
    lines = [json.dumps(row(i)) for i in range(300)]
    lines[276] = lines[276].replace('"assistant"', '"robot"')
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sources, "SHARD_BYTES", 1500)
    _, recs = read_all(str(tmp_path / "d.jsonl"))
    assert [r.message() for r in recs if r.problem] == [
        f"{tmp_path}/d.jsonl:277: messages[1].role: unknown role 'robot' (expected one of system, user, assistant, tool)"]


def test_big_json_is_read_in_parts_each_instance_once(tmp_path, monkeypatch):
    doc = {"type": "conversation", "instances": [row(i) for i in range(1000)]}
    doc["instances"][640]["messages"][0]["content"] = ""
    (tmp_path / "d.json").write_text(json.dumps(doc, indent=1))
    monkeypatch.setattr(sources, "JSON_PART_BYTES", 20_000)
    ds, recs = read_all(str(tmp_path / "d.json"))
    assert len(ds.shards) > 5
    good = [r.instance["messages"][1]["content"] for r in recs if not r.problem]
    assert good == [f"answer {i}" for i in range(1000) if i != 640]
    assert [r.problem for r in recs if r.problem] == ["instances[640].messages[0].content: is empty"]


def test_file_level_problem_reported_once_across_parts(tmp_path, monkeypatch):
    import pytest

    from lmflow_ray.errors import DataError

    body = ",\n".join(json.dumps(row(i)) for i in range(200))
    (tmp_path / "d.json").write_text('{"type": "conversation", "instances": [\n' + body + ",\n{oops}\n]}")
    monkeypatch.setattr(sources, "JSON_PART_BYTES", 5_000)
    assert len(open_dataset(str(tmp_path / "d.json")).shards) > 3
    with pytest.raises(DataError) as err:
        validate(open_dataset(str(tmp_path / "d.json")))
    assert err.value.problems == [f"{tmp_path}/d.json:202: not valid JSON: Expecting property name enclosed in double quotes (column 2)"]
