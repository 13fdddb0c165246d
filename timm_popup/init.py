"""Seeded, counter-based weight distributions.

A popup layer's weight is never stored: it is regenerated from (seed, the layer's qualified name, shape,
distribution, k). This module is that function, and its output must stay bit-identical forever, on any
device, process, platform and torch version, because every published mask is valid only on these exact
weights. Hence:

* Random bits come from our own counter-based generator, not torch's RNG. Element ``i`` (row-major, C
  order) of a layer draws ``z_i = mix64(key + (i + 1) * 0x9E3779B97F4A7C15 mod 2**64)``, where ``mix64`` is
  SplitMix64's output function and ``key`` is the first 8 bytes (little-endian) of
  ``sha256(f"timm-popup/v2|{seed}|{name}")`` (``name``: the tensor's qualified name in the model, e.g.
  ``layer1.0.conv1.weight``). This is exactly the stream of a SplitMix64 generator seeded
  with ``key``, so it can be reproduced in any language. Arithmetic is numpy ``uint64``, which wraps
  modulo 2**64 by definition.
* Real numbers are made from the bits with IEEE-754 float64 operations that are correctly rounded on
  every conforming platform (+, -, *, /, sqrt, frexp); we avoid libm's transcendental functions (their
  last bit differs between implementations) by computing the one logarithm we need from a series.
  The result is rounded once to float32.

Bit layout of ``z`` (bit 63 is the most significant):
    bit 63        sign of the weight (1 = negative) for every distribution but ``kaiming_uniform``
    bits 11..62   52-bit integer m, giving p = (m + 0.5) / 2**53 in (0, 1/2)

* normal distributions: ``|x| = -Phi^-1(p)`` with Acklam's rational approximation of the normal
  quantile (relative error < 1.2e-9), weight = sign * |x| * std.
* signed constants: weight = sign * std.
* ``kaiming_uniform``: u = (z >> 11 + 0.5) / 2**53 in (0, 1), weight = (2u - 1) * bound.
* :func:`random_normal` (frozen embeddings and tables): the normal recipe with a given std.

Version history: 1 keyed streams by module name and drew embeddings at std 0.02/sqrt(numel) (a bug);
2 keys them by tensor name (``conv.weight``) and draws embeddings at exactly the documented std.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from . import native
from .reference import GENERATOR_VERSION, draw_reference, splitmix64

__all__ = ["WEIGHT_INITS", "DEFAULT_WEIGHT_INIT", "GENERATOR_VERSION", "FAN_MODES", "NONLINEARITIES", "fans",
           "init_std", "stream_key", "weight_distribution", "distribution_options", "is_scaled",
           "random_uniform", "random_weight", "random_normal", "check_k", "check_weight_init", "draw_reference",
           "splitmix64"]


#: name -> (family, scaled by sqrt(1/k)).  std is Kaiming's sqrt(2 / fan_in) (ReLU gain, fan_in mode)
#: unless the name says xavier (Glorot: sqrt(2 / (fan_in + fan_out))).
WEIGHT_INITS: dict[str, tuple[str, bool]] = {
    "kaiming_normal": ("normal", False),  # the paper's N_k
    "signed_constant": ("signed", False),  # the paper's U_k: +-std of N_k
    "scaled_kaiming_normal": ("normal", True),  # N_k with std * sqrt(1/k) (paper section 4.5)
    "scaled_signed_constant": ("signed", True),
    "kaiming_uniform": ("uniform", False),  # U(-sqrt(3) std, sqrt(3) std), same variance as N_k
    "xavier_normal": ("normal", False),  # Zhou et al.'s N_x
    "signed_xavier_constant": ("signed", False),  # Zhou et al.'s U_x (their "signed constant")
}
# Table 2 of the paper: the signed Kaiming constant gives the best subnetworks on ImageNet and CIFAR.
DEFAULT_WEIGHT_INIT = "signed_constant"

#: ``mode``: the fan that sets a Kaiming std (torch.nn.init's ``mode``)
FAN_MODES = ("fan_in", "fan_out")
#: the nonlinearities whose gain (``torch.nn.init.calculate_gain``) scales a Kaiming std
NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
_DEFAULT_OPTIONS = dict(mode="fan_in", nonlinearity="relu", scale_fan=False)


def weight_distribution(weight_init: str, *, mode: str | None = None, nonlinearity: str | None = None,
                        scale_fan: bool | None = None) -> str:
    """The full name of a weight distribution: ``weight_init`` with the paper code's ``--mode``, ``--nonlinearity``
    and ``--scale-fan`` where they differ from its defaults (fan_in, relu, no scaling), e.g.
    ``kaiming_normal,mode=fan_out,nonlinearity=tanh,scale_fan``. A default distribution keeps its plain name (so
    its artifacts are byte for byte those of earlier releases); options given here override those in the name."""
    name, options = _parse(weight_init)
    given = dict(mode=mode, nonlinearity=nonlinearity, scale_fan=scale_fan)
    options.update({key: value for key, value in given.items() if value is not None})
    if options["mode"] not in FAN_MODES:
        raise ValueError(f"unknown init mode {options['mode']!r}; choose one of: {', '.join(FAN_MODES)}")
    if options["nonlinearity"] not in NONLINEARITIES:
        raise ValueError(f"unknown nonlinearity {options['nonlinearity']!r} (torch.nn.init.calculate_gain's names); "
                         f"choose one of: {', '.join(NONLINEARITIES)}")
    changed = [key for key, value in options.items() if value != _DEFAULT_OPTIONS[key]]
    if changed and "xavier" in name:
        raise ValueError(f"{name} has no {changed[0]} option (Glorot's std uses both fans and gain 1): use a kaiming "
                         "or signed_constant distribution")
    if options["scale_fan"] and WEIGHT_INITS[name][1]:
        raise ValueError(f"{name} is already scaled by sqrt(1/k): drop scale_fan or use "
                         f"{name.removeprefix('scaled_')}")
    parts = [name] + [f"{key}={options[key]}" for key in ("mode", "nonlinearity") if key in changed]
    return ",".join(parts + (["scale_fan"] if options["scale_fan"] else []))


def _parse(weight_init: str) -> tuple[str, dict]:
    name, *rest = str(weight_init).split(",")
    if name not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {name!r}; choose one of: {', '.join(WEIGHT_INITS)}")
    options = dict(_DEFAULT_OPTIONS)
    for part in rest:
        key, eq, value = part.partition("=")
        if key == "scale_fan" and not eq:
            options["scale_fan"] = True
        elif key in ("mode", "nonlinearity") and eq:
            options[key] = value
        else:
            raise ValueError(f"weight_init {weight_init!r}: unknown option {part!r} (mode=..., nonlinearity=..., "
                             "scale_fan)")
    return name, options


def is_scaled(weight_init: str) -> bool:
    """Whether the distribution's std carries the factor sqrt(1/k) (a ``scaled_*`` name or ``scale_fan``)."""
    name, options = distribution_options(weight_init)
    return WEIGHT_INITS[name][1] or options["scale_fan"]


def distribution_options(weight_init: str) -> tuple[str, dict]:
    """(the distribution's base name, its mode / nonlinearity / scale_fan) of a full name."""
    return _parse(check_weight_init(weight_init))


def check_weight_init(weight_init: str) -> str:
    """The canonical full name of ``weight_init`` (:func:`weight_distribution`); a one-line error if unknown."""
    return weight_distribution(weight_init)


def check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < float(k) <= 1.0:
        raise ValueError(
            f"k={k!r} is outside (0, 1]: k is the fraction of weights KEPT (e.g. 0.5 keeps half)")
    return float(k)


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a conv/linear weight shape, as ``torch.nn.init`` computes them."""
    if len(shape) < 2:
        raise ValueError(f"weight shape {tuple(shape)} has fewer than 2 dimensions")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def init_std(weight_init: str, shape: Sequence[int], k: float = 1.0) -> float:
    """The standard deviation of ``weight_init`` (a full name, :func:`weight_distribution`) for a weight of
    ``shape`` in a layer keeping ``k``.

    Kaiming: gain / sqrt(fan) as the paper's code (utils/builder.py) computes it, the fan ``mode``'s; ``scale_fan``
    multiplies the fan by k, the paper's "scaled" sqrt(1/k) (section 4.5; the paper's code multiplies by
    1 - prune_rate, the fraction pruned where its layers keep prune_rate: the confusion its users filed)."""
    name, options = _parse(weight_init)
    family, scaled = WEIGHT_INITS[name]
    fan_in, fan_out = fans(shape)
    if "xavier" in name:
        std = math.sqrt(2.0 / (fan_in + fan_out))
    else:
        fan = fan_in if options["mode"] == "fan_in" else fan_out
        nonlinearity = options["nonlinearity"]
        # ReLU keeps its original expression: the default weights stay bit for bit what they were
        std = math.sqrt(2.0 / fan) if nonlinearity == "relu" else (
            torch.nn.init.calculate_gain(nonlinearity) / math.sqrt(fan))
    if scaled or options["scale_fan"]:
        std = std * math.sqrt(1.0 / check_k(k))
    return std


def stream_key(seed: int, name: str) -> int:
    """The 64-bit SplitMix64 seed of layer ``name`` under model seed ``seed``."""
    digest = hashlib.sha256(f"timm-popup/v{GENERATOR_VERSION}|{int(seed)}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def random_weight(
    shape: Sequence[int],
    *,
    seed: int,
    name: str,
    weight_init: str,
    k: float = 1.0,
    fan_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """The frozen random float32 weight of tensor ``name`` (a pure function of its arguments).

    ``fan_shape`` is the shape whose fans set the std, where it differs from the stored shape (CondConv keeps
    its experts' weights flattened). Computed on the CPU; the values do not depend on where they are used.
    """
    family, _ = WEIGHT_INITS[distribution_options(weight_init)[0]]
    std = init_std(weight_init, tuple(fan_shape) if fan_shape is not None else tuple(shape), k)
    return native.generate(shape, stream_key(seed, name), family, std)


def random_normal(shape: Sequence[int], *, seed: int, name: str, std: float) -> torch.Tensor:
    """Seeded N(0, std**2) float32 values for the frozen tensor ``name`` (embeddings, position tables)."""
    return native.generate(shape, stream_key(seed, name), "normal", float(std))


def random_uniform(shape: Sequence[int], *, seed: int, name: str) -> torch.Tensor:
    """Seeded U(-1, 1) float32 values of stream ``name``: the coin flips of seeded decisions (IteRand's re-draws)."""
    return native.generate(shape, stream_key(seed, name), "uniform", 1.0 / math.sqrt(3.0))
