"""Object storage: a URI (local path, s3://, gs://, or anything pyarrow knows) -> pyarrow filesystem.

S3 settings come from the recipe's storage section, else the usual AWS environment variables.
Options travel to Ray tasks as a plain dict (``S3Options``), never as live clients.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from lmflow_ray.credentials import Secret, redact, reveal, secret
from lmflow_ray.errors import StorageError, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class S3Options:
    """Where S3 is and the keys for it. The keys are Secrets: through Ray they travel as references,
    and printed they show ***. Without keys pyarrow uses the node's own AWS credentials."""

    endpoint_url: str | None = None
    access_key: Secret | None = None
    secret_key: Secret | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "access_key", secret(self.access_key))
        object.__setattr__(self, "secret_key", secret(self.secret_key))

    @classmethod
    def resolve(cls, storage: Any = None) -> "S3Options":
        """Recipe values win; otherwise AWS_ENDPOINT_URL(_S3), AWS_ACCESS_KEY_ID, ... from the environment."""
        env = os.environ.get
        endpoint = getattr(storage, "endpoint_url", None)
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if not endpoint and env(name):
                try:
                    endpoint = check_endpoint(env(name))
                except ValueError as err:
                    raise UserError(f"{name}: {err}") from None
        return cls(
            endpoint_url=endpoint,
            access_key=getattr(storage, "aws_access_key_id", None) or env("AWS_ACCESS_KEY_ID"),
            secret_key=getattr(storage, "aws_secret_access_key", None) or env("AWS_SECRET_ACCESS_KEY"),
            region=getattr(storage, "region", None) or env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "access_key": self.access_key, "secret_key": self.secret_key,
                "region": self.region}


def check_endpoint(url: str) -> str:
    """An S3 endpoint without a scheme would silently mean plain http: ask for it."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} has no scheme; write https://{url} (or http:// for a plain-text local server)")
    return url


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
        kwargs["access_key"] = reveal(opts.access_key)
        kwargs["secret_key"] = reveal(opts.secret_key) or ""
    if opts.region:
        kwargs["region"] = opts.region
    return pafs.S3FileSystem(**kwargs)


# ---- retries: only a missing file means "not there" ----------------------------------------------

RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)


def retrying(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, tried again with backoff on any storage error but a missing file (which callers
    handle); still failing, a StorageError that names ``what``. Never a reason to delete."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as err:
            if delay is None:
                raise StorageError(f"{what}: storage kept failing after {len(RETRY_DELAYS_S) + 1} tries ({err}); "
                                   "stopped without changing anything") from None
            import sys

            print(redact(f"{what}: storage error ({err}); trying again in {delay:g} s"), file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(uri: str, s3: S3Options | dict | None = None) -> bytes | None:
    """A file's bytes, or None when it does not exist (any other failure is retried, then raised)."""
    fs, path = filesystem(uri, s3)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return retrying(uri, read)
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes, s3: S3Options | dict | None = None) -> None:
    fs, path = filesystem(uri, s3)

    def write() -> None:
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open_output_stream(path) as f:
            f.write(data)

    retrying(uri, write)


def _files(fs: pafs.FileSystem, path: str, what: str) -> dict[str, int]:
    """Relative path -> size of every file under ``path``; a missing folder is empty."""
    infos = retrying(what, lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)))
    root = path.rstrip("/") + "/"
    return {i.path[len(root):]: i.size for i in infos if i.type == pafs.FileType.File}


# ---- paths: one run is one folder; nothing is written or deleted outside its own folder ----------

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_run_name(name: str) -> bool:
    return bool(RUN_NAME.fullmatch(name)) and not name.endswith(".")


def safe_relpath(rel: str, where: str) -> str:
    """A path inside a folder, as storage listed it; one that would leave the folder is refused."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
        raise StorageError(f"{where}: refusing {rel!r}: a file name that points outside its folder")
    return rel


def _normal(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return os.path.abspath(uri)
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def inside(uri: str, root: str) -> bool:
    a, b = _normal(uri), _normal(root)
    return a == b or a.startswith(b.rstrip("/") + "/")


def remove_in_run(uri: str, run_uri: str, s3: S3Options | dict | None = None) -> None:
    """Delete ``uri`` only if it lies in the run folder ``run_uri`` (``<output>/<run_name>``), checked
    on the path as written: no ``.`` or ``..`` segment, the run folder's name a valid run_name."""
    name = run_uri.rstrip("/").rsplit("/", 1)[-1]
    segments = uri.split("://", 1)[-1].split("/")
    if not is_run_name(name) or "." in segments or ".." in segments or not inside(uri, run_uri):
        raise StorageError(f"refusing to delete {uri}: not inside the run folder {run_uri}")
    remove(uri, s3)


def clear_run(run_uri: str, s3: S3Options | dict | None = None, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete everything in a run folder but the names in ``keep`` (its lease); returns what went."""
    fs, path = filesystem(run_uri, s3)
    entries = retrying(run_uri, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    gone = []
    for e in entries:
        if e.base_name not in keep:
            remove_in_run(join(run_uri, e.base_name), run_uri, s3)
            gone.append(e.base_name)
    return gone


# ---- run folders and checkpoints ---------------------------------------------------------------
# A run lives at <output_model_path>/<run_name>/: Ray Train's checkpoint_NNNNNN/ folders (each with
# a manifest, an `hf/` export and the resume state), tensorboard/, loss.png, summary.md.

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lmflow-ray-checkpoint/2"  # /2: files carry sha256 as well as size
EXPORT_DIR = "hf"
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def list_local_files(folder: str | os.PathLike, hashes: bool = False) -> dict[str, Any]:
    """Relative path -> size (or {"size", "sha256"}) for every file under a local folder."""
    root = os.fspath(folder)
    out: dict[str, Any] = {}
    for base, _, files in os.walk(root):
        for name in files:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            size = os.path.getsize(full)
            out[rel] = {"size": size, "sha256": sha256_file(full)} if hashes else size
    return out


def write_manifest(folder: str | os.PathLike, files: dict[str, Any], info: dict[str, Any]) -> None:
    """The manifest lists every file of the finished checkpoint (all ranks) with its size and
    sha256: a reader that finds a file missing or short knows the checkpoint is partial, and a
    resume refuses a file whose content changed."""
    body = {"format": MANIFEST_FORMAT, **info, "files": dict(sorted(files.items()))}
    with open(os.path.join(os.fspath(folder), MANIFEST), "w") as f:
        json.dump(body, f, indent=1)


def _entry(value: Any) -> tuple[int, str | None]:
    """(size, sha256 or None) of a manifest entry: format /1 held the size alone."""
    return (int(value["size"]), value.get("sha256")) if isinstance(value, dict) else (int(value), None)


def verify_local(folder: str | os.PathLike, manifest: dict, where: str) -> None:
    """Every file of a downloaded checkpoint has the size and content its manifest gives; run before
    anything from it is loaded (DeepSpeed's own files are pickles, loaded with weights_only=False)."""
    for rel, value in manifest.get("files", {}).items():
        size, digest = _entry(value)
        full = os.path.join(os.fspath(folder), safe_relpath(rel, where))
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            raise StorageError(f"{where}/{rel}: missing or not {size} bytes after download")
        if digest is not None and sha256_file(full) != digest:
            raise StorageError(f"{where}/{rel}: its content differs from the manifest's sha256; refusing to load "
                               "a checkpoint file that was changed after it was written")


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
    """Is the checkpoint at ``uri`` complete? Every file in its manifest present with its size.
    Only a missing manifest makes it partial; storage that fails is retried, then raised."""
    fs, path = filesystem(uri, s3)
    digits = path.rstrip("/").rsplit("/", 1)[-1].removeprefix(CHECKPOINT_PREFIX)
    step = int(digits) if digits.isdigit() else -1  # from the folder name until the manifest says
    manifest = _read_manifest(uri, s3)
    if manifest is None:
        return CheckpointInfo(uri, step, False, "no manifest.json (partial or not an lmflow-ray checkpoint)")
    step = int(manifest.get("step", step))
    found = _files(fs, path, uri)
    for rel, value in manifest.get("files", {}).items():
        size, _ = _entry(value)
        if rel not in found:
            return CheckpointInfo(uri, step, False, f"{rel}: missing", manifest)
        if found[rel] != size:
            return CheckpointInfo(uri, step, False, f"{rel}: {found[rel]} bytes, expected {size}", manifest)
    return CheckpointInfo(uri, step, True, "", manifest)


def _read_manifest(uri: str, s3: S3Options | dict | None) -> dict | None:
    """The manifest, or None when there is none. It is written in one piece, so one that does not
    parse is a bad read or a damaged file: retried like any storage error, never "partial"."""
    fs, path = filesystem(join(uri, MANIFEST), s3)

    def read() -> dict:
        with fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            manifest = json.loads(raw)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            raise OSError(f"not a valid manifest ({len(raw)} bytes)")
        return manifest

    try:
        return retrying(join(uri, MANIFEST), read)
    except FileNotFoundError:
        return None


def _checkpoint_uris(run_uri: str, s3: S3Options | dict | None) -> list[str]:
    """checkpoint_NNNNNN folders of a run, oldest first (the zero-padded name sorts by step)."""
    fs, path = filesystem(run_uri, s3)
    entries = retrying(run_uri, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return sorted(join(run_uri, e.base_name) for e in entries
                  if e.type == pafs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX))


def list_checkpoints(run_uri: str, s3: S3Options | dict | None = None) -> list[CheckpointInfo]:
    """Every checkpoint folder of a run, oldest step first (complete or not)."""
    return [inspect_checkpoint(u, s3) for u in _checkpoint_uris(run_uri, s3)]


def latest_checkpoint(run_uri: str, s3: S3Options | dict | None = None,
                      say: Callable[[str], None] | None = None) -> CheckpointInfo | None:
    """The newest complete checkpoint; partial ones after it are passed over (and said), older
    ones are not even opened. A checkpoint that cannot be read stops here, never skipped."""
    for uri in reversed(_checkpoint_uris(run_uri, s3)):
        info = inspect_checkpoint(uri, s3)
        if info.complete:
            return info
        if say is not None:
            say(f"passing over the partial checkpoint {uri} ({info.problem})")
    return None


def remove(uri: str, s3: S3Options | dict | None = None) -> None:
    fs, path = filesystem(uri, s3)
    info = retrying(uri, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory:
        retrying(uri, lambda: fs.delete_dir(path))
    elif info.type == pafs.FileType.File:
        retrying(uri, lambda: fs.delete_file(path))


# ---- copies: file by file, every name checked --------------------------------------------------

COPY_CHUNK = 8 << 20


def _copy_file(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    """One file, in 8 MB pieces, closed explicitly: an S3 object is only written when its stream
    closes, and pyarrow's ``copy_files`` closes it in a destructor that logs a failed upload and
    goes on ("Error ignored when destroying file"), so a full S3 server looked like a finished copy."""
    with src_fs.open_input_stream(src) as fin, dst_fs.open_output_stream(dst) as out:
        while chunk := fin.read(COPY_CHUNK):
            out.write(chunk)


def _copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str, where: str) -> list[str]:
    """Copy every file under ``src`` to ``dst``; a listed name that would land outside ``dst`` (``..``,
    an absolute path) stops the copy before anything is written. Returns the relative paths."""
    names = [safe_relpath(rel, where) for rel in _files(src_fs, src, where)]
    for folder in sorted({posixpath.dirname(n) for n in names}):
        target = f"{dst}/{folder}" if folder else dst
        retrying(target, lambda t=target: dst_fs.create_dir(t, recursive=True))

    def one(rel: str) -> None:
        retrying(f"{where}/{rel}", lambda: _copy_file(src_fs, f"{src}/{rel}", dst_fs, f"{dst}/{rel}"))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, names))
    return names


def upload(local_dir: str | os.PathLike, uri: str, s3: S3Options | dict | None = None) -> list[str]:
    """Copy a local folder's files to ``uri`` (any filesystem), keeping what is already there."""
    fs, path = filesystem(uri, s3)
    retrying(uri, lambda: fs.create_dir(path, recursive=True))
    return _copy_tree(pafs.LocalFileSystem(), os.path.abspath(local_dir), fs, path, os.fspath(local_dir))


def upload_file(local_file: str | os.PathLike, uri: str, s3: S3Options | dict | None = None) -> None:
    """Copy one local file to ``uri`` (any filesystem), streamed."""
    fs, path = filesystem(uri, s3)
    parent = posixpath.dirname(path)
    if parent:
        retrying(uri, lambda: fs.create_dir(parent, recursive=True))
    retrying(uri, lambda: _copy_file(pafs.LocalFileSystem(), os.path.abspath(local_file), fs, path))


def copy(source: str, target: str, s3: S3Options | dict | None = None) -> None:
    """Copy a folder between any two URIs (local or remote), without a local stop in between."""
    src_fs, src = filesystem(source, s3)
    dst_fs, dst = filesystem(target, s3)
    if retrying(source, lambda: src_fs.get_file_info(src)).type != pafs.FileType.Directory:
        raise UserError(f"{source}: no such folder")
    retrying(target, lambda: dst_fs.create_dir(dst, recursive=True))
    _copy_tree(src_fs, src, dst_fs, dst, source)


def download(uri: str, local_dir: str | os.PathLike, s3: S3Options | dict | None = None) -> str:
    fs, path = filesystem(uri, s3)
    if retrying(uri, lambda: fs.get_file_info(path)).type != pafs.FileType.Directory:
        raise UserError(f"{uri}: no such folder")
    os.makedirs(local_dir, exist_ok=True)
    _copy_tree(fs, path, pafs.LocalFileSystem(), os.path.abspath(local_dir), uri)
    return os.fspath(local_dir)


# ---- outputs (eval results, merged models): written aside, put in place whole ------------------
# Every output folder carries a mark saying lmflow-ray wrote it and what it is. A folder that holds
# anything without that mark (a run, a dataset, the current folder) is never replaced.

OUTPUT_MARK = ".lmflow-ray-output.json"
_TEMP_PREFIX = ".lmflow-ray-tmp-"


def check_output(target: str, kind: str, s3: S3Options | dict | None = None) -> None:
    """Refuse ``target`` unless it is missing, empty, or an earlier ``kind`` output of ours."""
    fs, path = filesystem(target, s3)
    info = retrying(target, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.File:
        raise UserError(f"{target}: is a file; name a folder for the {kind} output")
    if info.type == pafs.FileType.NotFound:
        return
    names = retrying(target, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    if not names:
        return
    raw = read_bytes(join(target, OUTPUT_MARK), s3)
    mark = None
    if raw is not None:
        try:
            mark = json.loads(raw)
        except ValueError:
            pass
    if not isinstance(mark, dict) or mark.get("kind") != kind:
        held = mark.get("kind") if isinstance(mark, dict) else None
        what = f"{_an(held)} output" if held else "files lmflow-ray did not write"
        raise UserError(f"{target}: already holds {what}; refusing to replace it with {_an(kind)} output. "
                        "Name a new folder (or remove that one yourself)")


def _an(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def new_output_dir(target: str) -> str:
    """A temporary local folder to write ``target``'s content into: next to a local target (so it
    can be renamed into place), else in the system's temp folder."""
    import tempfile

    parent = None if is_remote(target) else os.path.dirname(os.path.abspath(target))
    if parent:
        os.makedirs(parent, exist_ok=True)
        _sweep(parent)
    tmp = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}@{socket.gethostname()}-", dir=parent)
    os.chmod(tmp, 0o755)
    return tmp


def put_output(finished: str, target: str, kind: str, s3: S3Options | dict | None = None) -> None:
    """Put the complete local folder ``finished`` at ``target``, replacing an earlier ``kind``
    output of ours and nothing else. Locally one atomic rename (an exchange when there is an old
    one, which is then deleted); remotely every file is uploaded before any stale one is deleted.
    The target is never missing and never half-written."""
    check_output(target, kind, s3)
    with open(os.path.join(finished, OUTPUT_MARK), "w") as f:
        json.dump({"kind": kind, "written_by": "lmflow-ray", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
    if is_remote(target):
        fs, path = filesystem(target, s3)
        old = set(_files(fs, path, target))
        with open(os.path.join(finished, OUTPUT_MARK), "rb") as f:
            write_bytes(join(target, OUTPUT_MARK), f.read(), s3)  # first: a cut-off upload is still ours
        new = set(upload(finished, target, s3))
        for rel in sorted(old - new):
            retrying(target, lambda r=rel: fs.delete_file(f"{path}/{r}"))
        return
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _signals_held():
        if not os.path.isdir(target) or not os.listdir(target):
            os.rename(finished, target)  # onto nothing or an empty folder: one rename
            return
        _exchange(finished, target)      # ``finished`` now holds the old output
        import shutil

        shutil.rmtree(finished, ignore_errors=True)


def _exchange(a: str, b: str) -> None:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); where the filesystem
    cannot, two renames with the old one moved aside first."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
            return
    aside = f"{a}-old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


class _signals_held:
    """SIGINT / SIGTERM wait until the swap and the old folder's deletion are done."""

    def __enter__(self) -> None:
        import signal
        import threading

        self.held = threading.current_thread() is threading.main_thread()
        if self.held:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def __exit__(self, *_: Any) -> None:
        import signal

        if self.held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _sweep(parent: str) -> None:
    """Remove temporary folders of ours in ``parent`` whose process is gone (killed mid-write). Only
    this machine's: on a shared filesystem another machine's pid means nothing here."""
    import shutil

    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(_TEMP_PREFIX):
            continue
        pid, _, rest = name[len(_TEMP_PREFIX):].partition("@")
        host = rest.rsplit("-", 1)[0]
        if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def export_uri(uri: str, s3: S3Options | dict | None = None) -> str:
    """The folder with config/weights or an adapter that ``uri`` stands for: a model or adapter
    folder itself, a checkpoint folder's hf/ export, or a run folder's latest complete checkpoint."""
    fs, path = filesystem(uri, s3)
    if retrying(uri, lambda: fs.get_file_info(path)).type != pafs.FileType.Directory:
        raise UserError(f"{uri}: no such folder")
    names = {i.base_name for i in retrying(uri, lambda: fs.get_file_info(pafs.FileSelector(path)))}
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
