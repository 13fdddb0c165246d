"""The reference transforms' pixel work as tensor operations, the same code on any device.

Geometry works on one uint8 image (C, H, W) at a time, because sources differ in size: crop, resize (antialiased, as
PIL's resampling is), flip; in a loader worker or on the training device. Photometry works on a whole uint8 batch
(B, C, H, W) on the training device: torchvision's ``ColorJitter`` with each example's own factors and order and the
normalisation to the model's mean and std, together one affine colour map per example, applied in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ["resized_crop", "resize_center_crop", "flip", "colour_maps", "normalize", "JITTER_COLUMNS"]

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


def resized_crop(image: torch.Tensor, box: Sequence[int], size: Sequence[int], interpolation: str) -> torch.Tensor:
    """``box`` (top, left, height, width, in ``image``'s pixels) of ``image`` resized to ``size`` (height, width):
    timm's RandomResizedCrop."""
    top, left, height, width = box
    return _resize(image[:, top:top + max(height, 1), left:left + max(width, 1)], size, interpolation)


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


def colour_maps(jitter: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's colour jitter as one affine colour map: matrices (B, C, C) and offsets (B, C), composed in
    each example's order from its factors (``jitter``: one :data:`JITTER_COLUMNS` row per example) and its image's
    channel means (``means``, (B, C), on the device the maps are wanted on: no host sync).

    Each of torchvision's three operations is affine in the pixel: brightness a blend with black, contrast with the
    mean grey of the image as it is at that point (the map so far applied to the image's means), saturation with
    the pixel's own grey. Hue (op 3) is never drawn here, and saturation leaves a grey image as it is."""
    b, n = means.shape
    dtype, device = means.dtype, means.device
    luma = torch.tensor(_LUMA if n == 3 else (1.0,), dtype=dtype, device=device)
    if device.type == "cuda" and not jitter.is_pinned():
        jitter = jitter.pin_memory()  # a copy from pageable memory would wait for the GPU's queue to drain
    jitter = jitter.to(device=device, dtype=dtype, non_blocking=True)
    order = jitter[:, :4].long()
    m = torch.eye(n, dtype=dtype, device=device).expand(b, n, n)
    t = torch.zeros(b, n, dtype=dtype, device=device)
    for j in range(4):
        op = order[:, j]
        saturation = (op == 2) & (n == 3)
        f = jitter[:, 4:7].gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1)
        f = torch.where((op == 3) | ((op == 2) & (n == 1)), torch.ones_like(f), f)
        grey_now = (torch.bmm(m, means.unsqueeze(2)).squeeze(2) + t) @ luma  # contrast's blend target
        grey_row = torch.einsum("k,bkc->bc", luma, m)  # saturation's: the pixel's grey, as a row of the map
        keep = (1 - f) * saturation
        m = f.view(b, 1, 1) * m + keep.view(b, 1, 1) * grey_row.unsqueeze(1)
        t = f.unsqueeze(1) * t + ((1 - f) * (op == 1) * grey_now + keep * (t @ luma)).unsqueeze(1)
    return m, t


#: images converted to float at a time: a chunk's float copy (4.8 MB at 224 px) is reused from the allocator and
#: read again while in cache, where one of a whole batch is faulted in page by page every batch (2x slower here)
_CHUNK = 8


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], jitter: torch.Tensor | None = None,
              means: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels (B, C, H, W) in [0, 255] (uint8 or float) -> float32 (x / 255 - mean) / std, after each example's
    colour jitter (``jitter``: one :data:`JITTER_COLUMNS` row per example, on the host; None or all factors 1: none)
    with ``means`` the pixels' channel means (B, C) if known (else taken here).

    Jitter and normalisation are one affine map per example, applied in one pass (``baddbmm``) and clamped once to
    the normalised image of [0, 255]: torchvision clamps after each jitter operation, and the two differ only where
    an intermediate value leaves that range."""
    scale = [1 / (255 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std, strict=True)]
    scales, shifts = torch.tensor(scale, device=x.device), torch.tensor(shift, device=x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    maps = None
    if jitter is not None and not bool((jitter[:, 4:7] == 1).all()):
        if means is None:
            means = torch.cat([x[i:i + _CHUNK].float().mean(dim=(2, 3)) for i in range(0, len(x), _CHUNK)])
        m, t = colour_maps(jitter, means.to(x.device, torch.float32))
        maps = m * scales.view(1, -1, 1), t * scales + shifts
    for i in range(0, len(x), _CHUNK):
        chunk, o = x[i:i + _CHUNK], out[i:i + _CHUNK]
        if maps is None:
            o.copy_(chunk).mul_(scales.view(1, -1, 1, 1)).add_(shifts.view(1, -1, 1, 1))
            continue
        chunk = chunk.to(torch.float32, memory_format=torch.contiguous_format)
        torch.baddbmm(maps[1][i:i + _CHUNK].unsqueeze(2), maps[0][i:i + _CHUNK], chunk.flatten(2), out=o.flatten(2))
        for c in range(x.shape[1]):
            o[:, c].clamp_(shift[c], 255 * scale[c] + shift[c])
    return out
