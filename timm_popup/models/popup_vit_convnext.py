"""Non-ResNet families, to show edge-popup on any timm architecture: ViT and ConvNeXt."""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from ._builder import IMAGENET_K, build_popup, popup_cfg

_VIT = popup_cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9, pool_size=None,
                 fixed_input_size=True, first_conv="patch_embed.proj", classifier="head")
_CONVNEXT = popup_cfg(crop_pct=0.95, first_conv="stem.0", classifier="head.fc")
default_cfgs = generate_default_cfgs({
    "popup_vit_tiny_patch16_224": _VIT,
    "popup_vit_small_patch16_224": _VIT,
    "popup_convnext_atto": _CONVNEXT,
    "popup_convnext_tiny": _CONVNEXT,
})


@register_model
def popup_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/16: every linear layer score-masked; LayerNorms non-affine; embeddings frozen random."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return build_popup(VisionTransformer, "popup_vit_tiny_patch16_224", pretrained, default_k=IMAGENET_K,
                       **dict(model_args, **kwargs))


@register_model
def popup_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Small/16 with random weights and learned top-k scores."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return build_popup(VisionTransformer, "popup_vit_small_patch16_224", pretrained, default_k=IMAGENET_K,
                       **dict(model_args, **kwargs))


# Layer scale off: a frozen layer-scale of 1e-6 would silence every residual branch.
@register_model
def popup_convnext_atto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-Atto with random weights and learned top-k scores (no layer scale)."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True, ls_init_value=None)
    return build_popup(ConvNeXt, "popup_convnext_atto", pretrained, default_k=IMAGENET_K, feature_cfg=dict(
        out_indices=(0, 1, 2, 3), flatten_sequential=True), **dict(model_args, **kwargs))


@register_model
def popup_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-Tiny with random weights and learned top-k scores (no layer scale)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), ls_init_value=None)
    return build_popup(ConvNeXt, "popup_convnext_tiny", pretrained, default_k=IMAGENET_K, feature_cfg=dict(
        out_indices=(0, 1, 2, 3), flatten_sequential=True), **dict(model_args, **kwargs))
