"""Object storage: a URI (local path, s3://, gs://, or anything pyarrow knows) -> pyarrow filesystem.

S3 settings come from the recipe's storage section, else the usual AWS environment variables.
Options travel to Ray tasks as a plain dict (``S3Options``), never as live clients.
"""

from __future__ import annotations

import os
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
