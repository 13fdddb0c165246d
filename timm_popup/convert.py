"""Turn any ``nn.Module`` (a timm model) into its edge-popup version, in place.

Every parameter of the model gets exactly one treatment, decided here and documented in docs/design.md:

* **masked**: a floating tensor of >= 2 dims whose name is a weight's (``weight``, ``weight_ih_l0``,
  ``in_proj_weight``): a :class:`PopupMask` parametrization with seeded random values and learned scores.
  Except where each output has a single input (fan-in 1: ``Linear(1, n)``, a 1x1 depthwise conv): there a
  weight is a per-output gain, and dropping it would cut its output (and every gradient behind it) out of the
  network, so the tensor keeps all its seeded random values, frozen (``weight:all``).
* **frozen** (a non-trainable, non-persistent buffer; the value's policy is recorded in
  ``model.popup_config.frozen``), the first rule that applies:

  ====================  =============================================================================
  ``norm:1`` / ``norm:0``  a normalisation layer's scale / shift: 1 / 0 (non-affine). A norm over a single
                        feature outputs only its shift, so there the shift is 1 (``norm:1``), never a
                        constant 0 that would kill every gradient through it.
  ``draw:0.02``         position embeddings, class/register tokens, relative-position tables (names with
                        pos / token / embed / rel / table / query / latent / prompt): seeded N(0, 0.02**2),
                        timm's own initialisation std for them.
  ``bias:0``            a bias (the paper's layers have none): 0.
  ``gain:1``            a constant that timm initialises at (near) zero, |c| < 1e-3: a residual gain or layer
                        scale (nfnet's skipinit, LayerScale): 1, the neutral gain. Frozen at ~0 it would
                        silence its branch forever.
  ``const``             any other constant (ScaledStdConv's gain, logit scales, temperatures): kept.
  ``draw:0.02``         anything else timm draws at random: seeded N(0, 0.02**2), never torch's unseeded values.
  ``weight:all``        a weight of fan-in 1 (above): all its seeded values, unmasked.
  ====================  =============================================================================

``learn_norm`` / ``learn_bias`` (the paper code's ``--bn-type LearnedBatchNorm``, and learned biases) keep the
``norm:*`` / ``bias:0`` tensors trainable parameters instead, starting from the same values (``popup_config.learned``
records them); their values are part of the artifact.

The model keeps its classes and forwards; ``reset_classifier`` converts the new head like the rest.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.models import filter_pretrained_cfg
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from .config import PopupConfig
from .init import (
    DEFAULT_WEIGHT_INIT,
    check_k,
    check_weight_init,
    fans,
    random_normal,
    random_weight,
    weight_distribution,
)
from .layers import (
    DEFAULT_SCORE_INIT,
    METHOD_MODES,
    PopupMask,
    check_score_init,
    mask_tensor,
    popup_masks,
    use_method,
    use_structure,
)
from .modes import MethodOptions, make_mask_method
from .native import parse_structure

__all__ = ["convert", "build_converted", "FrozenValue", "unfreeze", "folded", "make_scriptable", "reseed",
           "regenerated", "popup_masks", "frozen_tensors", "learned_policies", "learn_frozen",
           "is_norm", "is_masked_weight", "EMBED_STD", "NEAR_ZERO",
           "POPUP_PREFIX"]

#: what timm_popup.models registers every popup version of a timm model as: popup_<name>
POPUP_PREFIX = "popup_"
#: std of every frozen random draw that is not a masked weight (timm initialises embeddings with 0.02)
EMBED_STD = 0.02
#: a constant parameter smaller than this in magnitude is a (near-)zero gain: frozen at 1 instead
NEAR_ZERO = 1e-3

_WEIGHT_NAME = re.compile(r"(^|_)weight($|_)")
_EMBED_NAME = re.compile(r"pos|token|embed|rel|table|query|latent|prompt")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (torch's, or any class named *Norm* with a weight)."""
    return isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)) or (
        "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), nn.Parameter))


def is_masked_weight(name: str, param: torch.Tensor) -> bool:
    """Whether the parameter ``name`` (its leaf name) is a weight that edge-popup masks."""
    return param.is_floating_point() and param.ndim >= 2 and bool(_WEIGHT_NAME.search(name))


def _single_feature_norm(module: nn.Module) -> bool:
    shape = getattr(module, "normalized_shape", None)
    return shape is not None and int(torch.Size(shape).numel()) == 1


def _frozen_value(module: nn.Module, name: str, p: torch.Tensor, *, seed: int,
                  qualname: str) -> tuple[str, torch.Tensor]:
    """The policy (module docstring) and the frozen value of parameter ``name`` of ``module``."""
    device = "cpu" if p.is_meta else p.device  # a model built on the meta device is materialised here
    ones, zeros = (lambda: torch.ones(p.shape, dtype=p.dtype, device=device),
                   lambda: torch.zeros(p.shape, dtype=p.dtype, device=device))
    if is_norm(module) and name in ("weight", "bias"):
        one = name == "weight" or _single_feature_norm(module)
        return ("norm:1", ones()) if one else ("norm:0", zeros())
    if _EMBED_NAME.search(name):
        return f"draw:{EMBED_STD}", random_normal(p.shape, seed=seed, name=qualname, std=EMBED_STD)
    if "bias" in name:
        return "bias:0", zeros()
    if p.numel() and bool((p == p.flatten()[0]).all()):
        if abs(float(p.flatten()[0])) < NEAR_ZERO:
            return "gain:1", ones()
        return "const", p.detach().clone()
    return f"draw:{EMBED_STD}", random_normal(p.shape, seed=seed, name=qualname, std=EMBED_STD)


def _decided_without_values(module: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Whether the policy fixes this parameter's frozen value without reading timm's initial value."""
    return (is_masked_weight(name, p) or (is_norm(module) and name in ("weight", "bias"))
            or bool(_EMBED_NAME.search(name)) or "bias" in name)


#: the only buffers a model built on the meta device may hold: BatchNorm statistics, at PyTorch's initial values
_BN_STATS = {"running_mean": torch.zeros_like, "running_var": torch.ones_like, "num_batches_tracked": torch.zeros_like}


def build_converted(factory: Callable[[], nn.Module], *, k: float = 0.5, weight_init: str = DEFAULT_WEIGHT_INIT,
                    seed: int = 0, dense: Sequence[str] = (), init_scores: bool = True,
                    check: Callable[[nn.Module], None] | None = None, **options: Any) -> nn.Module:
    """``convert(factory(), ...)``, skipping timm's dense initialisation where the parameter policy allows.

    The model is first built on the meta device (no memory, no init). If every parameter's frozen value follows
    from the policy alone and its only buffers are BatchNorm statistics, it is converted from there (the weights
    are generated anyway; the result is identical to a CPU build); otherwise it is built again on the CPU.
    ``init_scores=False`` leaves the scores uninitialised, for a mask that is loaded into all of them next;
    ``options``: :func:`convert`'s others (learn_norm, learn_bias, score_init, init_mode, nonlinearity, scale_fan).
    ``check`` sees the dense model before any of it is allocated where it can (on the meta device), else once built.
    """
    model = None
    if not dense:
        try:
            with torch.device("meta"):
                model = factory()
        except Exception as e:  # some constructors compute with tensors (e.g. .tolist()); they build on the CPU
            if "overflow" in str(e):  # no memory holds it: the CPU build would fail too, after allocating
                raise ValueError(f"the model is too large to build: {' '.join(str(e).split())}") from e
            model = None
    if check is not None and model is not None:
        check(model)
    modules = list(model.modules()) if model is not None else []
    if model is not None and all(
            name in _BN_STATS for m in modules for name, _ in m.named_buffers(recurse=False)) and all(
            _decided_without_values(m, name, p) for m in modules for name, p in m.named_parameters(recurse=False)):
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, _BN_STATS[name](buf, device="cpu"))
    else:
        model = factory()
        if check is not None and next(iter(model.parameters()), torch.empty(0)).device.type != "meta":
            check(model)
    return convert(model, k=k, weight_init=weight_init, seed=seed, dense=dense, init_scores=init_scores, **options)


class FrozenValue(nn.Module):
    """How a frozen random tensor that timm held as a parameter (class / register tokens, position embeddings,
    relative tables) is read: ``module.<name>`` goes through parametrize's ``ParametrizationList``, a torch.nn leaf
    module, which torch.fx records as a graph node, and returns the buffer ``module.<name>`` itself (it stays a
    non-persistent buffer: ``get_buffer``, ``named_buffers``, assignment and ``.to()`` see it as before). Read as a
    plain buffer, fx would hold a constant tensor, and ``self.cls_token.expand(x.shape[0], -1, -1)`` cannot take a
    traced size ("expand() takes 1 positional argument but 3 were given")."""

    def __init__(self, owner: nn.Module, name: str) -> None:
        super().__init__()
        self.name = name
        object.__setattr__(self, "owner", owner)  # a plain reference: not a submodule (no cycle in the module tree)

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        return self.owner._buffers[self.name]


def _freeze(module: nn.Module, name: str, value: torch.Tensor, *, read_as_node: bool = False) -> None:
    """Replace parameter ``name`` of ``module`` by a non-trainable buffer holding ``value``; ``read_as_node``: read
    through a :class:`FrozenValue` parametrization (a tensor timm held as a parameter and reads with traced sizes)."""
    delattr(module, name)
    if read_as_node:
        # parametrize's placeholder for the value: empty, like a masked weight's (state dicts hold scores only)
        module.register_buffer(name, torch.empty(0, dtype=value.dtype, device=value.device), persistent=False)
        parametrize.register_parametrization(module, name, FrozenValue(module, name), unsafe=True)
        module.parametrizations[name]._non_persistent_buffers_set.add("original")
        # the subclass parametrize made is still timm's class to everyone who asks where it comes from
        type(module).__module__ = parametrize.type_before_parametrizations(module).__module__
        # beside the property (register_buffer refuses a name the class already has): what get_buffer, named_buffers,
        # assignment (reseed) and .to() reach, and what FrozenValue reads
        module._buffers[name] = value
        module._non_persistent_buffers_set.add(name)
    else:
        module.register_buffer(name, value, persistent=False)


def unfreeze(module: nn.Module, name: str) -> nn.Parameter:
    """Undo :func:`_freeze`: the frozen tensor ``name`` of ``module`` becomes a trainable parameter holding a copy of
    its value (the weight-learning methods train every frozen tensor again); returns the parameter.

    A tensor read through :class:`FrozenValue` loses its parametrization first: the property parametrize put on the
    module's class would otherwise shadow the new parameter, and it reads the buffer this removes (registering the
    parameter asks ``hasattr(module, name)``, which runs that property: ``KeyError`` in ``FrozenValue.forward``)."""
    value = module._buffers[name]
    if parametrize.is_parametrized(module, name):
        # leave_parametrized=False: only the empty placeholder comes back as the buffer ``name``, deleted below
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    del module._buffers[name]
    module._non_persistent_buffers_set.discard(name)
    param = nn.Parameter(value.detach().clone())
    module.register_parameter(name, param)
    return param


def _fan_shape(module: nn.Module, name: str) -> Sequence[int] | None:
    # CondConv stores each expert's weight flattened to one row: its fans are those of the expert's shape
    return getattr(module, "weight_shape", None) if name == "weight" else None


class _FoldedRead(nn.Module):
    """A folded ``ParametrizationList``: returns the tensor it computed (what a scripted fx graph calls)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


def folded(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose masked and frozen tensors are plain tensors holding what the popup model computes
    with (the eval-mode masks): the network as deployed, for TorchScript.

    TorchScript cannot compile a parametrized module: parametrize's ``weight`` property raises under scripting
    ("Parametrization is not working with scripting", torch/nn/utils/parametrize.py) and the mask's forward calls
    custom autograd functions and C kernels. ``module`` itself is left as it was (it keeps training its scores)."""
    if isinstance(module, parametrize.ParametrizationList):
        with torch.no_grad():
            return _FoldedRead(module().detach().clone())
    # an RNN's _flat_weights holds the masked weights it last read (non-leaf tensors, which deepcopy refuses):
    # the copy starts without them and rebuilds them from its folded tensors below
    memo = {id(m._flat_weights): [] for m in module.modules() if isinstance(getattr(m, "_flat_weights", None), list)}
    out = copy.deepcopy(module, memo)
    training = [(m, m.training) for m in out.modules()]
    out.eval()  # the deterministic mask (a supermask samples in training mode)
    with torch.no_grad():
        values = {m: {name: getattr(m, name).detach().clone() for name in m.parametrizations}
                  for m in out.modules() if parametrize.is_parametrized(m)}
    for m, tensors in values.items():
        # not parametrize.remove_parametrizations: the copy shares its parametrized class (and the class's
        # properties) with ``module``, and removing a property there would break ``module`` itself
        m.__class__ = parametrize.type_before_parametrizations(m)
        del m._modules["parametrizations"]
        for name, value in tensors.items():
            m.register_buffer(name, value)
        if hasattr(m, "_init_flat_weights"):  # nn.RNN / LSTM / GRU read their weights through this list
            m._init_flat_weights()
    for m, mode in training:
        m.training = mode
    for m in out.modules():
        m.__dict__.pop("__prepare_scriptable__", None)
    return out


class _PrepareScriptable:
    """Instance-level ``__prepare_scriptable__`` (torch.jit.script calls it on the module it scripts and, recursing,
    on every submodule, putting what it returns in the parent's place): the :func:`folded` copy. On every module of
    a popup model (and a features_only wrapper), so that scripting the model, any submodule of it, or a torch.fx
    graph of it (which holds its leaves in containers of its own) folds a copy and never replaces anything inside
    the popup model. A module of the user's that *contains* a popup model gets the folded copy in its place."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> nn.Module:
        return folded(self.module)


def make_scriptable(module: nn.Module) -> nn.Module:
    """Make ``torch.jit.script(module)`` compile the :func:`folded` network (idempotent); returns ``module``."""
    for m in module.modules():
        if not isinstance(m.__dict__.get("__prepare_scriptable__"), _PrepareScriptable):
            m.__dict__["__prepare_scriptable__"] = _PrepareScriptable(m)
    return module


class _PopupResetClassifier:
    """Instance-level ``reset_classifier``: timm's, then the new head converted like the rest."""

    def __init__(self, model: nn.Module, original) -> None:
        self.model, self.original = model, original

    def __call__(self, *args, **kwargs):
        self.original(self.model, *args, **kwargs)
        cfg = self.model.popup_config
        before = {id(mask) for mask in popup_masks(self.model).values()}
        convert(self.model, k=cfg.k, weight_init=cfg.weight_init, seed=cfg.seed, dense=cfg.dense,
                structure=cfg.structure, learn_norm=cfg.learn_norm, learn_bias=cfg.learn_bias,
                score_init=cfg.score_init)
        if cfg.method in METHOD_MODES and cfg.method != "edge-popup":  # the new head learns the model's method
            masks = list(popup_masks(self.model).values())
            new = [mask for mask in masks if id(mask) not in before]
            # a global top-k regroups every tensor; the others change only the new head's masks
            use_method(masks if METHOD_MODES[cfg.method] == "global" else new, cfg.method, k=cfg.k, slots=cfg.slots,
                       score_l2=cfg.score_l2)


def convert(
    model: nn.Module,
    k: float = 0.5,
    weight_init: str = DEFAULT_WEIGHT_INIT,
    seed: int = 0,
    dense: Sequence[str] = (),
    init_scores: bool = True,
    method: str = "edge-popup",
    options: MethodOptions | None = None,
    *,
    structure: str | Sequence[int] | None = None,
    learn_norm: bool = False,
    learn_bias: bool = False,
    score_init: str = DEFAULT_SCORE_INIT,
    init_mode: str | None = None,
    nonlinearity: str | None = None,
    scale_fan: bool | None = None,
) -> nn.Module:
    """Make ``model`` an edge-popup network in place and return it.

    * every weight tensor (module docstring: conv, linear, embedding, LSTM, CondConv, weights read directly by
      functional calls) is masked, keeping the fraction ``k`` (of weights KEPT, 0 < k <= 1) by learned scores
      over seeded random values, first and last layer included, as in the paper;
    * modules whose qualified name matches a glob in ``dense`` (e.g. ``("conv1", "fc")``, the official
      code's first/last-layer-dense options) stay ordinary trainable modules;
    * every other parameter is frozen by the policy in the module docstring (norms non-affine, biases 0,
      near-zero gains 1, embeddings seeded N(0, 0.02**2)), so the whole network is a function of the seed;
    * the model keeps its classes and timm protocol; ``model.reset_classifier`` yields a popup head.

    After conversion the only trainable tensors are scores (and the parameters of ``dense`` modules). Calling
    it again (as ``reset_classifier`` does) converts only what is new.

    ``method`` (with its ``options``) makes it another mask-learning method of ``timm_popup.methods`` instead
    (``global-topk``, ``biprop``, ``iterand``, ``signed-supermask``, ``slot-machine``): the same network, its
    masks in that method's mode.

    ``structure`` (``"2:4"``, any N:M with N < M) keeps N of every M consecutive weights along each tensor's dim 1
    (input features, input channels) instead of one top-k per tensor; ``k`` must then be N/M, which tensors whose
    dim 1 does not divide by M keep as one top-k (``layers.use_structure``).

    The paper code's options: ``learn_norm`` / ``learn_bias`` train the norm layers' scale and shift / the biases
    with the scores (module docstring); ``init_mode`` (``fan_in`` / ``fan_out``), ``nonlinearity`` (the gain, by
    ``torch.nn.init.calculate_gain``'s names) and ``scale_fan`` complete ``weight_init``
    (``timm_popup.init.weight_distribution``); ``score_init`` is how scores start (``timm_popup.layers.SCORE_INITS``).
    """
    weight_init = weight_distribution(weight_init, mode=init_mode, nonlinearity=nonlinearity, scale_fan=scale_fan)
    k, weight_init, seed = check_k(k), check_weight_init(weight_init), int(seed)
    score_init = check_score_init(score_init)
    if structure is not None:
        n, m = parse_structure(structure)
        if not math.isclose(k, n / m, rel_tol=0, abs_tol=1e-3):
            raise ValueError(f"structure {n}:{m} keeps k = {n / m:.4g} of the weights, not k={k}: pass k={n / m:.4g}")
        k, structure = n / m, f"{n}:{m}"
    dense = tuple(dense)
    cfg = getattr(model, "popup_config", None) or PopupConfig()
    cfg.k, cfg.weight_init, cfg.seed, cfg.dense, cfg.structure = k, weight_init, seed, dense, structure
    cfg.learn_norm, cfg.learn_bias, cfg.score_init = bool(learn_norm), bool(learn_bias), score_init
    learn = learned_policies(cfg.learn_norm, cfg.learn_bias)

    def is_dense(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in dense)

    kept = {id(p) for name, m in model.named_modules() if dense and is_dense(name) for p in m.parameters()}
    shared: dict[int, PopupMask] = {}  # tied weights share one mask
    too_few = []
    for mod_name, module in list(model.named_modules()):
        if isinstance(module, (PopupMask, parametrize.ParametrizationList)):
            continue
        for p_name, p in list(module.named_parameters(recurse=False)):
            if id(p) in kept:
                continue
            qualname = f"{mod_name}.{p_name}" if mod_name else p_name
            if qualname in cfg.learned:  # learned by an earlier call (reset_classifier converts only what is new)
                continue
            if is_masked_weight(p_name, p) and fans(_fan_shape(module, p_name) or p.shape)[0] == 1:
                value = random_weight(p.shape, seed=seed, name=qualname, weight_init=weight_init, k=k,
                                      fan_shape=_fan_shape(module, p_name))
                _freeze(module, p_name, value.to(p.dtype) if p.is_meta else value.to(p.device, p.dtype))
                cfg.frozen[qualname] = "weight:all"
            elif is_masked_weight(p_name, p):
                mask = shared.get(id(p))
                if mask is None:
                    mask = PopupMask(p.shape, name=qualname, k=k, weight_init=weight_init, seed=seed,
                                     fan_shape=_fan_shape(module, p_name), device=p.device, init_scores=init_scores,
                                     score_init=score_init)
                    shared[id(p)] = mask
                    if round(k * p.numel()) == 0:
                        too_few.append(f"{qualname} {tuple(p.shape)}")
                mask_tensor(module, p_name, mask)
            else:
                with torch.no_grad():
                    policy, value = _frozen_value(module, p_name, p, seed=seed, qualname=qualname)
                value = value.to(value.device if p.is_meta else p.device, p.dtype)
                if policy in learn:  # trained with the scores, from the policy's value
                    delattr(module, p_name)
                    module.register_parameter(p_name, nn.Parameter(value))
                    cfg.learned[qualname] = policy
                    continue
                _freeze(module, p_name, value, read_as_node=policy.startswith("draw:"))
                cfg.frozen[qualname] = policy
    if too_few:
        raise ValueError(f"k={k} keeps 0 of the weights of {too_few[0]}"
                         f"{f' (and {len(too_few) - 1} more tensors)' if len(too_few) > 1 else ''}: that "
                         "tensor would be cut out of the network; use a larger k or keep it dense (dense=...)")
    model.popup_config = cfg
    use_structure(list(popup_masks(model).values()), structure)
    _name_popup_architecture(model)
    make_scriptable(model)
    if hasattr(type(model), "reset_classifier") and not isinstance(
            model.__dict__.get("reset_classifier"), _PopupResetClassifier):
        model.reset_classifier = _PopupResetClassifier(model, type(model).reset_classifier)
    if method != "edge-popup":
        make_mask_method(model, method, options)
    return model


def _name_popup_architecture(model: nn.Module) -> None:
    """A converted timm model is ``popup_<name>``: its config.json must rebuild it as such, and its pretrained cfg
    must no longer point at the dense weights of ``<name>``."""
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if arch and not arch.startswith(POPUP_PREFIX):
        cfg = filter_pretrained_cfg(cfg, remove_source=True, remove_null=True)
        cfg.pop("tag", None)
        model.pretrained_cfg = model.default_cfg = dict(cfg, architecture=POPUP_PREFIX + arch)


def _owner(model: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = qualname.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def regenerated(model: nn.Module, *, seed: int, k: float, weight_init: str) -> dict[str, torch.Tensor]:
    """The random tensors of a converted ``model`` (masked weights and frozen draws, by name) for another seed /
    k / distribution, computed without changing the model (a loader verifies them before it applies them)."""
    k, weight_init = check_k(k), check_weight_init(weight_init)
    out = {name: random_weight(mask.weight.shape, seed=seed, name=name, weight_init=weight_init, k=k,
                               fan_shape=mask.fan_shape) for name, mask in popup_masks(model).items()}
    for qualname, policy in model.popup_config.frozen.items():
        if policy.startswith("draw:"):
            old = getattr(*_owner(model, qualname))
            out[qualname] = random_normal(old.shape, seed=seed, name=qualname, std=float(policy[len("draw:"):]))
        elif policy == "weight:all":  # drawn as at conversion, CondConv's expert fans included
            module, attr = _owner(model, qualname)
            out[qualname] = random_weight(getattr(module, attr).shape, seed=seed, name=qualname,
                                          weight_init=weight_init, k=k, fan_shape=_fan_shape(module, attr))
    return out


def reseed(model: nn.Module, *, seed: int, k: float, weight_init: str,
           tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Regenerate a converted ``model``'s random tensors for another seed / k / distribution, in place.

    ``tensors``: the :func:`regenerated` values, where the caller has them already."""
    k, weight_init = check_k(k), check_weight_init(weight_init)
    tensors = tensors if tensors is not None else regenerated(model, seed=seed, k=k, weight_init=weight_init)
    for name, mask in popup_masks(model).items():
        mask.k, mask.weight_init, mask.seed = k, weight_init, int(seed)
        mask.set_weight(tensors[name].to(mask.weight.device, mask.weight.dtype))
    cfg = model.popup_config
    for qualname, policy in cfg.frozen.items():
        if policy.startswith("draw:") or policy == "weight:all":
            module, attr = _owner(model, qualname)
            old = getattr(module, attr)
            setattr(module, attr, tensors[qualname].to(old.device, old.dtype))
    cfg.k, cfg.weight_init, cfg.seed = k, weight_init, int(seed)
    return model


def learned_policies(learn_norm: bool, learn_bias: bool) -> frozenset[str]:
    """The parameter policies whose tensors train with the scores under ``learn_norm`` / ``learn_bias``."""
    return frozenset((("norm:1", "norm:0") if learn_norm else ()) + (("bias:0",) if learn_bias else ()))


def learn_frozen(model: nn.Module, *, learn_norm: bool, learn_bias: bool) -> list[str]:
    """Make the frozen tensors that ``learn_norm`` / ``learn_bias`` train parameters again (what a model built
    without them does to take an artifact that learned them); returns their names."""
    cfg = model.popup_config
    learn = learned_policies(learn_norm, learn_bias)
    names = [name for name, policy in cfg.frozen.items() if policy in learn]
    for name in names:
        unfreeze(*_owner(model, name))
        cfg.learned[name] = cfg.frozen.pop(name)
    cfg.learn_norm, cfg.learn_bias = cfg.learn_norm or learn_norm, cfg.learn_bias or learn_bias
    return names


def frozen_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors frozen by the parameter policy, in name order (what an artifact's frozen fingerprint covers).

    Buffers a model fills itself (convit's lazily computed position indices) are not among them."""
    cfg = model.popup_config
    return [(name, getattr(*_owner(model, name))) for name in sorted(cfg.frozen)]
