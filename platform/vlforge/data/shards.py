"""Shard sets: WebDataset tar files in img2dataset's layout, plus ``manifest.json``.

Each sample is a run of tar members sharing a key: ``KEY.jpg`` (or ``.png`` /
``.webp``), ``KEY.txt`` (caption), ``KEY.json`` (metadata: split, the kind's fields,
source, licence), and for two-image kinds (``nlvr2``) ``KEY.right.jpg``. Anything that reads
the public WebDataset layout reads these shards.

``manifest.json`` beside the shards lists, per shard, its file name (relative to
the manifest), sample count, byte size and sha256, plus the parameters that made
the set; ``params.kind`` is the data kind the set holds (``captions``, ``vqa`` or ``nlvr2``,
read with ``manifest_kind``). Writing is deterministic: members carry fixed mtimes and owners, so the
same samples give byte-identical shards.

    with ShardWriter("data/mine", params={"source": "ingest", "kind": "captions"}) as w:
        w.write("000001", image=jpeg_bytes, image_ext="jpg", text="a cat", meta={...})
    manifest = read_manifest("data/mine")        # local dir or s3:// URI
    manifest_kind(manifest)                      # "captions"
    list_shards("s3://bucket/mine")              # full shard URIs
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlforge.config import StorageConfig
from vlforge.data.storage import filesystem_for, is_remote

MANIFEST = "manifest.json"
FORMAT = "vlforge-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A feature cache's "image": a locked image tower's feature grid, float16 [C, h, w] in ``.npy`` format
# (``vlforge.workflows.features`` writes them; the pipeline passes them through as ``pixel_values``).
FEATURE_EXT = "npy"
# Manifests written before ``params.kind`` recorded ``params.task``: the corpus set's name or the old
# name of the pair kind. What each of those values is as a data kind.
LEGACY_KINDS = {"nlvr": "nlvr2", "scenes": "captions", "concepts": "captions"}


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    shards: list[ShardInfo]
    params: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    created_by: str = "vlforge"

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        d = {
            "format": self.format,
            "created_by": self.created_by,
            "total_samples": self.total_samples,
            "shards": [asdict(s) for s in self.shards],
            "params": self.params,
        }
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
            shards = [ShardInfo(**s) for s in d["shards"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}: not a vlforge manifest ({exc})") from None
        return cls(
            shards=shards,
            params=d.get("params", {}),
            format=d.get("format", FORMAT),
            created_by=d.get("created_by", "unknown"),
        )


class ShardWriter:
    """Write samples into ``prefix-00000.tar``, ``prefix-00001.tar``, ... and a manifest.

    Shards are written locally (``out_dir``); use ``storage.upload_dir`` to publish.
    Keys must be unique and are written in the order given.
    """

    def __init__(
        self,
        out_dir: str | Path,
        samples_per_shard: int = 1000,
        prefix: str = "shard",
        params: dict[str, Any] | None = None,
    ):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.params = dict(params or {})
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._buf: io.BytesIO | None = None
        self._count = 0
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()

    def write(
        self,
        key: str,
        *,
        image: bytes,
        image_ext: str = "jpg",
        text: str | None = None,
        meta: dict[str, Any] | None = None,
        extra: dict[str, bytes] | None = None,
    ) -> None:
        """Add one sample. ``extra`` maps further suffixes (e.g. ``right.jpg``) to bytes."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"bad sample key {key!r}: must be non-empty, without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        image_ext = image_ext.lower().lstrip(".")
        if image_ext not in (*IMAGE_EXTS, FEATURE_EXT):
            raise ValueError(f"image_ext must be one of {(*IMAGE_EXTS, FEATURE_EXT)}, got {image_ext!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        members: list[tuple[str, bytes]] = [(image_ext, image)]
        if text is not None:
            members.append(("txt", text.encode("utf-8")))
        if meta is not None:
            members.append(("json", json.dumps(meta, sort_keys=True).encode("utf-8")))
        for suffix, data in sorted((extra or {}).items()):
            members.append((suffix, data))
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._flush()

    def end_shard(self) -> None:
        """Close the shard being written (if any): the next sample starts a new one."""
        self._flush()

    def _open(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _flush(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        data = self._buf.getvalue()
        name = f"{self.prefix}-{len(self.shards):05d}.tar"
        (self.out_dir / name).write_bytes(data)
        self.shards.append(ShardInfo(name, self._count, len(data), hashlib.sha256(data).hexdigest()))
        self._tar = self._buf = None
        self._count = 0

    def close(self) -> Manifest:
        self._flush()
        manifest = Manifest(self.shards, self.params)
        (self.out_dir / MANIFEST).write_text(manifest.to_json())
        return manifest


def read_manifest(uri: str, storage: StorageConfig | None = None) -> Manifest | None:
    """The manifest of a shard set (dir or manifest URI), or None when there is none."""
    fs, path = filesystem_for(uri, storage)
    mpath = path if path.endswith(".json") else f"{path}/{MANIFEST}"
    if not fs.exists(mpath):
        return None
    with fs.open(mpath, "rb") as f:
        return Manifest.from_json(f.read().decode("utf-8"), where=mpath)


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def is_shard_set(uri: str) -> bool:
    """Whether ``uri`` names a whole shard set (a directory or prefix), not one ``.tar`` or a glob."""
    path = uri.rstrip("/")
    return not path.endswith(".tar") and not _is_glob(path)


def set_manifest(uri: str, storage: StorageConfig | None = None) -> Manifest | None:
    """``read_manifest`` for a whole shard set; None for one ``.tar``, a glob, or a set without a manifest."""
    return read_manifest(uri, storage) if is_shard_set(uri) else None


def manifest_kind(manifest: Manifest | None) -> str:
    """The data kind a shard set holds (one of ``config.DATA_KINDS``, unless the manifest names another):
    its manifest's ``params.kind``; a manifest written before that key, its ``params.task`` (legacy
    ``nlvr`` -> ``nlvr2``, ``scenes`` / ``concepts`` -> ``captions``); no manifest or neither key: captions."""
    params = manifest.params if manifest is not None else {}
    kind = params.get("kind") or params.get("task") or "captions"
    return LEGACY_KINDS.get(kind, kind)


def list_shards(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Full URIs (or absolute local paths) of a shard set's tar files.

    ``uri`` is a directory (its manifest's shards, else every ``*.tar`` in it), a
    ``manifest.json``, one ``.tar``, or a glob. Missing shards are an error.
    """
    fs, path = filesystem_for(uri, storage)
    scheme = "s3://" if uri.startswith("s3://") else ""

    def full(p: str) -> str:
        return f"{scheme}{p}" if scheme else p

    if _is_glob(path):
        found = sorted(p for p in fs.glob(path) if p.endswith(".tar"))
        if not found:
            raise FileNotFoundError(f"no shards match {uri}")
        return [full(p) for p in found]
    if path.endswith(".tar"):
        if not fs.exists(path):
            raise FileNotFoundError(f"shard not found: {uri}")
        return [full(path)]
    base = path[: -len(MANIFEST) - 1] if path.endswith(MANIFEST) else path
    if not fs.exists(base):
        raise FileNotFoundError(f"shard set not found: {uri}")
    manifest = read_manifest(full(base) if scheme else base, storage)
    if manifest is not None:
        paths = [f"{base}/{s.name}" for s in manifest.shards]
        missing = [p for p in paths if not fs.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard(s) listed in {full(base)}/{MANIFEST} are missing, first: {full(missing[0])}"
            )
        return [full(p) for p in paths]
    found = sorted(p for p in fs.find(base) if p.endswith(".tar"))
    if not found:
        raise FileNotFoundError(f"no .tar shards under {uri}")
    return [full(p) for p in found]


class _HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class ShardScan:
    """What reading one shard end to end found."""

    name: str
    samples: int  # keys with an image member
    bytes: int
    sha256: str
    problems: dict[str, int] = field(default_factory=dict)  # reason -> count
    detail: list[str] = field(default_factory=list)  # the first few problems, spelled out

    def note(self, reason: str, detail: str) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + 1
        if len(self.detail) < 5:
            self.detail.append(f"{self.name}: {detail}")


def scan_shard(shard_uri: str, storage: StorageConfig | None = None, name: str | None = None) -> ShardScan:
    """Read one tar shard end to end (as it is: vlforge's, img2dataset's or any WebDataset writer's):
    sample count, size, sha256, and problems by reason: ``corrupt_tar`` (an unreadable header or
    member; the rest is lost), ``missing_image``, ``missing_caption`` (a key without an image or a
    ``.txt``), ``stats_mismatch`` (img2dataset's ``<shard>_stats.json`` counts other successes)."""
    fs, path = filesystem_for(shard_uri, storage)
    scan = ShardScan(name or path.rsplit("/", 1)[-1], 0, 0, "")
    samples: dict[str, set[str]] = {}
    with fs.open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    key, _, suffix = Path(info.name).name.partition(".")
                    tar.extractfile(info).read()
                    samples.setdefault(f"{Path(info.name).parent}/{key}", set()).add(suffix.lower())
        except (tarfile.TarError, EOFError, OSError) as exc:
            scan.note("corrupt_tar", f"unreadable after {len(samples)} keys ({exc})")
        reader.drain()
    for key, suffixes in samples.items():
        if not suffixes & {*IMAGE_EXTS, FEATURE_EXT}:
            scan.note("missing_image", f"{key.rsplit('/', 1)[-1]} has no image member ({sorted(suffixes)})")
            continue
        scan.samples += 1
        if not suffixes & {"txt", "text", "caption"}:
            scan.note("missing_caption", f"{key.rsplit('/', 1)[-1]} has no .txt")
    scan.bytes, scan.sha256 = reader.bytes, reader.sha.hexdigest()
    stats = f"{path[: -len('.tar')]}_stats.json"
    if path.endswith(".tar") and fs.exists(stats):
        try:
            with fs.open(stats, "rb") as f:
                successes = json.loads(f.read()).get("successes")
        except (ValueError, UnicodeDecodeError):
            successes = None
        if isinstance(successes, int) and successes != scan.samples:
            scan.note(
                "stats_mismatch",
                f"{stats.rsplit('/', 1)[-1]} counts {successes} successes, the tar holds {scan.samples} samples",
            )
    return scan


def write_manifest(
    uri: str, storage: StorageConfig | None = None, *, kind: str = "captions", force: bool = False, progress=None
) -> tuple[Manifest, list[ShardScan]]:
    """Scan the shards of a set that has no manifest (img2dataset's output, say) and write
    ``manifest.json`` beside them, leaving the shards as they are. The scans' problems are
    returned and counted in ``params.scan_problems``; ``kind`` (``params.kind``) is the data kind the
    shards hold; an existing manifest is kept unless ``force``."""
    fs, base = filesystem_for(uri, storage)
    base = base.rstrip("/")
    if not is_shard_set(base):
        raise ValueError(f"{uri}: give the directory that holds the shards")
    if not fs.isdir(base):
        raise FileNotFoundError(f"shard set not found: {uri}")
    mpath = f"{base}/{MANIFEST}"
    if fs.exists(mpath) and not force:
        raise FileExistsError(f"{uri} already has a {MANIFEST}; pass force=True (--force) to rewrite it")
    scheme = "s3://" if uri.startswith("s3://") else ""
    found = sorted(p for p in fs.find(base) if p.endswith(".tar"))
    if not found:
        raise FileNotFoundError(f"no .tar shards under {uri}")
    scans = []
    for i, p in enumerate(found):
        scans.append(scan_shard(f"{scheme}{p}", storage, name=p[len(base) + 1 :]))
        if progress is not None:
            progress(f"scanned {i + 1}/{len(found)} {scans[-1].name}: {scans[-1].samples} samples")
    problems: dict[str, int] = {}
    for sc in scans:
        for k, v in sc.problems.items():
            problems[k] = problems.get(k, 0) + v
    source = "img2dataset" if any(fs.exists(f"{p[:-4]}_stats.json") for p in found[:3]) else "scanned"
    manifest = Manifest(
        [ShardInfo(sc.name, sc.samples, sc.bytes, sc.sha256) for sc in scans],
        {"kind": kind, "source": source, "scan_problems": problems},
        created_by="vlforge data manifest",
    )
    with fs.open(mpath, "wb") as f:
        f.write(manifest.to_json().encode("utf-8"))
    return manifest, scans


def verify(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Check every shard against the manifest's size and sha256; returns problems (empty = ok).
    A set without a manifest (img2dataset's output) is read end to end instead (``scan_shard``)."""
    manifest = read_manifest(uri, storage)
    if manifest is None:
        problems = []
        for shard in list_shards(uri, storage):
            problems += scan_shard(shard, storage).detail
        return problems
    fs, base = filesystem_for(uri, storage)
    base = base[: -len(MANIFEST) - 1] if base.endswith(MANIFEST) else base
    problems = []
    for s in manifest.shards:
        p = f"{base}/{s.name}"
        if not fs.exists(p):
            problems.append(f"{s.name}: missing")
            continue
        h = hashlib.sha256()
        with fs.open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != s.sha256:
            problems.append(f"{s.name}: sha256 {h.hexdigest()[:12]} != manifest {s.sha256[:12]}")
    return problems


def iter_samples(shard_uri: str, storage: StorageConfig | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard as ``{"__key__": key, suffix: bytes, ...}``, read with tarfile.

    For tools and tests (round trips, the single-process benchmark baseline); the
    training path reads through Ray Data (``vlforge.data.pipeline``).
    """
    fs, path = filesystem_for(shard_uri, storage)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for info in tar:
            if not info.isreg():
                continue
            key, _, suffix = Path(info.name).name.partition(".")
            data = tar.extractfile(info).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[suffix] = data
        if current is not None:
            yield current


def shard_set_summary(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    shards = list_shards(uri, storage)
    manifest = set_manifest(uri, storage)
    return {
        "uri": uri,
        "remote": is_remote(uri),
        "shards": len(shards),
        "samples": manifest.total_samples if manifest else None,
        "bytes": sum(s.bytes for s in manifest.shards) if manifest else None,
        "params": manifest.params if manifest else {},
    }


__all__ = [
    "MANIFEST",
    "Manifest",
    "ShardInfo",
    "ShardScan",
    "ShardWriter",
    "is_shard_set",
    "iter_samples",
    "list_shards",
    "manifest_kind",
    "read_manifest",
    "scan_shard",
    "set_manifest",
    "shard_set_summary",
    "verify",
    "write_manifest",
]
