"""Ingest: a folder of images plus a CSV or JSONL of captions -> a shard set.

    vlforge data ingest photos/ captions.csv --out data/photos
    vlforge data ingest photos/ captions.jsonl --out data/photos --samples-per-shard 2000

Each caption row names an image file (relative to the folder) and its caption;
the columns are found by name (``image``/``file``/``filename``/``path`` and
``caption``/``text``), or given with ``--image-col`` / ``--caption-col``. Every
other column goes into the sample's JSON metadata, so per-sample fields such as
``question``, ``answer``, ``label`` or ``split`` pass through. Image bytes are
stored as they are (JPEG, PNG, WebP); files in other formats are re-encoded as PNG.
Rows whose image is missing or unreadable are skipped and listed in the report;
``strict=True`` turns any skip into an error.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.data.images import has_transparency
from vlforge.data.shards import Manifest, ShardWriter

IMAGE_COLUMNS = ("image", "file", "filename", "path", "image_path", "url")
CAPTION_COLUMNS = ("caption", "text", "txt")
PASS_THROUGH = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}


@dataclass
class IngestReport:
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{reason}: {detail}")


class IngestError(ValueError):
    pass


def _rows(captions: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = captions.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with captions.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IngestError(f"{captions}:{i}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise IngestError(f"{captions}:{i}: each line must be a JSON object")
                yield i, row
    elif suffix in (".csv", ".tsv"):
        with captions.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader, 2):
                yield i, dict(row)
    else:
        raise IngestError(f"{captions}: captions must be .csv, .tsv or .jsonl, got {suffix or 'no suffix'}")


def _pick(row: dict[str, Any], given: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if given:
        if given not in row:
            raise IngestError(f"{where}: no column {given!r} (columns: {', '.join(row)})")
        return given
    for c in candidates:
        if c in row:
            return c
    raise IngestError(f"{where}: no {what} column; name one of {candidates} or pass --{what}-col")


def image_bytes(path: Path) -> tuple[bytes, str]:
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").lower()
        im.verify()
    if fmt in PASS_THROUGH:
        return data, PASS_THROUGH[fmt]
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        # transparency stays (as PNG alpha): decoding composites it over ``image.background``
        im.convert("RGBA" if has_transparency(im) else "RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"


def ingest(
    images_dir: str | Path,
    captions: str | Path,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    image_col: str | None = None,
    caption_col: str | None = None,
    split: str = "train",
    strict: bool = False,
    progress=None,
) -> IngestReport:
    images_dir, captions = Path(images_dir), Path(captions)
    if not images_dir.is_dir():
        raise IngestError(f"{images_dir} is not a directory")
    if not captions.is_file():
        raise IngestError(f"{captions} does not exist")
    report = IngestReport()
    writer = ShardWriter(
        out,
        samples_per_shard,
        params={"source": str(captions.name), "kind": "captions", "ingested_from": str(images_dir.name)},
    )
    cols: tuple[str, str] | None = None
    for line, row in _rows(captions):
        where = f"{captions.name}:{line}"
        if cols is None:
            cols = (
                _pick(row, image_col, IMAGE_COLUMNS, "image", where),
                _pick(row, caption_col, CAPTION_COLUMNS, "caption", where),
            )
        icol, ccol = cols
        name, caption = row.get(icol), row.get(ccol)
        if not name:
            report.skip("no_image_name", where)
            continue
        if caption is None or not str(caption).strip():
            report.skip("missing_caption", f"{where} ({name})")
            continue
        path = (images_dir / str(name)).resolve()
        if images_dir.resolve() not in path.parents:
            report.skip("outside_folder", f"{where} ({name})")
            continue
        if not path.is_file():
            report.skip("missing_image", f"{where} ({name})")
            continue
        try:
            data, ext = image_bytes(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is reported, not fatal
            report.skip("unreadable_image", f"{where} ({name}: {exc})")
            continue
        meta = {k: v for k, v in row.items() if k not in (icol, ccol)}
        meta.setdefault("split", split)
        meta["source"] = str(name)
        writer.write(f"{report.written:09d}", image=data, image_ext=ext, text=str(caption).strip(), meta=meta)
        report.written += 1
        if progress and report.written % 1000 == 0:
            progress(f"  {report.written} samples")
    if strict and report.skipped:
        raise IngestError(f"{sum(report.skipped.values())} rows skipped: " + "; ".join(report.examples))
    if report.written == 0:
        raise IngestError(
            f"no usable rows in {captions}" + (": " + "; ".join(report.examples) if report.examples else "")
        )
    writer.params["skipped"] = report.skipped
    report.manifest = writer.close()
    return report
