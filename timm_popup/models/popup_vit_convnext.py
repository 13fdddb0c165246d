"""Non-ResNet families, to show edge-popup on any timm architecture: ViT and ConvNeXt."""

from __future__ import annotations

from timm.models import generate_default_cfgs, model_entrypoint, register_model
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from ._builder import IMAGENET_K, build_popup_from, popup_cfg

_VIT = popup_cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9, pool_size=None,
                 fixed_input_size=True, first_conv="patch_embed.proj", classifier="head")
_CONVNEXT = popup_cfg(crop_pct=0.95, first_conv="stem.0", classifier="head.fc")
default_cfgs = generate_default_cfgs({
    "popup_vit_tiny_patch16_224": _VIT,
    "popup_vit_small_patch16_224": _VIT,
    "popup_convnext_atto": _CONVNEXT,
    "popup_convnext_tiny": _CONVNEXT,
})


def _timm_built(variant: str, pretrained: bool, **kwargs) -> VisionTransformer | ConvNeXt:
    # built by timm's own entrypoint of the same architecture: its model args and its features_only cfg
    return build_popup_from(model_entrypoint(variant.removeprefix("popup_")), variant, pretrained,
                            default_k=IMAGENET_K, **kwargs)


@register_model
def popup_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/16: every linear layer score-masked; LayerNorms non-affine; embeddings frozen random."""
    return _timm_built("popup_vit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def popup_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Small/16 with random weights and learned top-k scores."""
    return _timm_built("popup_vit_small_patch16_224", pretrained, **kwargs)


# Layer scale off: a frozen layer-scale of 1e-6 would silence every residual branch.
@register_model
def popup_convnext_atto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-Atto with random weights and learned top-k scores (no layer scale)."""
    return _timm_built("popup_convnext_atto", pretrained, **dict(dict(ls_init_value=None), **kwargs))


@register_model
def popup_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-Tiny with random weights and learned top-k scores (no layer scale)."""
    return _timm_built("popup_convnext_tiny", pretrained, **dict(dict(ls_init_value=None), **kwargs))
