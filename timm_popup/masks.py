"""Masks as artifacts: bit-packed masks + seed in ``model.safetensors``, verified before they are trusted.

File format (version 2), all tensors, because ``safetensors.torch.load_file`` drops header metadata:

* ``__popup__.format_version`` int64[1], ``__popup__.generator_version`` int64[1] (``timm_popup.init``),
  ``__popup__.seed`` int64[1], ``__popup__.k`` float64[1], ``__popup__.weight_init`` uint8[] (UTF-8).
* per masked tensor ``NAME`` (its qualified name in the model, e.g. ``layer1.0.conv1.weight``): ``NAME.mask``
  uint8[ceil(n/8)], the tensor's boolean mask flattened in C order
  and packed little-endian within each byte (element i is bit ``i % 8`` of byte ``i // 8``);
  ``NAME.mask_shape`` int64[ndim]; ``NAME.fingerprint`` uint8[32], sha256 of the regenerated float32
  weight's little-endian bytes.
* ``__popup__.frozen_fingerprint`` uint8[32]: sha256 over every tensor the parameter policy froze
  (``timm_popup.convert``: non-affine norm scale/shift, zero biases, gains, frozen embeddings), in name order.
* everything else in the model's ``state_dict`` except scores: BatchNorm running statistics and the
  parameters of layers kept dense.
* ``__popup__.checksum`` uint8[32]: sha256 over all other tensors (name order), so any corruption is caught.
* free per-layer density (a supermask, whose density is learned, not ``round(k * n)``): ``__popup__.free_density``
  int64[1] = 1 and per layer ``NAME.kept`` int64[1], the layer's kept count, which replaces the ``round(k * n)``
  check (``k`` is then the supermask's initial keep probability, still needed for the scaled distributions).
  Top-k files do not hold these keys; a reader without them rejects a free-density file with
  the "not round(k*n)" error, never silently.

Format 3 (the methods that followed the paper, ``timm_popup.methods``; edge-popup and supermask files stay
format 2, byte for byte): everything above, plus ``__popup__.method`` uint8[] (UTF-8: ``global-topk``,
``biprop``, ``iterand``, ``signed-supermask``, ``slot-machine``) and per method:

* ``global-topk``: ``NAME.kept`` per tensor; their sum must be ``round(k * N)`` over the file's tensors.
* ``biprop``: ``NAME.alpha`` float32[1], the tensor's binary scale, recomputed from the regenerated weights and
  compared on load.
* ``signed-supermask``: ``NAME.flips`` uint8[], one bit per kept weight (in flat order): its sign is flipped.
* ``iterand``: ``NAME.redraws`` (per kept weight, the event of its last re-draw, 0 for none, as
  ``NAME.redraw_bits`` bits each) and ``__popup__.redraw_rate`` / ``__popup__.redraw_every`` for the record.
* ``slot-machine``: no ``NAME.mask`` (every weight is used); ``NAME.slot``, each weight's candidate index at
  ceil(log2(slots)) bits, and ``__popup__.slots``.

Packed unsigned values (``pack_uint``): value i's bit b is bit ``i * bits + b`` of the little-endian bit stream.

Version history: 1 keyed masks by module name (``conv1.mask``) on generator version 1; 2 keys them by tensor
name on generator version 2 (any weight tensor of any module is masked). A version-1 file is refused with the
reason.

Loading (``filter_state_dict``, timm's ``pretrained_filter_fn``) adopts the file's seed, k and weight
distribution unless the caller chose them, regenerates the weights, compares them with the fingerprints
and only then (a rejected file leaves the model as it was) turns each mask into scores (1 kept, 0 dropped:
top-k of those is exactly the mask; for a free-density mask +1 / -1 and the masks switch to the supermask's
``sample`` mode, whose eval mask is scores > 0).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from ._io import atomic_write
from .convert import frozen_tensors, popup_masks, regenerated, reseed
from .init import GENERATOR_VERSION, check_k, check_weight_init
from .layers import binary_alpha, num_kept, use_method

__all__ = ["FORMAT_VERSION", "OLDEST_FORMAT", "artifact_format", "pack_uint", "unpack_uint", "MaskError",
           "mask_state_dict", "save_masks", "load_masks", "filter_state_dict", "pack_mask", "unpack_mask",
           "artifact_info", "recorded_args"]

FORMAT_VERSION = 3
#: the oldest format this release still reads
OLDEST_FORMAT = 2
#: methods whose artifacts need no format-3 key (written as format 2: older releases read them)
_FORMAT2_METHODS = ("edge-popup", "supermask")
#: per-tensor keys of an artifact, other than the tensor's state
_TENSOR_KEYS = ("mask", "mask_shape", "fingerprint", "kept", "alpha", "flips", "redraws", "redraw_bits", "slot")
#: the keys that carry the artifact's information per weight (what ``bits_per_weight`` counts)
_PAYLOAD_KEYS = ("mask", "flips", "redraws", "slot")
_META = "__popup__."


class MaskError(ValueError):
    """A mask file that cannot be trusted for this model; the message says why and what to do."""


def artifact_format(method: str) -> int:
    """The format an artifact of ``method`` is written in: the oldest that can hold it (edge-popup and supermask
    files stay format 2, readable by older releases)."""
    return OLDEST_FORMAT if method in _FORMAT2_METHODS else FORMAT_VERSION


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    bits = np.packbits(mask.detach().cpu().flatten().numpy().astype(np.uint8), bitorder="little")
    return torch.from_numpy(bits)


def unpack_bits(packed: torch.Tensor, n: int) -> np.ndarray:
    """The ``n`` mask bits of a packed mask as a uint8 0/1 array (the one place that knows the bit order).

    numpy, not torch: counting and converting bool tensors is ~100x slower in torch on CPU."""
    return np.unpackbits(packed.numpy(), count=n, bitorder="little")


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(unpack_bits(packed, math.prod(shape)).astype(bool)).reshape(shape)


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers ``values`` (any shape, flattened) at ``bits`` bits each, little-endian (module docstring)."""
    v = values.detach().cpu().flatten().numpy().astype(np.uint64)
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little"))


def unpack_uint(packed: torch.Tensor, n: int, bits: int) -> np.ndarray:
    """The ``n`` values of :func:`pack_uint` (int64)."""
    planes = unpack_bits(packed, n * bits).reshape(n, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _bits_for(largest: int) -> int:
    return max(1, int(largest).bit_length())


def _sha256(tensors: list[torch.Tensor]) -> torch.Tensor:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update((t.view(torch.uint8) if t.dtype == torch.bool else t).numpy())  # the buffer itself, no copy
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def _classifiers(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _frozen_fingerprint(model: nn.Module, replaced: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """sha256 of the tensors the parameter policy froze, ``replaced`` ones (a re-seed under check) substituted.
    The classifier's (its zero bias) are left out: a mask loads into a model with another num_classes."""
    classifiers, replaced = _classifiers(model), replaced or {}
    return _sha256([replaced.get(n, t) for n, t in frozen_tensors(model) if n.rpartition(".")[0] not in classifiers])


def _checksum(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    names = sorted(n for n in tensors if n != _META + "checksum")
    return _sha256([torch.tensor(list(n.encode()), dtype=torch.uint8) for n in names] + [tensors[n] for n in names])


def mask_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The compact artifact tensors of a popup ``model`` (see the module docstring)."""
    cfg = getattr(model, "popup_config", None)
    layers = popup_masks(model)
    if cfg is None or not layers:
        raise MaskError("this model has no popup layers: build it with timm.create_model('popup_...') or "
                        "timm_popup.convert(model) before saving a mask")
    method = cfg.method
    out: dict[str, torch.Tensor] = {
        _META + "format_version": torch.tensor([artifact_format(method)]),
        _META + "generator_version": torch.tensor([GENERATOR_VERSION]),
        _META + "seed": torch.tensor([cfg.seed]),
        _META + "k": torch.tensor([cfg.k], dtype=torch.float64),
        _META + "weight_init": torch.tensor(list(cfg.weight_init.encode()), dtype=torch.uint8),
        _META + "frozen_fingerprint": _frozen_fingerprint(model),
    }
    if method not in _FORMAT2_METHODS:
        out[_META + "method"] = torch.tensor(list(method.encode()), dtype=torch.uint8)
    if method == "slot-machine":
        out[_META + "slots"] = torch.tensor([cfg.slots])
    if method == "iterand":
        out[_META + "redraw_every"] = torch.tensor([cfg.redraw_every])
        out[_META + "redraw_rate"] = torch.tensor([cfg.redraw_rate], dtype=torch.float64)
    free = any(layer.mode == "sample" for layer in layers.values())
    if free:
        out[_META + "free_density"] = torch.tensor([1])
    for name, layer in layers.items():
        out[f"{name}.mask_shape"] = torch.tensor(list(layer.weight.shape))
        out[f"{name}.fingerprint"] = _sha256([layer.weight_seeded().float()])
        if layer.mode == "slots":
            out[f"{name}.slot"] = pack_uint(layer.slot_choice(), _bits_for(cfg.slots - 1))
            continue
        mask = layer.get_mask()
        out[f"{name}.mask"] = pack_mask(mask)
        if free or layer.mode == "global":
            out[f"{name}.kept"] = torch.tensor([int(mask.sum())])
        if layer.mode == "binary":
            out[f"{name}.alpha"] = binary_alpha(layer.weight, mask).reshape(1).cpu()
        if layer.mode == "signed":
            out[f"{name}.flips"] = pack_mask(layer.flips()[mask])
        if method == "iterand":
            events = layer.redraws[mask]
            bits = _bits_for(int(events.max()) if events.numel() else 0)
            out[f"{name}.redraws"] = pack_uint(events, bits)
            out[f"{name}.redraw_bits"] = torch.tensor([bits])
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[2] not in ("scores", "redraws"):
            out[name] = tensor.detach().cpu().contiguous().clone()
    out[_META + "checksum"] = _checksum(out)
    return out


def save_masks(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s mask artifact to ``path`` (a ``.safetensors`` file) atomically."""
    path = Path(path)
    tensors = mask_state_dict(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}  # one key: safetensors writes a metadata map in random order, i.e. other bytes
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    return path


def read_mask_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a mask file's tensors (safetensors only: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"mask file {path} does not exist: pass the model.safetensors written by save_pretrained")
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated/invalid files
        raise MaskError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt: "
                        "download or copy it again") from e


def _scalar(sd: dict[str, torch.Tensor], key: str):
    return sd[_META + key].item()


def _popup_args(sd: dict[str, torch.Tensor]) -> dict:
    return dict(seed=int(_scalar(sd, "seed")), k=float(_scalar(sd, "k")),
                weight_init=bytes(sd[_META + "weight_init"].tolist()).decode())


def recorded_args(path: str | os.PathLike) -> dict | None:
    """The seed, k and weight_init a mask file records, read without its masks, so that a model can be built
    with them instead of being built and then re-seeded. None where the file cannot tell (missing, corrupt,
    another format): the loader then reports why."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            sd = {key: f.get_tensor(key) for key in f.keys() if key.startswith(_META)}
        if not OLDEST_FORMAT <= int(_scalar(sd, "format_version")) <= FORMAT_VERSION:
            return None
        args = _popup_args(sd)
        check_k(args["k"]), check_weight_init(args["weight_init"])
        return args
    except Exception:  # any unreadable file: the normal load path raises the one-line error
        return None


def artifact_info(sd: dict[str, torch.Tensor]) -> dict:
    """What a mask artifact holds: format, method, seed, k, weight distribution, layers, kept/total weights and
    the bits it stores per weight (its masks and what its method adds, per weight of the masked tensors)."""
    _check_format(sd)
    method = _method(sd)
    layers = _stored_tensors(sd)
    total = sum(math.prod(s) for s in layers.values())
    kept = sum(int(np.count_nonzero(unpack_bits(sd[f"{n}.mask"], math.prod(s)))) if f"{n}.mask" in sd
               else math.prod(s) for n, s in layers.items())
    payload = sum(sd[f"{n}.{key}"].numel() * 8 for n in layers for key in _PAYLOAD_KEYS if f"{n}.{key}" in sd)
    density = {"supermask": "free", "global-topk": "global top-k", "slot-machine": "all (one of K values each)"}
    info = dict(format_version=int(_scalar(sd, "format_version")), method=method, **_popup_args(sd),
                generator_version=int(_scalar(sd, "generator_version")), layers=len(layers),
                total_weights=total, kept_weights=kept, density=density.get(method, "top-k"),
                bits_per_weight=round(payload / max(total, 1), 3))
    if method == "slot-machine":
        info["slots"] = int(_scalar(sd, "slots"))
    return info


def _free_density(sd: dict[str, torch.Tensor]) -> bool:
    return _META + "free_density" in sd and bool(sd[_META + "free_density"].item())


def _check_format(sd: dict[str, torch.Tensor]) -> None:
    if _META + "format_version" not in sd:
        if any(n.endswith(".weight") for n in sd):
            raise MaskError("this is a dense checkpoint (it holds weights, not timm-popup masks): a --method "
                            "dense / finetune / random-subnet run loads with timm_popup.methods.load_dense(directory), "
                            "a plain timm checkpoint with plain timm; a mask is the model.safetensors written by "
                            "timm_popup.save_pretrained")
        raise MaskError("this file holds no timm-popup mask (no __popup__.format_version): pass a "
                        "model.safetensors written by timm_popup.save_pretrained")
    version = int(sd[_META + "format_version"].item())
    if version > FORMAT_VERSION:
        raise MaskError(f"this mask uses format version {version}, newer than this timm-popup reads "
                        f"(up to {FORMAT_VERSION}): install the newer timm-popup that wrote it")
    if version < OLDEST_FORMAT:
        raise MaskError(f"this mask uses format version {version} (masks of generator version "
                        f"{int(sd[_META + 'generator_version'].item())}), which this timm-popup no longer reads: "
                        f"find the mask again with this release (format {FORMAT_VERSION})")
    generator = int(sd[_META + "generator_version"].item())
    if generator != GENERATOR_VERSION:
        raise MaskError(f"this mask was found on weights of generator version {generator}, this timm-popup "
                        f"generates version {GENERATOR_VERSION}: use a timm-popup release that matches")
    if _META + "checksum" not in sd or not torch.equal(sd[_META + "checksum"], _checksum(sd)):
        raise MaskError("the mask file's checksum does not match its contents: it is corrupt; download it again")


def _method(sd: dict[str, torch.Tensor]) -> str:
    """The training method an artifact records (format 2: edge-popup, or supermask for a free-density file)."""
    if _META + "method" in sd:
        return bytes(sd[_META + "method"].tolist()).decode()
    return "supermask" if _free_density(sd) else "edge-popup"


def _stored_tensors(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n[: -len(".mask_shape")]: tuple(sd[n].tolist()) for n in sd if n.endswith(".mask_shape")}


def _packed(sd: dict[str, torch.Tensor], key: str, count: int) -> torch.Tensor:
    """The packed array ``key`` of ``count`` bits, checked for its size (a short or long one is corrupt)."""
    if key not in sd or sd[key].numel() != -(-count // 8):
        found = "no" if key not in sd else f"{sd[key].numel()} bytes"
        raise MaskError(f"{key} holds {found}, not the {-(-count // 8)} bytes of its {count} bits: the mask file is "
                        "corrupt; download it again")
    return sd[key]


def _decode(sd: dict[str, torch.Tensor], name: str, n: int, method: str, k: float) -> dict[str, np.ndarray]:
    """One tensor's verified payload: its mask bits and what its method adds (flips, re-draw events, slots)."""
    if method == "slot-machine":
        slots = int(_scalar(sd, "slots"))
        bits = _bits_for(slots - 1)
        choice = unpack_uint(_packed(sd, f"{name}.slot", n * bits), n, bits)
        if choice.size and int(choice.max()) >= slots:
            raise MaskError(f"tensor {name} chooses candidate {int(choice.max())} of {slots}: the mask file is "
                            "corrupt; download it again")
        return dict(bits=np.ones(n, dtype=np.uint8), slot=choice)
    bits = unpack_bits(_packed(sd, f"{name}.mask", n), n)
    kept = int(np.count_nonzero(bits))
    if _free_density(sd) or method == "global-topk":
        if f"{name}.kept" not in sd or kept != int(sd[f"{name}.kept"].item()):
            raise MaskError(f"tensor {name} keeps {kept} of {n} weights, not the count the file records: the mask "
                            "file is corrupt; download it again")
    elif kept != num_kept(n, k):
        raise MaskError(f"tensor {name} keeps {kept} of {n} weights, not round(k*n) for k={k}: the mask was saved "
                        "with another k or is corrupt")
    out = dict(bits=bits)
    if method == "signed-supermask":
        out["flips"] = unpack_bits(_packed(sd, f"{name}.flips", kept), kept)
    if method == "iterand":
        width = int(sd[f"{name}.redraw_bits"].item())
        out["redraws"] = unpack_uint(_packed(sd, f"{name}.redraws", kept * width), kept, width)
    return out


def filter_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: verify a mask artifact against ``model`` and turn it into a state dict.

    Adopts the artifact's seed / k / weight distribution where the caller did not choose them, then checks every
    tensor's regenerated weights against the stored fingerprints. The model changes only once all checks pass;
    then its masks take the artifact's method (``timm_popup.layers.use_method``) and scores that reproduce the
    artifact exactly under it (1 kept / 0 dropped; -1 for a flipped sign; a one-hot choice of slot).
    """
    sd = state_dict
    _check_format(sd)
    cfg = model.popup_config
    found = _popup_args(sd)
    method = _method(sd)
    current = dict(seed=cfg.seed, k=cfg.k, weight_init=cfg.weight_init)
    for key, value in found.items():
        if current[key] != value and key in cfg.explicit:
            raise MaskError(f"this mask was found with {key}={value!r} but the model was built with "
                            f"{key}={current[key]!r}: drop the {key} argument (the mask's value is used) or pass "
                            f"{value!r}")
    new = regenerated(model, **found) if found != current else None

    classifiers = _classifiers(model)
    masks = popup_masks(model)
    stored = _stored_tensors(sd)
    is_head = {name: name.rpartition(".")[0] in classifiers for name in masks}
    if set(stored) - set(masks) or {n for n in set(masks) - set(stored) if not is_head[n]}:
        missing, extra = sorted(set(masks) - set(stored))[:3], sorted(set(stored) - set(masks))[:3]
        raise MaskError(f"this mask is for another architecture (model tensors without a mask: {missing}, "
                        f"mask tensors not in the model: {extra}): load it with the model it was saved from")
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
        if not torch.equal(_sha256([weight.float()]), sd[f"{name}.fingerprint"]):
            raise MaskError(f"tensor {name}: the weights regenerated from seed {found['seed']} do not match the "
                            "mask's fingerprint, so the mask was found on other random weights; never apply it")
        payload = _decode(sd, name, math.prod(shape), method, found["k"])
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
    if not torch.equal(_frozen_fingerprint(model, new or {}), sd[_META + "frozen_fingerprint"]):
        raise MaskError("the model's frozen tensors (norm layers, biases, gains, embeddings) differ from the ones "
                        "the mask was found with: build the same architecture and model arguments the mask was "
                        "saved from")
    # only now that everything is verified: a rejected file leaves the model as it was
    if new is not None:
        reseed(model, **found, tensors=new)
    slots = int(_scalar(sd, "slots")) if method == "slot-machine" else 0
    use_method(list(masks.values()), method, k=found["k"], slots=slots)
    cfg.method, cfg.slots = method, slots
    if method == "iterand":
        cfg.redraw_every, cfg.redraw_rate = int(_scalar(sd, "redraw_every")), float(_scalar(sd, "redraw_rate"))
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
    for mask in heads + [m for m, _ in found_payload]:
        # the parameter itself: load_state_dict's copy onto itself is a no-op
        out.update({key: mask.scores for key in keys[id(mask.scores)]})
    artifact_keys = {f"{n}.{suffix}" for n in stored for suffix in _TENSOR_KEYS}
    for name, tensor in sd.items():
        if not name.startswith(_META) and name not in artifact_keys:
            out[name] = tensor
    return out


def load_masks(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Verify the mask file at ``path`` against ``model`` and apply it (the loader timm's path also uses)."""
    state = filter_state_dict(read_mask_file(path), model)
    model.load_state_dict(state, strict=strict)
    return model
