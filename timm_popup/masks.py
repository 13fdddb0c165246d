"""Masks as artifacts: bit-packed masks + seed in ``model.safetensors``, verified before they are trusted.

File format (version 1), all tensors, because ``safetensors.torch.load_file`` drops header metadata:

* ``__popup__.format_version`` int64[1], ``__popup__.generator_version`` int64[1] (``timm_popup.init``),
  ``__popup__.seed`` int64[1], ``__popup__.k`` float64[1], ``__popup__.weight_init`` uint8[] (UTF-8).
* per popup layer ``NAME``: ``NAME.mask`` uint8[ceil(n/8)], the layer's boolean mask flattened in C order
  and packed little-endian within each byte (element i is bit ``i % 8`` of byte ``i // 8``);
  ``NAME.mask_shape`` int64[ndim]; ``NAME.fingerprint`` uint8[32], sha256 of the regenerated float32
  weight's little-endian bytes.
* ``__popup__.frozen_fingerprint`` uint8[32]: sha256 over every other frozen tensor (non-affine norm
  scale/shift, frozen embeddings), in name order.
* everything else in the model's ``state_dict`` except scores: BatchNorm running statistics and the
  parameters of layers kept dense.
* ``__popup__.checksum`` uint8[32]: sha256 over all other tensors (name order), so any corruption is caught.
* free per-layer density (a supermask, whose density is learned, not ``round(k * n)``): ``__popup__.free_density``
  int64[1] = 1 and per layer ``NAME.kept`` int64[1], the layer's kept count, which replaces the ``round(k * n)``
  check (``k`` is then the supermask's initial keep probability, still needed for the scaled distributions).
  Top-k files do not hold these keys and are unchanged; a reader without them rejects a free-density file with
  the "not round(k*n)" error, never silently.

Loading (``filter_state_dict``, timm's ``pretrained_filter_fn``) adopts the file's seed, k and weight
distribution unless the caller chose them, regenerates the weights, compares them with the fingerprints
and only then turns each mask into scores (1 kept, 0 dropped: top-k of those is exactly the mask; for a
free-density mask +1 / -1 and the layers switch to the supermask's ``sample`` mode, whose eval mask is scores > 0).
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
from .convert import popup_layers, reseed
from .init import GENERATOR_VERSION, check_k, check_weight_init
from .layers import num_kept

__all__ = ["FORMAT_VERSION", "MaskError", "mask_state_dict", "save_masks", "load_masks", "filter_state_dict",
           "pack_mask", "unpack_mask", "artifact_info", "recorded_args"]

FORMAT_VERSION = 1
_META = "__popup__."


class MaskError(ValueError):
    """A mask file that cannot be trusted for this model; the message says why and what to do."""


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    bits = np.packbits(mask.detach().cpu().flatten().numpy().astype(np.uint8), bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def _sha256(tensors: list[torch.Tensor]) -> torch.Tensor:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bool else t.numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def _frozen_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Frozen tensors other than popup weights: non-persistent buffers (norm affine, embeddings)."""
    persistent = set(model.state_dict())
    layers = {f"{name}.{b}" for name in popup_layers(model) for b in ("weight", "bias")}
    return sorted((n, b) for n, b in model.named_buffers() if n not in persistent and n not in layers)


def _checksum(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    names = sorted(n for n in tensors if n != _META + "checksum")
    return _sha256([torch.tensor(list(n.encode()), dtype=torch.uint8) for n in names] + [tensors[n] for n in names])


def mask_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The compact artifact tensors of a popup ``model`` (see the module docstring)."""
    cfg = getattr(model, "popup_cfg", None)
    layers = popup_layers(model)
    if cfg is None or not layers:
        raise MaskError("this model has no popup layers: build it with timm.create_model('popup_...') or "
                        "timm_popup.convert(model) before saving a mask")
    out: dict[str, torch.Tensor] = {
        _META + "format_version": torch.tensor([FORMAT_VERSION]),
        _META + "generator_version": torch.tensor([GENERATOR_VERSION]),
        _META + "seed": torch.tensor([cfg["seed"]]),
        _META + "k": torch.tensor([cfg["k"]], dtype=torch.float64),
        _META + "weight_init": torch.tensor(list(cfg["weight_init"].encode()), dtype=torch.uint8),
        _META + "frozen_fingerprint": _sha256([b for _, b in _frozen_tensors(model)]),
    }
    free = any(layer.mode == "sample" for layer in layers.values())
    if free:
        out[_META + "free_density"] = torch.tensor([1])
    for name, layer in layers.items():
        mask = layer.get_mask()
        out[f"{name}.mask"] = pack_mask(mask)
        out[f"{name}.mask_shape"] = torch.tensor(list(layer.weight.shape))
        out[f"{name}.fingerprint"] = _sha256([layer.weight.float()])
        if free:
            out[f"{name}.kept"] = torch.tensor([int(mask.sum())])
    for name, tensor in model.state_dict().items():
        if not name.endswith(".scores") and name != "scores":
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
        if int(_scalar(sd, "format_version")) != FORMAT_VERSION:
            return None
        args = _popup_args(sd)
        check_k(args["k"]), check_weight_init(args["weight_init"])
        return args
    except Exception:  # any unreadable file: the normal load path raises the one-line error
        return None


def artifact_info(sd: dict[str, torch.Tensor]) -> dict:
    """What a mask artifact holds: format, seed, k, weight distribution, layers, kept/total weights."""
    _check_format(sd)
    layers = {n[: -len(".mask")]: tuple(sd[n + "_shape"].tolist()) for n in sd if n.endswith(".mask")}
    total = sum(math.prod(s) for s in layers.values())
    kept = sum(int(np.unpackbits(sd[f"{n}.mask"].numpy(), count=math.prod(s)).sum()) for n, s in layers.items())
    return dict(format_version=int(_scalar(sd, "format_version")), **_popup_args(sd),
                generator_version=int(_scalar(sd, "generator_version")), layers=len(layers),
                total_weights=total, kept_weights=kept, density="free" if _free_density(sd) else "top-k")


def _free_density(sd: dict[str, torch.Tensor]) -> bool:
    return _META + "free_density" in sd and bool(sd[_META + "free_density"].item())


def _check_format(sd: dict[str, torch.Tensor]) -> None:
    if _META + "format_version" not in sd:
        if any(n.endswith(".weight") for n in sd):
            raise MaskError("this is a dense checkpoint (it holds weights, not timm-popup masks): load it with "
                            "plain timm, or pass a model.safetensors written by timm_popup.save_pretrained")
        raise MaskError("this file holds no timm-popup mask (no __popup__.format_version): pass a "
                        "model.safetensors written by timm_popup.save_pretrained")
    version = int(sd[_META + "format_version"].item())
    if version > FORMAT_VERSION:
        raise MaskError(f"this mask uses format version {version}, newer than this timm-popup reads "
                        f"({FORMAT_VERSION}): upgrade timm-popup (pip install -U timm-popup)")
    generator = int(sd[_META + "generator_version"].item())
    if generator != GENERATOR_VERSION:
        raise MaskError(f"this mask was found on weights of generator version {generator}, this timm-popup "
                        f"generates version {GENERATOR_VERSION}: use a timm-popup release that matches")
    if _META + "checksum" not in sd or not torch.equal(sd[_META + "checksum"], _checksum(sd)):
        raise MaskError("the mask file's checksum does not match its contents: it is corrupt; download it again")


def filter_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: verify a mask artifact against ``model`` and turn it into a state dict.

    Adopts the artifact's seed / k / weight distribution where the caller did not choose them (the model is
    re-seeded in place), then checks every layer's regenerated weights against the stored fingerprints.
    """
    sd = state_dict
    _check_format(sd)
    cfg = model.popup_cfg
    found = _popup_args(sd)
    for key, value in found.items():
        if cfg[key] != value and key in cfg.get("explicit", ()):
            raise MaskError(f"this mask was found with {key}={value!r} but the model was built with "
                            f"{key}={cfg[key]!r}: drop the {key} argument (the mask's value is used) or pass {value!r}")
    if any(cfg[key] != value for key, value in found.items()):
        reseed(model, **found)

    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    layers = popup_layers(model)
    stored = {n[: -len(".mask")] for n in sd if n.endswith(".mask")}
    if stored - set(layers) or set(layers) - stored - set(classifiers):
        missing, extra = sorted(set(layers) - stored)[:3], sorted(stored - set(layers))[:3]
        raise MaskError(f"this mask is for another architecture (model layers without a mask: {missing}, "
                        f"mask layers not in the model: {extra}): load it with the model it was saved from")
    out: dict[str, torch.Tensor] = {}
    free, to_sample = _free_density(sd), []
    for name, layer in layers.items():
        shape = tuple(layer.weight.shape)
        stored_shape = tuple(sd[f"{name}.mask_shape"].tolist()) if name in stored else None
        if stored_shape != shape:
            if name in classifiers:  # another num_classes: keep the model's fresh popup classifier
                out[f"{name}.scores"] = layer.scores.detach().clone()
                continue
            raise MaskError(f"layer {name} has shape {shape} in the model but {stored_shape} in the mask: "
                            "the mask is for another architecture; build the model it was saved from")
        if not torch.equal(_sha256([layer.weight.float()]), sd[f"{name}.fingerprint"]):
            raise MaskError(f"layer {name}: the weights regenerated from seed {found['seed']} do not match the "
                            "mask's fingerprint, so the mask was found on other random weights; never apply it")
        # numpy, not torch: counting and converting bool tensors is ~100x slower in torch on CPU
        bits = np.unpackbits(sd[f"{name}.mask"].numpy(), count=math.prod(shape), bitorder="little")
        kept = int(np.count_nonzero(bits))
        if free:
            if f"{name}.kept" not in sd or kept != int(sd[f"{name}.kept"].item()):
                raise MaskError(f"layer {name} keeps {kept} of {bits.size} weights, not the count the file "
                                "records: the mask file is corrupt; download it again")
            to_sample.append(layer)  # a free-density mask is not any layer's top-k
            scores = bits.astype(np.float32) * 2 - 1
        else:
            if kept != num_kept(bits.size, layer.k):
                raise MaskError(f"layer {name} keeps {kept} of {bits.size} weights, not round(k*n) for "
                                f"k={layer.k}: the mask was saved with another k or is corrupt")
            scores = bits.astype(np.float32)
        out[f"{name}.scores"] = torch.from_numpy(scores).reshape(shape).to(layer.scores.dtype)
    if not torch.equal(_sha256([b for _, b in _frozen_tensors(model)]), sd[_META + "frozen_fingerprint"]):
        raise MaskError("the model's frozen tensors (norm layers, embeddings) differ from the ones the mask was "
                        "found with: build the same architecture and model arguments the mask was saved from")
    for layer in to_sample:  # only once everything is verified: a rejected file leaves the model as it was
        layer.mode, layer._cache = "sample", None
    if free:
        cfg["method"] = "supermask"
    skip = set(stored) | {name for name in layers}
    for name, tensor in sd.items():
        owner = name.rsplit(".", 1)[0]
        if name.startswith(_META) or owner in skip:
            continue
        out[name] = tensor
    return out


def load_masks(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Verify the mask file at ``path`` against ``model`` and apply it (the loader timm's path also uses)."""
    state = filter_state_dict(read_mask_file(path), model)
    model.load_state_dict(state, strict=strict)
    return model
