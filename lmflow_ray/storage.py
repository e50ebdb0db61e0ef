"""Object storage: a URI (local path, s3://, gs://, or anything pyarrow knows) -> pyarrow filesystem.

S3 settings come from the recipe's storage section, else the usual AWS environment variables.
Options travel to Ray tasks as a plain dict (``S3Options``), never as live clients.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from lmflow_ray.errors import UserError


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None

    @classmethod
    def resolve(cls, storage: Any = None) -> "S3Options":
        """Recipe values win; otherwise AWS_ENDPOINT_URL(_S3), AWS_ACCESS_KEY_ID, ... from the environment."""
        env = os.environ.get
        return cls(
            endpoint_url=getattr(storage, "endpoint_url", None) or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            access_key=getattr(storage, "aws_access_key_id", None) or env("AWS_ACCESS_KEY_ID"),
            secret_key=getattr(storage, "aws_secret_access_key", None) or env("AWS_SECRET_ACCESS_KEY"),
            region=getattr(storage, "region", None) or env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, s3: S3Options | dict | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI. Local paths come back absolute."""
    if isinstance(s3, dict):
        s3 = S3Options(**s3)
    if uri.startswith("s3://"):
        return _s3(s3 or S3Options.resolve()), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError
        raise UserError(f"{uri}: cannot open this storage URI ({err})") from None


def _s3(opts: S3Options) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"allow_bucket_creation": True}
    if opts.endpoint_url:
        parsed = urlparse(opts.endpoint_url if "://" in opts.endpoint_url else f"http://{opts.endpoint_url}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
    if opts.access_key:
        kwargs["access_key"] = opts.access_key
        kwargs["secret_key"] = opts.secret_key or ""
    if opts.region:
        kwargs["region"] = opts.region
    return pafs.S3FileSystem(**kwargs)


# ---- run folders and checkpoints ---------------------------------------------------------------
# A run lives at <output_model_path>/<run_name>/: Ray Train's checkpoint_NNNNNN/ folders (each with
# a manifest, an `hf/` export and the resume state), tensorboard/, loss.png, summary.md.

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lmflow-ray-checkpoint/1"
EXPORT_DIR = "hf"
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def list_local_files(folder: str | os.PathLike) -> dict[str, int]:
    """Relative path -> size for every file under a local folder."""
    root = os.fspath(folder)
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            full = os.path.join(base, name)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def write_manifest(folder: str | os.PathLike, files: dict[str, int], info: dict[str, Any]) -> None:
    """The manifest lists every file of the finished checkpoint (all ranks) with its size: a reader
    that finds a file missing or short knows the checkpoint is partial."""
    import json

    body = {"format": MANIFEST_FORMAT, **info, "files": dict(sorted(files.items()))}
    with open(os.path.join(os.fspath(folder), MANIFEST), "w") as f:
        json.dump(body, f, indent=1)


@dataclass
class CheckpointInfo:
    uri: str
    step: int
    complete: bool
    problem: str = ""
    manifest: dict | None = None

    @property
    def export_uri(self) -> str:
        return join(self.uri, EXPORT_DIR)


def inspect_checkpoint(uri: str, s3: S3Options | dict | None = None) -> CheckpointInfo:
    """Is the checkpoint at ``uri`` complete? Every file in its manifest present with its size."""
    import json

    fs, path = filesystem(uri, s3)
    digits = path.rstrip("/").rsplit("/", 1)[-1].removeprefix(CHECKPOINT_PREFIX)
    step = int(digits) if digits.isdigit() else -1  # from the folder name until the manifest says
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError):
        return CheckpointInfo(uri, step, False, "no manifest.json (partial or not an lmflow-ray checkpoint)")
    except ValueError:
        return CheckpointInfo(uri, step, False, "manifest.json is not valid JSON")
    step = int(manifest.get("step", step))
    found = {
        i.path[len(path) + 1 :]: i.size
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if i.type == pafs.FileType.File
    }
    for rel, size in manifest.get("files", {}).items():
        if rel not in found:
            return CheckpointInfo(uri, step, False, f"{rel}: missing", manifest)
        if found[rel] != size:
            return CheckpointInfo(uri, step, False, f"{rel}: {found[rel]} bytes, expected {size}", manifest)
    return CheckpointInfo(uri, step, True, "", manifest)

def _checkpoint_uris(run_uri: str, s3: S3Options | dict | None) -> list[str]:
    """checkpoint_NNNNNN folders of a run, oldest first (the zero-padded name sorts by step)."""
    fs, path = filesystem(run_uri, s3)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(join(run_uri, e.base_name) for e in entries
                  if e.type == pafs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX))


def list_checkpoints(run_uri: str, s3: S3Options | dict | None = None) -> list[CheckpointInfo]:
    """Every checkpoint folder of a run, oldest step first (complete or not)."""
    return [inspect_checkpoint(u, s3) for u in _checkpoint_uris(run_uri, s3)]


def latest_checkpoint(run_uri: str, s3: S3Options | dict | None = None) -> CheckpointInfo | None:
    """The newest complete checkpoint; older ones are not even opened."""
    for uri in reversed(_checkpoint_uris(run_uri, s3)):
        info = inspect_checkpoint(uri, s3)
        if info.complete:
            return info
    return None


def remove(uri: str, s3: S3Options | dict | None = None) -> None:
    fs, path = filesystem(uri, s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def swap_in(finished: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put a complete local folder at ``target`` (same filesystem), replacing what is there: a
    crash leaves the old folder (or none), never half of one."""
    old = f"{os.fspath(finished)}-old"
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(finished, target)
    shutil.rmtree(old, ignore_errors=True)


def upload(local_dir: str | os.PathLike, uri: str, s3: S3Options | dict | None = None) -> None:
    """Copy a local folder's files to ``uri`` (any filesystem), keeping what is already there."""
    fs, path = filesystem(uri, s3)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(os.fspath(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def copy(source: str, target: str, s3: S3Options | dict | None = None) -> None:
    """Copy a folder between any two URIs (local or remote), without a local stop in between."""
    src_fs, src = filesystem(source, s3)
    dst_fs, dst = filesystem(target, s3)
    if src_fs.get_file_info(src).type != pafs.FileType.Directory:
        raise UserError(f"{source}: no such folder")
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def download(uri: str, local_dir: str | os.PathLike, s3: S3Options | dict | None = None) -> str:
    fs, path = filesystem(uri, s3)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise UserError(f"{uri}: no such folder")
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, os.fspath(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return os.fspath(local_dir)


def export_uri(uri: str, s3: S3Options | dict | None = None) -> str:
    """The folder with config/weights or an adapter that ``uri`` stands for: a model or adapter
    folder itself, a checkpoint folder's hf/ export, or a run folder's latest complete checkpoint."""
    fs, path = filesystem(uri, s3)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise UserError(f"{uri}: no such folder")
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    if MANIFEST in names:
        info = inspect_checkpoint(uri, s3)
        if not info.complete:
            raise UserError(f"{uri}: incomplete checkpoint ({info.problem})")
        return info.export_uri
    if any(n.startswith(CHECKPOINT_PREFIX) for n in names):
        latest = latest_checkpoint(uri, s3)
        if latest is None:
            raise UserError(f"{uri}: no complete checkpoint in this run folder")
        return latest.export_uri
    return uri


def local_model_folder(uri: str, cache_dir: str | os.PathLike, s3: S3Options | dict | None = None) -> str:
    """``export_uri(uri)`` as a local folder; remote ones are downloaded into ``cache_dir``."""
    uri = export_uri(uri, s3)
    if not is_remote(uri):
        return os.path.abspath(uri)
    return download(uri, cache_dir, s3)
