"""Image-classification datasets from Hugging Face ``datasets``: a Hub id, a ``save_to_disk`` directory or an image
folder, its image and label columns and train/eval splits found at load time (one-line ``DataError`` rather than
mid-training), the built-in Fashion-MNIST (Debian's idx files converted once, or the Hub's copy), class names."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .decode import to_pil, undecoded
from .errors import DataError, one_line
from .transforms import ConvertMode, EnsureSize

__all__ = [
    "ImageDataset", "load_image_dataset", "check_split", "fashion_mnist_to_disk", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_APT_DIR", "BUILTIN_DATASETS", "resolve_dataset", "open_dataset", "default_cache_dir", "peek_image",
    "channel_stats", "label_mapping", "has_class_names", "is_split_slice", "split_rows", "add_split_slice",
    "check_held_out", "main", "PREPARED_MANIFEST", "PREPARED_VERSION", "prepared",
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
    prepared: str | None = None  # how ``timm-popup prepare`` changed the images, for a dataset it wrote

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    def __getitem__(self, split: str) -> Any:
        return self.splits[check_split(self, split)]

    def describe(self) -> str:
        """One-line summary, for logs."""
        sizes = ", ".join(f"{s}={'?' if n is None else n}" for s, n in self.num_rows.items())
        return (f"{self.source}: splits [{sizes}], train={self.train_split!r}, eval={self.eval_split!r}, "
                f"image={self.image_column!r}, label={self.label_column!r}, {self.num_classes} classes"
                f"{' (streaming)' if self.streaming else ''}{'; ' + self.prepared if self.prepared else ''}")


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
            f"cannot be reached ({one_line(exc)}); check the id and your network/HF_HUB_OFFLINE, or pass a local path")
    return DataError(f"could not load dataset {name!r}: {one_line(exc)}")


#: the file ``timm-popup prepare`` (:mod:`timm_popup.data.prepare`) writes beside its shards, and its format
PREPARED_MANIFEST, PREPARED_VERSION = "timm_popup_prepare.json", "timm-popup prepare 1"


def prepared(path: Path) -> str | None:
    """How ``timm-popup prepare`` made the dataset at ``path`` (one line for the run's config and card), None where
    it did not; an unfinished preparation is an error (its missing shards would be missing data)."""
    manifest = path / PREPARED_MANIFEST
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
        line = (f"images re-encoded by timm-popup prepare at a maximum side of {int(info['max_side'])} px "
                f"(JPEG quality {int(info['quality'])}) from {info['source']}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{manifest} cannot be read ({one_line(e)}): prepare the dataset again") from e
    if info.get("format") != PREPARED_VERSION:
        raise DataError(f"{manifest} is of format {info.get('format')!r}, not {PREPARED_VERSION!r}: prepare the "
                        "dataset again with this timm-popup")
    if info.get("complete") is not True:
        raise DataError(f"{path} is an unfinished timm-popup prepare: run the same `timm-popup prepare` command "
                        "again to finish it")
    return line


def _load_local(path: Path, streaming: bool, cache_dir: str | None) -> dict[str, Any]:
    if path.is_dir() and ((path / "dataset_dict.json").is_file()
                          or ((path / "dataset_info.json").is_file() and (path / "state.json").is_file())):
        try:
            loaded = _as_split_dict(datasets.load_from_disk(str(path)))
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path} looks like a save_to_disk dataset but cannot be read: {one_line(e)}") from e
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
        raise DataError(f"could not load local dataset {path}: {one_line(e)}") from e


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
            logger.debug("could not list the splits of %s early: %s", name, one_line(e))
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
                        f"'train[:1000]' or 'train+validation' ({one_line(e)})") from e
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


def check_split(ds: ImageDataset, split: str) -> str:
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
    local, how = Path(source).expanduser(), None
    if local.exists():
        how = prepared(local) if local.is_dir() else None
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
                        num_rows={s: sliced.get(s, _num_rows(s, d)) for s, d in splits.items()}, prepared=how)


def _num_rows(split: str, split_ds: Any) -> int | None:
    if isinstance(split_ds, datasets.Dataset):
        return len(split_ds)
    info_splits = split_ds.info.splits if split_ds.info is not None else None
    if info_splits and split in info_splits and info_splits[split].num_examples:
        return int(info_splits[split].num_examples)
    return None


def peek_image(ds: ImageDataset, split: str) -> Image.Image:
    """The first image of ``split`` as a PIL image (its size and mode tell a small model what to expect)."""
    split_ds, decoder = undecoded(ds.splits[check_split(ds, split)], ds.image_column)
    if isinstance(split_ds, datasets.IterableDataset):
        first = next(iter(split_ds.take(1)), None)
    else:
        first = split_ds[0] if len(split_ds) else None
    if first is None:
        raise DataError(f"split {split!r} of dataset {ds.source!r} is empty")
    return to_pil(first[ds.image_column], decoder)


def channel_stats(ds: ImageDataset, split: str, input_size: Sequence[int], *, max_images: int = 1000,
                  seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``split``'s pixels in [0, 1], as a model of ``input_size`` (C, H, W) sees them
    (converted to 'L' / 'RGB', resized), from a seeded sample of at most ``max_images`` images, rounded to 4 places.

    For the paper's small networks, which have no normalisation layer, inputs of zero mean and unit variance keep
    the random weights' activations at the scale their distribution assumes; CIFAR's statistics are far off for,
    e.g., Fashion-MNIST.
    """
    split_ds, decoder = undecoded(ds.splits[check_split(ds, split)], ds.image_column)
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
        pixels = to_tensor(to_pil(value, decoder)).to(torch.float64).flatten(1)
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
    parser = argparse.ArgumentParser(prog="python -m timm_popup.data",
                                     description="Image-classification datasets for timm-popup.")
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
