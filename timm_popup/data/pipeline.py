"""The tensor pipeline: the reference transform's work on tensors, split between the loader's workers and the training
device.

Each example's parameters are drawn in the worker, from its seeded generators, exactly as the reference (PIL) path
draws them (:class:`~timm_popup.data.draws.Program`). Then, with ``decode="cpu"``, the worker decodes (Pillow; a JPEG
whose crop is at least twice the output at reduced DCT size), crops, resizes and flips, and hands on uint8 pixels;
with ``decode="gpu"`` it hands on the encoded bytes and the draws, and the training process decodes the batch on its
device (torchvision's batched decoder: nvJPEG on a GPU) and crops, resizes, flips and jitters there. Normalisation
always runs on the training device, batched (:func:`finish_images`), as timm's prefetcher normalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import torch
from torchvision.transforms.functional import pil_to_tensor

from .decode import Encoded, decode_cpu, decode_on, read_encoded, reduction, to_pil
from .draws import Draw, Program, program_of
from .ops import color_jitter, flip, normalize, resize_center_crop, resized_crop
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
    where = ("gpu (workers read the encoded bytes; torchvision's nvJPEG decoder and the transforms run on the "
             "training GPU)" if on_device else
             "cpu (workers decode with libjpeg-turbo, at reduced DCT size where a crop is at least 4x the output, and "
             "transform; normalisation on the training device)")
    return TensorPipeline(program, on_device), where + ("" if requested != "auto" else ", chosen by auto")


def _geometry(program: Program, pixels: torch.Tensor, draw: Draw,
              scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    if program.training:
        pixels = resized_crop(pixels, draw.box, program.size, draw.interpolation, scale)
    else:
        pixels = resize_center_crop(pixels, program.resize, program.size, program.interpolation)
    return flip(pixels, draw.hflip, draw.vflip)


def _jittered(pixels: torch.Tensor, draws: Sequence[Draw]) -> torch.Tensor:
    """Float pixels (B, C, H, W) after each example's colour jitter."""
    return color_jitter(pixels.float(), torch.tensor([d.jitter for d in draws], dtype=torch.float64))


@dataclass(frozen=True)
class TensorPipeline:
    """The tensor pipeline of one :class:`Program`, placed: decoding in the workers or on the training device."""

    program: Program
    on_device: bool

    def example(self, value: Any, decoder: datasets.Image | None) -> dict[str, Any]:
        """The worker's half for one example (its generators already seeded for it): its draws, and its pixels
        (cpu) or encoded bytes (gpu). What has no bytes to read here (a decoded image, an array, a remote path) is
        decoded as the reference path decodes it and goes on as pixels."""
        program, encoded = self.program, read_encoded(value)
        if encoded is None:
            pil = ConvertMode("L" if program.channels == 1 else "RGB")(to_pil(value, decoder))
            pixels = pil_to_tensor(pil)
            draw = program.draw(pil.width, pil.height)
            return {"image": self._worker_pixels(_geometry(program, pixels, draw), draw), "draw": draw}
        draw = program.draw(encoded.width, encoded.height)
        if self.on_device:
            return {"image": encoded, "draw": draw}
        scale = reduction(draw.box, program.size) if encoded.is_jpeg and program.training else 1
        pixels, factors = decode_cpu(encoded, program.channels, scale)
        return {"image": self._worker_pixels(_geometry(program, pixels, draw, factors), draw), "draw": draw}

    def _worker_pixels(self, pixels: torch.Tensor, draw: Draw) -> torch.Tensor:
        """uint8 pixels the worker hands on: jittered here when it decodes (a few passes over one small image on
        a worker's core cost less than over the batch in the training process), left for the device otherwise."""
        if self.on_device or not self.program.training:
            return pixels
        return _jittered(pixels.unsqueeze(0), (draw,))[0].round_().to(torch.uint8)

    def collate(self, rows: Sequence[dict[str, Any]]) -> TensorBatch:
        images = [r["image"] for r in rows]
        stacked = not any(isinstance(i, Encoded) for i in images)
        return TensorBatch(torch.stack(images) if stacked else images, tuple(r["draw"] for r in rows), self.program)


@dataclass(frozen=True)
class TensorBatch:
    """A batch on its way to the model: uint8 pixels (B, C, H, W), or per example encoded bytes or pixels (the
    device decodes), with each example's draws. ``.to`` moves it (Accelerate calls it), :func:`finish_images` ends
    the pipeline on the device."""

    images: torch.Tensor | list[Encoded | torch.Tensor]
    draws: tuple[Draw, ...]
    program: Program

    def __len__(self) -> int:
        return len(self.draws)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TensorBatch:
        if isinstance(self.images, torch.Tensor):
            return replace(self, images=self.images.to(device, non_blocking=non_blocking))
        return self  # decoded where the model runs (decode_on moves what the CPU decodes)

    def pin_memory(self) -> TensorBatch:
        return replace(self, images=self.images.pin_memory()) if isinstance(self.images, torch.Tensor) else self

    def finish(self, device: torch.device | str) -> torch.Tensor:
        """Float images (B, C, H, W) on ``device``, normalised: decoded and cropped there first if they came
        encoded, then colour jitter and normalisation batched."""
        program = self.program
        if isinstance(self.images, torch.Tensor):  # the workers decoded and jittered
            return normalize(self.images.to(device, non_blocking=True), program.mean, program.std)
        encoded = [i for i in self.images if isinstance(i, Encoded)]
        decoded = iter(decode_on(encoded, program.channels, device))
        pixels = torch.stack([
            _geometry(program, next(decoded), draw) if isinstance(image, Encoded) else image.to(device)
            for image, draw in zip(self.images, self.draws, strict=True)])
        return normalize(_jittered(pixels, self.draws) if program.training else pixels, program.mean, program.std)


def finish_images(images: torch.Tensor | TensorBatch, device: torch.device | str) -> torch.Tensor:
    """A loader's images as the model takes them on ``device``: float tensors moved, a :class:`TensorBatch`
    finished there."""
    if isinstance(images, TensorBatch):
        return images.finish(device)
    return images.to(device, non_blocking=True)
