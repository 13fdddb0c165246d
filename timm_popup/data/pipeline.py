"""The tensor pipeline: the reference transform's work on tensors, split between the loader's workers and the training
device.

Each example's parameters are drawn in the worker, from its seeded generators, exactly as the reference (PIL) path
draws them (:class:`~timm_popup.data.draws.Program`). Then, with ``decode="cpu"``, the worker decodes (a JPEG: only
its crop's region; at reduced DCT size where the crop is at least 4x the output), crops, resizes and flips, and hands
on uint8 pixels; with ``decode="gpu"`` it hands on the encoded bytes and the draws, and the training process decodes
the batch on its device (torchvision's batched decoder: nvJPEG on a GPU) and crops, resizes and flips there. Colour
jitter and normalisation always run on the training device, one batched pass (:func:`finish_images`), as timm's
prefetcher normalises: on a GPU they cost nothing a worker's core would notice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import torch
from torch.utils.data import default_collate
from torchvision.transforms.functional import pil_to_tensor

from .decode import Box, Encoded, decode_cpu, decode_on, read_encoded, reduction, region_decoder, to_pil
from .draws import Draw, Program, program_of
from .ops import flip, normalize, resize_center_crop, resized_crop
from .transforms import ConvertMode

__all__ = ["DECODE_CHOICES", "TensorPipeline", "TensorBatch", "choose_decode", "finish_images"]

#: ``--decode``: auto (the GPU when the run trains on one), cpu (workers decode), gpu (the training device decodes)
DECODE_CHOICES = ("auto", "cpu", "gpu")


def choose_decode(requested: str, transform: Any, *, device: torch.device | str, streaming: bool = False
                  ) -> tuple[TensorPipeline | None, str]:
    """Where images are decoded for ``transform`` (a reference transform of
    :func:`~timm_popup.data.transforms.build_transforms`): the tensor pipeline placed as ``requested`` says, or None
    where the reference path runs (a step with no tensor form, a streamed split), and a line saying which ran and
    why (the run's config and card record it)."""
    if requested not in DECODE_CHOICES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {requested!r}")
    cuda = torch.device(device).type == "cuda"
    if requested == "gpu" and not cuda:
        raise ValueError("--decode gpu decodes with nvJPEG on the training GPU, and this run computes on the CPU: "
                         "use --decode cpu or auto")
    program, why = program_of(transform)
    if program is None or streaming:
        reason = why if program is None else "a streamed split is read example by example"
        return None, f"pil (Pillow in the workers, the reference transforms: {reason})"
    on_device = requested == "gpu" or (requested == "auto" and cuda)
    if on_device:
        where = ("gpu (workers read the encoded bytes; torchvision's nvJPEG decoder and the transforms run on the "
                 "training GPU)")
    elif program.training:
        region, why = region_decoder()  # loaded here, before the workers start, so that they inherit it
        decoder = ("only each crop's region of a JPEG, with " + why if region is not None else
                   f"whole JPEGs with torchvision's decoder (the region decoder is unavailable: {why})")
        where = (f"cpu (workers decode {decoder}, at reduced DCT size where a crop is at least 4x the output, crop, "
                 "resize and flip; colour jitter and normalisation on the training device)")
    else:
        where = ("cpu (workers decode whole JPEGs with torchvision's decoder, resize and centre-crop; normalisation on "
                 "the training device)")
    return TensorPipeline(program, on_device, means_in_workers=not cuda), where + (
        "" if requested != "auto" else ", chosen by auto")


def _geometry(program: Program, pixels: torch.Tensor, draw: Draw, box: Box | None = None) -> torch.Tensor:
    """An example's crop, resize and flips; ``box``: its crop box in ``pixels`` (default: the draw's, in source
    pixels)."""
    if program.training:
        pixels = resized_crop(pixels, draw.box if box is None else box, program.size, draw.interpolation)
    else:
        pixels = resize_center_crop(pixels, program.resize, program.size, program.interpolation)
    return flip(pixels, draw.hflip, draw.vflip)


@dataclass(frozen=True)
class TensorPipeline:
    """The tensor pipeline of one :class:`Program`, placed: decoding in the workers or on the training device."""

    program: Program
    on_device: bool
    # the channel means colour jitter needs: taken by the workers for a CPU device (there the image is in cache; a
    # second pass over the batch would cost the training process more), by the device itself on a GPU (free there)
    means_in_workers: bool = True

    def example(self, value: Any, decoder: datasets.Image | None) -> dict[str, Any]:
        """The worker's half for one example (its generators already seeded for it): its draws, and its pixels
        (cpu) or encoded bytes (gpu). What has no bytes to read here (a decoded image, an array, a remote path) is
        decoded as the reference path decodes it and goes on as pixels."""
        program, encoded = self.program, read_encoded(value)
        if encoded is None:
            pil = ConvertMode("L" if program.channels == 1 else "RGB")(to_pil(value, decoder))
            draw = program.draw(pil.width, pil.height)
            pixels = _geometry(program, pil_to_tensor(pil), draw)
        else:
            draw = program.draw(encoded.width, encoded.height)
            if self.on_device:
                return {"image": encoded, "draw": draw}
            box = draw.box if program.training else None
            pixels, box = decode_cpu(encoded, program.channels, box,
                                     reduction(box, program.size) if encoded.is_jpeg else 1)
            pixels = _geometry(program, pixels, draw, box)
        if self.on_device or not program.jitters or not self.means_in_workers:
            return {"image": pixels, "draw": draw}
        # contrast's blend target: the channel means, taken here, where the pixels are still in the worker's cache
        means = pixels.permute(1, 2, 0).reshape(-1, pixels.shape[0]).float().mean(dim=0)
        return {"image": pixels, "draw": draw, "means": means}

    def collate(self, rows: Sequence[dict[str, Any]]) -> TensorBatch:
        """The batch: pixels stacked (by ``default_collate``: straight into shared memory in a worker), or the
        examples as they are where the device decodes some."""
        images, draws = [r["image"] for r in rows], tuple(r["draw"] for r in rows)
        if any(isinstance(i, Encoded) for i in images):
            return TensorBatch(images, draws, self.program)
        means = default_collate([r["means"] for r in rows]) if "means" in rows[0] else None
        # pixels as the resize leaves them, channels last: the device makes them planar as it converts to float
        pixels = default_collate([i.permute(1, 2, 0) for i in images]).permute(0, 3, 1, 2)
        return TensorBatch(pixels, draws, self.program, means)


@dataclass(frozen=True)
class TensorBatch:
    """A batch on its way to the model: uint8 pixels (B, C, H, W), or per example encoded bytes or pixels (the
    device decodes), with each example's draws (and, for colour jitter, the pixels' channel means). ``.to`` moves
    it (Accelerate calls it), :func:`finish_images` ends the pipeline on the device."""

    images: torch.Tensor | list[Encoded | torch.Tensor]
    draws: tuple[Draw, ...]
    program: Program
    means: torch.Tensor | None = None  # (B, C) channel means of the pixels, where the workers took them

    def __len__(self) -> int:
        return len(self.draws)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TensorBatch:
        if isinstance(self.images, torch.Tensor):
            means = None if self.means is None else self.means.to(device, non_blocking=non_blocking)
            return replace(self, images=self.images.to(device, non_blocking=non_blocking), means=means)
        return self  # decoded where the model runs (decode_on moves what the CPU decodes)

    def pin_memory(self) -> TensorBatch:
        if not isinstance(self.images, torch.Tensor):
            return self
        return replace(self, images=self.images.pin_memory(),
                       means=None if self.means is None else self.means.pin_memory())

    def finish(self, device: torch.device | str) -> torch.Tensor:
        """Float images (B, C, H, W) on ``device``, normalised: decoded, cropped and resized there first if they came
        encoded, then each example's colour jitter and the normalisation in one batched pass."""
        program = self.program
        if isinstance(self.images, torch.Tensor):  # the workers decoded them
            pixels = self.images.to(device, non_blocking=True)
        else:
            encoded = [i for i in self.images if isinstance(i, Encoded)]
            decoded = iter(decode_on(encoded, program.channels, device))
            pixels = torch.stack([
                _geometry(program, next(decoded), draw) if isinstance(image, Encoded) else image.to(device)
                for image, draw in zip(self.images, self.draws, strict=True)])
        jitter = torch.tensor([d.jitter for d in self.draws]) if program.jitters else None
        return normalize(pixels, program.mean, program.std, jitter, self.means)


def finish_images(images: torch.Tensor | TensorBatch, device: torch.device | str) -> torch.Tensor:
    """A loader's images as the model takes them on ``device``: float tensors moved, a :class:`TensorBatch`
    finished there."""
    if isinstance(images, TensorBatch):
        return images.finish(device)
    return images.to(device, non_blocking=True)
