"""Score-masked weight tensors: edge-popup's forward pass and straight-through gradient, on any module.

A :class:`PopupMask` is a ``torch.nn.utils.parametrize`` parametrization of one weight tensor of any module
(conv, linear, embedding, LSTM, CondConv experts, timm's Std/ScaledStd/Same convs ...): wherever the module
reads ``self.weight`` - its own forward, ``F.linear(x, self.qkv.weight)`` in an attention block, weight
standardisation - it gets ``frozen * h(|scores|)``, where ``h`` keeps exactly ``round(k * n)`` entries of the
tensor (the largest |score|s; ties go to the lowest flat index) and the gradient passes straight through
``h`` to the scores (paper eq. 5, with the sign of the score from ``abs``). The module keeps its class
(``parametrize`` subclasses it), its forward and its timm protocol.

``PopupMask.weight`` is the frozen tensor, a non-persistent buffer regenerated from the seed
(``timm_popup.init``); ``scores`` is the only parameter. The parametrization list's ``original`` is an empty
placeholder: the mask holds everything, so that modes that train the weight can swap it for a parameter.

The same masks serve the paper's baselines through a per-tensor ``mode`` (set by ``timm_popup.methods``):

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
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import native
from .init import check_k, check_weight_init, fans, random_weight, stream_key

__all__ = ["PopupMask", "MODES", "num_kept", "topk_mask", "fused_masked_weight", "mask_tensor", "unmask_tensor"]

MODES = ("topk", "sample", "fixed", "dense")

def num_kept(n: int, k: float) -> int:
    """Number of weights a tensor of ``n`` keeps at fraction ``k`` (Python's ``round``)."""
    return round(k * n)


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean mask of the ``round(k * n)`` largest ``|scores|``; ties broken by lowest flat index.

    Exact and free of host synchronisation (``timm_popup.native``: fused C kernels on the CPU, PyTorch ops
    elsewhere)."""
    return native.topk_mask(scores, k)


def fused_masked_weight(scores: torch.Tensor, weight: torch.Tensor, k: float, hint: torch.Tensor) -> torch.Tensor:
    """``weight * topk_mask(scores, k)`` with the straight-through gradient to ``scores``, in one pass over the
    tensor (selection and masked weight together) and one in backward; ``hint`` carries the threshold bracket from
    step to step."""
    return native.masked_weight(scores, weight, k, hint)[0]


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


class PopupMask(nn.Module):
    """The parametrization ``weight -> frozen * h(scores)`` of one weight tensor (module docstring)."""

    weight: torch.Tensor
    scores: nn.Parameter
    k: float
    weight_init: str
    seed: int
    popup_name: str
    #: One of ``MODES`` (module docstring); only ``timm_popup.methods`` (and loading a supermask) changes it.
    mode: str = "topk"

    def __init__(self, shape: Sequence[int], *, name: str, k: float, weight_init: str, seed: int,
                 fan_shape: Sequence[int] | None = None, device: torch.device | str | None = None,
                 init_scores: bool = True) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.popup_name = name
        self.fan_shape = tuple(fan_shape) if fan_shape is not None else shape
        device = torch.device(device or "cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        self.register_buffer("weight", torch.empty(shape, device="meta"), persistent=False)
        self.regenerate(seed=seed, k=k, weight_init=weight_init, device=device)
        self.scores = nn.Parameter(torch.empty(shape, device=device))
        if init_scores:  # else a mask is about to be loaded into them (the build of a pretrained model)
            self.reset_scores()

    def reset_scores(self) -> None:
        """Kaiming uniform as torch initialises a conv/linear weight (a=sqrt(5): bound 1/sqrt(fan_in)). Scores
        are trained, not published, so torch's RNG (seeded per tensor) is fine here."""
        bound = 1.0 / math.sqrt(fans(self.fan_shape)[0])
        gen = torch.Generator().manual_seed(stream_key(self.seed, self.popup_name + "#scores") >> 1)
        with torch.no_grad():
            self.scores.copy_(torch.empty(self.scores.shape).uniform_(-bound, bound, generator=gen))

    def regenerate(self, *, seed: int, k: float, weight_init: str, device: torch.device | None = None) -> None:
        """Make ``weight`` the seeded draw for (seed, tensor name, k, weight_init); the scores stay as they are."""
        self.k, self.weight_init, self.seed = check_k(k), check_weight_init(weight_init), int(seed)
        weight = random_weight(self.weight.shape, seed=self.seed, name=self.popup_name,
                               weight_init=self.weight_init, k=self.k, fan_shape=self.fan_shape)
        self.weight = weight.to(device or self.weight.device)
        self._cache: tuple | None = None
        self._hint = native.new_hint()  # the threshold bracket the fused selection carries from step to step

    def set_mode(self, mode: str) -> None:
        """Switch to another of ``MODES`` (what ``timm_popup.methods`` and loading a supermask do)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.mode, self._cache = mode, None

    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the frozen weight (a re-seed) and forget what was computed from the old one."""
        self.weight, self._cache = weight, None

    @property
    def learns_weight(self) -> bool:
        """Whether ``weight`` is a trainable parameter (dense or fixed-mask modes) rather than frozen."""
        return self.mode in ("dense", "fixed")

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

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        """``weight * mask``; differentiable (straight-through) with respect to the scores."""
        mode = self.mode
        if mode == "topk":  # edge-popup's hot path: keep it first and unchanged
            if self.training:
                return fused_masked_weight(self.scores, self.weight, self.k, self._hint)
            if torch.is_grad_enabled() and self.scores.requires_grad:
                return _StraightThrough.apply(self.scores, self.weight, self._cached()[1])
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

    def extra_repr(self) -> str:
        mode = "" if self.mode == "topk" else f", mode={self.mode}"
        return f"{self.popup_name}: {tuple(self.weight.shape)}, k={self.k}, weight_init={self.weight_init}, " \
               f"seed={self.seed}{mode}"


def mask_tensor(module: nn.Module, tensor_name: str, mask: PopupMask) -> None:
    """Make ``module.<tensor_name>`` read as ``mask``'s masked weight, wherever and however the module reads it.

    The parameter is removed (its values are not needed: the mask regenerates them); an empty non-persistent
    placeholder takes the place of ``parametrize``'s ``original``, so state dicts hold only the scores.
    """
    old = getattr(module, tensor_name)
    delattr(module, tensor_name)
    module.register_buffer(tensor_name, torch.empty(0, dtype=old.dtype, device=mask.weight.device), persistent=False)
    parametrize.register_parametrization(module, tensor_name, mask, unsafe=True)
    plist = module.parametrizations[tensor_name]
    plist._non_persistent_buffers_set.add("original")


def unmask_tensor(module: nn.Module, tensor_name: str) -> nn.Parameter:
    """Fold the mask of ``module.<tensor_name>`` into a plain parameter (the module as timm made it)."""
    with torch.no_grad():
        value = getattr(module, tensor_name).detach().clone()
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    delattr(module, tensor_name)
    param = nn.Parameter(value, requires_grad=True)
    module.register_parameter(tensor_name, param)
    return param
