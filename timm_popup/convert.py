"""Turn any ``nn.Module`` (a timm model) into its edge-popup version, in place."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .init import DEFAULT_WEIGHT_INIT, check_k, check_weight_init, random_weight
from .layers import PopupConv2d, PopupLayer, PopupLinear

__all__ = ["convert", "reseed", "popup_layers", "EMBED_STD"]

#: std of the frozen draw that replaces any other randomly initialised parameter (ViT's pos_embed,
#: cls_token ...); timm initialises such embeddings with std 0.02.
EMBED_STD = 0.02


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm)) or (
        "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), nn.Parameter))


def _freeze(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` of ``module`` by a non-trainable buffer holding ``value``."""
    delattr(module, name)
    module.register_buffer(name, value, persistent=False)


def _embedding_draw(shape: torch.Size, seed: int, name: str) -> torch.Tensor:
    """Frozen N(0, EMBED_STD) values for a non-conv/linear parameter, from the seeded generator."""
    value = random_weight((1, math.prod(shape)), seed=seed, name=name, weight_init="kaiming_normal")
    return (value * (EMBED_STD / math.sqrt(2.0))).reshape(shape)  # kaiming std at fan_in 1 is sqrt(2)


def _set_child(model: nn.Module, qualname: str, child: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


class _PopupResetClassifier:
    """Instance-level ``reset_classifier``: timm's, then the new head converted like the rest."""

    def __init__(self, model: nn.Module, original) -> None:
        self.model, self.original = model, original

    def __call__(self, *args, **kwargs):
        self.original(self.model, *args, **kwargs)
        cfg = self.model.popup_cfg
        convert(self.model, k=cfg["k"], weight_init=cfg["weight_init"], seed=cfg["seed"], dense=cfg["dense"])


def convert(
    model: nn.Module,
    k: float = 0.5,
    weight_init: str = DEFAULT_WEIGHT_INIT,
    seed: int = 0,
    dense: Sequence[str] = (),
) -> nn.Module:
    """Make ``model`` an edge-popup network in place and return it.

    * every ``nn.Conv2d`` / ``nn.Linear`` (first and last included, as in the paper) becomes a
      :class:`PopupConv2d` / :class:`PopupLinear` with seeded random weights, keeping the fraction ``k``
      (of weights KEPT, 0 < k <= 1) by learned scores; biases are pinned at zero;
    * layers whose qualified name matches a glob in ``dense`` (e.g. ``("conv1", "fc")``, the official
      code's first/last-layer-dense options) stay ordinary trainable layers;
    * normalisation layers become non-affine (scale 1, shift 0, frozen); BatchNorm running statistics
      are still tracked;
    * any other parameter is frozen: kept if constant (e.g. zeros), else redrawn from the seeded
      generator with std ``EMBED_STD`` (so the whole network is a function of the seed);
    * the model keeps its class and timm protocol; ``model.reset_classifier`` yields a popup head.

    After conversion the only trainable tensors are scores (and the parameters of ``dense`` layers).
    """
    k, weight_init = check_k(k), check_weight_init(weight_init)
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise ValueError("convert: nn.MultiheadAttention reads its weights directly and cannot be "
                         "score-masked; use a model built from nn.Linear attention (e.g. timm's ViT)")
    dense = tuple(dense)

    def is_dense(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in dense)

    dense_modules = {m for name, m in model.named_modules() if dense and is_dense(name)}
    kept = {id(p) for m in dense_modules for p in m.parameters()}
    for name, module in list(model.named_modules()):
        if isinstance(module, PopupLayer) or module in dense_modules:
            continue
        args = dict(k=k, weight_init=weight_init, seed=seed, name=name)
        if isinstance(module, nn.Conv2d):
            from timm.layers import Conv2dSame
            _set_child(model, name, PopupConv2d.from_dense(
                module, same_pad=isinstance(module, Conv2dSame), **args))
        elif isinstance(module, nn.Linear):
            _set_child(model, name, PopupLinear.from_dense(module, **args))

    redrawn = list(getattr(model, "popup_cfg", {}).get("redrawn", ()))
    for mod_name, module in model.named_modules():
        if isinstance(module, PopupLayer) or module in dense_modules:
            continue
        for p_name, p in list(module.named_parameters(recurse=False)):
            if id(p) in kept:
                continue
            qualname = f"{mod_name}.{p_name}" if mod_name else p_name
            with torch.no_grad():
                if _is_norm(module) and p_name in ("weight", "bias"):
                    value = torch.ones_like(p) if p_name == "weight" else torch.zeros_like(p)
                elif p.numel() and bool((p == p.flatten()[0]).all()):
                    value = p.detach().clone()
                else:
                    value = _embedding_draw(p.shape, seed, qualname).to(p.device, p.dtype)
                    redrawn.append(qualname)
            _freeze(module, p_name, value)

    old = getattr(model, "popup_cfg", {})
    model.popup_cfg = dict(old, k=k, weight_init=weight_init, seed=int(seed), dense=list(dense), redrawn=redrawn)
    if hasattr(type(model), "reset_classifier") and not isinstance(
            model.__dict__.get("reset_classifier"), _PopupResetClassifier):
        model.reset_classifier = _PopupResetClassifier(model, type(model).reset_classifier)
    return model


def reseed(model: nn.Module, *, seed: int, k: float, weight_init: str) -> nn.Module:
    """Regenerate a converted ``model``'s frozen random tensors for another seed / k / distribution."""
    k, weight_init = check_k(k), check_weight_init(weight_init)
    for layer in popup_layers(model).values():
        layer.regenerate(seed=seed, k=k, weight_init=weight_init)
    for qualname in model.popup_cfg.get("redrawn", ()):
        mod_name, _, attr = qualname.rpartition(".")
        module = model.get_submodule(mod_name)
        old = getattr(module, attr)
        setattr(module, attr, _embedding_draw(old.shape, seed, qualname).to(old.device, old.dtype))
    model.popup_cfg.update(k=k, weight_init=weight_init, seed=int(seed))
    return model


def popup_layers(model: nn.Module) -> dict[str, PopupLayer]:
    """The popup layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PopupLayer)}
