"""Storage: one interface over local paths and ``s3://`` URIs (fsspec / s3fs).

Credentials are never passed in code or config: s3fs (botocore) reads
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or the
machine's identity. The endpoint of an S3-compatible server comes from
``StorageConfig.s3_endpoint_url`` or the first of ``VLFORGE_S3_ENDPOINT``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``. Requests are retried with botocore's
"standard" exponential backoff (``StorageConfig.max_attempts``), connection errors
included, so reads ride out a restarting server.

    fs, path = filesystem_for("s3://bucket/corpus/scenes/train")
    check_reachable("s3://bucket/corpus/scenes/train")   # fast, clear error before any work starts
    upload_dir("data/corpus", "s3://bucket/corpus")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from vlforge.config import S3_ENDPOINT_ENV, StorageConfig

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs


def is_uri(x: str) -> bool:
    """True when ``x`` has a scheme (``s3://...``, ``file://...``, ``gs://...``); False for a plain path."""
    return "://" in x


def is_remote(uri: str) -> bool:
    return is_uri(uri) and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (driver side, before workers in other directories read it); URIs as they are."""
    return uri if is_uri(uri) else os.path.abspath(uri)


def local_path(uri: str) -> str:
    """A local directory for ``uri`` (``s3://`` and other pyarrow URIs are downloaded once)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    from ray.train import Checkpoint

    return Checkpoint(uri).to_directory()


def s3_endpoint(cfg: StorageConfig | None = None) -> str | None:
    if cfg is not None and cfg.s3_endpoint_url:
        return cfg.s3_endpoint_url
    for name in S3_ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def filesystem_for(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) for a local path or a URI."""
    if uri.startswith("s3://"):
        import s3fs

        cfg = cfg or StorageConfig()
        client_kwargs = {}
        if cfg.s3_region:
            client_kwargs["region_name"] = cfg.s3_region
        fs = s3fs.S3FileSystem(
            anon=cfg.anonymous,
            endpoint_url=s3_endpoint(cfg),
            client_kwargs=client_kwargs,
            config_kwargs={
                "retries": {"max_attempts": cfg.max_attempts, "mode": "standard"},
                "connect_timeout": cfg.connect_timeout_s,
                "read_timeout": cfg.read_timeout_s,
            },
            skip_instance_cache=True,
        )
        fs.retries = cfg.max_attempts  # s3fs's own retry loop (dropped connections mid-read)
        return fs, uri[len("s3://") :].rstrip("/")
    if is_remote(uri):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    from fsspec.implementations.local import LocalFileSystem

    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return LocalFileSystem(), str(Path(path).resolve())


def arrow_filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """(pyarrow filesystem for Ray Data, path within it); (None, local path) for local files."""
    if not is_remote(uri):
        return None, filesystem_for(uri, cfg)[1]
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem_for(uri, cfg)
    return PyFileSystem(FSSpecHandler(fs)), path


def upload_dir(local_dir: str | os.PathLike, dest_uri: str, cfg: StorageConfig | None = None) -> int:
    """Copy a local directory tree to ``dest_uri``; returns the number of files."""
    fs, dest = filesystem_for(dest_uri, cfg)
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    n = 0
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        target = f"{dest}/{rel}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(f), target)
        n += 1
    return n


class StorageUnreachable(ConnectionError):
    """The storage behind a URI cannot be reached or does not let us in (endpoint down, no bucket,
    bad credentials)."""


def check_reachable(uri: str, cfg: StorageConfig | None = None) -> None:
    """Fail fast (two attempts, 5 s connect timeout) when ``uri``'s storage is unreachable, with
    the endpoint and the cause in the message. Local paths: nothing to check here."""
    if not uri.startswith("s3://"):
        return
    import dataclasses

    cfg = dataclasses.replace(cfg or StorageConfig(), max_attempts=2, connect_timeout_s=5.0, read_timeout_s=10.0)
    fs, path = filesystem_for(uri, cfg)
    bucket = path.split("/", 1)[0]
    where = s3_endpoint(cfg) or "AWS S3"
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StorageUnreachable(f"{uri}: bucket {bucket!r} does not exist at {where}") from None
    except PermissionError as exc:
        raise StorageUnreachable(
            f"{uri}: access to bucket {bucket!r} at {where} denied ({exc}); "
            "credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from None
    except Exception as exc:  # botocore / aiohttp connection errors have no common base worth naming
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise StorageUnreachable(
                f"{uri}: no S3 credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "or give the machine an identity"
            ) from None
        raise StorageUnreachable(f"{uri}: S3 endpoint {where} unreachable: {type(exc).__name__}: {exc}") from None
