"""The paper's small networks: Conv2/4/6/8 (Table 1) and the official code's FC (LeNet-300-100)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.resources import files

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._builder import CIFAR_K, build_popup, popup_cfg

__all__ = ["ConvNet", "MLP"]


class ConvNet(nn.Module):
    """VGG-like conv stack (conv 3x3 + ReLU, max-pool after each pair), then FC 256, 256, classes.

    No BatchNorm, no biases (as in Frankle & Carbin, Zhou et al. and the paper). ``width`` scales every
    layer's channels and neurons (the paper's width multiplier, Figure 4).
    """

    def __init__(self, stages: Sequence[int], num_classes: int = 10, in_chans: int = 3,
                 img_size: int | Sequence[int] = 32, width: float = 1.0, hidden: int = 256,
                 drop_rate: float = 0.0, global_pool: str = "") -> None:
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        layers: list[nn.Module] = []
        chans = in_chans
        for stage in stages:
            out = max(1, round(stage * width))
            layers += [nn.Conv2d(chans, out, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            chans, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"img_size {img_size} is too small for {len(stages)} pooling stages")
        self.features = nn.Sequential(*layers)
        hidden = max(1, round(hidden * width))
        self.fc1 = nn.Linear(chans * h * w, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.num_classes, self.num_features, self.in_chans = num_classes, hidden, in_chans
        self.fc = nn.Linear(hidden, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)  # not squeeze(): batch size 1 must keep its batch dimension
        x = self.drop(self.act(self.fc2(self.act(self.fc1(x)))))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MLP(ConvNet):
    """LeNet-300-100 (the official code's ``FC``): flatten, FC 300, 100, classes; no biases."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int | Sequence[int] = 28,
                 width: float = 1.0, drop_rate: float = 0.0, global_pool: str = "") -> None:
        nn.Module.__init__(self)
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        h1, h2 = max(1, round(300 * width)), max(1, round(100 * width))
        self.features = nn.Identity()
        self.fc1 = nn.Linear(in_chans * h * w, h1, bias=False)
        self.fc2 = nn.Linear(h1, h2, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.num_classes, self.num_features, self.in_chans = num_classes, h2, in_chans
        self.fc = nn.Linear(h2, num_classes, bias=False) if num_classes > 0 else nn.Identity()


_CONV = popup_cfg(cifar=True, first_conv="features.0")
# A mask that ships inside the package (found by the README's main command), so pretrained=True works offline;
# its input size, normalisation and class names are the ones its config.json recorded.
_FMNIST = files("timm_popup") / "pretrained" / "popup_conv4.ep_k50_fmnist"
_FMNIST_CFG = json.loads((_FMNIST / "config.json").read_text())["pretrained_cfg"]
default_cfgs = generate_default_cfgs({
    "popup_conv2": _CONV,
    "popup_conv4.ep_k50_fmnist": popup_cfg(
        cifar=True, first_conv="features.0", file=str(_FMNIST / "model.safetensors"), fixed_input_size=True,
        **{key: tuple(_FMNIST_CFG[key]) for key in ("input_size", "mean", "std", "label_names")}),
    # '*', listed after the tag: the untagged CIFAR cfg stays the default although the tag has weights
    "popup_conv4.*": _CONV,
    "popup_conv6": _CONV,
    "popup_conv8": _CONV,
    "popup_fc": popup_cfg(cifar=True, input_size=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
                          first_conv="fc1"),
})


def _convnet(variant: str, pretrained: bool, stages: Sequence[int], **kwargs) -> nn.Module:
    return build_popup(ConvNet, variant, pretrained, default_k=CIFAR_K, stages=stages, **kwargs)


@register_model
def popup_conv2(pretrained: bool = False, **kwargs) -> ConvNet:
    """Conv2 of the paper's Table 1: conv 64, 64, pool; FC 256, 256, 10 (4,300,992 weights at 32x32)."""
    model_args = dict(stages=(64,))
    return _convnet("popup_conv2", pretrained, **dict(model_args, **kwargs))


@register_model
def popup_conv4(pretrained: bool = False, **kwargs) -> ConvNet:
    """Conv4 of the paper's Table 1: two conv pairs 64, 128; FC 256, 256, 10 (2,425,024 weights)."""
    model_args = dict(stages=(64, 128))
    return _convnet("popup_conv4", pretrained, **dict(model_args, **kwargs))


@register_model
def popup_conv6(pretrained: bool = False, **kwargs) -> ConvNet:
    """Conv6 of the paper's Table 1: conv pairs 64, 128, 256; FC 256, 256, 10 (2,261,184 weights)."""
    model_args = dict(stages=(64, 128, 256))
    return _convnet("popup_conv6", pretrained, **dict(model_args, **kwargs))


@register_model
def popup_conv8(pretrained: bool = False, **kwargs) -> ConvNet:
    """Conv8 of the paper's Table 1: conv pairs 64, 128, 256, 512; FC 256, 256, 10 (5,275,840 weights)."""
    model_args = dict(stages=(64, 128, 256, 512))
    return _convnet("popup_conv8", pretrained, **dict(model_args, **kwargs))


@register_model
def popup_fc(pretrained: bool = False, **kwargs) -> MLP:
    """LeNet-300-100 on 28x28 grayscale inputs (the official code's FC network)."""
    return build_popup(MLP, "popup_fc", pretrained, default_k=CIFAR_K, **kwargs)
