"""The reference transforms on PIL images: timm's ImageNet pipeline or the paper's CIFAR augmentation, converted to
the channel count the model expects, and the :class:`Augmentation` settings both pipelines read."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import timm.data
import torch
from PIL import Image
from torchvision import transforms as T

from .errors import DataError

__all__ = ["Augmentation", "ConvertMode", "EnsureSize", "Transform", "build_transforms", "fit_stats"]

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


def fit_stats(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
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
    mean = fit_stats(data_config.get("mean", timm.data.IMAGENET_DEFAULT_MEAN), channels, "mean")
    std = fit_stats(data_config.get("std", timm.data.IMAGENET_DEFAULT_STD), channels, "std")
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
