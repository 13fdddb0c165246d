"""Images as a dataset stores them (a PIL image, an undecoded ``datasets.Image`` value: bytes or a path, an array)
-> pixels, with the file named when it cannot be read."""

from __future__ import annotations

import os
from typing import Any

import datasets
import numpy as np
from PIL import Image

from .errors import UnreadableImageError, one_line

__all__ = ["undecoded", "to_pil"]

def undecoded(split_ds: Any, column: str) -> tuple[Any, datasets.Image]:
    """``split_ds`` with its image ``column`` left undecoded ({"path", "bytes"}), and the feature that decodes it
    (its mode included), for :func:`to_pil`: ``datasets`` decodes an Image feature with no word of which file
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
        raise UnreadableImageError(f"cannot read image {where} ({one_line(e)}): remove or replace it") from e


def to_pil(value: Any, decoder: datasets.Image | None = None) -> Image.Image:
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
