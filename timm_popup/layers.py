"""Score-masked conv/linear layers: edge-popup's forward pass and straight-through gradient.

A popup layer computes with ``weight * h(|scores|)``, where ``h`` keeps exactly ``round(k * n)`` entries
of the layer (the largest |score|s; ties go to the lowest flat index) and the gradient passes straight
through ``h`` to the scores (paper eq. 5, with the sign of the score from ``abs``). ``weight`` is a
frozen, non-persistent buffer regenerated from the seed (``timm_popup.init``); ``scores`` is the only
parameter.

The same layers serve the paper's baselines through a per-layer ``mode`` (set by ``timm_popup.methods``):

* ``"topk"`` (edge-popup, the default): the mask above.
* ``"sample"`` (Zhou et al.'s supermask): each training forward draws ``mask ~ Bernoulli(sigmoid(scores))``, the
  gradient passing straight through the sample to the probability; eval uses the deterministic mask
  ``sigmoid(scores) > 0.5``, i.e. ``scores > 0`` (binary, so it fits the bit-packed artifact).
* ``"fixed"`` (training the weights of a given subnetwork): ``weight`` is a trainable parameter multiplied by
  the boolean buffer ``fixed_mask``; there are no scores.
* ``"dense"`` (the learned-dense baseline): ``weight`` is a trainable parameter used unmasked; no scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from torch import nn

from .init import DEFAULT_WEIGHT_INIT, check_k, check_weight_init, fans, random_weight, stream_key

__all__ = ["PopupConv2d", "PopupLinear", "PopupLayer", "MODES", "num_kept", "topk_mask"]

MODES = ("topk", "sample", "fixed", "dense")

_SAMPLE = 4096  # scores sampled to bracket the threshold; the bracket holds ~4% of a layer
_SMALL = 1 << 16  # below this many weights a plain kthvalue is as fast


def num_kept(n: int, k: float) -> int:
    """Number of weights a layer of ``n`` keeps at fraction ``k`` (Python's ``round``)."""
    return round(k * n)


def _kth_largest(a: torch.Tensor, keep: int) -> tuple[torch.Tensor, int]:
    """Exact value of the ``keep``-th largest element of 1-D ``a``, and how many elements are >= it.

    A strided sample brackets the value; one pass counts what lies above the bracket and gathers the
    thin band inside it, and ``kthvalue`` runs on the band only. Falls back to a full ``kthvalue`` if
    the bracket missed (the result is exact either way, and deterministic).
    """
    n = a.numel()
    if n > _SMALL:
        sample = a[:: n // _SAMPLE].sort().values
        m = sample.numel()
        q = (n - keep) / n
        margin = 4.0 * math.sqrt(m * q * (1 - q)) + 8
        j_lo, j_hi = int(q * m - margin), int(q * m + margin)
        inside = a >= sample[j_lo] if j_lo >= 0 else torch.ones_like(a, dtype=torch.bool)
        n_above = 0
        if j_hi < m:
            above = a > sample[j_hi]
            inside &= ~above
            n_above = int(torch.count_nonzero(above))
        band = a[inside]
        need = keep - n_above  # how many of the band are kept
        if 0 < need <= band.numel():
            threshold = band.kthvalue(band.numel() - need + 1).values
            return threshold, n_above + int(torch.count_nonzero(band >= threshold))
    threshold = a.kthvalue(n - keep + 1).values
    return threshold, int(torch.count_nonzero(a >= threshold))


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean mask of the ``round(k * n)`` largest ``|scores|``; ties broken by lowest flat index."""
    a = scores.detach().abs().flatten()
    n = a.numel()
    keep = num_kept(n, k)
    if keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold, n_ge = _kth_largest(a, keep)
    mask = a >= threshold
    if n_ge > keep:  # ties at the threshold: drop the tied entries with the highest indices
        tied = (a == threshold).nonzero().flatten()
        mask[tied[tied.numel() - (n_ge - keep):]] = False
    return mask.view_as(scores)


class _StraightThrough(torch.autograd.Function):
    """weight * mask forward; d(loss)/d(scores) = grad * weight * sign(scores) backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scores, weight)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight = ctx.saved_tensors
        return (grad * weight).mul_(scores.sign()), None, None


class _SampledMask(_StraightThrough):
    """weight * mask forward (mask sampled by the caller); backward straight through the Bernoulli sample to its
    probability, as Zhou et al.: d(loss)/d(scores) = grad * weight * sigmoid'(scores)."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight = ctx.saved_tensors
        p = torch.sigmoid(scores)
        return (grad * weight).mul_(p * (1 - p)), None, None


class PopupLayer:
    """What PopupConv2d and PopupLinear share: frozen seeded weight, scores, top-k mask."""

    weight: torch.Tensor
    scores: nn.Parameter
    k: float
    weight_init: str
    seed: int
    popup_name: str
    #: One of ``MODES`` (module docstring); only ``timm_popup.methods`` (and loading a supermask) changes it.
    mode: str = "topk"

    @property
    def dense_weight(self) -> bool:
        """Whether ``weight`` is a trainable parameter used unmasked (the learned-dense baseline)."""
        return self.mode == "dense"

    @property
    def learns_weight(self) -> bool:
        """Whether ``weight`` is a trainable parameter (dense or fixed-mask modes) rather than frozen."""
        return self.mode in ("dense", "fixed")

    def _make_popup(self, *, k: float, weight_init: str, seed: int, name: str) -> None:
        shape, device = self.weight.shape, self.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        has_bias = self.bias is not None
        del self.weight, self.bias
        self.popup_name = name
        self.register_buffer("weight", torch.empty(shape, device="meta"), persistent=False)
        self.regenerate(seed=seed, k=k, weight_init=weight_init, device=device)
        if has_bias:  # the paper's layers have no bias: keep the slot, pinned at zero
            self.register_buffer("bias", torch.zeros(shape[0], device=device), persistent=False)
        else:
            self.bias = None
        # Kaiming uniform as torch initialises a conv/linear weight (a=sqrt(5): bound 1/sqrt(fan_in)).
        # Scores are trained, not published, so torch's RNG (seeded per layer) is fine here.
        bound = 1.0 / math.sqrt(fans(shape)[0])
        gen = torch.Generator().manual_seed(stream_key(seed, name + "#scores") >> 1)
        scores = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        self.scores = nn.Parameter(scores.to(device))

    def regenerate(self, *, seed: int, k: float, weight_init: str, device: torch.device | None = None) -> None:
        """Make ``weight`` the seeded draw for (seed, layer name, k, weight_init); the scores stay as they are."""
        self.k, self.weight_init, self.seed = check_k(k), check_weight_init(weight_init), int(seed)
        weight = random_weight(self.weight.shape, seed=self.seed, name=self.popup_name,
                               weight_init=self.weight_init, k=self.k)
        self.weight = weight.to(device or self.weight.device)
        self._cache: tuple | None = None

    def get_mask(self) -> torch.Tensor:
        """The current boolean mask (shape of ``weight``): True where the weight is kept. For a supermask this
        is the deterministic (eval) mask, also in training mode: the one an artifact stores."""
        mode = self.mode
        if mode == "topk":
            if self.training:
                return topk_mask(self.scores, self.k)
            return self._cached()[1]
        if mode == "sample":
            return self._cached()[1]
        if mode == "fixed":
            return self.fixed_mask
        return torch.ones_like(self.weight, dtype=torch.bool)

    def masked_weight(self) -> torch.Tensor:
        """``weight * mask``; differentiable (straight-through) with respect to the scores."""
        mode = self.mode
        if mode == "topk":  # edge-popup's hot path: keep it first and unchanged
            if self.training or (torch.is_grad_enabled() and self.scores.requires_grad):
                mask = topk_mask(self.scores, self.k) if self.training else self._cached()[1]
                return _StraightThrough.apply(self.scores, self.weight, mask)
            return self._cached()[2]
        if mode == "sample":
            if self.training:  # a fresh subnetwork every forward (torch's RNG, seeded per epoch by the trainer)
                s = self.scores.detach()
                mask = torch.rand_like(s) < torch.sigmoid(s)
                return _SampledMask.apply(self.scores, self.weight, mask)
            if torch.is_grad_enabled() and self.scores.requires_grad:
                return _SampledMask.apply(self.scores, self.weight, self._cached()[1])
            return self._cached()[2]
        if mode == "fixed":  # the product keeps masked weights' gradient exactly zero, so they stay zero
            return self.weight * self.fixed_mask
        return self.weight

    def _cached(self) -> tuple:
        # Eval mode: mask once, reuse until the scores change (in-place updates bump _version). Whatever
        # changes ``mode`` resets ``_cache``, which keeps the mode out of edge-popup's per-forward key.
        s = self.scores
        key = (s._version, s.data_ptr(), self.k, self.weight.data_ptr())
        if self._cache is None or self._cache[0] != key:
            # sample mode's eval mask: sigmoid(s) > 0.5 without rounding sigmoid near 0.5
            mask = topk_mask(s, self.k) if self.mode == "topk" else s.detach() > 0
            self._cache = (key, mask, self.weight * mask)
        return self._cache

    def popup_repr(self) -> str:
        mode = "" if self.mode == "topk" else f", mode={self.mode}"
        return f"k={self.k}, weight_init={self.weight_init}, seed={self.seed}{mode}"


class PopupConv2d(nn.Conv2d, PopupLayer):
    """An ``nn.Conv2d`` whose frozen random weight is masked by learned scores."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *,
                 k: float = 0.5, weight_init: str = DEFAULT_WEIGHT_INIT, seed: int = 0,
                 name: str = "", same_pad: bool = False, device=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device="meta")
        self.same_pad = same_pad  # timm's Conv2dSame: TF-style padding computed from the input size
        self._make_popup(k=k, weight_init=weight_init, seed=seed, name=name)
        if device is not None:
            self.to(device)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, k: float, weight_init: str, seed: int, name: str,
                   same_pad: bool = False) -> PopupConv2d:
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, k=k,
                    weight_init=weight_init, seed=seed, name=name, same_pad=same_pad)
        return layer.to(conv.weight.device) if conv.weight.device.type != "meta" else layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.popup_repr()


class PopupLinear(nn.Linear, PopupLayer):
    """An ``nn.Linear`` whose frozen random weight is masked by learned scores."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, k: float = 0.5,
                 weight_init: str = DEFAULT_WEIGHT_INIT, seed: int = 0, name: str = "",
                 device=None) -> None:
        super().__init__(in_features, out_features, bias, device="meta")
        self._make_popup(k=k, weight_init=weight_init, seed=seed, name=name)
        if device is not None:
            self.to(device)

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, k: float, weight_init: str, seed: int,
                   name: str) -> PopupLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, k=k,
                    weight_init=weight_init, seed=seed, name=name)
        return layer.to(linear.weight.device) if linear.weight.device.type != "meta" else layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.popup_repr()
