"""``popup_<name>`` for every timm model ``<name>``, visible to every registry query of timm.

Importing this module lists every ``popup_<name>`` in timm's registry tables: the name and its module
(``popup_any``) go into ``_model_entrypoints`` / ``_model_to_module`` / ``_module_to_models`` /
``_model_with_tags`` at once (a few dict entries per name; the entrypoint function is made when its entry is first
read), so ``is_model``, ``model_entrypoint`` and
``list_models`` (filters, ``module=``, ``include_tags``, ``name_matches_cfg``, ``pretrained=``) answer without a
build. Its pretrained cfg, which costs a copy of ``<name>``'s cfg, is made on demand: timm's two cfg tables are
wrapped in a dict that, asked for a pending name (``in``, ``[]``, ``get``), registers it with timm's own
``register_model`` and answers; iterating them lists pending names without making their cfgs. So
``get_pretrained_cfg``, ``get_pretrained_cfg_value`` (which timm's own tests call before ``create_model``) and
``create_model`` see an ordinary registered model, and import cost stays a few ms for ~1400 names.

A model registered with timm after this import (a plugin's), or a deprecated name, gets its ``popup_`` entry on
first lookup: the entrypoint table answers ``popup_<name>`` of any registered ``<name>`` by registering it.

The entry runs ``<name>``'s own timm entrypoint (``pretrained=False``: its dense weights are never downloaded) and
takes over its call to timm's ``build_model_with_cfg`` (``_builder.build_popup_from``): the same model class, model
args and ``features_only`` feature cfg as ``<name>``, converted (k=0.5 unless given), masks loaded like any popup
model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
#: what ``__name__`` register_model files the entries under (``_model_to_module``, ``list_models(module=...)``)
MODULE = __name__.rsplit(".", 1)[-1]


def _popup_default_cfg(base: str) -> dict[str, Any]:
    cfg = get_pretrained_cfg(base)
    known = cfg.to_dict(remove_source=True) if cfg is not None else {}
    # the base's tag, licence and paper describe its trained weights, not a random network and its mask
    for key in ("tag", "architecture", "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
                "hf_hub_revision", "custom_load", "label_names", "label_descriptions", "label_offset"):
        known.pop(key, None)
    return popup_cfg(**known)


def _entrypoint(base: str) -> Callable[..., nn.Module]:
    name = PREFIX + base

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        _PENDING.register(name)  # its pretrained cfg, before timm's builder resolves it
        return build_popup_from(model_entrypoint(base), name, pretrained, default_k=GENERIC_K, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{base} with seeded random weights and learned top-k scores (k={GENERIC_K} by default)."
    return entrypoint


def register_popup(base: str, entrypoint: Callable[..., nn.Module] | None = None) -> str:
    """Register ``popup_<base>`` (its cfg and its published tags) with timm; return the name."""
    name = PREFIX + base
    model_entrypoint(base)  # a KeyError for a name timm does not know
    cfg = _popup_default_cfg(base)
    cfgs = {name: cfg} | {f"{name}.{tag}": dict(cfg, hf_hub_id=hub_id)
                          for tag, hub_id in PUBLISHED.get(name, {}).items()}
    default_cfgs.update(generate_default_cfgs(cfgs))
    _PENDING.registering.add(name)
    try:
        register_model(entrypoint or _entrypoint(base))
    finally:
        _PENDING.registering.discard(name)
    return name


class _Pending:
    """The ``popup_<base>`` names listed in timm's tables whose pretrained cfg is not made yet."""

    def __init__(self) -> None:
        self.bases: dict[str, str] = {}
        #: names being registered now: register_model asks the entrypoint table whether the name exists
        self.registering: set[str] = set()

    def list_all(self) -> None:
        """List ``popup_<name>`` of every registered, non-deprecated timm model not listed yet (a few dict
        entries each, as register_model makes them; the cfgs wait for :meth:`register`)."""
        entrypoints, to_module = _registry._model_entrypoints, _registry._model_to_module
        names = _registry._module_to_models[MODULE]
        for base in [b for b in dict.keys(entrypoints) if not b.startswith(PREFIX)]:
            name = PREFIX + base
            if base in _registry._deprecated_models or dict.__contains__(entrypoints, name):
                continue
            if PUBLISHED.get(name):  # a published mask: listed with its tags, as pretrained (list_pretrained)
                register_popup(base)
                continue
            dict.__setitem__(entrypoints, name, _UNMADE)  # the function is made when first asked for
            to_module[name] = MODULE
            names.add(name)
            _registry._model_with_tags[name] = [name]
            self.bases[name] = base

    def register(self, key: object) -> bool:
        """Make the cfg of the pending architecture of ``key`` (``name`` or ``name.tag``); whether it was pending."""
        if not isinstance(key, str):
            return False
        name = _registry.split_model_name_tag(key)[0]
        base = self.bases.pop(name, None)
        if base is None:
            return False
        entry = _registry._model_entrypoints[name]
        dict.pop(_registry._model_entrypoints, name)  # register_model files it again (no overwrite warning)
        _registry._model_to_module.pop(name, None)
        _registry._module_to_models[MODULE].discard(name)
        _registry._model_with_tags.pop(name, None)
        register_popup(base, entry)
        return True

    def forget(self, key: object) -> None:
        """timm removes ``key``'s entries (a registration under the same name): it is no longer ours to make."""
        if isinstance(key, str):
            self.bases.pop(key, None)


_PENDING = _Pending()
#: a listed name's entrypoint before anything asked for it (a function per name would cost ~10 us each at import)
_UNMADE = object()


class _CfgTable(dict):
    """timm's ``_model_pretrained_cfgs`` / ``_model_default_cfgs``: also holds each pending name's cfg, made when
    asked for. Iteration and ``len`` count pending names (``list_models(name_matches_cfg=True)``) without making
    them; ``keys`` / ``items`` / ``values`` make them all."""

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (_PENDING.register(key) and dict.__contains__(self, key))

    def __missing__(self, key: str) -> Any:
        if _PENDING.register(key):
            return dict.__getitem__(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def pop(self, key: str, *default: Any) -> Any:
        _PENDING.forget(key)
        return dict.pop(self, key, *default)

    def __iter__(self) -> Iterator[str]:
        yield from list(dict.keys(self))
        yield from [name for name in list(_PENDING.bases) if not dict.__contains__(self, name)]

    def __len__(self) -> int:
        return dict.__len__(self) + len(_PENDING.bases)

    def _all(self) -> dict:
        for name in list(_PENDING.bases):
            _PENDING.register(name)
        return dict(self)

    def keys(self):  # noqa: ANN201 - dict's view types
        return self._all().keys()

    def items(self):  # noqa: ANN201
        return self._all().items()

    def values(self):  # noqa: ANN201
        return self._all().values()


class _PopupEntrypoints(dict):
    """timm's entrypoint table. A listed ``popup_<name>`` gets its entrypoint function when first read; the table
    also answers ``popup_<name>`` of a ``<name>`` registered after the import (or a deprecated one) by registering
    it (module docstring)."""

    def _add(self, name: object) -> bool:
        if not isinstance(name, str) or not name.startswith(PREFIX) or name in _PENDING.registering:
            return False
        base = name[len(PREFIX):]
        if base.startswith(PREFIX) or not dict.__contains__(self, base):
            return False
        register_popup(base)
        return True

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or self._add(name)

    def __getitem__(self, name: str) -> Callable[..., nn.Module]:
        entry = dict.__getitem__(self, name)
        if entry is _UNMADE:
            entry = _entrypoint(name[len(PREFIX):])
            dict.__setitem__(self, name, entry)
        return entry

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def values(self):  # noqa: ANN201 - dict's view type; every entrypoint made
        return {name: self[name] for name in dict.keys(self)}.values()

    def items(self):  # noqa: ANN201
        return {name: self[name] for name in dict.keys(self)}.items()

    def __missing__(self, name: str):
        if self._add(name):
            return dict.__getitem__(self, name)
        raise KeyError(name)


def install() -> None:
    """Make every ``popup_<name>`` visible to timm's registry and creatable (idempotent)."""
    if not isinstance(_registry._model_entrypoints, _PopupEntrypoints):
        _registry._model_entrypoints = _PopupEntrypoints(_registry._model_entrypoints)
    for table in ("_model_pretrained_cfgs", "_model_default_cfgs"):
        if not isinstance(getattr(_registry, table), _CfgTable):
            setattr(_registry, table, _CfgTable(getattr(_registry, table)))
    _PENDING.list_all()


install()
