"""``timm-popup prepare``: a dataset re-encoded once at a maximum side, FFCV's ``max_resolution``.

Decoding is most of a loader worker's time, and it grows with the pixels of the stored image, not of the crop: an
ImageNet photo is decoded at its full size to feed a 224 px crop. Stored at a maximum side of, say, 320 px, each
image decodes in a fraction of the time. That changes the data (every crop is taken from the smaller image), so it
is never done silently: it is a command of its own, its output says what it is (``timm_popup_prepare.json``), and
every run trained from it records it in its config and on its card.

The output is a directory of Parquet shards, ``data/<split>-<k>-of-<n>.parquet`` (the Hub's layout: ``datasets``
and ``--dataset`` read it as they read any dataset), each written whole (temp file + rename). A run that stops
leaves finished shards; the same command again skips them and writes the rest. Images within the maximum side keep
their stored bytes; larger ones are resized (Pillow's ``thumbnail``: the JPEG decoded at reduced DCT size where it
stays at least twice the target, then an antialiased bicubic resize) and stored as JPEG (quality ``--quality``) if
they were JPEGs, else as PNG.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image
from tqdm.auto import tqdm

from .._io import atomic_write
from .decode import read_encoded, to_pil, undecoded
from .errors import DataError
from .sources import PREPARED_MANIFEST, PREPARED_VERSION, ImageDataset

__all__ = ["PrepareOptions", "prepare_dataset"]


@dataclass(frozen=True)
class PrepareOptions:
    """How a dataset is prepared (all of it goes into the manifest, and a second run must ask the same)."""

    max_side: int
    quality: int = 90
    shard_size: int = 5000

    def check(self) -> None:
        for ok, message in ((self.max_side >= 16, f"--max-side must be at least 16 px, got {self.max_side}"),
                            (1 <= self.quality <= 100, f"--quality must be 1-100, got {self.quality}"),
                            (self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}")):
            if not ok:
                raise DataError(message)


def _shard_name(split: str, k: int, n: int) -> str:
    return f"{split}-{k:05d}-of-{n:05d}.parquet"


def _write_manifest(destination: Path, manifest: dict[str, Any], complete: bool) -> None:
    atomic_write(destination / PREPARED_MANIFEST,
                 lambda tmp: Path(tmp).write_text(json.dumps({**manifest, "complete": complete}, indent=1)))


def _reencoded(value: Any, decoder: datasets.Image, max_side: int, quality: int) -> dict[str, Any]:
    """One stored image within ``max_side``: its own bytes where it already is, else resized and encoded."""
    encoded = read_encoded(value)
    path = value.get("path") if isinstance(value, dict) else None
    if encoded is not None and max(encoded.width, encoded.height) <= max_side:
        return {"bytes": encoded.data.numpy().tobytes(), "path": path}
    if encoded is not None:
        image = Image.open(io.BytesIO(encoded.data.numpy().tobytes()))
        fmt = encoded.format
    else:  # decoded already (an array, a PIL image) or remote
        image, fmt = to_pil(value, decoder), None
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if fmt == "JPEG" and image.mode in ("L", "RGB", "CMYK"):
        image.save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, "PNG")
    name = None if path is None else str(Path(path).with_suffix(".jpg" if fmt == "JPEG" else ".png").name)
    return {"bytes": buf.getvalue(), "path": name}


@dataclass(frozen=True, eq=False)
class _Shard:
    """One output file and the rows it holds (what a worker process is handed)."""

    target: Path
    rows: datasets.Dataset
    image_column: str
    label_column: str
    decoder: datasets.Image
    features: datasets.Features
    options: PrepareOptions

    def write(self) -> int:
        images = [_reencoded(v, self.decoder, self.options.max_side, self.options.quality)
                  for v in self.rows[self.image_column]]
        shard = datasets.Dataset.from_dict({self.image_column: images, self.label_column: self.rows[self.label_column]},
                                           features=self.features)
        quiet = datasets.is_progress_bar_enabled()  # one bar per shard would bury the command's own
        datasets.disable_progress_bars()
        try:
            atomic_write(self.target, shard.to_parquet)
        finally:
            if quiet:
                datasets.enable_progress_bars()
        return len(images)


def _source_bytes(ds: ImageDataset) -> int | None:
    """The bytes the source's splits take on disk, where ``datasets`` knows them (an upper bound of the output:
    images are kept or made smaller)."""
    total = 0
    for split_ds in ds.splits.values():
        files = getattr(split_ds, "cache_files", None)
        if not files:
            return None
        total += sum(os.path.getsize(f["filename"]) for f in files if os.path.exists(f["filename"]))
    return total


def _manifest(ds: ImageDataset, options: PrepareOptions) -> dict[str, Any]:
    return {"format": PREPARED_VERSION, "source": ds.source, **asdict(options),
            "image_column": ds.image_column, "label_column": ds.label_column,
            "splits": {s: {"rows": len(d), "shards": max(1, math.ceil(len(d) / options.shard_size))}
                       for s, d in ds.splits.items()}}


def _start(destination: Path, manifest: dict[str, Any], needed: int | None) -> None:
    """Check ``destination`` before any image is read: a fresh directory, or this same preparation to finish; the
    disk has room for the source's size. Writes the manifest (``complete: false``) in a fresh one."""
    path = destination / PREPARED_MANIFEST
    if path.is_file():
        before = json.loads(path.read_text())
        before.pop("complete", None)
        if before != manifest:
            changed = sorted(k for k in set(before) | set(manifest) if before.get(k) != manifest.get(k))
            changed = [k for k in changed if k != "splits"] or changed  # the shards follow from --shard-size
            raise DataError(f"{destination} holds another preparation (its {', '.join(changed)} differ): pass the "
                            "same options to finish it, or a new directory")
    elif destination.exists() and any(destination.iterdir()):
        raise DataError(f"{destination} exists and is not a timm-popup prepare output: pass a new or empty directory")
    (destination / "data").mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(destination).free
    if needed is not None and free < needed:
        raise DataError(f"{destination} has {free / 2**30:.1f} GiB free and the preparation may need up to "
                        f"{needed / 2**30:.1f} GiB (the source's size): free space or pick another disk")
    if not path.is_file():
        _write_manifest(destination, manifest, complete=False)


def prepare_dataset(ds: ImageDataset, destination: str | os.PathLike, options: PrepareOptions, *,
                    workers: int = 0, progress: bool = True) -> Path:
    """Write ``ds`` (all its splits, the image and label columns) re-encoded within ``options.max_side`` to
    ``destination``, shard by shard, skipping the shards a stopped run already wrote; ``workers`` processes encode
    shards side by side (0: this process). Returns the directory, which ``--dataset`` then reads."""
    options.check()
    if ds.streaming:
        raise DataError("timm-popup prepare reads a dataset whole: drop --streaming (the source is downloaded once)")
    destination = Path(destination).expanduser()
    manifest = _manifest(ds, options)
    _start(destination, manifest, _source_bytes(ds))
    jobs = []
    for split, split_ds in ds.splits.items():
        rows, decoder = undecoded(split_ds, ds.image_column)
        label = rows.features[ds.label_column] if rows.features else datasets.Value("int64")
        features = datasets.Features({ds.image_column: datasets.Image(), ds.label_column: label})
        n = manifest["splits"][split]["shards"]
        for k in range(n):
            part = range(k * options.shard_size, min(len(rows), (k + 1) * options.shard_size))
            jobs.append(_Shard(destination / "data" / _shard_name(split, k, n), rows.select(part), ds.image_column,
                               ds.label_column, decoder, features, options))
    todo = [job for job in jobs if not job.target.exists()]
    with tqdm(total=sum(len(j.rows) for j in jobs), initial=sum(len(j.rows) for j in jobs if j.target.exists()),
              desc=f"prepare (max side {options.max_side})", unit="img", disable=not progress) as bar:
        if workers > 0:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                for done in pool.map(_Shard.write, todo):
                    bar.update(done)
        else:
            for job in todo:
                bar.update(job.write())
    _write_manifest(destination, manifest, complete=True)
    return destination
