"""The one builder behind every popup_* registry entry: timm's build_model_with_cfg + convert."""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from timm.models import _builder as timm_builder
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from ..config import POPUP_ARGS, PopupConfig
from ..convert import build_converted, make_scriptable, popup_masks
from ..export import WEIGHTS_NAME
from ..init import DEFAULT_WEIGHT_INIT
from ..layers import use_method
from ..masks import MaskError, check_planned_model, filter_state_dict, recorded_args
from ..native import parse_structure

__all__ = ["build_popup", "build_popup_from", "popup_cfg", "CIFAR_K", "IMAGENET_K", "HUB_ORG"]

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
    popup = dict(k=default_k, weight_init=DEFAULT_WEIGHT_INIT, seed=0, dense=(), structure=None)
    explicit = [key for key in POPUP_ARGS if key in kwargs]
    popup.update({key: kwargs.pop(key) for key in explicit})
    source = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and source:  # build with the mask's seed / k / distribution / learned tensors: no second build
        recorded = recorded_args(source) or {}
        popup.update({key: value for key, value in recorded.items() if key not in explicit})
    if "structure" in explicit and popup["structure"] is not None and "k" not in explicit:  # N:M keeps N/M
        n, m = parse_structure(popup["structure"])
        popup["k"] = n / m

    has_source = _has_source(variant, kwargs)
    if pretrained and not has_source:
        raise MaskError(f"no mask is published for {variant}: load one with pretrained_cfg_overlay=dict(file="
                        "'.../model.safetensors'), timm.create_model('local-dir:DIR', pretrained=True) or "
                        "timm.create_model('hf-hub:org/name', pretrained=True)")

    def popup_model_cls(**model_kwargs: Any) -> nn.Module:
        def dense_model() -> nn.Module:
            # a copy per build: build_converted may build twice (meta, then CPU), and some constructors consume
            # their arguments (timm's EfficientNet builder pops each block's 'block_type')
            model = model_cls(**copy.deepcopy(model_kwargs))
            model.popup_config = PopupConfig(explicit=tuple(explicit))
            return model

        # a verified mask is loaded into every score next: initialising them first would be wasted work
        return build_converted(dense_model, **popup, init_scores=not (pretrained and has_source), check=check)

    mask_file, classifiers = _local_mask(variant, kwargs) if pretrained else (None, ())
    check = (lambda model: check_planned_model(model, mask_file, classifiers)) if mask_file else None

    try:
        # make_scriptable: a features_only wrapper scripts as the folded network too (convert set up the model)
        with _built_from_config(variant, kwargs):
            model = build_model_with_cfg(popup_model_cls, variant, pretrained, pretrained_filter_fn=filter_state_dict,
                                         **kwargs)
        return make_scriptable(model)
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


@contextlib.contextmanager
def _built_from_config(variant: str, kwargs: dict[str, Any]) -> Iterator[None]:
    """A model that an artifact's config.json describes (timm passes its ``model_args`` as ``pretrained_model_args``)
    and that its class cannot build from them: the artifact's fault, one line naming the arguments (the popup
    ones, num_classes and in_chans were checked before: ``timm_popup.configjson.check_config``)."""
    args = kwargs.get("pretrained_model_args")
    try:
        yield
    except MaskError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, AttributeError, ZeroDivisionError,
            OverflowError) as e:
        if not args:
            raise
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise MaskError(f"config.json is invalid: its model_args {sorted(args)} (with any argument you passed) do not "
                        f"build {variant} ({reason}): repair them or write the artifact again "
                        "(timm_popup.save_pretrained)") from e


def _local_mask(variant: str, kwargs: dict[str, Any]) -> tuple[Path | None, tuple[str, ...]]:
    """The local mask file a pretrained build loads (``file=`` or a ``local-dir:``), and the classifier names."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    names = cfg.get("classifier") or ()
    classifiers = (names,) if isinstance(names, str) else tuple(names)
    path = Path(cfg["file"]) if isinstance(cfg.get("file"), str) else None
    path = path / WEIGHTS_NAME if path is not None and path.is_dir() else path
    return (path if path is not None and path.is_file() else None), classifiers


def _has_source(variant: str, kwargs: dict[str, Any]) -> bool:
    """Whether the resolved pretrained cfg names a mask to load (else timm would warn and build a random mask)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")).to_dict()
    return any(cfg.get(key) for key in ("file", "url", "hf_hub_id", "state_dict"))


# ------------------------------------------------------------------------------------------------------------------
# popup_<name> built exactly as timm builds <name>
#
# A timm entrypoint decides, from its kwargs, the model class, the model args, a model_cfg and the feature_cfg
# (out_indices default, flatten_sequential, feature_cls 'hook' / 'getter' ...) and hands them to timm's
# build_model_with_cfg; nothing of it is readable from outside (vit pops out_indices from the kwargs, swin derives it
# from depths). So the popup entrypoint runs the base entrypoint itself and takes over its one call to timm's
# builder: same class, args, model_cfg and feature_cfg; the popup variant's pretrained cfg, the mask loader, the
# conversion. Every timm.models module calls build_model_with_cfg through its own global name (92 of them import
# it by name), so the name is rebound once, in each module, to a function that is timm's own unless a popup build
# is in progress in this context (a ContextVar: other threads and every plain timm build are untouched).

_TAKE_OVER: ContextVar[Callable[..., nn.Module] | None] = ContextVar("timm_popup_take_over", default=None)
#: what build_popup_from takes from the caller and never lets the base entrypoint see (it belongs to the popup variant)
_POPUP_SOURCE_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
#: what the base entrypoint passes to timm's builder about its own dense weights: replaced by the popup variant's
_BASE_ONLY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained_filter_fn", "pretrained_strict",
                   "pretrained_model_args", "cache_dir")


@functools.wraps(build_model_with_cfg)
def _build_model_with_cfg(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, **kwargs: Any):
    take_over = _TAKE_OVER.get()
    if take_over is None:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    _TAKE_OVER.set(None)  # a model that builds sub-models with timm's builder builds them as timm does
    return take_over(model_cls, **kwargs)


def _install_take_over() -> None:
    """Rebind ``build_model_with_cfg`` in every loaded timm.models module (idempotent; see the comment above)."""
    for name, module in list(sys.modules.items()):
        if (name.startswith("timm.models.") and module is not timm_builder
                and getattr(module, "build_model_with_cfg", None) is build_model_with_cfg):
            module.build_model_with_cfg = _build_model_with_cfg


#: the arguments that ask timm for a features_only model
_FEATURE_ARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg", "output_stride_features")


def _popup_args_of(model: nn.Module) -> dict[str, Any]:
    return dict(model.popup_config.popup_args(), dense=model.popup_config.dense)


def _features_from(whole: nn.Module, features: nn.Module) -> nn.Module:
    """``features`` (a popup feature model built unloaded) with the loaded mask of ``whole``, its method included."""
    cfg = whole.popup_config
    masks = list(popup_masks(features).values())
    if cfg.method != "edge-popup":
        use_method(masks, cfg.method, k=cfg.k, slots=cfg.slots)
    features.popup_config.method, features.popup_config.slots = cfg.method, cfg.slots
    state, own = whole.state_dict(), features.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise MaskError(f"the features_only model has tensors the whole model does not ({missing[:3]}): load the "
                        "mask into the whole model and use its forward_intermediates")
    features.load_state_dict({key: state[key] for key in own})
    return features


def build_popup_from(
    entrypoint: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    *,
    default_k: float,
    **kwargs: Any,
) -> nn.Module:
    """``popup_<base>``: what timm's ``entrypoint`` of ``<base>`` builds (class, model args, model_cfg, and for
    ``features_only`` the base's own feature_cfg: out_indices, feature classes, flatten_sequential), made popup by
    :func:`build_popup` under ``variant``'s pretrained cfg. Tensor names, and so the seeded weights, are those of
    the base model."""
    _install_take_over()  # timm families imported after timm_popup (none in timm 1.0.31) are covered too
    source = {key: kwargs.pop(key) for key in _POPUP_SOURCE_ARGS if key in kwargs}
    popup_args = {key: kwargs.pop(key) for key in POPUP_ARGS if key in kwargs}

    features = bool(kwargs.get("features_only"))

    def take_over(model_cls: Callable[..., nn.Module], **build_kwargs: Any) -> nn.Module:
        for key in _BASE_ONLY_ARGS:
            build_kwargs.pop(key, None)
        if pretrained and features and not build_kwargs.get("features_only"):
            # the family's features_only model is a class of its own (EfficientNetFeatures, MobileNetV3Features,
            # HRNet): it has no head, and a mask verifies only against the whole network. Load it into the whole
            # popup model, then take the feature model's tensors (same names, so the same seeded weights) from it.
            whole_kwargs = {key: value for key, value in kwargs.items() if key not in _FEATURE_ARGS}
            whole = build_popup_from(entrypoint, variant, True, default_k=default_k, **source, **popup_args,
                                     **whole_kwargs)
            return _features_from(whole, build_popup(model_cls, variant, False, default_k=default_k,
                                                     **_popup_args_of(whole), **build_kwargs))
        return build_popup(model_cls, variant, pretrained, default_k=default_k, **source, **popup_args,
                           **build_kwargs)

    token = _TAKE_OVER.set(take_over)
    try:
        with _built_from_config(variant, kwargs):
            model = entrypoint(pretrained=False, **kwargs)
        taken = _TAKE_OVER.get() is None
    finally:
        _TAKE_OVER.reset(token)
    if not taken:
        raise TypeError(f"{variant}: timm's entrypoint for it does not build through timm's build_model_with_cfg, "
                        "so it cannot be made popup here; convert the model instead: "
                        "timm_popup.convert(timm.create_model(...))")
    return model
