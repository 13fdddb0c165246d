"""Image-classification data from Hugging Face ``datasets`` for the training scripts.

``load_image_dataset`` accepts a Hub id, a ``save_to_disk`` directory or an image folder, finds the image and label
columns and the train/eval splits, and fails at load time (one-line ``DataError``) rather than mid-training.
``build_transforms`` gives timm's ImageNet pipeline or the paper's CIFAR augmentation, converting images to the
channel count the model expects; ``create_loader`` turns a split into a seeded ``DataLoader`` of
``(float images, long labels)``. ``fashion_mnist_to_disk`` (also ``python -m timm_popup.data fashion-mnist OUT``)
converts Debian's ``dataset-fashion-mnist`` idx files into a ``save_to_disk`` dataset.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gzip
import hashlib
import inspect
import io
import logging
import multiprocessing
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T

__all__ = [
    "DataError", "ImageDataset", "load_image_dataset", "build_transforms", "create_loader", "fashion_mnist_to_disk",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_APT_DIR", "BUILTIN_DATASETS", "resolve_dataset", "open_dataset",
    "default_cache_dir", "peek_image", "channel_stats", "Augmentation", "label_mapping", "has_class_names",
    "UnreadableImageError", "is_split_slice", "split_rows", "add_split_slice", "check_held_out",
]

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "images", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target", "targets", "class", "cls", "category")
TRAIN_SPLIT_NAMES = ("train", "training")
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test", "eval", "evaluation", "dev", "testing")
# Pillow opens more formats, but these are what image folders realistically hold; used only to tell an image folder
# apart from a directory of parquet/csv files.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_APT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


class DataError(ValueError):
    """A dataset problem the user can fix (bad id/path, split or column); the message is one line."""

    def __init__(self, message: str) -> None:
        # datasets' own messages span lines; the CLI prints ours as a single line.
        super().__init__(" ".join(str(message).split()))


class UnreadableImageError(DataError):
    """An image of the dataset cannot be decoded (a truncated or corrupt file); the message names it."""

    def __init__(self, message: str) -> None:
        # An exception raised in a DataLoader worker reaches the main process re-built from the worker's traceback
        # text (torch's ExceptionWrapper.reraise calls type(text) with "Caught ... Original Traceback ...
        # <module>.UnreadableImageError: <message>"): keep only the original message.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1]
        super().__init__(message)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class ImageDataset:
    """Splits of one image-classification dataset plus what ``load_image_dataset`` detected about them.

    ``splits`` maps split name to a ``datasets.Dataset`` (or ``datasets.IterableDataset`` when ``streaming``).
    ``train_split`` / ``eval_split`` are the detected roles (``None`` when the dataset has no such split).
    ``num_rows`` holds each split's size where it is known without reading the data (``None`` otherwise).
    """

    source: str
    splits: dict[str, Any]
    image_column: str
    label_column: str
    class_names: list[str]
    train_split: str | None
    eval_split: str | None
    streaming: bool = False
    num_rows: dict[str, int | None] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    def __getitem__(self, split: str) -> Any:
        return self.splits[_check_split(self, split)]

    def describe(self) -> str:
        """One-line summary, for logs."""
        sizes = ", ".join(f"{s}={'?' if n is None else n}" for s, n in self.num_rows.items())
        return (f"{self.source}: splits [{sizes}], train={self.train_split!r}, eval={self.eval_split!r}, "
                f"image={self.image_column!r}, label={self.label_column!r}, {self.num_classes} classes"
                f"{' (streaming)' if self.streaming else ''}")


# ----------------------------------------------------------------------------------------------------------- loading


def _looks_like_path(name: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else that does not exist locally was meant as a path.
    return (name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or "\\" in name
            or Path(name).suffix.lower() in _FILE_BUILDERS)


def _has_images(directory: Path) -> bool:
    for _, _, files in os.walk(directory):
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
            return True
    return False


def _as_split_dict(obj: Any, default_split: str = "train") -> dict[str, Any]:
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return dict(obj)
    split = getattr(obj, "split", None)
    return {str(split) if split else default_split: obj}


def _hub_error(name: str, exc: BaseException) -> DataError:
    if isinstance(exc, datasets.exceptions.DatasetNotFoundError):
        return DataError(
            f"dataset {name!r} was not found on the Hugging Face Hub and no local directory of that name exists: "
            f"check the id (e.g. 'uoft-cs/cifar10'), run `hf auth login` and accept the terms for gated datasets "
            f"such as 'ILSVRC/imagenet-1k', or pass an existing local path")
    if isinstance(exc, ConnectionError):
        return DataError(
            f"could not load dataset {name!r}: no local directory of that name exists and the Hugging Face Hub "
            f"cannot be reached ({_one_line(exc)}); check the id and your network/HF_HUB_OFFLINE, or pass a local path")
    return DataError(f"could not load dataset {name!r}: {_one_line(exc)}")


def _load_local(path: Path, streaming: bool, cache_dir: str | None) -> dict[str, Any]:
    if path.is_dir() and ((path / "dataset_dict.json").is_file()
                          or ((path / "dataset_info.json").is_file() and (path / "state.json").is_file())):
        try:
            loaded = _as_split_dict(datasets.load_from_disk(str(path)))
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path} looks like a save_to_disk dataset but cannot be read: {_one_line(e)}") from e
        if streaming:
            # Several shards let DataLoader workers split the stream and let shuffling reorder shards.
            loaded = {s: d.to_iterable_dataset(num_shards=max(1, min(len(d), 64))) for s, d in loaded.items()}
        return loaded
    if path.is_dir():
        builder_args: dict[str, Any] = {"path": "imagefolder", "data_dir": str(path)} if _has_images(path) else {
            "path": str(path)}
    elif path.suffix.lower() in _FILE_BUILDERS:
        builder_args = {"path": _FILE_BUILDERS[path.suffix.lower()], "data_files": {"train": str(path)}}
    else:
        raise DataError(f"{path} is a file of unsupported type {path.suffix!r}; pass a save_to_disk directory, an "
                        f"image folder or one of {sorted(_FILE_BUILDERS)}")
    try:
        return _as_split_dict(datasets.load_dataset(**builder_args, streaming=streaming, cache_dir=cache_dir))
    except datasets.data_files.EmptyDatasetError as e:
        raise DataError(f"directory {path} holds no images or data files and is not a save_to_disk dataset "
                        f"(no dataset_dict.json / dataset_info.json+state.json); point to the dataset itself") from e
    except (OSError, ValueError) as e:
        raise DataError(f"could not load local dataset {path}: {_one_line(e)}") from e


def _load_hub(name: str, requested: list[str] | None, streaming: bool, cache_dir: str | None) -> dict[str, Any]:
    if requested is not None:
        # Check split names against the Hub metadata first so a typo fails before a (possibly huge) download. Best
        # effort: offline with a cached copy this lookup fails while loading works, and the check after loading
        # still catches the typo.
        try:
            available = datasets.get_dataset_split_names(name)
        except datasets.exceptions.DatasetNotFoundError as e:
            raise _hub_error(name, e) from e
        except Exception as e:  # any other failure only skips the early check
            logger.debug("could not list the splits of %s early: %s", name, _one_line(e))
        else:
            _check_requested(requested, available, name)
    try:
        return _as_split_dict(datasets.load_dataset(name, streaming=streaming, cache_dir=cache_dir))
    except (OSError, ValueError) as e:  # DatasetNotFoundError, ConnectionError, missing config, ...
        raise _hub_error(name, e) from e


def _parse_split_arg(split: str | Sequence[str] | None) -> list[str] | None:
    if split is None:
        return None
    names = [s.strip() for s in split.split(",")] if isinstance(split, str) else [str(s).strip() for s in split]
    names = [s for s in names if s]
    if not names:
        raise DataError("split is empty; pass a split name such as 'train' or 'train,validation'")
    return names


def is_split_slice(spec: str) -> bool:
    """Whether ``spec`` uses ``datasets``' split syntax (``train[:80%]``, ``train[10:20]``, ``train+test``)
    rather than naming one split."""
    return "[" in spec or "+" in spec


def split_rows(spec: str, lengths: dict[str, int], source: str) -> list[tuple[str, int, int]]:
    """The rows of the split ``spec`` as ``(split, start, stop)`` ranges, read with ``datasets``' own parser
    (``datasets.ReadInstruction``: percentages round to the closest row, so ``train[:80%]`` and ``train[80%:]``
    split ``train`` exactly); ``lengths`` gives each split's size."""
    if not is_split_slice(spec):
        return [(spec, 0, lengths[spec])]
    try:
        instructions = datasets.ReadInstruction.from_spec(spec).to_absolute(lengths)
    except (ValueError, AssertionError) as e:
        if "Unknown split" in str(e):
            raise DataError(f"unknown split in {spec!r} for dataset {source!r}; available splits: "
                            f"{list(lengths)}") from e
        raise DataError(f"split {spec!r} is not a split name or a slice like 'train[:80%]', 'train[80%:]', "
                        f"'train[:1000]' or 'train+validation' ({_one_line(e)})") from e
    return [(i.splitname, i.from_, i.to) for i in instructions]


def _lengths(splits: dict[str, Any], specs: Sequence[str], source: str) -> dict[str, int]:
    """The sizes of the splits that the splits or slices ``specs`` read. A streamed split of unknown size can be
    sliced by row numbers (it is then read with skip / take) but not by a percentage."""
    lengths = {}
    for spec in specs:
        for name, _, _ in split_rows(spec, {name: 1 for name in splits}, source):
            n = _num_rows(name, splits[name])
            if n is None and "%" in spec:
                raise DataError(f"split {name!r} of dataset {source!r} is streamed and its size is unknown, so "
                                f"{spec!r} cannot take a percentage of it; slice it by rows ('{name}[:1000]') or "
                                "load it without --streaming")
            lengths[name] = sys.maxsize if n is None else n
    return lengths


def _select_split(splits: dict[str, Any], spec: str, source: str) -> tuple[Any, int | None]:
    """The rows of the split slice ``spec`` of ``splits`` as one dataset (streamed splits: skip / take), and
    their number where it is known."""
    rows = split_rows(spec, _lengths(splits, [spec], source), source)
    parts = [splits[name].skip(start).take(stop - start) if isinstance(splits[name], datasets.IterableDataset)
             else splits[name].select(range(start, stop)) for name, start, stop in rows]
    part = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    count = sum(stop - start for _, start, stop in rows)
    return part, None if count >= sys.maxsize // 2 else count


def _check_held_out(splits: dict[str, Any], train: str, evaluation: str, source: str) -> None:
    if not (is_split_slice(train) or is_split_slice(evaluation)):
        return  # two split names: different splits (a name given twice is refused by the training script)
    lengths = _lengths(splits, [train, evaluation], source)
    shared = 0
    for name, start, stop in split_rows(train, lengths, source):
        for other, first, last in split_rows(evaluation, lengths, source):
            if other == name:
                shared += max(0, min(stop, last) - max(start, first))
    if shared:
        raise DataError(f"the validation split {evaluation!r} shares {_count(shared)} images with the train split "
                        f"{train!r}; validate on held-out images, e.g. --train-split 'train[:80%]' --val-split "
                        "'train[80%:]'")


def _count(n: int) -> str:
    return "its" if n >= sys.maxsize // 2 else str(n)  # an open-ended range of a stream of unknown size


def check_held_out(ds: ImageDataset, train: str, evaluation: str) -> None:
    """A :class:`DataError` when the split (or slice) ``evaluation`` of ``ds`` shares images with ``train``."""
    _check_held_out(ds.splits, train, evaluation, ds.source)


def add_split_slice(ds: ImageDataset, spec: str) -> ImageDataset:
    """``ds`` with one more split, named ``spec``: the slice ``spec`` of its splits (see :func:`split_rows`)."""
    part, rows = _select_split(ds.splits, spec, ds.source)
    return replace(ds, splits={**ds.splits, spec: part}, num_rows={**ds.num_rows, spec: rows})


def _check_requested(requested: list[str], available: Sequence[str], source: str) -> None:
    for spec in requested:
        if is_split_slice(spec):
            split_rows(spec, {name: 1 for name in available}, source)  # its splits exist, its syntax is valid
        elif spec not in available:
            raise DataError(f"unknown split {spec!r} for dataset {source!r}; available splits: {list(available)}")


def _check_split(ds: ImageDataset, split: str) -> str:
    if split not in ds.splits:
        raise DataError(f"unknown split {split!r} for dataset {ds.source!r}; available splits: {list(ds.splits)}")
    return split


def _detect_roles(names: list[str], requested: list[str] | None) -> tuple[str | None, str | None]:
    if requested is not None and len(requested) >= 2:
        return requested[0], requested[1]  # explicit "train,eval" order wins over name guessing

    def first(candidates: Sequence[str]) -> str | None:
        lowered = {n.lower(): n for n in names}
        for c in candidates:
            if c in lowered:
                return lowered[c]
        for c in candidates:  # e.g. "train_clean" or "validation_matched"
            for n in names:
                if n.lower().startswith(c):
                    return n
        return None

    train, evaluation = first(TRAIN_SPLIT_NAMES), first(EVAL_SPLIT_NAMES)
    if train is None and requested is not None and evaluation is None:
        train = requested[0]  # a single split with an unusual name is taken as the one to train on
    return train, evaluation


def _features_and_columns(split_ds: Any) -> tuple[datasets.Features | None, list[str]]:
    features = split_ds.features
    if features is not None:
        return features, list(features)
    # Some streamed sources carry no schema; the first example still tells us the column names.
    first = next(iter(split_ds.take(1)), None)
    return None, list(first) if first else []


def _detect_column(kind: str, feature_type: type, names: tuple[str, ...], features: datasets.Features | None,
                   candidates: list[str], columns: list[str], given: str | None, source: str) -> str:
    """The ``kind`` (image/label) column: ``given``, else a ``feature_type`` feature, else a known name.

    Among several typed columns the name list decides (CIFAR-100: fine_label before coarse_label).
    """
    if given is not None:
        if given not in columns:
            raise DataError(f"{kind} column {given!r} not found in dataset {source!r}; columns are {columns}")
        return given
    if features is not None:
        typed = [c for c in candidates if isinstance(features[c], feature_type)]
        if typed:
            return next((c for c in names if c in typed), typed[0])
    lowered = {c.lower(): c for c in candidates}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise DataError(f"no {kind} column found in dataset {source!r} (no {feature_type.__name__} feature and none "
                    f"of {list(names)}); columns are {columns}; pass --{kind}-column")


def _detect_image_column(features: datasets.Features | None, columns: list[str], given: str | None,
                         source: str) -> str:
    return _detect_column("image", datasets.Image, IMAGE_COLUMN_NAMES, features, columns, columns, given, source)


def _detect_label_column(features: datasets.Features | None, columns: list[str], given: str | None,
                         image_column: str, source: str) -> str:
    if given is not None and given == image_column:
        raise DataError(f"label column {given!r} is also the image column; pass a different --label-column")
    candidates = [c for c in columns if c != image_column]
    return _detect_column("label", datasets.ClassLabel, LABEL_COLUMN_NAMES, features, candidates, columns, given,
                          source)


def _is_int_dtype(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def _resolve_classes(splits: dict[str, Any], label_column: str, features: datasets.Features | None,
                     streaming: bool, source: str) -> tuple[dict[str, Any], list[str]]:
    """Class names for the label column, casting string labels to a shared ClassLabel (map-style only)."""
    feature = features[label_column] if features is not None else None
    if isinstance(feature, datasets.ClassLabel):
        return splits, list(feature.names)
    dtype = feature.dtype if isinstance(feature, datasets.Value) else None
    if dtype is None or not (_is_int_dtype(dtype) or dtype in ("string", "large_string")):
        kind = "unknown" if feature is None else type(feature).__name__ + (f"({dtype})" if dtype else "")
        raise DataError(f"label column {label_column!r} of dataset {source!r} has type {kind}; expected ClassLabel, "
                        f"integer class ids or class-name strings; pass another --label-column")
    if streaming:
        raise DataError(f"label column {label_column!r} of dataset {source!r} is {dtype}, not ClassLabel, so the "
                        f"number of classes is unknown without reading the whole stream; load it without streaming")
    values: set[Any] = set()
    for split_ds in splits.values():
        values.update(v for v in split_ds.unique(label_column) if v is not None)
    if _is_int_dtype(dtype):
        ids = [int(v) for v in values if int(v) >= 0]  # -1 marks unlabeled rows (e.g. ImageNet test)
        if not ids:
            raise DataError(f"label column {label_column!r} of dataset {source!r} holds no class ids >= 0")
        return splits, [str(i) for i in range(max(ids) + 1)]
    names = sorted(values)
    logger.info("encoding string label column %r of %s as ClassLabel with %d classes", label_column, source,
                len(names))
    class_label = datasets.ClassLabel(names=names)
    return {s: d.cast_column(label_column, class_label) for s, d in splits.items()}, names


def load_image_dataset(name_or_path: str | os.PathLike, *, split: str | Sequence[str] | None = None,
                       image_column: str | None = None, label_column: str | None = None, streaming: bool = False,
                       cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load an image-classification dataset and detect its image/label columns and train/eval splits.

    Args:
        name_or_path: a Hub id (``uoft-cs/cifar10``, ``ILSVRC/imagenet-1k``), a ``save_to_disk`` directory, an image
            folder (class subfolders, optionally under ``train/`` and ``validation|val|test/``), or a local
            parquet/arrow/csv/json file or directory of such files. An existing local path wins over a Hub id.
        split: keep only these splits: one name, a comma-separated string or a sequence. With two or more, the first
            is the train split and the second the eval split (which must not share images); otherwise roles are
            detected from the names (``train``; ``validation``/``valid``/``val``/``test``...). A split may be a
            slice in ``datasets``' syntax, kept under that name: ``train[:80%]``, ``train[80%:]``, ``train[:1000]``.
        image_column: image column; default: the first ``datasets.Image`` feature, else a column named like
            ``image``/``img``/``pixel_values``.
        label_column: label column; default: a ``ClassLabel`` feature (``label``/``fine_label``... preferred), else a
            column named ``label``/``labels``/``fine_label``/``target``... holding integer ids or class-name strings.
        streaming: return ``datasets.IterableDataset`` splits (Hub data is then read lazily).
        cache_dir: ``datasets`` cache directory for Hub and image-folder/parquet data.

    Raises:
        DataError: (a ``ValueError``) with a one-line message for a missing path/dataset, unknown split, or a
            missing/unsuitable image or label column.
    """
    source = os.fspath(name_or_path)
    requested = _parse_split_arg(split)
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    local = Path(source).expanduser()
    if local.exists():
        splits = _load_local(local, streaming, cache)
    elif _looks_like_path(source):
        raise DataError(f"dataset path {source!r} does not exist; pass an existing save_to_disk directory or image "
                        f"folder, or a Hugging Face Hub id such as 'uoft-cs/cifar10'")
    else:
        splits = _load_hub(source, requested, streaming, cache)
    sliced: dict[str, int] = {}
    if requested is not None:
        _check_requested(requested, list(splits), source)
        if len(requested) >= 2:
            _check_held_out(splits, requested[0], requested[1], source)
        kept = {}
        for spec in requested:
            if spec in splits:
                kept[spec] = splits[spec]
            else:  # a slice such as train[:80%], read from the splits it names
                kept[spec], sliced[spec] = _select_split(splits, spec, source)
        splits = kept
    if not splits:
        raise DataError(f"dataset {source!r} has no splits")

    reference_split = next(iter(splits))
    features, columns = _features_and_columns(splits[reference_split])
    image_col = _detect_image_column(features, columns, image_column, source)
    label_col = _detect_label_column(features, columns, label_column, image_col, source)
    for name, split_ds in splits.items():
        cols = _features_and_columns(split_ds)[1]
        for role, col in (("image", image_col), ("label", label_col)):
            if col not in cols:
                raise DataError(f"{role} column {col!r} is missing from split {name!r} of dataset {source!r}; "
                                f"its columns are {cols}")
    if features is not None and isinstance(features[image_col], datasets.Value) and features[image_col].dtype in (
            "string", "large_string", "binary", "large_binary"):
        # File paths or encoded bytes: the Image feature decodes both lazily, like a native image column.
        splits = {s: d.cast_column(image_col, datasets.Image()) for s, d in splits.items()}
    splits, class_names = _resolve_classes(splits, label_col, features, streaming, source)

    train_split, eval_split = _detect_roles(list(splits), requested)
    return ImageDataset(source=source, splits=splits, image_column=image_col, label_column=label_col,
                        class_names=class_names, train_split=train_split, eval_split=eval_split, streaming=streaming,
                        num_rows={s: sliced.get(s, _num_rows(s, d)) for s, d in splits.items()})


def _num_rows(split: str, split_ds: Any) -> int | None:
    if isinstance(split_ds, datasets.Dataset):
        return len(split_ds)
    info_splits = split_ds.info.splits if split_ds.info is not None else None
    if info_splits and split in info_splits and info_splits[split].num_examples:
        return int(info_splits[split].num_examples)
    return None


def peek_image(ds: ImageDataset, split: str) -> Image.Image:
    """The first image of ``split`` as a PIL image (its size and mode tell a small model what to expect)."""
    split_ds, decoder = _undecoded(ds.splits[_check_split(ds, split)], ds.image_column)
    if isinstance(split_ds, datasets.IterableDataset):
        first = next(iter(split_ds.take(1)), None)
    else:
        first = split_ds[0] if len(split_ds) else None
    if first is None:
        raise DataError(f"split {split!r} of dataset {ds.source!r} is empty")
    return _to_pil(first[ds.image_column], decoder)


def channel_stats(ds: ImageDataset, split: str, input_size: Sequence[int], *, max_images: int = 1000,
                  seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``split``'s pixels in [0, 1], as a model of ``input_size`` (C, H, W) sees them
    (converted to 'L' / 'RGB', resized), from a seeded sample of at most ``max_images`` images, rounded to 4 places.

    For the paper's small networks, which have no normalisation layer, inputs of zero mean and unit variance keep
    the random weights' activations at the scale their distribution assumes; CIFAR's statistics are far off for,
    e.g., Fashion-MNIST.
    """
    split_ds, decoder = _undecoded(ds.splits[_check_split(ds, split)], ds.image_column)
    channels, height, width = (int(v) for v in input_size)
    to_tensor = T.Compose([ConvertMode("L" if channels == 1 else "RGB"), EnsureSize((height, width)), T.ToTensor()])
    if isinstance(split_ds, datasets.IterableDataset):
        rows = (example[ds.image_column] for example in split_ds.take(max_images))
    else:
        n = len(split_ds)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].tolist()
        rows = (split_ds[i][ds.image_column] for i in sorted(order))
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for value in rows:
        pixels = to_tensor(_to_pil(value, decoder)).to(torch.float64).flatten(1)
        total += pixels.sum(1)
        total_sq += pixels.square().sum(1)
        count += pixels.shape[1]
    if count == 0:
        raise DataError(f"split {split!r} of dataset {ds.source!r} is empty")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(max(float(v), 1e-3), 4) for v in std)


# ---------------------------------------------------------------------------------------------- built-in datasets

#: Built-in names: each is read from a local source when there is one, else from this Hub id (also its card name).
BUILTIN_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}


def default_cache_dir() -> Path:
    """Where built-in datasets are converted to: ``$TIMM_POPUP_CACHE``, else ``$XDG_CACHE_HOME/timm-popup``."""
    if os.environ.get("TIMM_POPUP_CACHE"):
        return Path(os.environ["TIMM_POPUP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "timm-popup"


def _fashion_mnist_installed(idx_dir: Path) -> bool:
    return all(_find_idx_file(idx_dir, stem) is not None for pair in _FASHION_MNIST_FILES.values() for stem in pair)


def resolve_dataset(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                    notify: Callable[[str], None] | None = None, idx_dir: str | os.PathLike | None = None) -> str:
    """What to pass to ``load_image_dataset`` for ``name_or_path``.

    A built-in name (``fashion-mnist``) is Debian's ``dataset-fashion-mnist`` files (``idx_dir``, default
    ``/usr/share/datasets/fashion-mnist``) converted into ``cache_dir`` (default :func:`default_cache_dir`) on first
    use, or, where that package is not installed, the same data from the Hub (``zalando-datasets/fashion_mnist``,
    same train/test splits); ``notify`` is told which source is used. An existing local path of that name wins.
    Anything else is returned unchanged. Concurrent first uses are safe (the conversion is written to a temp dir and
    renamed), but let one process go first to avoid converting twice.
    """
    name = os.fspath(name_or_path)
    if name not in BUILTIN_DATASETS or Path(name).exists():
        return name
    say = notify or logger.info
    source = Path(idx_dir).expanduser() if idx_dir is not None else Path(FASHION_MNIST_APT_DIR)
    if not _fashion_mnist_installed(source):
        say(f"{name}: Debian's dataset-fashion-mnist is not installed (no idx files in {source}); using the Hub "
            f"dataset {BUILTIN_DATASETS[name]}")
        return BUILTIN_DATASETS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = fashion_mnist_to_disk(cache / name, source)
    say(f"{name}: Debian's dataset-fashion-mnist ({source}), converted to {out}")
    return str(out)


def open_dataset(name_or_path: str | os.PathLike, *, split: str | Sequence[str] | None = None,
                 image_column: str | None = None, label_column: str | None = None, streaming: bool = False,
                 cache_dir: str | os.PathLike | None = None, notify: Callable[[str], None] | None = None,
                 ) -> ImageDataset:
    """:func:`load_image_dataset` of :func:`resolve_dataset`: what ``--dataset`` means everywhere it is taken."""
    name = os.fspath(name_or_path)
    source = resolve_dataset(name, cache_dir, notify=notify)
    try:
        return load_image_dataset(source, split=split, image_column=image_column, label_column=label_column,
                                  streaming=streaming, cache_dir=cache_dir)
    except DataError as e:
        if source == BUILTIN_DATASETS.get(name) and not Path(name).exists():
            raise DataError(f"{name}: Debian's dataset-fashion-mnist is not installed and the Hub copy could not be "
                            f"loaded ({e}); install it with `{FASHION_MNIST_APT_HINT}` (as root) or let the Hub be "
                            "reached") from e
        raise


# -------------------------------------------------------------------------------------------------------- transforms


Transform = Callable[[Image.Image], torch.Tensor]


class ConvertMode:
    """Convert a PIL image to ``mode`` ('L' or 'RGB') so any dataset feeds a 1- or 3-channel model."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class EnsureSize:
    """Resize only images whose size differs from ``(height, width)`` (e.g. 28x28 data into a 32x32 model)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        height, width = self.size
        return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BILINEAR)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _fit_stats(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)  # RGB statistics for a grayscale model: the average is the best guess
    raise DataError(f"data_config {what} has {len(values)} values but the model takes {channels} channels")


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation, with the meanings of timm ``train.py``'s flags of the same names.

    ``pad_crop`` is the paper's CIFAR crop (``RandomCrop(size, padding=pad_crop)``, small images only); ``scale`` /
    ``ratio`` set a ``RandomResizedCrop`` (``None``: none for small images, timm's (0.08, 1) for others); ``hflip`` /
    ``vflip`` are flip probabilities; ``aa`` a timm auto-augment policy (``rand-m9-mstd0.5``, ``augmix-m5``,
    ``v0``...); ``color_jitter`` the brightness/contrast/saturation factor (0: none); ``reprob`` the random-erasing
    probability (``remode``, ``recount``); ``mixup`` / ``cutmix`` the Beta(alpha, alpha) of timm's ``Mixup``
    (0: off), applied per batch by the training loop. ``Augmentation()`` is no augmentation at all.
    """

    pad_crop: int = 0
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    vflip: float = 0.0
    aa: str | None = None
    color_jitter: float = 0.0
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"

    def __post_init__(self) -> None:
        checks = [
            (self.pad_crop >= 0, f"--pad-crop must be >= 0 pixels, got {self.pad_crop}"),
            (self.scale is None or (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1),
             f"--scale takes MIN MAX with 0 < MIN <= MAX <= 1, got {self.scale}"),
            (len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1],
             f"--ratio takes MIN MAX with 0 < MIN <= MAX, got {self.ratio}"),
            (0 <= self.hflip <= 1, f"--hflip is a probability in [0, 1], got {self.hflip}"),
            (0 <= self.vflip <= 1, f"--vflip is a probability in [0, 1], got {self.vflip}"),
            (self.color_jitter >= 0, f"--color-jitter must be >= 0, got {self.color_jitter}"),
            (0 <= self.reprob <= 1, f"--reprob is a probability in [0, 1], got {self.reprob}"),
            (self.remode in ("const", "rand", "pixel"), f"--remode must be const, rand or pixel, got {self.remode!r}"),
            (self.recount >= 1, f"--recount must be at least 1, got {self.recount}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix are Beta alphas, >= 0"),
            (0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1,
             "--mixup-prob and --mixup-switch-prob are probabilities in [0, 1]"),
            (self.mixup_mode in ("batch", "pair", "elem"), f"--mixup-mode must be batch, pair or elem, got "
                                                          f"{self.mixup_mode!r}"),
            (self.aa is None or self.aa.startswith(("rand", "augmix", "v0", "original", "3a")),
             f"unknown --aa policy {self.aa!r}; use a timm policy such as rand-m9-mstd0.5, augmix-m5, v0 or original"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)

    @property
    def uses_mixup(self) -> bool:
        """Whether the training loop mixes batches (timm's ``Mixup``)."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def jitters(self) -> bool:
        """Whether colour jitter applies: as in timm, an auto-augment policy (other than 3-Augment) replaces it."""
        return bool(self.color_jitter) and not (self.aa and "3a" not in self.aa)

    def describe(self) -> str:
        """What is applied, e.g. ``pad-crop 4, hflip 0.5`` or ``none``; shown at start and in the card."""
        parts = []
        if self.pad_crop:
            parts.append(f"pad-crop {self.pad_crop}")
        if self.scale is not None:
            parts.append(f"random-resized-crop scale {_num(self.scale)} ratio {_num(self.ratio)}")
        parts += [f"{name} {_num(p)}" for name, p in (("hflip", self.hflip), ("vflip", self.vflip)) if p]
        if self.aa:
            parts.append(f"aa {self.aa}")
        if self.jitters:
            parts.append(f"color-jitter {_num(self.color_jitter)}")
        if self.reprob:
            parts.append(f"reprob {_num(self.reprob)} ({self.remode}, x{self.recount})")
        if self.mixup:
            parts.append(f"mixup {_num(self.mixup)}")
        if self.cutmix:
            parts.append(f"cutmix {_num(self.cutmix)}")
        if self.uses_mixup and (self.mixup_prob != 1 or self.mixup_mode != "batch"):
            parts.append(f"mixup-prob {_num(self.mixup_prob)} mode {self.mixup_mode}")
        return ", ".join(parts) or "none"


def _num(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_num(v) for v in value) + ")"
    return f"{value:.4g}"


def _auto_augment(policy: str, size: tuple[int, int], mean: tuple[float, ...]) -> Callable:
    """timm's auto-augment transform for ``policy``, with the parameters timm's own training transform uses."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    params: dict[str, Any] = dict(translate_const=int(min(size) * 0.45),
                                  img_mean=tuple(min(255, round(255 * x)) for x in mean))
    if policy.startswith("rand"):
        return rand_augment_transform(policy, params)
    if policy.startswith("augmix"):
        return augment_and_mix_transform(policy, dict(params, translate_pct=0.3))
    return auto_augment_transform(policy, params)


def build_transforms(data_config: dict, *, is_training: bool, cifar_style: bool,
                     augmentation: Augmentation | None = None) -> Transform:
    """PIL image -> normalized float tensor of shape ``data_config['input_size']``.

    Args:
        data_config: timm data config, e.g. ``timm.data.resolve_data_config({}, model=model)``; uses
            ``input_size`` (C, H, W), ``mean``, ``std`` and, for timm transforms, ``interpolation``/``crop_pct``/...
        is_training: apply ``augmentation`` (eval is always deterministic).
        cifar_style: for small 32x32/28x28 models: the image as it is (resized only if its size differs), then
            ``augmentation``'s pad-crop, resized crop, flips, auto-augment, colour jitter, ToTensor + Normalize and
            random erasing. Otherwise timm's ``create_transform`` with ``augmentation``'s settings (resize + center
            crop for eval).
        augmentation: what to apply when training; ``None`` means none (``Augmentation()``).

    Images are converted to 'L' or 'RGB' to match ``input_size[0]`` (1 or 3), so grayscale data trains an RGB model
    and vice versa.
    """
    aug = augmentation or Augmentation()
    input_size = tuple(data_config.get("input_size", (3, 224, 224)))
    if len(input_size) != 3:
        raise DataError(f"data_config input_size must be (channels, height, width), got {input_size}")
    channels, height, width = (int(v) for v in input_size)
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise DataError(f"models with {channels} input channels are not supported; expected 1 or 3")
    mean = _fit_stats(data_config.get("mean", timm.data.IMAGENET_DEFAULT_MEAN), channels, "mean")
    std = _fit_stats(data_config.get("std", timm.data.IMAGENET_DEFAULT_STD), channels, "std")
    convert = ConvertMode(modes[channels])
    if cifar_style:
        steps: list[Callable] = [convert, EnsureSize((height, width))]
        tail: list[Callable] = []
        if is_training:
            if aug.pad_crop:
                steps.append(T.RandomCrop((height, width), padding=aug.pad_crop))
            if aug.scale is not None:
                steps.append(T.RandomResizedCrop((height, width), scale=aug.scale, ratio=aug.ratio))
            steps += [flip(p) for flip, p in ((T.RandomHorizontalFlip, aug.hflip), (T.RandomVerticalFlip, aug.vflip))
                      if p]
            if aug.aa:
                steps.append(_auto_augment(aug.aa, (height, width), mean))
            if aug.jitters:
                steps.append(T.ColorJitter(*(aug.color_jitter,) * 3))
            if aug.reprob:
                from timm.data.random_erasing import RandomErasing

                tail.append(RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device="cpu"))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std), *tail])
    if is_training and aug.pad_crop:
        raise DataError(f"--pad-crop is the paper's crop for images of at most 32 pixels; this model takes "
                        f"{height}x{width}: use --scale / --ratio (timm's random resized crop) instead")
    accepted = inspect.signature(timm.data.create_transform).parameters
    config = {k: v for k, v in data_config.items() if k in accepted and k != "is_training"}
    config.update(input_size=(channels, height, width), mean=mean, std=std)
    if is_training:
        config.update(scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip, vflip=aug.vflip,
                      color_jitter=aug.color_jitter or None, auto_augment=aug.aa, re_prob=aug.reprob,
                      re_mode=aug.remode, re_count=aug.recount)
    return T.Compose([convert, timm.data.create_transform(**config, is_training=is_training)])


# ------------------------------------------------------------------------------------------------------ class names


def has_class_names(class_names: Sequence[str]) -> bool:
    """Whether ``class_names`` name the classes (not just ``"0"``, ``"1"``... made up for integer labels)."""
    return list(class_names) != [str(i) for i in range(len(class_names))]


def _name_key(name: str) -> str:
    # "T-shirt/top" (Debian's Fashion-MNIST) and "T - shirt / top" (the Hub's) name the same class
    return "".join(str(name).split()).casefold()


def label_mapping(dataset_names: Sequence[str], model_names: Sequence[str] | None, *,
                  what: str = "the model") -> list[int] | None:
    """For each of a dataset's classes, the output of a model trained with ``model_names`` that predicts it.

    ``None`` when no mapping is needed (the same names in the same order) or possible (either side has only
    integer ids: they are taken as they are). Names are matched ignoring case and spaces. Raises
    :class:`DataError` when the dataset has a class the model does not know.
    """
    if not model_names or not has_class_names(dataset_names) or not has_class_names(model_names):
        return None
    index = {_name_key(name): i for i, name in enumerate(model_names)}
    mapping = [index.get(_name_key(name), -1) for name in dataset_names]
    unknown = [name for name, i in zip(dataset_names, mapping, strict=True) if i < 0]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise DataError(f"the dataset's classes do not match {what}'s: {shown} not among its "
                        f"{len(model_names)} classes ({', '.join(repr(n) for n in list(model_names)[:5])}"
                        f"{', ...' if len(model_names) > 5 else ''}); evaluate on the dataset it was trained for")
    return None if mapping == list(range(len(mapping))) else mapping


# ----------------------------------------------------------------------------------------------------------- loaders


def _undecoded(split_ds: Any, column: str) -> tuple[Any, datasets.Image]:
    """``split_ds`` with its image ``column`` left undecoded ({"path", "bytes"}), and the feature that decodes it
    (its mode included), for :func:`_to_pil`: ``datasets`` decodes an Image feature with no word of which file
    failed (a truncated JPEG says only "image file is truncated"). Only the feature is cast; no data is rewritten."""
    feature = (split_ds.features or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return split_ds.cast_column(column, datasets.Image(mode=feature.mode, decode=False)), feature
    return split_ds, datasets.Image()


def _decode_image(value: dict[str, Any], decoder: datasets.Image) -> Image.Image:
    """An undecoded ``datasets.Image`` value, opened and its pixels read by ``decoder`` (``datasets``' own: local
    files, remote paths, embedded bytes); a file that cannot be read is an :class:`UnreadableImageError` naming it."""
    try:
        return decoder.decode_example(value)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL raises on bad files
        where = value.get("path") or "an image stored in the dataset (no file name recorded)"
        raise UnreadableImageError(f"cannot read image {where} ({_one_line(e)}): remove or replace it") from e


def _to_pil(value: Any, decoder: datasets.Image | None = None) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # undecoded datasets.Image value
        return _decode_image(value, decoder or datasets.Image())
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW arrays (pixel_values columns) -> HWC for PIL
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


class _BatchTransform:
    """``with_transform`` hook: decode + transform only the two used columns, lazily, per fetched batch."""

    def __init__(self, image_column: str, label_column: str, transform: Callable,
                 label_map: Sequence[int] | None = None, decoder: datasets.Image | None = None) -> None:
        self.image_column, self.label_column, self.transform = image_column, label_column, transform
        self.label_map, self.decoder = label_map, decoder

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"image": [self.transform(_to_pil(v, self.decoder)) for v in batch[self.image_column]],
                "label": [_map_label(int(v), self.label_map) for v in batch[self.label_column]]}


def _map_label(label: int, label_map: Sequence[int] | None) -> int:
    return label if label_map is None or label < 0 else label_map[label]


def _example_seed(seed: int, epoch: int, *key: int) -> int:
    """The seed of one example's augmentation: a function of (seed, epoch, where the example is), nothing else."""
    digest = hashlib.blake2b(repr((seed, epoch, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _seed_draws(value: int) -> None:
    # the three generators timm's and torchvision's transforms draw from; CUDA's is left alone
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value)


@contextlib.contextmanager
def _restored_draws(restore: bool) -> Iterator[None]:
    """Put the process's generators back afterwards (in the training process itself, where dropout and mixup draw
    from them too); a loader worker has no other use for them."""
    if not restore:
        yield
        return
    state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.default_generator.set_state(state[2])


class _SeededImages(torch.utils.data.Dataset):
    """A map-style split whose example ``i`` in epoch ``e`` is augmented with draws seeded by (seed, e, i).

    So an example's augmentation does not depend on which worker transforms it, how many came before it or whether
    the first batches of the epoch were skipped: a run resumed mid-epoch (``skip_first_batches``) draws what the
    uninterrupted run drew, with any number of workers, and no worker's generator state needs saving.
    """

    def __init__(self, rows: datasets.Dataset, image_column: str, label_column: str, transform: Callable,
                 label_map: Sequence[int] | None, decoder: datasets.Image, seed: int) -> None:
        self.rows, self.transform, self.label_map, self.decoder, self.seed = rows, transform, label_map, decoder, seed
        self.image_column, self.label_column, self.epoch = image_column, label_column, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        batch = self.rows[list(indices)]
        out = []
        with _restored_draws(torch.utils.data.get_worker_info() is None):
            for index, value, label in zip(indices, batch[self.image_column], batch[self.label_column], strict=True):
                _seed_draws(_example_seed(self.seed, self.epoch, int(index)))
                out.append({"image": self.transform(_to_pil(value, self.decoder)),
                            "label": _map_label(int(label), self.label_map)})
        return out


_SKIPPED = {"image": None, "label": -1}


class _StreamingImages(torch.utils.data.IterableDataset):
    """Transforms a streamed ``datasets.IterableDataset`` example by example.

    Iterating the wrapped dataset inside each DataLoader worker lets ``datasets`` give every worker its own shards;
    ``set_epoch`` is forwarded so Accelerate's per-epoch call reshuffles the stream (seed + epoch). With ``seed``,
    example ``j`` of worker ``w`` of shard ``shard`` is augmented with draws seeded by (seed, epoch, shard, w, j).
    ``resume_at(batches, batch_size)`` makes the next pass start after the first ``batches`` batches this process
    read: every worker reads its part of them again (the stream, and its shuffle buffer, have no other way to reach
    that position exactly) but decodes nothing, and yields an empty batch in place of each (``_collate``), so the
    workers take turns exactly as before. Exact when the workers' parts of the stream last at least that far.
    """

    def __init__(self, stream: datasets.IterableDataset, image_column: str, label_column: str,
                 transform: Callable, label_map: Sequence[int] | None = None,
                 decoder: datasets.Image | None = None, seed: int | None = None, shard: int = 0) -> None:
        super().__init__()
        self.stream, self.transform, self.label_map, self.decoder = stream, transform, label_map, decoder
        self.image_column, self.label_column = image_column, label_column
        self.seed, self.shard, self.epoch, self.skip, self.batch_size = seed, shard, 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)
        self.epoch, self.skip = epoch, 0

    def resume_at(self, batches: int, batch_size: int) -> None:
        self.skip, self.batch_size = batches, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # datasets gives worker w the shards w, w + workers, ...: with fewer shards than workers some get none, and
        # the DataLoader takes batches in turn from the others
        active = max(1, min(workers, self.stream.num_shards))
        skipped = len(range(worker, self.skip, active)) * self.batch_size
        for j, example in enumerate(self.stream):
            if j < skipped:
                yield _SKIPPED
                continue
            with _restored_draws(info is None):
                if self.seed is not None:
                    _seed_draws(_example_seed(self.seed, self.epoch, self.shard, worker, j))
                image = self.transform(_to_pil(example[self.image_column], self.decoder))
            yield {"image": image, "label": _map_label(int(example[self.label_column]), self.label_map)}


def _leave_stopping_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM, SIGUSR1 and SIGINT: schedulers and launchers signal a whole process tree,
    and the training process, which stops on them after a checkpoint, ends its workers itself (they also end when
    it dies). The disposition is the process's, so no thread of the worker is left to die of it (torch starts
    threads before ``worker_init_fn`` runs, so a signal mask set here would not cover them)."""
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _end_workers_at_exit() -> None:
    """Kill this process's DataLoader workers that are still alive. multiprocessing ends daemonic children at exit
    with SIGTERM and then waits for them: workers that ignore SIGTERM (a loader nobody closed, e.g. after an error)
    would hang the exit. Registered after multiprocessing's own exit function, so it runs before it."""
    for child in multiprocessing.active_children():
        try:
            worker = Path(f"/proc/{child.pid}/comm").read_text().strip() == "pt_data_worker"
        except OSError:
            worker = child.daemon  # no /proc: every daemonic child (the workers are)
        if worker:
            child.kill()
            child.join(timeout=5)


def _collate(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    if rows[0]["image"] is None:  # a batch skipped on resume: nothing to train on, only its place in the turn
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images = torch.stack([r["image"] for r in rows]).float()
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    return images, labels


def create_loader(ds: ImageDataset, split: str, transform: Callable, *, batch_size: int, shuffle: bool,
                  num_workers: int = 0, seed: int = 0, drop_last: bool = False, shuffle_buffer: int = 10_000,
                  pin_memory: bool = False, num_shards: int = 1, shard_index: int = 0,
                  label_map: Sequence[int] | None = None, seeded_draws: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over one split yielding ``(images float32 [B, C, H, W], labels int64 [B])``.

    Map-style splits decode and transform lazily via ``with_transform`` and shuffle with a ``torch.Generator`` seeded
    with ``seed``; streaming splits shuffle with a ``shuffle_buffer``-example buffer seeded with ``seed`` (call
    ``set_epoch`` on the dataset, or Accelerate's ``loader.set_epoch``, to vary the order per epoch). Worker seeds
    also derive from the generator, so with ``num_workers > 0`` the augmentation is reproducible too; with 0 workers
    it uses the global torch RNG (seed it, e.g. ``accelerate.utils.set_seed``).

    ``num_shards`` / ``shard_index`` keep one process's part of the split (contiguous rows of a map-style split; for a
    stream, whole shards when they divide evenly, else every ``num_shards``-th example), so that each of several
    processes reads and decodes only its own images. ``label_map[i]`` replaces label ``i`` (see :func:`label_mapping`).

    ``seeded_draws`` (training): each example's augmentation draws from generators seeded by (``seed``, the epoch
    ``set_epoch`` gave, the example's index or place in the stream), whichever worker or process transforms it, so a
    run resumed mid-epoch draws exactly what the uninterrupted one drew.
    """
    split_ds, decoder = _undecoded(ds.splits[_check_split(ds, split)], ds.image_column)
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is outside 0..{num_shards - 1}")
    generator = torch.Generator().manual_seed(seed)
    if num_workers:
        atexit.unregister(_end_workers_at_exit)  # once per process, whatever the number of loaders
        atexit.register(_end_workers_at_exit)
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=_collate, drop_last=drop_last,
                  generator=generator, pin_memory=pin_memory,
                  worker_init_fn=_leave_stopping_to_the_trainer if num_workers else None)
    if isinstance(split_ds, datasets.IterableDataset):
        if num_shards > 1:
            from datasets.distributed import split_dataset_by_node

            split_ds = split_dataset_by_node(split_ds, rank=shard_index, world_size=num_shards)
        stream = split_ds.select_columns([ds.image_column, ds.label_column])
        if shuffle:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        return torch.utils.data.DataLoader(
            _StreamingImages(stream, ds.image_column, ds.label_column, transform, label_map, decoder,
                             seed=seed if seeded_draws else None, shard=shard_index), **common)
    if num_shards > 1:
        split_ds = split_ds.shard(num_shards=num_shards, index=shard_index, contiguous=True)
    if seeded_draws:
        rows = split_ds.select_columns([ds.image_column, ds.label_column])
        return torch.utils.data.DataLoader(
            _SeededImages(rows, ds.image_column, ds.label_column, transform, label_map, decoder, seed),
            shuffle=shuffle, **common)
    mapped = split_ds.with_transform(_BatchTransform(ds.image_column, ds.label_column, transform, label_map,
                                                     decoder), columns=[ds.image_column, ds.label_column])
    return torch.utils.data.DataLoader(mapped, shuffle=shuffle, **common)


# ------------------------------------------------------------------------------------------------------ Fashion-MNIST


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != magic:
        found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
        raise DataError(f"{path} is not an idx file with magic {magic} (found {found})")
    ndim = magic & 0xFF  # low byte = number of dimensions, next byte 0x08 = unsigned bytes
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: its idx header is incomplete")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    if array.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {array.size} bytes of data but its header says {dims}")
    return array.reshape(dims)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _fashion_mnist_split(directory: Path, images_stem: str, labels_stem: str) -> datasets.Dataset:
    images = _read_idx(_find_idx_file(directory, images_stem), _IDX_IMAGES_MAGIC)
    labels = _read_idx(_find_idx_file(directory, labels_stem), _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{images_stem} has {len(images)} images but {labels_stem} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_stem} holds label {int(labels.max())}; Fashion-MNIST labels are 0-9")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=list(FASHION_MNIST_CLASSES))})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": _png_bytes(img), "path": None} for img in images], "label": labels.tolist()},
        features=features)


def fashion_mnist_to_disk(out_dir: str | os.PathLike, idx_dir: str | os.PathLike | None = None, *,
                          overwrite: bool = False) -> Path:
    """Convert Fashion-MNIST idx files into a ``save_to_disk`` ``DatasetDict`` (splits train/test).

    Args:
        out_dir: destination directory; written atomically (temp dir next to it, then renamed). If it already holds
            a saved dataset it is returned unchanged unless ``overwrite``.
        idx_dir: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; default: where Debian's
            ``dataset-fashion-mnist`` package puts them (``/usr/share/datasets/fashion-mnist``).
        overwrite: replace an existing dataset at ``out_dir``.

    Returns:
        The resolved ``out_dir``, loadable with ``load_image_dataset`` (columns ``image``, ``label`` (ClassLabel)).
    """
    out = Path(out_dir).expanduser().resolve()
    source = Path(idx_dir).expanduser() if idx_dir is not None else Path(FASHION_MNIST_APT_DIR)
    stems = [stem for pair in _FASHION_MNIST_FILES.values() for stem in pair]
    missing = [stem for stem in stems if _find_idx_file(source, stem) is None]
    if missing:
        raise DataError(f"Fashion-MNIST idx files not found in {source} (missing {', '.join(missing)}[.gz]); install "
                        f"them with `{FASHION_MNIST_APT_HINT}` or pass the directory holding them")
    if out.exists() and not overwrite:
        if (out / "dataset_dict.json").is_file():
            logger.info("%s already holds a saved dataset; not converting again", out)
            return out
        if out.is_file() or any(out.iterdir()):
            raise DataError(f"{out} exists and is not a saved dataset; remove it or choose another output directory")
    dataset = datasets.DatasetDict({split: _fashion_mnist_split(source, *files)
                                    for split, files in _FASHION_MNIST_FILES.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the renamed result should look like a plain mkdir
    old = None
    try:
        dataset.save_to_disk(str(staging))
        if out.exists():
            # rename() cannot replace a non-empty directory: move the old one aside so the swap is two renames.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "dataset")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and (old / "dataset").exists() and not out.exists():
            os.rename(old / "dataset", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m timm_popup.data fashion-mnist OUT_DIR`` / ``python -m timm_popup.data inspect NAME_OR_PATH``."""
    parser = argparse.ArgumentParser(prog="python -m timm_popup.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fmnist = commands.add_parser("fashion-mnist", help="convert Debian's Fashion-MNIST idx files to save_to_disk")
    fmnist.add_argument("out_dir")
    fmnist.add_argument("--idx-dir", default=None, help=f"idx file directory (default {FASHION_MNIST_APT_DIR})")
    fmnist.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    show = commands.add_parser("inspect", help="load a dataset and print what was detected")
    show.add_argument("name_or_path")
    show.add_argument("--split", default=None)
    show.add_argument("--image-column", default=None)
    show.add_argument("--label-column", default=None)
    show.add_argument("--streaming", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "fashion-mnist":
            path = fashion_mnist_to_disk(args.out_dir, args.idx_dir, overwrite=args.overwrite)
            print(load_image_dataset(path).describe())
        else:
            print(load_image_dataset(args.name_or_path, split=args.split, image_column=args.image_column,
                                     label_column=args.label_column, streaming=args.streaming).describe())
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
