"""The one builder behind every popup_* registry entry: timm's build_model_with_cfg + convert."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from timm.models import build_model_with_cfg
from torch import nn

from ..convert import convert
from ..init import DEFAULT_WEIGHT_INIT

__all__ = ["build_popup", "popup_cfg", "CIFAR_K", "IMAGENET_K"]

CIFAR_K = 0.5  # the paper's default for its CIFAR-10 networks
IMAGENET_K = 0.3  # the paper's ImageNet setting (Table 2, Figure 8)

_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def popup_cfg(url: str = "", *, cifar: bool = False, **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg; ``cifar`` gives the 32x32, 10-class defaults of the paper's small nets."""
    cfg = dict(url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
               interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv="conv1", classifier="fc", license="apache-2.0")
    if cifar:
        cfg.update(num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                   mean=_CIFAR_MEAN, std=_CIFAR_STD)
    cfg.update(kwargs)
    return cfg


def build_popup(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    *,
    k: float,
    weight_init: str = DEFAULT_WEIGHT_INIT,
    seed: int = 0,
    dense: Sequence[str] = (),
    **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls(**kwargs)`` through timm's builder and convert it to edge-popup.

    The conversion happens inside the class timm instantiates, so timm's pretrained loading and
    features_only wrapping see the popup model.
    """

    def popup_model_cls(**model_kwargs: Any) -> nn.Module:
        return convert(model_cls(**model_kwargs), k=k, weight_init=weight_init, seed=seed, dense=dense)

    return build_model_with_cfg(popup_model_cls, variant, pretrained, **kwargs)
