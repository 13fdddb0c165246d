"""The weight generator's definition in numpy: SplitMix64 streams and the recipe that turns their bits into
float32 weights (``timm_popup.init``'s docstring is the specification), and the version of that definition,
``GENERATOR_VERSION``, which every mask file records.

It is the lowest module of the package, so that both ``init`` (which names the streams and picks the
distributions) and ``native`` (whose C generator must reproduce these bits, and checks itself against them when
it loads) build on it. Every published mask is valid only on exactly these bits: change nothing here without a
new generator version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["GENERATOR_VERSION", "splitmix64", "draw_reference"]

#: the version of the bits defined here (and of the stream names in ``timm_popup.init``): a mask is valid only on
#: the weights of the version it records
GENERATOR_VERSION = 2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 20  # elements per block: bounds float64 temporaries to a few MB

# Acklam's approximation of the standard normal quantile function.
_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
_P_LOW = 0.02425
_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476


def splitmix64(key: int, start: int, stop: int) -> np.ndarray:
    """SplitMix64 outputs number start+1 .. stop of the generator seeded with ``key``."""
    z = np.arange(start + 1, stop + 1, dtype=np.uint64)
    z *= _GOLDEN
    z += np.uint64(key)
    z ^= z >> np.uint64(30)
    z *= _MUL1
    z ^= z >> np.uint64(27)
    z *= _MUL2
    z ^= z >> np.uint64(31)
    return z


def _horner(x: np.ndarray, coeffs: Sequence[float]) -> np.ndarray:
    out = np.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        out *= x
        out += c
    return out


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive finite x from IEEE-exact operations only (frexp, +, -, *, /)."""
    m, e = np.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)  # |s| <= 0.1716: log(m) = 2 atanh(s), 11 odd terms reach 1e-17
    s2 = s * s
    acc = np.full_like(s, 1.0 / 21.0)
    for j in range(9, -1, -1):
        acc *= s2
        acc += 1.0 / (2 * j + 1)
    return 2.0 * s * acc + e * _LN2


def _half_normal(p: np.ndarray) -> np.ndarray:
    """-Phi^-1(p) for p in (0, 1/2): the magnitude of a standard normal draw."""
    q = p - 0.5
    r = q * q
    out = _horner(r, _A)
    out *= q
    out /= _horner(r, _B) * r + 1.0
    np.negative(out, out=out)
    tail = np.flatnonzero(p < _P_LOW)  # about 5% of draws take the tail formula instead
    qt = np.sqrt(-2.0 * _log(p[tail]))
    out[tail] = -_horner(qt, _C) / (_horner(qt, _D) * qt + 1.0)
    return out


def draw_reference(shape: Sequence[int], family: str, std: float, key: int) -> torch.Tensor:
    """The definition of every frozen value (module docstring) in numpy; ``timm_popup.native`` computes the same
    bits in C, in parallel, and is used when it is available (it checks itself against this on load)."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        z = splitmix64(key, start, stop)
        if family == "uniform":
            u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
            vals = (2.0 * u - 1.0) * (math.sqrt(3.0) * std)
        else:
            negative = (z >> np.uint64(63)).astype(bool)
            if family == "signed":
                vals = np.full(stop - start, std)
            else:
                m = (z >> np.uint64(11)) & np.uint64((1 << 52) - 1)
                vals = _half_normal((m.astype(np.float64) + 0.5) * 2.0**-53) * std
            np.negative(vals, out=vals, where=negative)
        out[start:stop] = vals  # the one rounding to float32
    return torch.from_numpy(out).reshape(shape)
