"""``popup_<name>`` for every timm model ``<name>``, registered with timm the first time it is asked for.

timm has no hook for computed model names, so importing this module wraps timm's name -> entrypoint table
(``timm.models._registry._model_entrypoints``) in a dict that, when asked for ``popup_<name>`` of a registered
``<name>`` it does not hold yet, registers it with timm's own ``register_model`` and answers. Everything
downstream - ``create_model``, ``hf-hub:`` / ``local-dir:`` names whose config.json names the architecture,
pretrained cfgs - then sees an ordinary registered model. ``timm.list_models("popup_*")`` lists the
hand-written entries (the paper's networks) and those already used, not a thousand generated names, and
import costs nothing per architecture.

The entry runs ``<name>``'s own timm entrypoint (``pretrained=False``: its dense weights are never downloaded) and
takes over its call to timm's ``build_model_with_cfg`` (``_builder.build_popup_from``): the same model class, model
args and ``features_only`` feature cfg as ``<name>``, converted (k=0.5 unless given), masks loaded like any popup
model.
"""

from __future__ import annotations

from typing import Any

from timm.models import _registry, generate_default_cfgs, get_pretrained_cfg, model_entrypoint, register_model
from torch import nn

from ..convert import POPUP_PREFIX as PREFIX
from ._builder import build_popup_from, popup_cfg

__all__ = ["PREFIX", "GENERIC_K", "PUBLISHED", "register_popup", "install"]

#: k for architectures the paper did not use: half the weights, the paper's best region for its CIFAR nets
GENERIC_K = 0.5
#: masks the project publishes for architectures without a hand-written entry: ``{name: {tag: hf_hub_id}}``
PUBLISHED: dict[str, dict[str, str]] = {}

# timm's register_model reads the registering module's default_cfgs; entries are added as names are registered
default_cfgs: dict[str, Any] = {}


def _popup_default_cfg(base: str) -> dict[str, Any]:
    cfg = get_pretrained_cfg(base)
    known = cfg.to_dict(remove_source=True) if cfg is not None else {}
    # the base's tag, licence and paper describe its trained weights, not a random network and its mask
    for key in ("tag", "architecture", "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
                "hf_hub_revision", "custom_load", "label_names", "label_descriptions", "label_offset"):
        known.pop(key, None)
    return popup_cfg(**known)


def register_popup(base: str) -> str:
    """Register ``popup_<base>`` (and its published tags) with timm; return the name."""
    name = PREFIX + base
    base_entry = model_entrypoint(base)
    cfg = _popup_default_cfg(base)
    cfgs = {name: cfg} | {f"{name}.{tag}": dict(cfg, hf_hub_id=hub_id)
                          for tag, hub_id in PUBLISHED.get(name, {}).items()}
    default_cfgs.update(generate_default_cfgs(cfgs))

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_popup_from(base_entry, name, pretrained, default_k=GENERIC_K, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{base} with seeded random weights and learned top-k scores (k={GENERIC_K} by default)."
    register_model(entrypoint)
    return name


class _PopupEntrypoints(dict):
    """timm's entrypoint table; also answers ``popup_<name>`` for every registered ``<name>`` (module docstring)."""

    def __init__(self, table: dict) -> None:
        super().__init__(table)
        self._registering: set[str] = set()

    def _add(self, name: object) -> bool:
        if not isinstance(name, str) or not name.startswith(PREFIX) or name in self._registering:
            return False
        base = name[len(PREFIX):]
        if base.startswith(PREFIX) or not dict.__contains__(self, base):
            return False
        self._registering.add(name)  # register_model asks this table whether the name exists
        try:
            register_popup(base)
        finally:
            self._registering.discard(name)
        return True

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or self._add(name)

    def __missing__(self, name: str):
        if self._add(name):
            return dict.__getitem__(self, name)
        raise KeyError(name)


def install() -> None:
    """Make every ``popup_<name>`` creatable (idempotent)."""
    if not isinstance(_registry._model_entrypoints, _PopupEntrypoints):
        _registry._model_entrypoints = _PopupEntrypoints(_registry._model_entrypoints)


install()
