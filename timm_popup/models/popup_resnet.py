"""Popup ResNets and Wide ResNets (the paper's ImageNet networks) and the CIFAR ResNet-18 of appendix C.1."""

from __future__ import annotations

from timm.models import generate_default_cfgs, model_entrypoint, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from ._builder import CIFAR_K, HUB_ORG, IMAGENET_K, build_popup, build_popup_from, popup_cfg


def _resnet_cifar(width: float = 1.0, **kwargs) -> ResNet:
    """ResNet with the CIFAR stem: one 3x3 stride-1 conv and no max-pool (32x32 inputs); ``width`` scales every
    stage's channels (the paper's width multiplier)."""
    channels = tuple(max(1, round(c * width)) for c in (64, 128, 256, 512))
    model = ResNet(**dict(kwargs, channels=channels))
    model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), channels[0], 3, stride=1, padding=1, bias=False)
    if channels[0] != 64:  # timm's plain stem is 64 wide whatever the stages: narrow it and the first block with it
        model.bn1 = nn.BatchNorm2d(channels[0])
        model.layer1[0] = kwargs["block"](channels[0], channels[0])
    model.maxpool = nn.Identity()
    # stride-1 stem and no max-pool: the stem's features are at full resolution, each stage 4x finer than timm's
    for info in model.feature_info:
        info["reduction"] = 1 if info["module"] == "act1" else info["reduction"] // 4
    return model


default_cfgs = generate_default_cfgs({
    "popup_resnet18_cifar.ep_k50_cifar10": popup_cfg(
        cifar=True, hf_hub_id=f"{HUB_ORG}/popup_resnet18_cifar.ep_k50_cifar10"),
    "popup_resnet18": popup_cfg(),
    "popup_resnet34": popup_cfg(),
    # Tags name where the project publishes masks found at the paper's ImageNet setting (k=0.3, U_k).
    "popup_resnet50.ep_k30_in1k": popup_cfg(hf_hub_id=f"{HUB_ORG}/popup_resnet50.ep_k30_in1k"),
    "popup_resnet101.ep_k30_in1k": popup_cfg(hf_hub_id=f"{HUB_ORG}/popup_resnet101.ep_k30_in1k"),
    "popup_wide_resnet50_2.ep_k30_in1k": popup_cfg(hf_hub_id=f"{HUB_ORG}/popup_wide_resnet50_2.ep_k30_in1k"),
    "popup_wide_resnet101_2": popup_cfg(),
})


def _resnet(variant: str, pretrained: bool, **kwargs) -> ResNet:
    # built by timm's own entrypoint of the same architecture: its model args and its features_only cfg
    return build_popup_from(model_entrypoint(variant.removeprefix("popup_")), variant, pretrained,
                            default_k=IMAGENET_K, **kwargs)


@register_model
def popup_resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as in the paper's appendix C.1."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return build_popup(_resnet_cifar, "popup_resnet18_cifar", pretrained, default_k=CIFAR_K,
                       **dict(model_args, **kwargs))


@register_model
def popup_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with random weights and learned top-k scores."""
    return _resnet("popup_resnet18", pretrained, **kwargs)


@register_model
def popup_resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-34 with random weights and learned top-k scores."""
    return _resnet("popup_resnet34", pretrained, **kwargs)


@register_model
def popup_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with random weights; k=0.3 keeps 7.65M of its 25.5M weights (paper Table 2)."""
    return _resnet("popup_resnet50", pretrained, **kwargs)


@register_model
def popup_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-101 with random weights and learned top-k scores (paper Table 2)."""
    return _resnet("popup_resnet101", pretrained, **kwargs)


@register_model
def popup_wide_resnet50_2(pretrained: bool = False, **kwargs) -> ResNet:
    """Wide ResNet-50-2 with random weights: at k=0.3 its subnetwork matches a trained ResNet-34."""
    return _resnet("popup_wide_resnet50_2", pretrained, **kwargs)


@register_model
def popup_wide_resnet101_2(pretrained: bool = False, **kwargs) -> ResNet:
    """Wide ResNet-101-2 with random weights and learned top-k scores."""
    return _resnet("popup_wide_resnet101_2", pretrained, **kwargs)
