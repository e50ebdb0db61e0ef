"""Where instances come from: list a file or folder (local or object storage), tell each file's
dataset type, cut files into shards that read independently, and read a shard into Records.

JSONL files are cut into byte ranges (a shard owns the lines that start inside its range), parquet
files into row groups, LMFlow JSON files stay whole. Line numbers inside a JSONL shard are counted
from the shard start; the true line is only worked out when there is a problem to report.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lmflow_ray.data.formats import (
    EXTENSIONS,
    Invalid,
    Record,
    header_type,
    infer_type,
    records_from_json,
    records_from_jsonl,
    records_from_table,
)
from lmflow_ray.errors import DataError, UserError
from lmflow_ray.storage import S3Options, filesystem

SHARD_BYTES = 2 << 20  # a JSONL byte range per task (about 3,000 chat rows)
JSON_PART_BYTES = 8 << 20  # a big JSON file is read in parts (each parses the file, keeps a slice)
PEEK_BYTES = 1 << 16


@dataclass
class Shard:
    uri: str  # as the user wrote it, for messages
    path: str  # inside the filesystem
    fmt: str  # json | jsonl | parquet
    kind: str  # dataset type of the file
    start: int = 0  # jsonl: byte range; parquet: row group; json: part `start` of `end`
    end: int = -1
    first_row: int = 0  # parquet: row index of the group's first row

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Dataset:
    """A dataset on storage: its files, their common type, and the shards to read."""

    uri: str
    kind: str
    shards: list[Shard]
    s3: dict

    @property
    def files(self) -> list[str]:
        return sorted({s.uri for s in self.shards})


def _fmt(path: str) -> str:
    return {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}[posixpath.splitext(path)[1].lower()]


def _display(uri: str, root: str, path: str) -> str:
    """The file's name as the user would write it: the dataset URI joined with the relative part."""
    rel = posixpath.relpath(path, root) if path != root else ""
    return uri if not rel or rel == "." else posixpath.join(uri.rstrip("/"), rel)


def list_files(uri: str, fs: pafs.FileSystem, root: str) -> list[tuple[str, pafs.FileInfo]]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        if not info.path.lower().endswith(EXTENSIONS):
            raise UserError(f"{uri}: expected a .json, .jsonl or .parquet file, or a folder of them")
        return [(uri, info)]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [
        (_display(uri, root, f.path), f)
        for f in found
        if f.type == pafs.FileType.File
        and f.path.lower().endswith(EXTENSIONS)
        and not any(part.startswith((".", "_")) for part in posixpath.relpath(f.path, root).split("/"))
    ]
    if not files:
        raise UserError(f"{uri}: no .json, .jsonl or .parquet files in this folder")
    return sorted(files, key=lambda item: item[0])


def peek_type(fs: pafs.FileSystem, display: str, info: pafs.FileInfo) -> str:
    """The dataset type of one file, reading as little of it as possible."""
    fmt = _fmt(info.path)
    if fmt == "parquet":
        with fs.open_input_file(info.path) as f:
            names = pq.read_schema(f).names
        try:
            return infer_type(dict.fromkeys(names))
        except Invalid as err:
            raise DataError([f"{display}: columns: {err.problem}"]) from None
    with fs.open_input_file(info.path) as f:
        head = f.read(min(PEEK_BYTES, info.size))
    if fmt == "json":
        # A prefix may end inside a multi-byte character; the whole file must decode strictly.
        kind = header_type(head.decode("utf-8", errors="ignore")) if len(head) < info.size else None
        if kind is None:
            if len(head) < info.size:  # the type hides behind a long "instances" array: read it all
                with fs.open_input_file(info.path) as f:
                    head = f.read()
            try:
                kind = header_type(head.decode("utf-8"))
            except UnicodeDecodeError:
                kind = None
        if kind is None:
            raise _first_problem(records_from_json(display, head), display)
        return kind
    lines = head.split(b"\n")
    number, first_line = next(((n, ln) for n, ln in enumerate(lines, 1) if ln.strip()), (1, b""))
    if number == len(lines) and len(head) < info.size:  # the first row runs past the peek
        with fs.open_input_file(info.path) as f:
            lines = f.read().split(b"\n")
        number, first_line = next(((n, ln) for n, ln in enumerate(lines, 1) if ln.strip()), (1, b""))
    for rec in records_from_jsonl(display, first_line + b"\n", number):
        if rec.problem:
            raise DataError([rec.message()])
        return rec.kind
    raise DataError([f"{display}: the file holds no instances"])


def _first_problem(records: Iterator[Record], display: str) -> DataError:
    for rec in records:
        if rec.problem:
            return DataError([rec.message()])
    return DataError([f"{display}: the file holds no instances"])


def open_dataset(uri: str, s3: S3Options | None = None, shard_bytes: int | None = None) -> Dataset:
    """List, type-check and shard a dataset; no instance is read yet (only file headers)."""
    s3 = s3 or S3Options.resolve()
    shard_bytes = shard_bytes or SHARD_BYTES
    fs, root = filesystem(uri, s3)
    files = list_files(uri, fs, root)
    shards: list[Shard] = []
    kind = ""
    first = ""
    for display, info in files:
        file_kind = peek_type(fs, display, info)
        if not kind:
            kind, first = file_kind, display
        elif file_kind != kind:
            raise DataError([f"{display}:1: type: {file_kind}, but {first} is {kind}: one dataset (folder) holds one type"])
        shards += _shards(display, info, _fmt(info.path), file_kind, fs, shard_bytes)
    return Dataset(uri, kind, shards, s3.to_dict())


def _shards(display: str, info: pafs.FileInfo, fmt: str, kind: str, fs: pafs.FileSystem, shard_bytes: int) -> list[Shard]:
    if fmt == "jsonl":
        size = max(info.size, 1)
        return [Shard(display, info.path, fmt, kind, a, min(a + shard_bytes, size)) for a in range(0, size, shard_bytes)]
    if fmt == "parquet":
        with fs.open_input_file(info.path) as f:
            meta = pq.ParquetFile(f).metadata
        out, row = [], 0
        for g in range(meta.num_row_groups):
            out.append(Shard(display, info.path, fmt, kind, g, g + 1, row))
            row += meta.row_group(g).num_rows
        return out
    parts = max(1, -(-info.size // JSON_PART_BYTES))
    return [Shard(display, info.path, fmt, kind, i, parts) for i in range(parts)]


def read_shard(shard: Shard | dict, s3: dict | None = None) -> Iterator[Record]:
    """Every instance of one shard, validated, or the problems found in it."""
    if isinstance(shard, dict):
        shard = Shard(**shard)
    fs, _ = filesystem(shard.uri, s3)
    if shard.fmt == "json":
        with fs.open_input_file(shard.path) as f:
            yield from records_from_json(shard.uri, f.read(), (shard.start, max(shard.end, 1)), shard.kind)
        return
    if shard.fmt == "parquet":
        with fs.open_input_file(shard.path) as f:
            table = pq.ParquetFile(f).read_row_group(shard.start)
        yield from records_from_table(shard.uri, table.to_pylist(), shard.first_row, shard.kind)
        return
    data, line_start = _owned_lines(fs, shard)
    base: int | None = None
    for rec in records_from_jsonl(shard.uri, data, 1, shard.kind):
        if rec.problem and base is None:
            base = _lines_before(fs, shard.path, line_start)
        if rec.problem:
            rec.line = (rec.line or 1) + base
        yield rec


def _owned_lines(fs: pafs.FileSystem, shard: Shard) -> tuple[bytes, int]:
    """The bytes of the lines that start inside [start, end), and the offset of the first one."""
    with fs.open_input_file(shard.path) as f:
        size = f.size()
        begin = shard.start
        if begin > 0:  # skip the tail of a line owned by the previous shard
            f.seek(begin - 1)
            chunk = f.read(shard.end - begin + 1)
            cut = chunk.find(b"\n")
            if cut < 0:
                return b"", begin
            begin = begin + cut
            chunk = chunk[cut + 1 :]
        else:
            chunk = f.read(shard.end)
        pos = shard.end
        while pos < size and not chunk.endswith(b"\n"):  # finish the last owned line
            more = f.read(min(1 << 16, size - pos))
            cut = more.find(b"\n")
            chunk += more if cut < 0 else more[: cut + 1]
            if cut >= 0:
                break
            pos += len(more)
    return chunk, begin


def _lines_before(fs: pafs.FileSystem, path: str, offset: int) -> int:
    if offset <= 0:
        return 0
    count, done = 0, 0
    with fs.open_input_file(path) as f:
        while done < offset:
            block = f.read(min(1 << 22, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


def validate(dataset: Dataset, check: Callable[[dict], None] | None = None, limit: int = 1000) -> int:
    """Read every instance of an opened dataset; return how many are good, or raise DataError
    listing each problem as file:line: field: problem. ``check`` may refuse a valid instance by
    raising UserError (e.g. the chat template cannot render it)."""
    good, problems, total = 0, [], 0
    for shard in dataset.shards:
        for rec in read_shard(shard, dataset.s3):
            if not rec.problem and check is not None:
                try:
                    check(rec.instance)
                except UserError as err:
                    rec.problem = str(err)
            if rec.problem:
                total += 1
                if len(problems) < limit:
                    problems.append(rec.message())
            else:
                good += 1
    if total:
        raise DataError(problems, total)
    if good == 0:
        raise DataError([f"{dataset.uri}: no instances found"])
    return good
