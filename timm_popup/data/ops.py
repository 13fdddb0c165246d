"""The reference transforms' pixel work as tensor operations, the same code on any device.

Geometry works on one uint8 image (C, H, W) at a time, because sources differ in size: crop, resize (antialiased, as
PIL's resampling is), flip. Photometry works on float pixels (B, C, H, W) in [0, 255]: torchvision's ``ColorJitter``
with each example's own factors and order, as one colour matrix per example, and normalisation to the model's mean
and std; a batch of one in a loader worker, a whole batch on the training device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ["resized_crop", "resize_center_crop", "flip", "color_jitter", "normalize",
           "JITTER_COLUMNS"]

#: interpolation names (timm's, as a Draw carries them) -> torchvision's modes
_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
          "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS, "box": InterpolationMode.BOX,
          "hamming": InterpolationMode.HAMMING}
#: one example's jitter as a row: the order of the four operations (torchvision's fn_idx; 3, hue, never applies
#: here), then the brightness, contrast and saturation factors (1.0: unchanged)
JITTER_COLUMNS = ("op0", "op1", "op2", "op3", "brightness", "contrast", "saturation")


def _resize(image: torch.Tensor, size: Sequence[int], interpolation: str) -> torch.Tensor:
    mode = _MODES[interpolation]
    if mode in (InterpolationMode.LANCZOS, InterpolationMode.BOX, InterpolationMode.HAMMING):
        mode = InterpolationMode.BICUBIC  # PIL-only filters: the nearest tensor one
    return F.resize(image, list(size), interpolation=mode, antialias=True)  # uint8 in, uint8 out


def resized_crop(image: torch.Tensor, box: Sequence[int], size: Sequence[int], interpolation: str,
                 scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """``box`` (top, left, height, width, in source pixels) of ``image`` resized to ``size`` (height, width):
    timm's RandomResizedCrop. ``scale``: ``image`` is that many times smaller than the source (vertically,
    horizontally: a JPEG decoded at reduced DCT size), so the box is too."""
    top, height = round(box[0] / scale[0]), round(box[2] / scale[0])
    left, width = round(box[1] / scale[1]), round(box[3] / scale[1])
    crop = image[:, top:top + max(height, 1), left:left + max(width, 1)]
    return _resize(crop, size, interpolation)


def resize_center_crop(image: torch.Tensor, resize: int | Sequence[int], size: Sequence[int],
                       interpolation: str) -> torch.Tensor:
    """timm's evaluation transform: the shorter side to ``resize`` (or both sides, given two), then the centre
    ``size`` (height, width)."""
    image = _resize(image, [resize] if isinstance(resize, int) else list(resize), interpolation)
    return F.center_crop(image, list(size))


def flip(image: torch.Tensor, horizontal: bool, vertical: bool) -> torch.Tensor:
    if horizontal:
        image = image.flip(-1)
    if vertical:
        image = image.flip(-2)
    return image


#: torchvision's grayscale weights (ITU-R 601-2 luma)
_LUMA = (0.2989, 0.587, 0.114)


def _colour_map(order: Sequence[int], factors: Sequence[float], means: Sequence[float]
                ) -> tuple[list[list[float]], list[float]]:
    """One example's jitter as a colour matrix and offset (plain floats: a few dozen operations, no tensor)."""
    n = len(means)
    luma = _LUMA if n == 3 else (1.0,)
    m = [[float(r == c) for c in range(n)] for r in range(n)]
    t = [0.0] * n
    for op in order:
        if op == 3:
            continue  # hue: never drawn here (Program takes ColorJitter without hue)
        f = factors[op]
        if op == 0:  # brightness: blend with black
            m, t = [[f * v for v in row] for row in m], [f * v for v in t]
        elif op == 1:  # contrast: blend with the mean grey of the image as it is at this point
            now = [sum(m[r][c] * means[c] for c in range(n)) + t[r] for r in range(n)]
            grey = sum(w * v for w, v in zip(luma, now, strict=True))
            m, t = [[f * v for v in row] for row in m], [f * v + (1 - f) * grey for v in t]
        elif op == 2 and n == 3:  # saturation: blend with the pixel's own grey
            grey_row = [sum(luma[k] * m[k][c] for k in range(3)) for c in range(3)]
            grey_t = sum(luma[k] * t[k] for k in range(3))
            m = [[f * m[r][c] + (1 - f) * grey_row[c] for c in range(3)] for r in range(3)]
            t = [f * t[r] + (1 - f) * grey_t for r in range(3)]
    return m, t


def color_jitter(x: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` (brightness, contrast, saturation) on float pixels (B, C, H, W) in [0, 255],
    each example with its own factors and order (``jitter``: one :data:`JITTER_COLUMNS` row per example).

    Each of the three operations is affine in the pixel (a blend with black, with the image's mean grey, with the
    pixel's grey), so an example's sequence is one colour matrix and offset, composed from its order, its factors
    and the image's channel means, and applied in one pass, clamped once to [0, 255] (torchvision clamps after each
    operation: the two differ only where an intermediate value leaves that range)."""
    rows = jitter.tolist()
    if all(row[4:] == [1.0, 1.0, 1.0] for row in rows):
        return x
    means = x.mean(dim=(2, 3)).tolist()  # one sync per batch, not per example
    maps = [_colour_map([int(v) for v in row[:4]], row[4:], mean) for row, mean in zip(rows, means, strict=True)]
    matrices = torch.tensor([m for m, _ in maps], dtype=x.dtype).to(x.device, non_blocking=True)
    offsets = torch.tensor([t for _, t in maps], dtype=x.dtype).to(x.device, non_blocking=True)
    out = torch.baddbmm(offsets.unsqueeze(2), matrices, x.flatten(2))
    return out.clamp_(0, 255).view_as(x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels in [0, 255] (uint8 or float) -> float32 (x / 255 - mean) / std, in place after the conversion."""
    scale = torch.tensor([1 / (255 * s) for s in std], device=x.device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=x.device).view(1, -1, 1, 1)
    return x.to(torch.float32, copy=True).mul_(scale).add_(shift)
