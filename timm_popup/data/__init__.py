"""Image-classification data from Hugging Face ``datasets`` for the training scripts, in layers that import one way:

``errors`` (one-line errors) -> ``decode`` (stored images to pixels) -> ``transforms`` (the reference PIL pipelines
and the augmentation settings) -> ``sources`` (datasets, splits, columns, class names, Fashion-MNIST) -> ``prepare``
(``timm-popup prepare``: a dataset re-encoded at a maximum side) -> ``ops``
(the same transforms as tensor operations, on any device) -> ``draws`` (each example's seeded random
parameters, drawn as the reference transform draws them) -> ``pipeline`` (the tensor pipeline, its work split
between the workers and the training device: ``--decode``) -> ``loaders`` (seeded, sharded, resumable DataLoaders).

``python -m timm_popup.data fashion-mnist OUT`` converts Debian's ``dataset-fashion-mnist`` idx files into a
``save_to_disk`` dataset; ``python -m timm_popup.data inspect NAME`` prints what loading detects.
"""

from .errors import DataError, UnreadableImageError
from .loaders import create_loader
from .pipeline import DECODE_CHOICES, TensorBatch, TensorPipeline, choose_decode, finish_images
from .prepare import PrepareOptions, prepare_dataset
from .sources import (
    BUILTIN_DATASETS,
    FASHION_MNIST_APT_DIR,
    FASHION_MNIST_CLASSES,
    ImageDataset,
    add_split_slice,
    channel_stats,
    check_held_out,
    default_cache_dir,
    fashion_mnist_to_disk,
    has_class_names,
    is_split_slice,
    label_mapping,
    load_image_dataset,
    main,
    open_dataset,
    peek_image,
    resolve_dataset,
    split_rows,
)
from .transforms import Augmentation, build_transforms, fit_stats

__all__ = [
    "DataError", "ImageDataset", "load_image_dataset", "build_transforms", "create_loader", "fashion_mnist_to_disk",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_APT_DIR", "BUILTIN_DATASETS", "resolve_dataset", "open_dataset",
    "default_cache_dir", "peek_image", "channel_stats", "Augmentation", "label_mapping", "has_class_names",
    "UnreadableImageError", "is_split_slice", "split_rows", "add_split_slice", "check_held_out", "fit_stats", "main",
    "DECODE_CHOICES", "TensorBatch", "TensorPipeline", "choose_decode", "finish_images", "PrepareOptions",
    "prepare_dataset",
]
