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

__all__ = ["WEIGHT_INITS", "DEFAULT_WEIGHT_INIT", "GENERATOR_VERSION", "fans", "init_std", "stream_key",
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

def check_weight_init(weight_init: str) -> str:
    if weight_init not in WEIGHT_INITS:
        raise ValueError(
            f"unknown weight_init {weight_init!r}; choose one of: {', '.join(WEIGHT_INITS)}")
    return weight_init


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
    """The standard deviation of ``weight_init`` for a weight of ``shape`` in a layer keeping ``k``."""
    family, scaled = WEIGHT_INITS[check_weight_init(weight_init)]
    fan_in, fan_out = fans(shape)
    if "xavier" in weight_init:
        std = math.sqrt(2.0 / (fan_in + fan_out))
    else:
        std = math.sqrt(2.0 / fan_in)
    if scaled:
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
    family, _ = WEIGHT_INITS[check_weight_init(weight_init)]
    std = init_std(weight_init, tuple(fan_shape) if fan_shape is not None else tuple(shape), k)
    return native.generate(shape, stream_key(seed, name), family, std)


def random_normal(shape: Sequence[int], *, seed: int, name: str, std: float) -> torch.Tensor:
    """Seeded N(0, std**2) float32 values for the frozen tensor ``name`` (embeddings, position tables)."""
    return native.generate(shape, stream_key(seed, name), "normal", float(std))


def random_uniform(shape: Sequence[int], *, seed: int, name: str) -> torch.Tensor:
    """Seeded U(-1, 1) float32 values of stream ``name``: the coin flips of seeded decisions (IteRand's re-draws)."""
    return native.generate(shape, stream_key(seed, name), "uniform", 1.0 / math.sqrt(3.0))
