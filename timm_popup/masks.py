"""A popup model and its mask file (:mod:`timm_popup.maskfile`): reading a model into one, verifying one against a
model and applying it.

Saving (``mask_state_dict``) reads each masked tensor's seeded weight, mask and what its method adds, and the
tensors the parameter policy froze (their fingerprint), and hands them to the file format.

Loading (``filter_state_dict``, timm's ``pretrained_filter_fn``) adopts the file's seed, k and weight
distribution unless the caller chose them, regenerates the weights, compares them with the fingerprints
and only then (a rejected file leaves the model as it was) turns each mask into scores (1 kept, 0 dropped:
top-k of those is exactly the mask; for a free-density mask +1 / -1 and the masks switch to the supermask's
``sample`` mode, whose eval mask is scores > 0).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .convert import frozen_tensors, learn_frozen, learned_policies, popup_masks, regenerated, reseed
from .init import check_k, check_weight_init
from .layers import PopupMask, binary_alpha, num_kept, use_method, use_structure
from .maskfile import (  # the file's names stay importable from here, where the first releases had them
    FORMAT_VERSION,
    META,
    OLDEST_FORMAT,
    TENSOR_KEYS,
    Header,
    MaskedTensor,
    MaskError,
    artifact_format,
    artifact_info,
    check_format,
    decode_tensor,
    encode,
    pack_mask,
    pack_uint,
    read_header,
    read_mask_file,
    recorded_learned,
    recorded_method,
    recorded_popup_args,
    recorded_structure,
    scalar,
    sha256,
    stored_tensors,
    unpack_mask,
    unpack_uint,
    write_mask_file,
)

__all__ = ["FORMAT_VERSION", "OLDEST_FORMAT", "artifact_format", "pack_uint", "unpack_uint", "MaskError",
           "mask_state_dict", "model_header", "save_masks", "load_masks", "filter_state_dict", "pack_mask",
           "unpack_mask", "artifact_info", "recorded_args", "read_mask_file", "check_planned_model"]


def _classifiers(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _fingerprinted_frozen(model: nn.Module, replaced: dict[str, torch.Tensor] | None = None,
                          learned: frozenset[str] = frozenset()) -> list[torch.Tensor]:
    """The tensors the parameter policy froze, in the order the file's fingerprint hashes them, ``replaced`` ones (a
    re-seed under check) substituted, those of the ``learned`` policies (an artifact that trained them) left out. The
    classifier's (its zero bias) are left out too: a mask loads into a model with another num_classes."""
    classifiers, replaced, frozen = _classifiers(model), replaced or {}, model.popup_config.frozen
    return [replaced.get(n, t) for n, t in frozen_tensors(model)
            if n.rpartition(".")[0] not in classifiers and frozen[n] not in learned]


def _masked_tensor(layer: PopupMask, method: str) -> MaskedTensor:
    """What the file records of one masked tensor, read from its layer."""
    if layer.mode == "slots":
        return MaskedTensor(layer.weight_seeded(), slot=layer.slot_choice())
    mask = layer.get_mask()
    return MaskedTensor(
        layer.weight_seeded(), mask=mask,
        alpha=binary_alpha(layer.weight, mask) if layer.mode == "binary" else None,
        flips=layer.flips()[mask] if layer.mode == "signed" else None,
        redraws=layer.redraws[mask] if method == "iterand" else None)


def mask_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The compact artifact tensors of a popup ``model`` (:mod:`timm_popup.maskfile`): everything read from the
    model first (frozen tensors, each masked tensor, the other state), then encoded in one call."""
    cfg = getattr(model, "popup_config", None)
    layers = popup_masks(model)
    if cfg is None or not layers:
        raise MaskError("this model has no popup layers: build it with timm.create_model('popup_...') or "
                        "timm_popup.convert(model) before saving a mask")
    frozen = _fingerprinted_frozen(model)
    tensors = ((name, _masked_tensor(layer, cfg.method)) for name, layer in layers.items())
    # what only training needs: scores, IteRand's re-draw record, Gem-Miner's weights alive (in the mask already)
    state = {n: t for n, t in model.state_dict().items()
             if n.rpartition(".")[2] not in ("scores", "redraws", "alive")}
    return encode(model_header(model), frozen, tensors, state)


def model_header(model: nn.Module) -> Header:
    """The header of ``model``'s artifact: how its weights were drawn, its method, structure and what else it
    learned."""
    cfg = model.popup_config
    free = any(layer.mode == "sample" for layer in popup_masks(model).values())
    return Header(method=cfg.method, seed=cfg.seed, k=cfg.k, weight_init=cfg.weight_init, free=free,
                  slots=cfg.slots, redraw_every=cfg.redraw_every, redraw_rate=cfg.redraw_rate,
                  structure=cfg.structure, learn_norm=cfg.learn_norm, learn_bias=cfg.learn_bias)


def save_masks(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s mask artifact to ``path`` (a ``.safetensors`` file) atomically."""
    return write_mask_file(mask_state_dict(model), path)


def recorded_args(path: str | os.PathLike) -> dict | None:
    """The seed, k, weight_init and learned tensors a mask file records, read without its masks, so that a model can
    be built with them instead of being built and then re-seeded. None where the file cannot tell (missing, corrupt,
    another format): the loader then reports why."""
    try:
        sd = read_header(path)
        if not OLDEST_FORMAT <= int(scalar(sd, "format_version")) <= FORMAT_VERSION:
            return None
        args = recorded_popup_args(sd)
        check_k(args["k"]), check_weight_init(args["weight_init"])
        return dict(args, **{key: True for key, value in recorded_learned(sd).items() if value})
    except Exception:  # any unreadable file: the normal load path raises the one-line error
        return None


def filter_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: verify a mask artifact against ``model`` and turn it into a state dict.

    Adopts the artifact's seed / k / weight distribution where the caller did not choose them, then checks every
    tensor's regenerated weights against the stored fingerprints. The model changes only once all checks pass;
    then its masks take the artifact's method (``timm_popup.layers.use_method``) and scores that reproduce the
    artifact exactly under it (1 kept / 0 dropped; -1 for a flipped sign; a one-hot choice of slot).
    """
    sd = state_dict
    check_format(sd)
    cfg = model.popup_config
    found = recorded_popup_args(sd)
    method = recorded_method(sd)
    current = dict(seed=cfg.seed, k=cfg.k, weight_init=cfg.weight_init)
    structure = recorded_structure(sd)
    if structure != cfg.structure and "structure" in cfg.explicit:
        raise MaskError(f"this mask was found with structure={structure!r} but the model was built with "
                        f"structure={cfg.structure!r}: drop the structure argument (the mask's is used) or pass "
                        f"{structure!r}")
    # init_mode / nonlinearity / scale_fan are parts of the weight distribution's full name
    explicit = set(cfg.explicit) | ({"weight_init"} if {"init_mode", "nonlinearity", "scale_fan"} & set(cfg.explicit)
                                    else set())
    learned = recorded_learned(sd)
    for key, value in [*found.items(), *learned.items()]:
        have = getattr(cfg, key)
        if have != value and (key in explicit or have is True):
            raise MaskError(f"this mask was found with {key}={value!r} but the model was built with "
                            f"{key}={have!r}: drop the {key} argument (the mask's value is used) or pass "
                            f"{value!r}")
    new = regenerated(model, **found) if found != current else None

    classifiers = _classifiers(model)
    masks = popup_masks(model)
    stored = stored_tensors(sd)
    is_head = {name: name.rpartition(".")[0] in classifiers for name in masks}
    if set(stored) - set(masks) or {n for n in set(masks) - set(stored) if not is_head[n]}:
        missing, extra = sorted(set(masks) - set(stored))[:3], sorted(set(stored) - set(masks))[:3]
        raise MaskError(f"this mask is for another architecture (model tensors without a mask: {missing}, "
                        f"mask tensors not in the model: {extra}): load it with the model it was saved from")
    learn = learned_policies(**learned)
    missing = [n for n, policy in {**cfg.frozen, **cfg.learned}.items() if policy in learn and n not in sd
               and n.rpartition(".")[0] not in classifiers]
    if missing:
        raise MaskError(f"the mask records learned {'norm layers' if learned['learn_norm'] else 'biases'} but holds no "
                        f"value for {missing[0]}: the file is corrupt or for another architecture")
    _check_state(sd, model, stored, classifiers, learn)
    heads, found_payload = [], []
    for name, mask in masks.items():
        shape = tuple(mask.weight.shape)
        weight = new[name] if new is not None else mask.weight_seeded()
        if stored.get(name) != shape:
            if is_head[name]:  # another num_classes: keep the model's fresh popup classifier
                heads.append(mask)
                continue
            raise MaskError(f"tensor {name} has shape {shape} in the model but {stored.get(name)} in the mask: "
                            "the mask is for another architecture; build the model it was saved from")
        if not torch.equal(sha256([weight.float()]), sd[f"{name}.fingerprint"]):
            raise MaskError(f"tensor {name}: the weights regenerated from seed {found['seed']} do not match the "
                            "mask's fingerprint, so the mask was found on other random weights; never apply it")
        n = math.prod(shape)
        payload = decode_tensor(sd, name, n, method, found["k"], num_kept(n, found["k"]), shape)
        if method == "biprop":
            alpha = float(binary_alpha(weight, torch.from_numpy(payload["bits"]).view(shape)))
            if not math.isclose(alpha, float(sd[f"{name}.alpha"].item()), rel_tol=1e-6):
                raise MaskError(f"tensor {name}: the binary scale of the regenerated kept weights ({alpha:.6g}) is "
                                f"not the recorded one ({float(sd[f'{name}.alpha'].item()):.6g}): the mask file is "
                                "corrupt or for other weights")
        found_payload.append((mask, payload))
    if method == "global-topk":
        sizes = sum(math.prod(shape) for shape in stored.values())
        total = sum(int(sd[f"{name}.kept"].item()) for name in stored)
        if total != num_kept(sizes, found["k"]):
            raise MaskError(f"the mask keeps {total} of {sizes} weights in all, not round(k*N) for k={found['k']}: "
                            "it was saved with another k or is corrupt")
    if not torch.equal(sha256(_fingerprinted_frozen(model, new or {}, learn)), sd[META + "frozen_fingerprint"]):
        raise MaskError("the model's frozen tensors (norm layers, biases, gains, embeddings) differ from the ones "
                        "the mask was found with: build the same architecture and model arguments the mask was "
                        "saved from")
    # only now that everything is verified: a rejected file leaves the model as it was
    if new is not None:
        reseed(model, **found, tensors=new)
    learn_frozen(model, **learned)
    slots = int(scalar(sd, "slots")) if method == "slot-machine" else 0
    use_structure(list(masks.values()), None)  # the file's method first (it may refuse a structure), then its own
    use_method(list(masks.values()), method, k=found["k"], slots=slots)
    use_structure(list(masks.values()), structure)
    cfg.method, cfg.slots, cfg.structure = method, slots, structure
    if method == "iterand":
        cfg.redraw_every, cfg.redraw_rate = int(scalar(sd, "redraw_every")), float(scalar(sd, "redraw_rate"))
    keys: dict[int, list[str]] = {}  # a module shared by several blocks (CoaT) has a key under each path
    for key, p in model.named_parameters(remove_duplicate=False):  # after use_method: slots replace scores
        keys.setdefault(id(p), []).append(key)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mask in heads:
            mask.reset_scores()
        for mask, payload in found_payload:  # written in place: the parameters themselves go into the state
            kept = torch.from_numpy(payload["bits"]).view(mask.weight.shape).bool()
            if method == "slot-machine":
                choice = torch.from_numpy(payload["slot"]).view(mask.weight.shape).to(mask.scores.device)
                mask.scores.zero_().scatter_(0, choice.unsqueeze(0), 1.0)
                continue
            value = kept.float()
            if method == "supermask":
                value = value.mul_(2).sub_(1)  # scores > 0 is the eval mask
            if method == "signed-supermask":
                value[kept] = 1.0 - 2.0 * torch.from_numpy(payload["flips"]).float()
            mask.scores.copy_(value)
            if method == "iterand":
                mask.redraws.zero_()[kept.to(mask.redraws.device)] = torch.from_numpy(payload["redraws"]).to(
                    mask.redraws)
                # loading the state rebuilds the weights from the seed and these events (PopupMask)
                out.update({key.rpartition(".")[0] + ".redraws": mask.redraws for key in keys[id(mask.scores)]})
            if method == "gem-miner":  # the mask is the scores' rounding; every weight counts as alive
                mask.alive.fill_(True)
                out.update({key.rpartition(".")[0] + ".alive": mask.alive for key in keys[id(mask.scores)]})
    for mask in heads + [m for m, _ in found_payload]:
        # the parameter itself: load_state_dict's copy onto itself is a no-op
        out.update({key: mask.scores for key in keys[id(mask.scores)]})
    own = model.state_dict()
    for name, tensor in _state(sd, stored).items():
        if name.rpartition(".")[0] in classifiers and name in own and own[name].shape != tensor.shape:
            continue  # a learned classifier bias of another num_classes: the model's fresh one stays
        out[name] = tensor
    return out


def _state(sd: dict[str, torch.Tensor], stored: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The file's copy of the model's other state (BatchNorm statistics, layers kept dense)."""
    artifact_keys = {f"{n}.{suffix}" for n in stored for suffix in TENSOR_KEYS}
    return {name: t for name, t in sd.items() if not name.startswith(META) and name not in artifact_keys}


def _check_state(sd: dict[str, torch.Tensor], model: nn.Module, stored: dict[str, tuple[int, ...]],
                 classifiers: tuple[str, ...], learn: frozenset[str]) -> None:
    """The file's other state has the model's keys, shapes and dtypes (a classifier's may differ: timm replaces a
    head of another num_classes), so loading it is never a multi-line error from ``load_state_dict``. The tensors
    the file learned (``learn``: their policies) and the model holds frozen are part of the state it takes."""
    def owned(name: str) -> bool:
        return name.rpartition(".")[0] in classifiers

    ours = {n: t for n, t in model.state_dict().items() if ".parametrizations." not in n and not owned(n)}
    ours.update({n: t for n, t in frozen_tensors(model) if model.popup_config.frozen[n] in learn and not owned(n)})
    theirs = {n: t for n, t in _state(sd, stored).items() if not owned(n)}
    extra, missing = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if extra or missing:
        raise MaskError(f"this mask is for another architecture (model state it lacks: {missing[:3]}, state the "
                        f"model has no tensor for: {extra[:3]}): load it with the model it was saved from")
    for name, t in theirs.items():
        if t.shape != ours[name].shape or t.dtype != ours[name].dtype:
            raise MaskError(f"tensor {name} is {ours[name].dtype} {tuple(ours[name].shape)} in the model but "
                            f"{t.dtype} {tuple(t.shape)} in the mask: the mask is for another architecture; build "
                            "the model it was saved from")


#: elements a model may hold beyond what its mask file covers (tensors the policy freezes, norms, a new head)
_UNCOVERED = 2**24


def check_planned_model(model: nn.Module, path: str | os.PathLike, classifiers: tuple[str, ...]) -> None:
    """Before a model is built for the mask file at ``path`` (``model``: its dense form, on the meta device where it
    can be): the file is valid on its own, each tensor it masks is a parameter of that shape (a classifier's may
    differ) and the model holds little beyond them, so a config.json or arguments that describe a far larger
    network than the file's are refused before it is allocated (the fingerprints are compared later)."""
    sd = read_mask_file(path)
    check_format(sd)
    params = dict(model.named_parameters())
    stored = stored_tensors(sd)
    for name, shape in stored.items():
        p = params.get(name)
        if p is None or (tuple(p.shape) != shape and name.rpartition(".")[0] not in classifiers):
            raise MaskError(f"tensor {name} has shape {None if p is None else tuple(p.shape)} in the model but "
                            f"{shape} in the mask: the mask is for another architecture; build the model it was "
                            "saved from")
    covered = sum(math.prod(shape) for shape in stored.values()) + sum(t.numel() for t in _state(sd, stored).values())
    size = sum(t.numel() for n, t in [*model.named_parameters(), *model.named_buffers()]
               if n.rpartition(".")[0] not in classifiers)
    if size > 2 * covered + _UNCOVERED:
        raise MaskError(f"the model would hold {size:,} values but its mask file covers {covered:,}: the mask is for "
                        "another architecture (or config.json describes another one); build the model it was saved "
                        "from")


def load_masks(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Verify the mask file at ``path`` against ``model`` and apply it (the loader timm's path also uses)."""
    state = filter_state_dict(read_mask_file(path), model)
    model.load_state_dict(state, strict=strict)
    return model
