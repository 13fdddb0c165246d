"""Edge-popup's hot path: fused CPU kernels and the weight generator, and the keyed selection GPUs run.

The profile of a popup training step shows ~13 extra passes over every weight tensor (abs, bracket
comparisons, count, band gather, final comparison, ``weight * mask``, and three in backward) plus host syncs.
``csrc/popup_kernels.c`` does the same work in two passes (select and mask together, backward) and regenerates
seeded weights at a few ns per weight in parallel. It is plain C + OpenMP, compiled on first use with the system C
compiler into a per-user cache and loaded with ctypes (``timm_popup.clib``), so the package needs no build step.

Everything here is exact: masks, masked weights, gradients and generated weights are bit-identical to
``timm_popup.layers`` / ``timm_popup.init`` (tests/test_native.py). Where the kernels cannot run (no
compiler, ``TIMM_POPUP_NATIVE=0``, a CUDA tensor, a non-contiguous or non-float32 tensor) the *keyed selection*
computes the same values with a handful of PyTorch ops and no host sync (no ``.item()``, ``nonzero`` or boolean
indexing): one int64 key per entry and one ``torch.topk`` (see its section below).

The tensor ops are ``torch.library`` custom ops (``torch.ops.timm_popup.*``) with fake implementations, so
they trace under ``torch.compile``; ``masked_weight`` has its straight-through backward registered. Eager training
on the CPU calls the kernels directly instead (see "eager training path" below): same bits, less dispatch.

The selection takes a *hint*: a float64 tensor ``[lo, hi]`` bracketing the threshold (:func:`new_hint` makes an
empty one). The kernel reads it and writes the bracket for the next call, so a layer that keeps one hint
tensor selects in one pass over its scores from the second step on, and that same pass writes the masked weight
of every entry outside the bracket (the few inside are patched once the threshold is known). A wrong hint only
costs time.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from . import clib
from .reference import draw_reference, splitmix64

__all__ = ["available", "new_hint", "Selection", "topk_threshold", "topk_mask", "masked_weight",
           "training_masked_weight", "masked_weight_signs", "ste_backward", "generate", "sign_bits", "torch_select",
           "torch_mask", "selection_keys", "kth_key", "keyed_mask", "FAMILIES", "parse_structure", "nm_applies",
           "nm_groups", "nm_ungroup", "nm_mask", "nm_fusable", "nm_masked_weight"]

#: generator families of ``timm_popup.init.draw_reference`` and their codes in the C kernel
FAMILIES = {"normal": 0, "signed": 1, "uniform": 2}

# -O3 vectorises the kernels (-O2 in gcc 12 does not); no -ffast-math and -ffp-contract=off (no fused
# multiply-add) keep every float64 operation rounding exactly as numpy's does.
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c99", "-fno-fast-math", "-ffp-contract=off"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_loading = False


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, f64, u64, ptr, cint = (ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_uint64,
                                     ctypes.c_void_p, ctypes.c_int)
    sigs = {
        "popup_has_openmp": ([], cint),
        "popup_topk_select": ([ptr, i64, i64, ptr, cint, ptr, ptr], cint),
        "popup_select_masked_weight": ([ptr, ptr, i64, i64, ptr, cint, ptr, ptr, ptr], cint),
        "popup_select_masked_weight_signs": ([ptr, ptr, f64, i64, i64, ptr, cint, ptr, ptr, ptr], cint),
        "popup_masked_weight": ([ptr, ptr, i64, f32, i64, ptr, cint], None),
        "popup_masked_weight_signs": ([ptr, ptr, f64, i64, f32, i64, ptr, cint], None),
        "popup_build_mask": ([ptr, i64, f32, i64, ptr, cint], None),
        "popup_nm_masked_weight": ([ptr, ptr, i64, i64, i64, cint, cint, ptr, cint], None),
        "popup_ste_backward": ([ptr, ptr, ptr, i64, ptr, cint], None),
        "popup_ste_backward_signs": ([ptr, ptr, f64, ptr, i64, ptr, cint], None),
        "popup_generate": ([u64, i64, i64, cint, f64, ptr, cint], cint),
        "popup_generate_sign_bits": ([u64, i64, ptr, cint], None),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def _self_check(lib: ctypes.CDLL) -> None:
    """Refuse a library whose generator is not bit-identical to init.py (e.g. a compiler that contracts FMAs
    regardless of flags): published masks are only valid on exactly those weights."""
    n = 4096  # ~200 tail draws of the normal family, every branch of the generator
    for family in FAMILIES:
        ref = draw_reference((n,), family, 0.5, 0x0123456789ABCDEF)
        out = torch.empty(n)
        lib.popup_generate(0x0123456789ABCDEF, 0, n, FAMILIES[family], 0.5, out.data_ptr(), 1)
        if not torch.equal(out.view(torch.int32), ref.view(torch.int32)):
            raise RuntimeError(f"compiled generator differs from timm_popup.init for family {family!r}")


def _load() -> ctypes.CDLL:
    # Apple clang without libomp: serial kernels are still exact and fast
    lib, failures = clib.load("popup_kernels.c", [([*_FLAGS, "-fopenmp"], ["-lm"]), (_FLAGS, ["-lm"])])
    if failures:
        warnings.warn(f"timm_popup.native: compiled without OpenMP (serial kernels): {failures[0]}", stacklevel=3)
    _declare(lib)
    _self_check(lib)
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried, _loading
    if _tried:
        return _lib
    if _loading:  # re-entered from the self-check (init.draw_reference may route to generate()): numpy serves meanwhile
        return None
    with _lock:
        if not _tried:
            if os.environ.get("TIMM_POPUP_NATIVE", "1") != "0":
                _loading = True
                try:
                    _lib = _load()
                except Exception as err:  # any failure: the exact PyTorch path serves instead
                    warnings.warn(f"timm_popup.native: C kernels unavailable, using the pure-PyTorch path ({err})",
                                  stacklevel=3)
                    _lib = None
                finally:
                    _loading = False
            _tried = True
    return _lib


def available() -> bool:
    """Whether the compiled C kernels are in use (compiles them on the first call)."""
    return _library() is not None


def _reset() -> None:
    """Forget the loaded library so the next call compiles/loads again (tests change the environment)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False


def _native(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library if every tensor is a contiguous CPU tensor of a dtype the kernels take, else None."""
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.uint8):
            return None
    return _library()


def _threads() -> int:
    return torch.get_num_threads()


def num_kept(n: int, k: float) -> int:
    """``round(k * n)`` (Python's round, as ``timm_popup.layers.num_kept``)."""
    return round(k * n)


# ---- the exact selection on any device: unique keys and torch.topk (no host syncs) ---------------------------
# Each entry gets one int64 key: the float32 bits of |score| (monotonic in the value for non-negative floats,
# +0 and -0 equal) in the high word and the inverted flat index n-1-i in the low word. Keys are unique and order
# entries exactly as the selection does (larger |score| first, ties to the lower index), so the keep largest keys
# *are* the mask: one torch.topk, no tie pass, no kthvalue (which CUDA runs 50-200x slower than topk on one long
# row). The key of the keep-th largest entry carries the (thr, cut) of the C kernels in its two words.
# A NaN score ranks above every number here, where the C kernels drop it: only a diverged run has one.

_HI = 1 if sys.byteorder == "little" else 0  # the high int32 word of an int64
_NONE_KEPT = torch.iinfo(torch.int64).max  # above every key: |score| bits < 2**31 and n - 1 - i < 2**31
_ALL_KEPT = torch.iinfo(torch.int64).min


def selection_keys(scores: torch.Tensor) -> torch.Tensor:
    """The flat int64 key of every entry of ``scores`` (above), in two device ops: the index words by ``arange``
    (an int64 below 2**31 has a zero high word), then ``abs`` written into the high words. Read in ``scores``' own
    layout (channels_last scores are not copied); the index is the flat index of the logical, row-major order."""
    s = scores.detach()
    n = s.numel()
    if n >= 2**31:
        raise ValueError(f"a masked tensor of {n} entries is too large for the keyed selection (at most 2**31 - 1)")
    keys = torch.arange(n - 1, -1, -1, device=s.device)
    if torch.compiler.is_compiling():  # written functionally: the compiler fuses it into one kernel anyway
        return (s.abs().reshape(-1).view(torch.int32).to(torch.int64) << 32) | keys
    high = keys.view(s.shape if s.dim() else (1,)).view(torch.int32)[..., _HI::2]
    torch.abs(s.view(high.shape), out=high.view(torch.float32))
    return keys


def kth_key(keys: torch.Tensor, keep: int) -> torch.Tensor:
    """The key of the ``keep``-th largest entry (0-dim, on the keys' device): entry i is kept iff its key is >= it."""
    if keep >= keys.numel():
        return torch.full((), _ALL_KEPT, dtype=torch.int64, device=keys.device)
    if keep <= 0:
        return torch.full((), _NONE_KEPT, dtype=torch.int64, device=keys.device)
    return keys.topk(keep, sorted=False).values.min()


def torch_select(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thr, cut)`` of the ``keep`` largest ``|scores|`` with PyTorch ops only, kept on the device (no sync).

    ``cut`` is the flat index of the last kept entry tied at ``thr``: the same mask as the C kernels' pair, which
    says ``n - 1`` where every tie is kept."""
    n = scores.numel()
    if keep >= n:
        return scores.new_full((), -math.inf), torch.full((), n - 1, dtype=torch.int64, device=scores.device)
    if keep <= 0:
        return scores.new_full((), math.inf), torch.full((), -1, dtype=torch.int64, device=scores.device)
    kth = kth_key(selection_keys(scores), keep)
    thr = (kth >> 32).to(torch.int32).view(torch.float32)
    return thr, (n - 1) - (kth & 0xFFFFFFFF)


def torch_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """The mask of :func:`torch_select`'s ``(thr, cut)``: above the threshold, or tied at it up to index ``cut``."""
    a = scores.detach().abs()
    idx = torch.arange(a.numel(), device=a.device).view_as(a)
    return (a > thr) | ((a == thr) & (idx <= cut))


def keyed_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean mask of the ``round(k * n)`` largest ``|scores|`` (ties to the lowest flat index), in five ops."""
    keys = selection_keys(scores)
    return (keys >= kth_key(keys, num_kept(scores.numel(), k))).view(scores.shape)


# ---- N:M structured selection ------------------------------------------------------------------------------------
# A group is M consecutive weights along dim 1 of the tensor (a linear layer's input features, a conv's input
# channels at one kernel tap: the reduction axis that NVIDIA's sparse tensor cores, cuSPARSELt and TensorRT group
# in a channels-last layout). The groups' order is that of ``nm_groups``: the tensor with dim 1 moved last.


def parse_structure(structure: str | Sequence[int]) -> tuple[int, int]:
    """``(n, m)`` of an N:M structure given as ``"2:4"`` or ``(2, 4)``: keep n of every m, 1 <= n < m <= 32."""
    try:
        n, m = (int(v) for v in (structure.split(":") if isinstance(structure, str) else structure))
    except (TypeError, ValueError):
        raise ValueError(f"structure {structure!r} is not N:M: write it as '2:4' (keep 2 of every 4 weights)") from None
    if not 1 <= n < m <= 32:
        raise ValueError(f"structure {n}:{m}: an N:M structure keeps 1 <= N < M of every M weights, M at most 32")
    return n, m


def nm_applies(shape: Sequence[int], m: int) -> bool:
    """Whether a tensor of ``shape`` splits into groups of ``m`` along dim 1 (else it keeps an unstructured top-k)."""
    return len(shape) >= 2 and shape[1] % m == 0


def nm_groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """``t`` as its groups of ``m``: shape ``(G, m)``, dim 1 of ``t`` moved last (a copy where that moves data)."""
    return t.movedim(1, -1).reshape(-1, m)


def nm_ungroup(groups: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The tensor of ``shape`` whose :func:`nm_groups` are ``groups``."""
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|scores|`` of every group of ``m`` (ties to the lower index), with
    the keyed selection on any device and no host sync: the groups' keys, one ``topk(n)`` per row."""
    s = scores.detach()
    keys = selection_keys(s.movedim(1, -1).contiguous()).view(-1, m)
    # min(dim).values, not amin: torch 2.14's CPU amin of int64 along a short dim is ~80x slower (113 ms against
    # 1.4 ms for a 512x512x3x3 tensor's groups), and it made a 2:4 ResNet-18 step 5x a dense one
    kth = keys.topk(n, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    return nm_ungroup(keys >= kth, s.shape)


def _unpack_signs(bits: torch.Tensor, std: float, like: torch.Tensor) -> torch.Tensor:
    """The signed-constant weight -+float32(std) from packed sign bits, shaped like ``like``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    neg = ((bits.flatten().unsqueeze(-1) >> shifts) & 1).flatten()[: like.numel()]
    stdf = torch.tensor(std, dtype=torch.float32, device=bits.device)  # rounded once, as init.draw_reference does
    return (1.0 - 2.0 * neg.to(torch.float32)).mul_(stdf).view_as(like)


# ---- custom ops ----------------------------------------------------------------------------------------------


def _is_hint(hint: torch.Tensor) -> bool:
    """Whether the kernels can read and update ``hint`` (:func:`new_hint`'s kind of tensor)."""
    return hint.dtype == torch.float64 and hint.device.type == "cpu" and hint.is_contiguous() and hint.numel() == 2


def _torch_masked(scores: torch.Tensor, source: torch.Tensor, std: float | None, thr: torch.Tensor,
                  cut: torch.Tensor) -> torch.Tensor:
    """The masked weight with PyTorch ops: ``source`` is the fp32 weight, or packed sign bits when ``std`` is given."""
    weight = source if std is None else _unpack_signs(source, std, scores)
    return weight * torch_mask(scores, thr, cut)


def _ste(grad: torch.Tensor, source: torch.Tensor, std: float | None, scores: torch.Tensor) -> torch.Tensor:
    """``(grad * weight) * sign(scores)``: one C pass where the kernels take the tensors, PyTorch ops elsewhere;
    ``source`` as in :func:`_torch_masked`."""
    lib = _native(grad, source, scores)
    if lib is not None and grad.dtype == scores.dtype == torch.float32 and grad.shape == scores.shape:
        n = scores.numel()
        if std is None and source.dtype == torch.float32 and source.shape == scores.shape:
            out = torch.empty_like(scores)
            lib.popup_ste_backward(grad.data_ptr(), source.data_ptr(), scores.data_ptr(), n, out.data_ptr(),
                                   _threads())
            return out
        if std is not None and source.dtype == torch.uint8 and source.numel() == (n + 7) // 8:
            out = torch.empty_like(scores)
            lib.popup_ste_backward_signs(grad.data_ptr(), source.data_ptr(), std, scores.data_ptr(), n,
                                         out.data_ptr(), _threads())
            return out
    weight = source if std is None else _unpack_signs(source, std, scores)
    return (grad * weight).mul_(scores.sign())


@torch.library.custom_op("timm_popup::topk_select", mutates_args=("hint",))
def _topk_select(scores: torch.Tensor, keep: int, hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _native(scores)
    if lib is not None and scores.dtype == torch.float32 and _is_hint(hint):
        thr = torch.empty((), dtype=torch.float32)
        cut = torch.empty((), dtype=torch.int64)
        status = lib.popup_topk_select(scores.data_ptr(), scores.numel(), keep, hint.data_ptr(), _threads(),
                                       thr.data_ptr(), cut.data_ptr())
        if status >= 0:
            return thr, cut
    return torch_select(scores, keep)


@_topk_select.register_fake
def _(scores: torch.Tensor, keep: int, hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scores.new_empty(()), scores.new_empty((), dtype=torch.int64)


@torch.library.custom_op("timm_popup::build_mask", mutates_args=())
def _build_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    lib = _native(scores)
    if lib is not None and scores.dtype == torch.float32 and thr.device.type == "cpu":
        out = torch.empty(scores.shape, dtype=torch.bool)
        lib.popup_build_mask(scores.data_ptr(), scores.numel(), float(thr), int(cut), out.data_ptr(), _threads())
        return out
    return torch_mask(scores, thr, cut)


@_build_mask.register_fake
def _(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(scores, dtype=torch.bool)


@torch.library.custom_op("timm_popup::masked_weight", mutates_args=())
def _masked_weight(scores: torch.Tensor, weight: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    lib = _native(scores, weight)
    if (lib is not None and scores.dtype == weight.dtype == torch.float32 and scores.shape == weight.shape
            and thr.device.type == "cpu"):
        out = torch.empty_like(weight)
        lib.popup_masked_weight(scores.data_ptr(), weight.data_ptr(), weight.numel(), float(thr), int(cut),
                                out.data_ptr(), _threads())
        return out
    return _torch_masked(scores, weight, None, thr, cut)


@_masked_weight.register_fake
def _(scores: torch.Tensor, weight: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(weight)


@torch.library.custom_op("timm_popup::masked_weight_signs", mutates_args=())
def _masked_weight_signs(scores: torch.Tensor, signs: torch.Tensor, std: float, thr: torch.Tensor,
                         cut: torch.Tensor) -> torch.Tensor:
    lib = _native(scores, signs)
    if lib is not None and scores.dtype == torch.float32 and signs.dtype == torch.uint8 and thr.device.type == "cpu":
        out = torch.empty_like(scores)
        lib.popup_masked_weight_signs(scores.data_ptr(), signs.data_ptr(), std, scores.numel(), float(thr),
                                      int(cut), out.data_ptr(), _threads())
        return out
    return _torch_masked(scores, signs, std, thr, cut)


@_masked_weight_signs.register_fake
def _(scores: torch.Tensor, signs: torch.Tensor, std: float, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(scores)


@torch.library.custom_op("timm_popup::ste_backward", mutates_args=())
def _ste_backward(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return _ste(grad, weight, None, scores)


@_ste_backward.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(scores)


@torch.library.custom_op("timm_popup::ste_backward_signs", mutates_args=())
def _ste_backward_signs(grad: torch.Tensor, signs: torch.Tensor, std: float, scores: torch.Tensor) -> torch.Tensor:
    return _ste(grad, signs, std, scores)


@_ste_backward_signs.register_fake
def _(grad: torch.Tensor, signs: torch.Tensor, std: float, scores: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(scores)


def _mw_setup(ctx, inputs, output) -> None:
    scores, weight, _, _ = inputs
    ctx.save_for_backward(scores, weight)


def _mw_backward(ctx, grad: torch.Tensor):
    scores, weight = ctx.saved_tensors
    return torch.ops.timm_popup.ste_backward(grad, weight, scores), None, None, None


def _mws_setup(ctx, inputs, output) -> None:
    scores, signs, std, _, _ = inputs
    ctx.save_for_backward(scores, signs)
    ctx.std = std


def _mws_backward(ctx, grad: torch.Tensor):
    scores, signs = ctx.saved_tensors
    return torch.ops.timm_popup.ste_backward_signs(grad, signs, ctx.std, scores), None, None, None, None


# Straight-through (paper eq. 5): the gradient reaches the scores as if the mask were the identity; the frozen
# weight, the threshold and the cut get none.
torch.library.register_autograd("timm_popup::masked_weight", _mw_backward, setup_context=_mw_setup)
torch.library.register_autograd("timm_popup::masked_weight_signs", _mws_backward, setup_context=_mws_setup)


# ---- eager training path --------------------------------------------------------------------------------------
# Each custom-op call costs tens of microseconds of Python dispatch (measured: select + masked weight + backward
# ~200 us per layer and step, a few ms per resnet18 step), and selecting and masking separately reads the scores
# twice. Eager training on the CPU kernels therefore takes one C call forward (selection through the hint and the
# masked weight in one pass) and one backward, inside a plain autograd.Function; torch.compile traces the custom
# ops above instead, which compute the same bits.


def _fusable(scores: torch.Tensor, source: torch.Tensor, std: float | None, hint: torch.Tensor) -> bool:
    """Whether :class:`_FusedMaskedWeight` can run these tensors on the C kernels."""
    if torch.compiler.is_compiling() or scores.dtype != torch.float32 or not _is_hint(hint):
        return False
    if std is None:
        if source.dtype != torch.float32 or source.shape != scores.shape:
            return False
    elif source.dtype != torch.uint8 or source.numel() != (scores.numel() + 7) // 8:
        return False
    return _native(scores, source) is not None


class _FusedMaskedWeight(torch.autograd.Function):
    """``(weight * topk_mask(scores), thr)`` in one kernel call, straight-through backward in another (see above)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, source: torch.Tensor, std: float | None, keep: int,
                hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lib = _library()
        out = torch.empty(scores.shape, dtype=torch.float32)
        thr, cut = torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.int64)
        ptrs = (hint.data_ptr(), _threads(), out.data_ptr(), thr.data_ptr(), cut.data_ptr())
        if std is None:
            status = lib.popup_select_masked_weight(scores.data_ptr(), source.data_ptr(), scores.numel(), keep, *ptrs)
        else:
            status = lib.popup_select_masked_weight_signs(scores.data_ptr(), source.data_ptr(), std, scores.numel(),
                                                          keep, *ptrs)
        if status < 0:  # the kernel ran out of memory for its band: the exact PyTorch path
            thr, cut = torch_select(scores, keep)
            out = _torch_masked(scores, source, std, thr, cut)
        ctx.save_for_backward(scores, source)
        ctx.std = std
        ctx.mark_non_differentiable(thr)
        ctx.set_materialize_grads(False)
        return out, thr

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _: torch.Tensor | None):
        scores, source = ctx.saved_tensors
        return None if grad is None else _ste(grad, source, ctx.std, scores), None, None, None, None


class _KeyedMaskedWeight(torch.autograd.Function):
    """``(weight * topk_mask(scores), kth key)`` with the keyed selection in six device ops (the keys' index words,
    abs into their high words, topk, min, compare, multiply) and the straight-through backward in three: the path
    where the C kernels do not run (CUDA, no compiler), with no host sync and no custom-op dispatch."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = selection_keys(scores)
        kth = kth_key(keys, keep)
        ctx.save_for_backward(scores, weight)
        ctx.mark_non_differentiable(kth)
        ctx.set_materialize_grads(False)
        return weight * (keys >= kth).view(weight.shape), kth

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _: torch.Tensor | None):
        scores, weight = ctx.saved_tensors
        return None if grad is None else (grad * weight).mul_(scores.sign()), None, None


def _key_threshold(kth: torch.Tensor) -> torch.Tensor:
    """The float32 |score| in the high word of a key (the threshold of :func:`torch_select`)."""
    return (kth >> 32).to(torch.int32).view(torch.float32)


def _masked(scores: torch.Tensor, source: torch.Tensor, std: float | None, k: float,
            hint: torch.Tensor | Selection | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(masked weight, thr, False)`` from the C kernels or the custom ops, ``(masked weight, kth key, True)`` from
    the keyed path; the same masked weight either way."""
    keep = num_kept(scores.numel(), k)
    state = hint if isinstance(hint, Selection) else Selection(hint)
    if _fusable(scores, source, std, state.hint):
        return (*_FusedMaskedWeight.apply(scores, source, std, keep, state.hint), False)
    compiling = torch.compiler.is_compiling()
    if std is None and (scores.device.type != "cpu" if compiling else _native(scores, source) is None):
        return (*_KeyedMaskedWeight.apply(scores, source, keep), True)
    thr, cut = torch.ops.timm_popup.topk_select(scores.detach(), keep, state.hint)
    if std is None:
        return torch.ops.timm_popup.masked_weight(scores, source, thr, cut), thr, False
    return torch.ops.timm_popup.masked_weight_signs(scores, source, std, thr, cut), thr, False


class _NMMaskedWeight(torch.autograd.Function):
    """``weight * nm_mask(scores, n, m)`` in one C pass (selection and masked weight), the straight-through backward
    in another: the eager CPU path of an N:M layer (the keyed selection costs six passes over the scores)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
        out = torch.empty_like(weight)
        _library().popup_nm_masked_weight(scores.data_ptr(), weight.data_ptr(), scores.shape[0], scores.shape[1],
                                          math.prod(scores.shape[2:]), n, m, out.data_ptr(), _threads())
        ctx.save_for_backward(scores, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight = ctx.saved_tensors
        return _ste(grad, weight, None, scores), None, None, None


def nm_fusable(scores: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`nm_masked_weight` runs these tensors (eager, contiguous float32 CPU tensors, the C kernels)."""
    return (not torch.compiler.is_compiling() and scores.dtype == weight.dtype == torch.float32
            and scores.shape == weight.shape and scores.dim() >= 2 and _native(scores, weight) is not None)


def nm_masked_weight(scores: torch.Tensor, weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``weight * nm_mask(scores, n, m)`` on the C kernels (where :func:`nm_fusable`), differentiable in ``scores``
    by the straight-through rule ``grad * weight * sign(scores)``; bit-identical to the keyed path."""
    return _NMMaskedWeight.apply(scores, weight, n, m)


# ---- public API -------------------------------------------------------------------------------------------------


def new_hint() -> torch.Tensor:
    """An empty threshold bracket (float64 ``[nan, nan]``) for a layer to keep and pass on every call."""
    return torch.full((2,), math.nan, dtype=torch.float64)


class Selection:
    """What one masked tensor carries from one training step to the next: the C kernels' threshold bracket
    (:func:`new_hint`). The keyed selection carries nothing: its keys (8 bytes per weight) live for one call,
    so that a GPU's peak memory holds one tensor's, not the network's."""

    def __init__(self, hint: torch.Tensor | None = None) -> None:
        self.hint = new_hint() if hint is None else hint


def topk_threshold(scores: torch.Tensor, k: float, hint: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thr, cut)`` of the ``round(k * n)`` largest ``|scores|``: entry ``i`` (flat) is kept iff
    ``|s_i| > thr`` or ``|s_i| == thr and i <= cut``. Both are 0-dim tensors on ``scores``' device (no sync).
    ``hint`` (see :func:`new_hint`) is read and updated in place when the C kernel runs."""
    keep = num_kept(scores.numel(), k)
    return torch.ops.timm_popup.topk_select(scores.detach(), keep, new_hint() if hint is None else hint)


def topk_mask(scores: torch.Tensor, k: float, hint: torch.Tensor | Selection | None = None) -> torch.Tensor:
    """Boolean mask identical to ``timm_popup.layers.topk_mask(scores, k)``: the C kernels where they take the
    tensor, else the keyed selection (three device ops, any device, traced as plain ops by ``torch.compile``)."""
    state = hint if isinstance(hint, Selection) else Selection(hint)
    compiling = torch.compiler.is_compiling()
    if scores.device.type != "cpu" if compiling else _native(scores) is None:
        return keyed_mask(scores, k)
    thr, cut = topk_threshold(scores, k, state.hint)
    return torch.ops.timm_popup.build_mask(scores.detach(), thr, cut)


def masked_weight(scores: torch.Tensor, weight: torch.Tensor, k: float, hint: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * topk_mask(scores, k), thr)``, differentiable in ``scores`` by the straight-through rule
    ``d/d(scores) = grad * weight * sign(scores)`` (as ``layers._StraightThrough``). ``hint`` as in
    :func:`topk_threshold`."""
    out, thr, keyed = _masked(scores, weight, None, k, hint)
    return out, _key_threshold(thr) if keyed else thr


def training_masked_weight(scores: torch.Tensor, weight: torch.Tensor, k: float, selection: Selection
                           ) -> torch.Tensor:
    """:func:`masked_weight`'s weight alone, with the state a layer keeps between steps (:class:`Selection`): what
    a training forward computes, with nothing spent on a threshold it does not read."""
    return _masked(scores, weight, None, k, selection)[0]


def masked_weight_signs(scores: torch.Tensor, signs: torch.Tensor, std: float, k: float,
                        hint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_weight` for a signed-constant weight given as packed sign bits (:func:`sign_bits`) and its
    std: the weight is ``-+float32(std)``, exactly ``init.draw_reference``'s, and is never materialised in fp32."""
    return _masked(scores, signs, float(std), k, hint)[:2]


def ste_backward(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``(grad * weight) * sign(scores)`` in one pass (bit-identical to ``layers._StraightThrough.backward``)."""
    return torch.ops.timm_popup.ste_backward(grad, weight, scores)


def generate(shape: Sequence[int], key: int, family: str, std: float) -> torch.Tensor:
    """Bit-identical to ``timm_popup.init.draw_reference(shape, family, std, key)``; parallel C where available."""
    shape = tuple(int(s) for s in shape)
    lib = _library()
    if lib is None:
        return draw_reference(shape, family, std, key)
    out = torch.empty(shape, dtype=torch.float32)
    if lib.popup_generate(key, 0, out.numel(), FAMILIES[family], float(std), out.data_ptr(), _threads()) != 0:
        raise ValueError(f"unknown family {family!r}")
    return out


def sign_bits(shape: Sequence[int], key: int) -> torch.Tensor:
    """Packed sign bits of the stream ``key`` (bit 63 of each draw: the sign of every "signed"/"normal" weight),
    bit ``i % 8`` of byte ``i // 8``, 1 = negative; uint8 of length ``ceil(n / 8)``."""
    n = math.prod(int(s) for s in shape)
    out = torch.empty((n + 7) // 8, dtype=torch.uint8)
    lib = _library()
    if lib is not None:
        lib.popup_generate_sign_bits(key, n, out.data_ptr(), _threads())
        return out
    negative = (splitmix64(key, 0, n) >> np.uint64(63)).astype(np.uint8)
    return torch.from_numpy(np.packbits(negative, bitorder="little"))
