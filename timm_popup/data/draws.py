"""The per-example draws of the augmentation: seeded by (seed, epoch, the example's place) alone, so which worker
or process transforms an example, and whether the epoch was resumed, changes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T

from .transforms import ConvertMode, EnsureSize

__all__ = ["example_seed", "seed_draws", "restored_draws", "Draw", "Program", "program_of"]


def example_seed(seed: int, epoch: int, *key: int) -> int:
    """The seed of one example's augmentation: a function of (seed, epoch, where the example is), nothing else."""
    digest = hashlib.blake2b(repr((seed, epoch, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_draws(value: int) -> None:
    # the three generators timm's and torchvision's transforms draw from; CUDA's is left alone
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value)


@contextlib.contextmanager
def restored_draws(restore: bool) -> Iterator[None]:
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


# ------------------------------------------------------------------- the tensor pipeline's program and its draws

#: a row of ops.JITTER_COLUMNS that changes nothing
NO_JITTER = (0.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Draw:
    """One example's augmentation, drawn before any pixel is decoded: what the reference transform draws for it."""

    box: tuple[int, int, int, int] | None  # (top, left, height, width) of the random resized crop; None: evaluation
    interpolation: str
    hflip: bool = False
    vflip: bool = False
    jitter: tuple[float, ...] = NO_JITTER


@dataclass(frozen=True)
class Program:
    """What a reference transform (:func:`timm_popup.data.transforms.build_transforms`, timm's ImageNet pipeline)
    does, in the form the tensor pipeline runs: made by :func:`program_of` from the transform's own steps, whose
    parameter draws it calls in the reference's order (so each example draws exactly what the PIL path draws)."""

    channels: int
    size: tuple[int, int]  # output (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    steps: tuple[Any, ...]  # the reference's random steps (crop, flips, jitter), in order
    resize: int | tuple[int, ...] | None = None  # evaluation: the resize before the centre crop
    interpolation: str = "bilinear"

    @property
    def training(self) -> bool:
        return self.resize is None

    @property
    def jitters(self) -> bool:
        return any(isinstance(step, T.ColorJitter) for step in self.steps)

    def draw(self, width: int, height: int) -> Draw:
        """Draw an example's parameters for a ``width`` x ``height`` source, from the process's generators (seeded
        for the example by :func:`seed_draws`), in the order and with the calls of the reference transform."""
        box, interpolation, hflip, vflip, jitter = None, self.interpolation, False, False, NO_JITTER
        shape = torch.empty((self.channels, height, width), device="meta")  # its size is all get_params reads
        for step in self.steps:
            if isinstance(step, RandomResizedCropAndInterpolation):
                box = tuple(int(v) for v in step.get_params(shape, step.scale, step.ratio))
                modes = step.interpolation
                interpolation = (random.choice(modes) if isinstance(modes, (list, tuple)) else modes).value
            elif isinstance(step, T.RandomHorizontalFlip):
                hflip = bool(torch.rand(1) < step.p)
            elif isinstance(step, T.RandomVerticalFlip):
                vflip = bool(torch.rand(1) < step.p)
            elif isinstance(step, T.ColorJitter):
                order, *factors = step.get_params(step.brightness, step.contrast, step.saturation, step.hue)
                jitter = (*(float(i) for i in order.tolist()), *(1.0 if f is None else float(f) for f in factors[:3]))
        return Draw(box, interpolation, hflip, vflip, jitter)


def _flat(transform: Any) -> list[Any]:
    return [s for t in transform.transforms for s in _flat(t)] if isinstance(transform, T.Compose) else [transform]


def program_of(transform: Any) -> tuple[Program | None, str]:
    """The :class:`Program` of a reference transform, or None and why it has none (a step with no tensor form here:
    auto-augment, random erasing, the small-image pipeline's pad-and-crop ...)."""
    channels, size, mean, std, resize, steps, interpolation = 3, None, None, None, None, [], "bilinear"
    for step in _flat(transform):
        if isinstance(step, ConvertMode):
            channels = 1 if step.mode == "L" else 3
        elif isinstance(step, EnsureSize):
            return None, "the small-image transforms (inputs of at most 32 px, fed as they are), cheap in Pillow"
        elif isinstance(step, RandomResizedCropAndInterpolation):
            size, steps = tuple(step.size), [*steps, step]
        elif isinstance(step, (T.RandomHorizontalFlip, T.RandomVerticalFlip)):
            steps.append(step)
        elif isinstance(step, T.ColorJitter) and step.hue is None:
            steps.append(step)
        elif isinstance(step, T.Resize) and resize is None and not steps and step.max_size is None:
            resize, interpolation = step.size, step.interpolation.value
        elif isinstance(step, T.CenterCrop) and resize is not None:
            size = tuple(step.size)
        elif isinstance(step, (MaybeToTensor, T.ToTensor)):
            continue
        elif isinstance(step, T.Normalize):
            mean, std = tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
        else:
            return None, f"{type(step).__name__} has no tensor form here"
    if size is None or mean is None or (resize is None) == (not steps):
        return None, "not timm's resized-crop (training) or resize + centre crop (evaluation) pipeline"
    resize = resize if resize is None or isinstance(resize, int) else tuple(resize)
    return Program(channels, size, mean, std, tuple(steps), resize, interpolation), ""
