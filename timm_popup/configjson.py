"""An artifact's ``config.json``, from anyone: every field the loader reads is checked before a model is built.

What ``pretrained_cfg`` may hold is timm's own schema: each field's type is read from the annotations of
``timm.models.PretrainedCfg`` (timm builds one from the dict, so a field it does not have fails there), widened where
timm's loaders and registry carry more than the annotation says, and narrowed only by bounds that no timm model's
values come near (sizes, class counts, statistics). ``tests/test_configjson.py`` renders every pretrained cfg in
timm's registry as config.json renders it and checks that each passes. Cross-field checks hold what is true of every
model: the values the mask file beside it records, and the classifier's rows; the shapes of the rest are compared
with the planned model itself (:func:`timm_popup.masks.check_planned_model`), not guessed from names here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from timm.models import PretrainedCfg, is_model

from .export import CONFIG_NAME, WEIGHTS_NAME
from .init import check_weight_init
from .layers import check_score_init
from .maskfile import FORMAT_VERSION, META, OLDEST_FORMAT, MaskError, check_header, valid_name
from .native import parse_structure
from .reference import GENERATOR_VERSION

__all__ = ["CONFIG_FIELDS", "MAX_CLASSES", "PRETRAINED_CFG_TYPES", "check_config", "is_popup_config"]

#: the most classes a config.json may ask for where the mask file does not fix the head's size
MAX_CLASSES = 2**17
_INT64 = (-(2**63), 2**63 - 1)
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")

ConfigRule = Callable[[Any, dict], "str | None"]

# -- what each pretrained_cfg field may hold: timm's annotations, and what timm carries beyond them ----------------

#: the weight sources: timm's save_config_for_hf drops them (remove_source) and its local-dir / hf-hub readers set
#: their own, so a config.json that names one points the loader somewhere else (hf_hub_filename is checked below)
_SOURCES = ("url", "file", "state_dict", "hf_hub_id", "source")
#: timm's loaders take a name or a tuple of names for these (``load_pretrained`` adapts each head,
#: ``adapt_input_conv`` each stem) and its registry carries tuples (distilled DeiT / LeViT heads, EfficientViM's
#: four, CrossViT's two stems) and an empty one (CSATv2's stem) where the annotation says ``Optional[str]``
_WIDER: dict[str, Any] = {"classifier": str | tuple[str, ...] | None, "first_conv": str | tuple[str, ...] | None}


def _pretrained_cfg_types() -> dict[str, Any]:
    hints = typing.get_type_hints(PretrainedCfg)
    return {f.name: _WIDER.get(f.name, hints[f.name]) for f in dataclasses.fields(PretrainedCfg)
            if f.name not in _SOURCES}


#: each pretrained_cfg field config.json may hold, and its type (a JSON list stands for a tuple)
PRETRAINED_CFG_TYPES: dict[str, Any] = _pretrained_cfg_types()


def _holds(tp: Any, value: Any) -> bool:
    """Whether ``value`` (as JSON gives it) is of the annotated type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_holds(a, value) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            # timm annotates a tuple of any length as Tuple[str] too (its registry's notes hold two)
            return all(_holds(args[0], v) for v in value)
        return len(value) == len(args) and all(_holds(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        return isinstance(value, dict) and all(_holds(args[0], k) and _holds(args[1], v) for k, v in value.items())
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"timm's PretrainedCfg has a field of type {tp!r}, which timm_popup.configjson does not know")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("NoneType", "None").replace("<class '", "").replace("'>", "")


def _timm_type(field: str) -> ConfigRule:
    def rule(value: Any, ctx: dict) -> str | None:
        tp = PRETRAINED_CFG_TYPES[field]
        return None if _holds(tp, value) else f"is {value!r}, not {_type_name(tp)} (timm's PretrainedCfg.{field})"
    return rule


def _known_fields(value: Any, ctx: dict) -> str | None:
    if not isinstance(value, dict):
        return f"is {value!r}, not a mapping"
    unknown = sorted(set(value) - set(PRETRAINED_CFG_TYPES) - {"hf_hub_filename"})
    if unknown:
        return (f"holds {unknown}, not fields of timm's PretrainedCfg (expected some of "
                f"{sorted(PRETRAINED_CFG_TYPES)}: weight sources are set by the loader)")
    return None


# -- rules: each returns None or what is wrong, as "is VALUE, not WHAT WAS EXPECTED" ----------------------------------

def _int_in(lo: int, hi: int) -> ConfigRule:
    def rule(value: Any, ctx: dict) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        return None if ok else f"is {value!r}, not an integer in [{lo}, {hi}]"
    return rule


def _number_in(lo: float, hi: float, *, open_low: bool = False) -> ConfigRule:
    def rule(value: Any, ctx: dict) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            lo < value if open_low else lo <= value) and value <= hi
        return None if ok else f"is {value!r}, not a number in {'(' if open_low else '['}{lo}, {hi}]"
    return rule


def _each(rule: ConfigRule, what: str) -> ConfigRule:
    """Every element of a list (None passes: the type rule before it says whether None may stand there)."""
    def each(value: Any, ctx: dict) -> str | None:
        if value is None:
            return None
        ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= 2**16 and not any(rule(x, ctx) for x in value)
        return None if ok else f"is {value!r}, not {what}"
    return each


def _is(kind: type | tuple[type, ...], what: str) -> ConfigRule:
    return lambda value, ctx: None if isinstance(value, kind) else f"is {value!r}, not {what}"


def _one_of(known: tuple[str, ...], what: str) -> ConfigRule:
    return lambda value, ctx: None if value in known else f"is {value!r}, not a known {what} ({', '.join(known)})"


def _all(*rules: ConfigRule) -> ConfigRule:
    return lambda value, ctx: next((r for r in (rule(value, ctx) for rule in rules) if r), None)


def _as_recorded(key: str) -> ConfigRule:
    """Equal to the mask file's ``__popup__.<key>`` (save_pretrained writes both from one model)."""
    def rule(value: Any, ctx: dict) -> str | None:
        header = ctx["header"]
        if header is None or value == header[key]:
            return None
        return f"is {value!r} but the mask file beside it records {key}={header[key]!r}"
    return rule


def _layer_names(value: Any, ctx: dict) -> str | None:
    """A layer name or several (timm's classifier / first_conv), each a module path; empty or None: none named."""
    names = (value,) if isinstance(value, str) else value or ()
    bad = [n for n in names if not isinstance(n, str) or not valid_name(n)]
    return f"is {value!r}: {bad[0]!r} is not a layer name" if bad else None


def _names(value: Any, ctx: dict) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) and valid_name(v) for v in value)
    return None if ok else f"is {value!r}, not a list of layer names"


def _architecture(value: Any, ctx: dict) -> str | None:
    if not isinstance(value, str) or not value.startswith("popup_") or not is_model(value):
        return (f"is {value!r}, not a popup architecture, but the artifact holds a timm-popup mask (a popup_* "
                "model: e.g. popup_resnet18)")
    return None


def _classifier_rows(ctx: dict) -> dict[str, int]:
    """Rows of each classifier the config names (one or several heads) that the mask file masks."""
    cfg = ctx["config"].get("pretrained_cfg")
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = (names,) if isinstance(names, str) else names if isinstance(names, (list, tuple)) else ()
    shapes = ctx["shapes"]
    return {n: shapes[f"{n}.weight"][0] for n in names if isinstance(n, str) and len(shapes.get(f"{n}.weight", ())) > 0}


def _sized_as_classifiers(value: Any, ctx: dict) -> str | None:
    """A head's weight has one row per class, in every timm model (each of two or four heads too); 0: no head."""
    wrong = {n: rows for n, rows in _classifier_rows(ctx).items() if rows != value}
    if not wrong or value == 0:
        return None
    name, rows = next(iter(wrong.items()))
    return f"is {value!r} but the mask file's classifier {name} has {rows} rows (one per class)"


def _canonical(check: Callable[[str], str], what: str) -> ConfigRule:
    """A name the library writes in exactly this form (``check`` returns its canonical form, or raises)."""
    def rule(value: Any, ctx: dict) -> str | None:
        try:
            ok = isinstance(value, str) and check(value) == value
        except ValueError:
            ok = False
        return None if ok else f"is {value!r}, not a {what} as timm-popup writes it"
    return rule


def _flag(value: Any, ctx: dict) -> str | None:
    return None if value is True else f"is {value!r}: written only as true (absent: false)"


_POPUP_ARG_RULES: dict[str, tuple[bool | None, ConfigRule]] = {
    "k": (None, _all(_number_in(0, 1, open_low=True), _as_recorded("k"))),
    "weight_init": (None, _all(_canonical(check_weight_init, "weight distribution"), _as_recorded("weight_init"))),
    "seed": (None, _all(_int_in(*_INT64), _as_recorded("seed"))),
    "structure": (None, _all(_canonical(lambda v: "{}:{}".format(*parse_structure(v)), "N:M structure"),
                             _as_recorded("structure"))),
    "learn_norm": (None, _all(_flag, _as_recorded("learn_norm"))),
    "learn_bias": (None, _all(_flag, _as_recorded("learn_bias"))),
    "score_init": (None, _canonical(check_score_init, "score initialisation")),
}
_NUM_CLASSES = _all(_int_in(0, MAX_CLASSES), _sized_as_classifiers)
_SIZE = _each(_int_in(1, 2**16), "a list of sizes in [1, 65536]")

#: bounds on top of timm's types, for the fields the loader and the data pipeline read
_PRETRAINED_CFG_BOUNDS: dict[str, ConfigRule] = {
    "input_size": _SIZE,
    "test_input_size": _SIZE,
    "min_input_size": _SIZE,
    "pool_size": _SIZE,
    "test_pool_size": _SIZE,
    "mean": _each(_number_in(-1e6, 1e6), "a list of numbers in [-1e6, 1e6]"),
    "std": _each(_number_in(0, 1e6, open_low=True), "a list of positive numbers"),
    "crop_pct": _number_in(0, 4, open_low=True),
    "test_crop_pct": lambda v, ctx: None if v is None else _number_in(0, 4, open_low=True)(v, ctx),
    "interpolation": _one_of(_INTERPOLATIONS, "interpolation"),
    "num_classes": _NUM_CLASSES,
    "classifier": _layer_names,
    "first_conv": _layer_names,
}


def _pretrained_cfg_rules() -> dict[str, tuple[bool | None, ConfigRule]]:
    rules: dict[str, tuple[bool | None, ConfigRule]] = {
        # timm reads exactly this file from the Hub: never a pickled checkpoint
        "pretrained_cfg.hf_hub_filename": (True, _one_of((WEIGHTS_NAME,), "mask file name")),
    }
    for field in PRETRAINED_CFG_TYPES:
        bound = _PRETRAINED_CFG_BOUNDS.get(field)
        rule = _timm_type(field) if bound is None else _all(_timm_type(field), bound)
        rules[f"pretrained_cfg.{field}"] = (None, rule)
    return rules


#: each field of an artifact's config.json that loading reads, by its path; (needed, rule): needed True, the
#: config must hold it; None, it may. A field is checked once the ones above it are (a dict before its keys).
CONFIG_FIELDS: dict[str, tuple[bool | None, ConfigRule]] = {
    "architecture": (True, _architecture),
    "pretrained_cfg": (True, _known_fields),
    "model_args": (None, _is(dict, "a mapping of model arguments")),
    "timm_popup": (None, _is(dict, "a mapping")),
    "num_classes": (None, _NUM_CLASSES),
    **{f"model_args.{key}": rule for key, rule in _POPUP_ARG_RULES.items()},
    "model_args.dense": (None, _names),
    "model_args.num_classes": (None, _NUM_CLASSES),
    # no check against the first layer's width: a stem may read in_chans any way (a Linear over flattened patches);
    # the planned model's shapes are compared with the mask file's before it is built (masks.check_planned_model)
    "model_args.in_chans": (None, _int_in(1, 2**16)),
    **_pretrained_cfg_rules(),
    "timm_popup.format_version": (None, _all(_int_in(OLDEST_FORMAT, FORMAT_VERSION), _as_recorded("format_version"))),
    "timm_popup.generator_version": (None, _all(_int_in(GENERATOR_VERSION, GENERATOR_VERSION),
                                                _as_recorded("generator_version"))),
    "timm_popup.method": (None, _as_recorded("method")),
    **{f"timm_popup.{key}": rule for key, rule in _POPUP_ARG_RULES.items()},
    # what the card and `timm-popup info` show
    "timm_popup.dense_bytes": (None, _int_in(0, 2**62)),
    "timm_popup.stats": (None, lambda v, ctx: None if isinstance(v, dict) and not any(
        _int_in(0, 2**62)(x, ctx) for x in v.values()) else f"is {v!r}, not a mapping of counts"),
    "timm_popup.metrics": (None, lambda v, ctx: None if isinstance(v, dict) and not any(
        _number_in(-1e30, 1e30)(x, ctx) for x in v.values()) else f"is {v!r}, not a mapping of numbers"),
    "timm_popup.dataset": (None, _is(str, "a dataset name")),
    "timm_popup.recipe": (None, _is(dict, "a mapping")),
}


def is_popup_config(config: Any, header: Mapping[str, Any] | None = None) -> bool:
    """Whether ``config`` (config.json's content) describes a popup artifact: it says so (a ``timm_popup`` entry, a
    popup_* architecture) or the mask file beside it (``header``, from :func:`timm_popup.maskfile.read_header`) is
    a timm-popup mask. A plain timm checkpoint's config (an export) is left to timm."""
    if not isinstance(config, dict):
        return header is not None and META + "format_version" in header
    architecture = config.get("architecture")
    return ("timm_popup" in config or (isinstance(architecture, str) and architecture.startswith("popup_"))
            or (header is not None and META + "format_version" in header))


@functools.cache
def _timm_version() -> str:
    import timm

    return timm.__version__


def check_config(config: Any, header: dict[str, torch.Tensor] | None = None, *, where: str = CONFIG_NAME) -> None:
    """Raise :class:`MaskError`, naming the field, its value and what was expected, unless the popup artifact's
    ``config`` follows :data:`CONFIG_FIELDS` and agrees with its mask file's ``header``
    (:func:`timm_popup.maskfile.read_header` or the whole file, itself checked first; None where the mask file is not
    at hand: the loader compares it later). A config that is not a popup artifact's (:func:`is_popup_config`) is
    not checked."""
    if not is_popup_config(config, header):
        return
    if not isinstance(config, dict):
        raise MaskError(f"{where} is invalid: it holds {type(config).__name__}, not a mapping: write the artifact "
                        "again (timm_popup.save_pretrained) or download it again")
    values = check_header(header) if header is not None and META + "format_version" in header else None
    shapes = {key[: -len(".mask_shape")]: tuple(t.tolist()) for key, t in (header or {}).items()
              if key.endswith(".mask_shape")}
    ctx = dict(config=config, header=values, shapes=shapes)
    for path, (needed, rule) in CONFIG_FIELDS.items():
        parent, _, key = path.rpartition(".")
        holder = config.get(parent) if parent else config
        if not isinstance(holder, dict):
            continue  # its parent is absent (and optional) or already reported
        if key not in holder:
            if needed:
                raise MaskError(f"{where} is invalid: {path} is missing (timm_popup.save_pretrained always writes "
                                "it): write the artifact again or download it again")
            continue
        reason = rule(holder[key], ctx)
        if reason:
            raise MaskError(f"{where} is invalid: {path} {' '.join(str(reason).split())[:300]} (timm "
                            f"{_timm_version()}): repair the field or write the artifact again "
                            "(timm_popup.save_pretrained)")
