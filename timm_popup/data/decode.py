"""Images as a dataset stores them (a PIL image, an undecoded ``datasets.Image`` value: bytes or a path, an array)
-> pixels, with the file named when it cannot be read."""

from __future__ import annotations

import ctypes
import functools
import io
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from .. import clib
from .errors import UnreadableImageError, one_line

__all__ = ["undecoded", "to_pil", "Encoded", "read_encoded", "Box", "reduction", "region_decoder", "decode_cpu",
           "decode_on"]

#: a crop box in pixels: top, left, height, width
Box = tuple[int, int, int, int]


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
        raise _unreadable(_where(value), e) from e


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


# ----------------------------------------------------------------------- encoded bytes -> uint8 tensors (C, H, W)

@dataclass(frozen=True)
class Encoded:
    """An image as stored: its file's bytes as a uint8 tensor (shared with the worker that read them, not
    copied), where it came from (for messages), and its size and mode read from the header."""

    data: torch.Tensor
    where: str
    width: int
    height: int
    mode: str
    format: str | None  # as Pillow names it from the header ("JPEG", "PNG", ...)

    @property
    def is_jpeg(self) -> bool:
        return self.format == "JPEG"

    @property
    def libjpeg_reads(self) -> bool:
        """An RGB or grey JPEG: what libjpeg's decoders (torchvision's, nvJPEG, the region decoder) take; CMYK and
        the rest go to Pillow."""
        return self.is_jpeg and self.mode in ("RGB", "L")


def _where(value: Any) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    return str(path) if path else "an image stored in the dataset (no file name recorded)"


def _unreadable(where: str, e: BaseException) -> UnreadableImageError:
    return UnreadableImageError(f"cannot read image {where} ({one_line(e)}): remove or replace it")


def read_encoded(value: Any) -> Encoded | None:
    """``value`` (an undecoded ``datasets.Image`` value or a local path) as its encoded bytes and header; None for
    what has no bytes here to read (a decoded image, an array, a remote path: :func:`to_pil` reads those)."""
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
    elif isinstance(value, (dict, str, os.PathLike)):
        path = value.get("path") if isinstance(value, dict) else value
        if not path or "://" in str(path):
            return None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _unreadable(str(path), e) from e
    else:
        return None
    where = _where(value)
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: no pixel is decoded
            width, height, mode, fmt = image.width, image.height, image.mode, image.format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _unreadable(where, e) from e
    return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), where, width, height, mode, fmt)


def reduction(box: Box | None, size: tuple[int, int]) -> int:
    """The DCT reduction (1, 2, 4 or 8) a JPEG may be decoded at for a crop of ``box`` resized to ``size``: the largest
    that leaves the decoded crop at least twice the output on both sides, so the antialiased resize still filters
    over two or more pixels (decoded smaller, the box filter of the DCT scaling would show: 8 levels of 255 on
    average against a full decode at 1.9x, 0.4 at 3.7x, on tests/test_pipeline.py's high-frequency images)."""
    if box is None:
        return 1
    height, width = box[2:]
    scale = 1
    while scale < 8 and height >= 4 * scale * size[0] and width >= 4 * scale * size[1]:
        scale *= 2
    return scale


_REGION_OK = 0  # jpeg_region_decode's status for a decoded region


@functools.cache
def region_decoder() -> tuple[ctypes.CDLL | None, str]:
    """``csrc/jpeg_region.c`` (a JPEG's region decoded alone with the system's libjpeg-turbo), compiled on first use
    and loaded, or None and why not: ``TIMM_POPUP_NATIVE=0``, no C compiler, no libjpeg headers. Load it in the
    process that starts the loader's workers, so they inherit it instead of each compiling it."""
    if os.environ.get("TIMM_POPUP_NATIVE", "1") == "0":
        return None, "TIMM_POPUP_NATIVE=0"
    try:
        lib, _ = clib.load("jpeg_region.c", [(["-O2", "-fPIC", "-shared", "-std=c99"], ["-ljpeg"])])
        if lib.jpeg_region_version() != 1:
            raise RuntimeError("csrc/jpeg_region.c's interface is not version 1")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        return None, one_line(e)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.jpeg_region_decode.argtypes = [p, ctypes.c_ulong, i, i, i, i, i, i, p, ctypes.c_long, p]
    lib.jpeg_region_decode.restype = i
    return lib, "the system's libjpeg-turbo"


def _decode_region(image: Encoded, channels: int, box: Box, scale: int) -> torch.Tensor | None:
    """``box`` (in pixels of the image at 1/``scale``) of a JPEG, decoded alone: uint8 (``channels``, H, W), the
    pixels a full decode has there; None where the region decoder is not loaded or leaves the file to others
    (CMYK, data it cannot read: the full decoders name the file or read what they can)."""
    lib = region_decoder()[0]
    if lib is None or not image.libjpeg_reads:
        return None
    top, left, height, width = box
    out = torch.empty((height * width + 64) * channels, dtype=torch.uint8)
    message = ctypes.create_string_buffer(200)  # JMSG_LENGTH_MAX
    status = lib.jpeg_region_decode(image.data.data_ptr(), image.data.numel(), channels, scale, top, left, height,
                                    width, out.data_ptr(), out.numel(), message)
    if status != _REGION_OK:
        return None
    return out[:height * width * channels].view(height, width, channels).permute(2, 0, 1)


def _scaled(box: Box, source: tuple[int, int], decoded: tuple[int, int]) -> Box:
    """``box`` in the pixels of a decode of size ``decoded`` (height, width) of a ``source`` image, inside it."""
    fy, fx = source[0] / decoded[0], source[1] / decoded[1]
    top, left = min(round(box[0] / fy), decoded[0] - 1), min(round(box[1] / fx), decoded[1] - 1)
    height = max(1, min(round(box[2] / fy), decoded[0] - top))
    return top, left, height, max(1, min(round(box[3] / fx), decoded[1] - left))


def decode_cpu(image: Encoded, channels: int, box: Box | None = None, scale: int = 1
               ) -> tuple[torch.Tensor, Box | None]:
    """Decode on the CPU to uint8 (``channels``, H, W), and say where ``box`` (a crop in source pixels, if any) lies
    in the pixels returned. ``scale`` > 1: a JPEG at reduced DCT size (:func:`reduction`).

    Fastest first: with a box, a JPEG's region alone (:func:`region_decoder`: 0.8-0.9x of a full decode on
    ImageNet-size images and RandomResizedCrop's boxes, bench/loader.py's stages); else a full-size RGB or grey
    JPEG through torchvision's decoder (libjpeg-turbo straight into a tensor: 0.6-0.8x Pillow's time, which
    converts and copies); the rest through Pillow (its draft mode for a reduced JPEG)."""
    mode = "L" if channels == 1 else "RGB"
    if box is not None:
        decoded = (-(-image.height // scale), -(-image.width // scale))  # libjpeg rounds a scaled size up
        region = _scaled(box, (image.height, image.width), decoded)
        pixels = _decode_region(image, channels, region, scale)
        if pixels is not None:
            return pixels, (0, 0, region[2], region[3])
    if scale == 1 and image.libjpeg_reads:
        try:
            return decode_jpeg(image.data, mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB), box
        except RuntimeError:
            pass  # Pillow below reads what libjpeg's strict mode refuses, or names the file
    try:
        with Image.open(io.BytesIO(image.data.numpy().tobytes())) as pil:
            if scale > 1 and image.is_jpeg:  # draft picks the largest reduction that keeps at least this size
                pil.draft(mode, (image.width // scale, image.height // scale))
            pixels = pil_to_tensor(pil.convert(mode))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _unreadable(image.where, e) from e
    return pixels, None if box is None else _scaled(box, (image.height, image.width), tuple(pixels.shape[1:]))


def decode_on(images: Sequence[Encoded], channels: int, device: torch.device | str) -> list[torch.Tensor]:
    """Decode a batch where the model runs: the JPEGs in one call of torchvision's batched decoder (nvJPEG on a CUDA
    device), the rest (PNG, CMYK, what that decoder refuses) on the CPU and moved there; a file neither can read is
    an :class:`UnreadableImageError` naming it."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[torch.Tensor | None] = [None] * len(images)
    jpegs = [i for i, image in enumerate(images) if image.libjpeg_reads]
    if jpegs:
        try:
            decoded = decode_jpeg([images[i].data for i in jpegs], mode=mode, device=device)
        except RuntimeError:  # one bad file fails the batch: decode those one by one on the CPU below
            decoded = [None] * len(jpegs)
        for i, pixels in zip(jpegs, decoded, strict=True):
            out[i] = pixels
    for i, pixels in enumerate(out):
        if pixels is None:
            out[i] = decode_cpu(images[i], channels)[0].to(device, non_blocking=True)
    return out  # type: ignore[return-value]
