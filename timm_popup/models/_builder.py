"""The one builder behind every popup_* registry entry: timm's build_model_with_cfg + convert."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from ..config import POPUP_ARGS, PopupConfig
from ..convert import build_converted
from ..init import DEFAULT_WEIGHT_INIT
from ..masks import MaskError, filter_state_dict, recorded_args

__all__ = ["build_popup", "popup_cfg", "CIFAR_K", "IMAGENET_K", "HUB_ORG"]

#: where the project publishes its masks (registry tags' hf_hub_id)
HUB_ORG = "timm-popup"
CIFAR_K = 0.5  # the paper's default for its CIFAR-10 networks
IMAGENET_K = 0.3  # the paper's ImageNet setting (Table 2, Figure 8)

_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def popup_cfg(url: str = "", *, cifar: bool = False, **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg; ``cifar`` gives the 32x32, 10-class defaults of the paper's small nets."""
    cfg = dict(url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
               interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv="conv1", classifier="fc", license="apache-2.0",
               # only the mask file: no fallback to pytorch_model.bin, and one failed lookup instead of two
               hf_hub_filename="model.safetensors")
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
    default_k: float,
    **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls(**kwargs)`` through timm's builder and convert it to edge-popup.

    ``k``, ``weight_init``, ``seed`` and ``dense`` in ``kwargs`` go to :func:`timm_popup.convert`; a mask
    loaded with ``pretrained`` supplies the ones the caller did not give. The conversion happens inside the
    class timm instantiates, so timm's pretrained loading and features_only wrapping see the popup model.
    """
    popup = dict(k=default_k, weight_init=DEFAULT_WEIGHT_INIT, seed=0, dense=())
    explicit = [key for key in POPUP_ARGS if key in kwargs]
    popup.update({key: kwargs.pop(key) for key in explicit})
    source = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and source:  # build with the mask's seed / k / distribution: no second weight generation
        recorded = recorded_args(source) or {}
        popup.update({key: value for key, value in recorded.items() if key not in explicit})

    has_source = _has_source(variant, kwargs)
    if pretrained and not has_source:
        raise MaskError(f"no mask is published for {variant}: load one with pretrained_cfg_overlay=dict(file="
                        "'.../model.safetensors'), timm.create_model('local-dir:DIR', pretrained=True) or "
                        "timm.create_model('hf-hub:org/name', pretrained=True)")

    def popup_model_cls(**model_kwargs: Any) -> nn.Module:
        def dense_model() -> nn.Module:
            model = model_cls(**model_kwargs)
            model.popup_config = PopupConfig(explicit=tuple(explicit))
            return model

        # a verified mask is loaded into every score next: initialising them first would be wasted work
        return build_converted(dense_model, **popup, init_scores=not (pretrained and has_source))

    try:
        return build_model_with_cfg(popup_model_cls, variant, pretrained,
                                    pretrained_filter_fn=filter_state_dict, **kwargs)
    except SafetensorError as e:
        raise MaskError(f"the mask file for {variant} is truncated or corrupt ({e}): download or copy it again") from e
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        source = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
        if isinstance(e, FileNotFoundError) and source and not isinstance(e, LocalEntryNotFoundError):
            raise MaskError(f"mask file {source} does not exist: pass the model.safetensors written by "
                            "timm_popup.save_pretrained") from e
        if not pretrained:
            raise
        reason = (str(e).splitlines() or [""])[0]
        raise RuntimeError(
            f"could not download the mask for {variant}: {type(e).__name__}: {reason}. "
            f"The project may not have published it yet (see https://huggingface.co/{HUB_ORG}); load a local "
            "mask with pretrained_cfg_overlay=dict(file='.../model.safetensors') or another one with "
            "timm.create_model('hf-hub:org/name', pretrained=True)") from e


def _has_source(variant: str, kwargs: dict[str, Any]) -> bool:
    """Whether the resolved pretrained cfg names a mask to load (else timm would warn and build a random mask)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    return any(cfg.get(key) for key in ("file", "url", "hf_hub_id", "state_dict"))
