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

The same masks serve the paper's baselines through a per-tensor ``mode`` (set by ``timm_popup.methods``). Each
mode is one small :class:`MaskMode` piece in ``MASK_MODES`` (how it selects, how it applies the mask, what its
eval cache holds); ``PopupMask``'s forward, ``get_mask`` and eval cache are generic over them, so a new mode is a
new piece and a table entry, not a branch in each method:

* ``"topk"`` (edge-popup, the default): the mask above.
* ``"sample"`` (Zhou et al.'s supermask): each training forward draws ``mask ~ Bernoulli(sigmoid(scores))``, the
  gradient passing straight through the sample to the probability; eval uses the deterministic mask
  ``sigmoid(scores) > 0.5``, i.e. ``scores > 0`` (binary, so it fits the bit-packed artifact).
* ``"fixed"`` (training the weights of a given subnetwork): ``weight`` is a trainable parameter multiplied by
  the boolean buffer ``fixed_mask``; there are no scores.
* ``"dense"`` (the learned-dense baseline): ``weight`` is a trainable parameter used unmasked; no scores.

The strong-lottery-ticket methods that followed the paper are modes of the same mask (``timm_popup.methods``):

* ``"global"`` (global top-k): one threshold over the |scores| of every tensor of a :class:`MaskGroup`, so that
  round(k * N) weights of the whole network are kept and each tensor's density is free. With a scaled
  distribution (``scaled_*``: std * sqrt(1/k)) each tensor's weights are rescaled to sqrt(1/its density)
  (:func:`density_rescale`): at k = 0.05 a layer kept at 50% would otherwise carry 4.5x its variance.
* ``"binary"`` (biprop / multi-prize tickets, MPT-1/32): the kept weights are binarised to ``+-alpha``, alpha the
  mean |weight| of the tensor's kept weights.
* ``"signed"`` (signed supermask): keep the top-k |scores| and multiply each kept weight by the sign of its score
  (keep, drop or flip the sign); the gradient passes straight through to the signed score.
* ``"slots"`` (slot machines): every weight chooses one of K seeded candidate values (``candidates``, K scores
  per weight), the one of highest score; nothing is pruned.
* ``"hypercube"`` (Gem-Miner): scores in [0, 1], the mask their rounding among the weights not yet frozen out
  (``alive``), a regulariser's gradient ``2 * l2 * scores`` added to the straight-through one.
* IteRand is the ``"topk"`` mode plus :meth:`PopupMask.redraw`: pruned weights re-drawn from seeded streams,
  each weight's last re-draw event kept in the persistent buffer ``redraws``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import native
from .init import check_k, check_weight_init, fans, is_scaled, random_uniform, random_weight, stream_key

__all__ = ["PopupMask", "SCORE_INITS", "DEFAULT_SCORE_INIT", "check_score_init", "MaskGroup", "MaskMode",
           "MASK_MODES", "MODES", "NMStructure", "use_structure", "METHOD_MODES", "use_method", "density_rescale",
           "binary_alpha", "binarized", "num_kept", "topk_mask", "fused_masked_weight", "MAX_SLOTS",
           "mask_tensor", "unmask_tensor", "popup_masks"]

#: the mask mode of every training method that learns a mask (``timm_popup.methods``; an artifact records the method)
METHOD_MODES = {"edge-popup": "topk", "supermask": "sample", "global-topk": "global", "biprop": "binary",
                "signed-supermask": "signed", "slot-machine": "slots", "iterand": "topk", "gem-miner": "hypercube"}

#: how scores start: torch's conv init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the paper code's), U(0, 1) (Gem-Miner's
#: "unif"), or ``constant=C`` (the paper code's ``--score-init-constant C``, for the sampled supermask)
SCORE_INITS = ("kaiming_uniform", "uniform", "constant=C")
DEFAULT_SCORE_INIT = "kaiming_uniform"
#: the most candidate values per weight of a slot machine (the paper's largest K is 64); a file holds at most this
MAX_SLOTS = 1024


def check_score_init(score_init: str) -> str:
    """``score_init`` in its canonical form (``constant=0.5``), or a one-line error."""
    name, eq, value = str(score_init).partition("=")
    if name in ("kaiming_uniform", "uniform") and not eq:
        return name
    if name == "constant" and eq:
        try:
            constant = float(value)
        except ValueError:
            constant = math.nan
        if math.isfinite(constant):
            return f"constant={constant!r}"
    raise ValueError(f"unknown score_init {score_init!r}; choose one of: {', '.join(SCORE_INITS)}")


def num_kept(n: int, k: float) -> int:
    """Number of weights a tensor of ``n`` keeps at fraction ``k`` (Python's ``round``)."""
    return round(k * n)


def topk_mask(scores: torch.Tensor, k: float, selection: native.Selection | None = None) -> torch.Tensor:
    """Boolean mask of the ``round(k * n)`` largest ``|scores|``; ties broken by lowest flat index.

    Exact and free of host synchronisation (``timm_popup.native``: fused C kernels on the CPU, a keyed
    ``torch.topk`` elsewhere); ``selection`` is the state a layer keeps between calls."""
    return native.topk_mask(scores, k, selection)


def fused_masked_weight(scores: torch.Tensor, weight: torch.Tensor, k: float,
                        selection: native.Selection | torch.Tensor) -> torch.Tensor:
    """``weight * topk_mask(scores, k)`` with the straight-through gradient to ``scores``: one pass over the tensor
    forward (selection and masked weight together) and one backward on the CPU kernels, a handful of device ops
    elsewhere; ``selection`` (or a bare threshold bracket) carries state from step to step."""
    if not isinstance(selection, native.Selection):
        selection = native.Selection(selection)
    return native.training_masked_weight(scores, weight, k, selection)


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


class _PlainStraightThrough(torch.autograd.Function):
    """weight * mask forward (``mask`` may hold -1 / 0 / 1); d(loss)/d(scores) = grad * weight backward: the
    signed supermask's rule, where the score's sign is the weight's sign, not a symmetry to divide out."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad * weight, None, None


class _SlotSelect(torch.autograd.Function):
    """Slot machines' greedy choice: forward the candidate of highest score of every weight; backward
    d(loss)/d(score_j) = grad * candidate_j for every candidate j (straight through the argmax)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, candidates: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(candidates)
        return candidates.gather(0, choice.unsqueeze(0)).squeeze(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (candidates,) = ctx.saved_tensors
        return grad.unsqueeze(0) * candidates, None, None


def density_rescale(mask: torch.Tensor, k: float) -> torch.Tensor:
    """``sqrt(k / density)``: turns a scaled distribution's ``sqrt(1/k)`` factor into ``sqrt(1/density)`` of a
    tensor whose density is not k (global top-k), so that each layer keeps its signal's variance as at density k.
    A device tensor: no host synchronisation."""
    return torch.sqrt(k * mask.numel() / mask.sum().clamp(min=1).to(torch.float32))


def binary_alpha(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """biprop's scale: the mean |weight| over the kept weights (the value that minimises the L2 error of the
    binarised kept weights), summed in float64 so that it is the same float32 wherever it is computed."""
    return ((weight.double().abs() * mask).sum() / mask.sum().clamp(min=1)).to(weight.dtype)


def binarized(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """biprop's binary weights: ``sign(weight) * alpha`` (:func:`binary_alpha`)."""
    return weight.sign() * binary_alpha(weight, mask)


class MaskGroup:
    """The tensors that share one global top-k: ``round(k * N)`` of their N weights are kept, those of largest
    |score| over the whole group (ties to the lowest index in group order, the order of the model's tensors).

    Computed once per change of any member's scores (their versions are the key) and shared by the members'
    forwards, so one training step selects once. A plain object, not a module: the members stay the model's."""

    def __init__(self, masks: Sequence[PopupMask], k: float) -> None:
        self.members, self.k = list(masks), check_k(k)
        self._key: tuple | None = None
        self._masks: dict[int, torch.Tensor] = {}

    def set_k(self, k: float) -> None:
        """Keep ``k`` of the group's weights from now on (a density schedule)."""
        self.k, self._key = check_k(k), None

    def mask_of(self, member: PopupMask) -> torch.Tensor:
        key = tuple((m.scores._version, m.scores.data_ptr()) for m in self.members)
        if key != self._key:
            with torch.no_grad():
                flat = torch.cat([m.scores.detach().reshape(-1) for m in self.members])
                keep = topk_mask(flat, self.k).split([m.scores.numel() for m in self.members])
            self._masks = {id(m): part.view(m.scores.shape) for m, part in zip(self.members, keep, strict=True)}
            self._key = key
        return self._masks[id(member)]


class MaskMode:
    """How one mode of :class:`PopupMask` selects and applies its mask: one small piece per mode, registered in
    ``MASK_MODES``; ``PopupMask``'s forward, ``get_mask`` and eval cache are generic over it.

    ``select`` is the deterministic boolean mask from the current scores (what an artifact stores); ``apply`` the
    weight computed under a mask, differentiable to the scores by the mode's straight-through rule;
    ``train_forward`` a training forward (``apply(select)`` unless the mode samples or fuses the two);
    ``eval_weight`` the weight an eval forward caches; ``cache_key`` what else than the tensor's own scores and
    weight invalidates that cache. A stateless object: what a tensor carries lives on its ``PopupMask``."""

    name: str = ""
    #: eval forwards reuse the masked weight until the scores change (False: the weight trains; computed each call)
    cached: bool = True
    #: ``weight`` is a trainable parameter rather than the frozen seeded draw
    learns_weight: bool = False
    #: why the mode cannot keep an N:M structure (:class:`NMStructure`); empty where it can
    unstructured_because: str = ""
    #: training forwards draw other masks than ``select``: norms' running statistics gathered in training do not
    #: describe the eval network (the trainer re-estimates them under the eval masks)
    samples: bool = False

    def select(self, m: PopupMask) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_forward(self, m: PopupMask) -> torch.Tensor:
        return self.apply(m, self.select(m))

    def eval_weight(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return m.weight * mask

    def cache_key(self, m: PopupMask) -> tuple:
        return ()


class TopK(MaskMode):
    """Edge-popup: the round(k * n) largest |scores|, gradient ``grad * weight * sign(scores)``."""

    name = "topk"

    def select(self, m: PopupMask) -> torch.Tensor:
        return m.keep_topk()

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(m.scores, m.weight, mask)

    def train_forward(self, m: PopupMask) -> torch.Tensor:
        if m.structure is None:  # edge-popup's hot path: selection and masked weight in one fused call
            return fused_masked_weight(m.scores, m.weight, m.k, m._selection)
        return m.structure.masked_weight(m.scores, m.weight)


class Sample(MaskMode):
    """Zhou et al.'s supermask: training samples ``mask ~ Bernoulli(sigmoid(scores))``; the deterministic mask is
    ``sigmoid(scores) > 0.5``, written ``scores > 0`` so that sigmoid's rounding near 0.5 cannot flip it."""

    name, samples = "sample", True
    unstructured_because = "supermask samples each weight on its own (Bernoulli); it keeps no top-k to group"

    def select(self, m: PopupMask) -> torch.Tensor:
        return m.scores.detach() > 0

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return _SampledMask.apply(m.scores, m.weight, mask)

    def train_forward(self, m: PopupMask) -> torch.Tensor:
        # a fresh subnetwork every forward (torch's RNG, seeded per epoch by the trainer)
        s = m.scores.detach()
        return self.apply(m, torch.rand_like(s) < torch.sigmoid(s))


class Fixed(MaskMode):
    """A given subnetwork's weights trained: the product keeps masked weights' gradient exactly zero."""

    name, cached, learns_weight = "fixed", False, True

    def select(self, m: PopupMask) -> torch.Tensor:
        return m.fixed_mask

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return m.weight * mask


class Dense(MaskMode):
    """The learned-dense baseline: the weight trained, unmasked."""

    name, cached, learns_weight = "dense", False, True

    def select(self, m: PopupMask) -> torch.Tensor:
        return torch.ones_like(m.weight, dtype=torch.bool)

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return m.weight


class _StrongTicket(MaskMode):
    """The strong-lottery-ticket modes: the eval cache holds ``apply`` of the mask (their weight is not
    ``weight * mask``)."""

    def eval_weight(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.apply(m, mask)


class GlobalTopK(_StrongTicket):
    """One threshold over the |scores| of a :class:`MaskGroup`; a scaled distribution is rescaled to
    sqrt(1/density) of each tensor (:func:`density_rescale`)."""

    name = "global"
    unstructured_because = "global-topk's density per tensor is free, N:M fixes it at N/M in every group"

    def select(self, m: PopupMask) -> torch.Tensor:
        return m.group.mask_of(m)

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        weight = m.weight
        if is_scaled(m.weight_init):
            weight = weight * density_rescale(mask, m.k)
        return _StraightThrough.apply(m.scores, weight, mask)

    def cache_key(self, m: PopupMask) -> tuple:
        # the others' scores move the shared threshold; a density schedule (modes.set_global_density) its k
        return (m.group.k, *(member.scores._version for member in m.group.members))


class Binary(_StrongTicket):
    """biprop: the kept weights binarised to +-alpha (:func:`binarized`)."""

    name = "binary"

    def select(self, m: PopupMask) -> torch.Tensor:
        return m.keep_topk()

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(m.scores, binarized(m.weight, mask), mask)


class Signed(_StrongTicket):
    """Signed supermask: the top-k |scores| kept, each kept weight times the sign of its score."""

    name = "signed"

    def select(self, m: PopupMask) -> torch.Tensor:
        return m.keep_topk()

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        kept = mask.to(m.weight.dtype)
        return _PlainStraightThrough.apply(m.scores, m.weight, torch.where(m.scores.detach() < 0, -kept, kept))


class Slots(_StrongTicket):
    """Slot machines: every weight is used; its K scores choose its value, not whether it is kept."""

    name = "slots"
    unstructured_because = "slot-machine prunes nothing: every weight takes one of its K values"

    def select(self, m: PopupMask) -> torch.Tensor:
        return torch.ones_like(m.weight, dtype=torch.bool)

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return _SlotSelect.apply(m.scores, m.candidates, m.scores.detach().argmax(0))


class _RegularisedStraightThrough(torch.autograd.Function):
    """Gem-Miner: weight * mask forward; backward the straight-through gradient of the alive weights,
    ``grad * weight * alive``, plus its regulariser's, ``2 * l2 * scores`` (the gradient of l2 * ||scores||^2,
    added where the scores are read so that the training loop needs no extra loss term)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, alive: torch.Tensor,
                l2: float) -> torch.Tensor:
        ctx.save_for_backward(scores, weight, alive)
        ctx.l2 = l2
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, weight, alive = ctx.saved_tensors
        return (grad * weight).mul_(alive).add_(scores, alpha=2 * ctx.l2), None, None, None, None


class Hypercube(_StrongTicket):
    """Gem-Miner (Sreenivasan et al., NeurIPS 2022): scores are probabilities in [0, 1] (the method clips them after
    every update), the mask is their rounding, ``scores > 0.5``, among the weights still ``alive`` (the persistent
    boolean buffer its iterative freezing clears, ``timm_popup.modes.freeze_lowest``)."""

    name = "hypercube"
    unstructured_because = "gem-miner's mask is the rounding of each score on its own; it keeps no top-k to group"

    def select(self, m: PopupMask) -> torch.Tensor:
        return (m.scores.detach() > 0.5) & m.alive

    def apply(self, m: PopupMask, mask: torch.Tensor) -> torch.Tensor:
        return _RegularisedStraightThrough.apply(m.scores, m.weight, mask, m.alive, m.score_l2)

    def cache_key(self, m: PopupMask) -> tuple:
        return (m.alive._version,)  # a freezing event


class NMStructure:
    """N:M structured masks: every group of ``m`` consecutive weights along dim 1 (input features / input channels,
    ``native.nm_groups``) keeps its ``n`` largest |scores|, ties to the lower index; the straight-through gradient
    is edge-popup's. Set on the tensors whose dim 1 divides into groups (:func:`use_structure`)."""

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = native.parse_structure((n, m))

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        return native.nm_mask(scores, self.n, self.m)

    def masked_weight(self, scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A training forward's ``weight * select(scores)`` with edge-popup's straight-through gradient."""
        if native.nm_fusable(scores, weight):  # eager on the CPU kernels: selection and masked weight in one pass
            return native.nm_masked_weight(scores, weight, self.n, self.m)
        return _StraightThrough.apply(scores, weight, self.select(scores))


#: every mode of :class:`PopupMask`, by its name (``PopupMask.mode``)
MASK_MODES: dict[str, MaskMode] = {mode.name: mode for mode in (
    TopK(), Sample(), Fixed(), Dense(), GlobalTopK(), Binary(), Signed(), Slots(), Hypercube())}
MODES = tuple(MASK_MODES)


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
    #: the piece of ``MASK_MODES`` that ``mode`` names: how this tensor selects and applies its mask
    masking: MaskMode = MASK_MODES["topk"]
    #: the tensors this one shares a global top-k with (mode ``"global"``)
    group: MaskGroup | None = None
    #: the N:M structure its top-k keeps (None: one top-k over the whole tensor)
    structure: NMStructure | None = None
    #: Gem-Miner: the weight of its regulariser l2 * ||scores||^2
    score_l2: float = 0.0

    def __init__(self, shape: Sequence[int], *, name: str, k: float, weight_init: str, seed: int,
                 fan_shape: Sequence[int] | None = None, device: torch.device | str | None = None,
                 init_scores: bool = True, score_init: str = DEFAULT_SCORE_INIT) -> None:
        super().__init__()
        self.score_init = check_score_init(score_init)
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
        """Scores as ``score_init`` says (``SCORE_INITS``); by default Kaiming uniform as torch initialises a
        conv/linear weight (a=sqrt(5): bound 1/sqrt(fan_in)). Scores are trained, not published, so torch's RNG
        (seeded per tensor) is fine here."""
        name, _, value = self.score_init.partition("=")
        with torch.no_grad():
            if name == "constant":
                self.scores.fill_(float(value))
                return
            bound = 1.0 / math.sqrt(fans(self.fan_shape)[0])
            low, high = (0.0, 1.0) if name == "uniform" else (-bound, bound)
            gen = torch.Generator().manual_seed(stream_key(self.seed, self.popup_name + "#scores") >> 1)
            self.scores.copy_(torch.empty(self.scores.shape).uniform_(low, high, generator=gen))

    def regenerate(self, *, seed: int, k: float, weight_init: str, device: torch.device | None = None) -> None:
        """Make ``weight`` the seeded draw for (seed, tensor name, k, weight_init); the scores stay as they are."""
        self.k, self.weight_init, self.seed = check_k(k), check_weight_init(weight_init), int(seed)
        self.weight = self.draw().to(device or self.weight.device)
        self._cache: tuple | None = None
        self._selection = native.Selection()  # what the selection carries from step to step (threshold bracket, keys)

    def draw(self, stream: str = "") -> torch.Tensor:
        """The seeded values of this tensor's stream ``<name><stream>`` (CPU) at its seed, k and distribution:
        ``""`` its own weights, ``"#slot<j>"`` slot candidates, ``"#iterand<e>"`` IteRand's re-draws."""
        return random_weight(self.weight.shape, seed=self.seed, name=self.popup_name + stream,
                             weight_init=self.weight_init, k=self.k, fan_shape=self.fan_shape)

    def set_mode(self, mode: str) -> None:
        """Switch to another of ``MODES`` (what ``timm_popup.methods`` and loading a supermask do)."""
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MASK_MODES)}")
        if self.structure is not None and MASK_MODES[mode].unstructured_because:
            raise ValueError(f"{self.popup_name} keeps an N:M structure ({self.structure.name}), which mode {mode} "
                             f"cannot: {MASK_MODES[mode].unstructured_because}")
        self.mode, self.masking, self._cache = mode, MASK_MODES[mode], None

    def set_structure(self, structure: NMStructure | None) -> None:
        """Keep ``structure`` (None: unstructured) in every top-k of this tensor from now on."""
        if structure is not None and self.masking.unstructured_because:
            raise ValueError(f"an N:M structure ({structure.name}) cannot apply to mode {self.mode}: "
                             f"{self.masking.unstructured_because}")
        self.structure, self._cache = structure, None

    def keep_topk(self) -> torch.Tensor:
        """The top-k mask of the current scores: round(k * n) of the tensor, or N of every M under a structure."""
        if self.structure is None:
            return topk_mask(self.scores, self.k, self._selection)
        return self.structure.select(self.scores)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the frozen weight (a re-seed) and forget what was computed from the old one."""
        self.weight, self._cache = weight, None

    @property
    def learns_weight(self) -> bool:
        """Whether ``weight`` is a trainable parameter (dense or fixed-mask modes) rather than frozen."""
        return self.masking.learns_weight

    def get_mask(self) -> torch.Tensor:
        """The current boolean mask (shape of ``weight``): True where the weight is kept. For a supermask this
        is the deterministic (eval) mask, also in training mode: the one an artifact stores."""
        if self.training or not self.masking.cached:
            return self.masking.select(self)
        return self._cached()[1]

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        """``weight * mask`` (as the mode computes it); differentiable (straight-through) with respect to the scores."""
        masking = self.masking
        if self.training or not masking.cached:  # edge-popup's hot path: TopK.train_forward is one fused call
            return masking.train_forward(self)
        if torch.is_grad_enabled() and self.scores.requires_grad:
            return masking.apply(self, self._cached()[1])
        return self._cached()[2]

    def flips(self) -> torch.Tensor:
        """Signed supermask: where the score is negative, i.e. the kept weight's sign is flipped."""
        return self.scores.detach() < 0

    def slot_choice(self) -> torch.Tensor:
        """Slot machines: the index of every weight's chosen candidate (the highest score; ties to the lowest)."""
        return self.scores.detach().argmax(0)

    def set_slots(self, slots: int) -> None:
        """Switch to slot machines with ``slots`` seeded candidates per weight and fresh scores, one per candidate."""
        if not 2 <= slots <= MAX_SLOTS:
            raise ValueError(f"slot machines choose among 2 to {MAX_SLOTS} candidate values per weight, not {slots}")
        # candidate 0 is the tensor's own draw (what the artifact fingerprints), j > 0 the stream "#slot<j>"
        candidates = [self.weight] + [self.draw(f"#slot{j}").to(self.weight.device) for j in range(1, slots)]
        self.register_buffer("candidates", torch.stack(candidates), persistent=False)
        self.weight = self.candidates[0]
        self.scores = nn.Parameter(torch.empty(self.candidates.shape, device=self.weight.device))
        self.reset_scores()
        self.set_mode("slots")

    def redraw(self, event: int, rate: float) -> None:
        """IteRand (Chijiwa et al. 2021): re-draw each pruned weight with probability ``rate`` from the seeded
        stream ``<name>#iterand<event>``, so the weights stay a function of the seed and the events; the event
        of each weight's last re-draw is kept in ``redraws`` (checkpointed; an artifact keeps the kept ones')."""
        with torch.no_grad():
            device = self.weight.device
            pick = random_uniform(self.weight.shape, seed=self.seed, name=f"{self.popup_name}#iterand-pick{event}")
            chosen = (pick.abs() < rate).to(device) & ~self.keep_topk()
            new = self.draw(f"#iterand{event}").to(device)
            self.redraws.masked_fill_(chosen, event)
            self.set_weight(torch.where(chosen, new, self.weight))

    def weight_seeded(self) -> torch.Tensor:
        """The tensor's draw from the seed (what an artifact fingerprints): ``weight`` unless IteRand re-drew some."""
        if "redraws" in self._buffers and bool(self.redraws.any()):
            return self.draw()
        return self.weight

    def track_redraws(self) -> None:
        """Start IteRand's record: ``redraws`` (the event of each weight's last re-draw, 0: the seed's draw) is
        a persistent buffer, so a checkpoint holds it and a resumed run rebuilds the same weights."""
        if "redraws" not in self._buffers:
            self.register_buffer("redraws", torch.zeros(self.weight.shape, dtype=torch.int16,
                                                        device=self.weight.device))

    def track_alive(self) -> None:
        """Start Gem-Miner's record of the weights not yet frozen out: ``alive``, a persistent boolean buffer (a
        checkpoint holds it), all True."""
        if "alive" not in self._buffers:
            self.register_buffer("alive", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device))

    def rebuild_redrawn(self) -> None:
        """Recompute ``weight`` from the seed and ``redraws`` (after a checkpoint or an artifact is loaded)."""
        weight, redraws = self.draw(), self.redraws.cpu()
        for event in torch.unique(redraws).tolist():
            if event:
                weight = torch.where(redraws == event, self.draw(f"#iterand{event}"), weight)
        self.set_weight(weight.to(self.weight.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "redraws" in state_dict:  # an IteRand checkpoint: its weights are the seed's plus re-draws
            self.rebuild_redrawn()

    def _cached(self) -> tuple:
        # Eval mode: mask once, reuse until the scores change (in-place updates bump _version). Whatever
        # changes ``mode`` resets ``_cache``, which keeps the mode out of edge-popup's per-forward key.
        s, masking = self.scores, self.masking
        exporting = torch.compiler.is_exporting()  # torch.export traces fake tensors: no data pointer, nothing kept
        key = None if exporting else (s._version, s.data_ptr(), self.k, self.weight.data_ptr(),
                                      *masking.cache_key(self))
        if exporting or self._cache is None or self._cache[0] != key:
            mask = masking.select(self)
            cache = (key, mask, masking.eval_weight(self, mask))
            if exporting:
                return cache
            self._cache = cache
        return self._cache

    def extra_repr(self) -> str:
        mode = "" if self.mode == "topk" else f", mode={self.mode}"
        mode += "" if self.structure is None else f", structure={self.structure.name}"
        return f"{self.popup_name}: {tuple(self.weight.shape)}, k={self.k}, weight_init={self.weight_init}, " \
               f"seed={self.seed}{mode}"


def use_method(masks: Sequence[PopupMask], method: str, *, k: float, slots: int = 0, score_l2: float = 0.0) -> None:
    """Put ``masks`` (all of a model's) in the mode of ``method`` (``METHOD_MODES``): global top-k groups them,
    slot machines draw ``slots`` candidates per weight, IteRand starts each tensor's re-draw record, Gem-Miner its
    record of the weights alive and its regulariser's weight ``score_l2``. Scores are kept except where slots
    replace them."""
    if method not in METHOD_MODES:
        raise ValueError(f"unknown mask method {method!r}; choose one of: {', '.join(METHOD_MODES)}")
    mode = METHOD_MODES[method]
    structured = next((mask for mask in masks if mask.structure is not None), None)
    if structured is not None and MASK_MODES[mode].unstructured_because:
        raise ValueError(f"--method {method} cannot keep the N:M structure {structured.structure.name}: "
                         f"{MASK_MODES[mode].unstructured_because}; train it without a structure")
    group = MaskGroup(masks, k) if mode == "global" else None
    for mask in masks:
        if mode == "slots":
            mask.set_slots(slots)
        else:
            mask.set_mode(mode)
        mask.group = group
        if method == "iterand":
            mask.track_redraws()
        if method == "gem-miner":
            mask.track_alive()
            mask.score_l2 = float(score_l2)


def use_structure(masks: Sequence[PopupMask], structure: str | Sequence[int] | None) -> None:
    """Give ``masks`` (all of a model's) the N:M ``structure`` (``"2:4"``; None: unstructured) where their dim 1
    splits into groups of M; the others keep one top-k over the tensor at k = N/M."""
    nm = None if structure is None else native.parse_structure(structure)
    for mask in masks:
        fits = nm is not None and native.nm_applies(mask.weight.shape, nm[1])
        mask.set_structure(NMStructure(*nm) if fits else None)


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


def popup_masks(model: nn.Module) -> dict[str, PopupMask]:
    """The masked tensors of ``model``, by their qualified name in the original model (``conv1.weight``)."""
    out: dict[str, PopupMask] = {}
    for module in model.modules():
        if isinstance(module, PopupMask):
            out.setdefault(module.popup_name, module)
    return out
