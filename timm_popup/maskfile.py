"""The mask file, ``model.safetensors`` of an artifact: what it holds, how it is checked on its own, where it goes.

It knows nothing of models: :mod:`timm_popup.masks` reads a model into these tensors and verifies a file against
a model (regenerated weights, frozen tensors) before applying it.

File format (version 2), all tensors, because ``safetensors.torch.load_file`` drops header metadata:

* ``__popup__.format_version`` int64[1], ``__popup__.generator_version`` int64[1] (``timm_popup.reference``),
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

Format 4 (files without its additions keep their format byte for byte) adds, each only where it is used:

* N:M structured masks (``structure`` of ``timm_popup.convert``): ``__popup__.structure`` uint8[] (UTF-8,
  ``"2:4"``), and per tensor whose dim 1 divides into groups of M either ``NAME.mask`` or, where it is smaller,
  ``NAME.nm``: each group's kept pattern as its colex rank among the C(M, N) patterns, G groups
  (``native.nm_groups`` order) packed as base-C numbers of ``nm_layout``'s chunk of groups each, ``pack_uint`` at the
  bits the largest chunk needs (2:4: 24 groups in 63 bits, 0.656 bit per weight). Every group of such a tensor must
  keep exactly N, however it is stored; the other tensors keep round(k * n).
* The paper code's options (issue 26): ``__popup__.learn_norm`` / ``__popup__.learn_bias`` int64[1] = 1 where the
  norm layers' scale and shift / the biases were trained with the scores (their values are then in the model state
  the file holds, outside the frozen fingerprint), and a ``weight_init`` with options
  (``kaiming_normal,mode=fan_out,nonlinearity=tanh,scale_fan``, ``timm_popup.init.weight_distribution``).
* The method ``gem-miner`` (its masks with ``NAME.kept`` per tensor, as a free density: the rounding of its scores
  among the weights its freezing left).

Packed unsigned values (``pack_uint``): value i's bit b is bit ``i * bits + b`` of the little-endian bit stream.

Version history: 1 keyed masks by module name (``conv1.mask``) on generator version 1; 2 keys them by tensor
name on generator version 2 (any weight tensor of any module is masked). A version-1 file is refused with the
reason.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from ._io import atomic_write
from .native import nm_applies, nm_groups, nm_ungroup, parse_structure
from .reference import GENERATOR_VERSION

__all__ = ["FORMAT_VERSION", "OLDEST_FORMAT", "META", "TENSOR_KEYS", "MaskError", "artifact_format", "pack_mask",
           "unpack_bits", "unpack_mask", "pack_uint", "unpack_uint", "bits_for", "sha256", "Header", "MaskedTensor",
           "encode", "write_mask_file", "read_mask_file", "check_format", "recorded_method", "recorded_popup_args",
           "recorded_learned", "read_header", "scalar", "free_density", "stored_tensors", "decode_tensor",
           "artifact_info", "checksum", "recorded_structure", "nm_layout", "pack_nm", "unpack_nm"]

FORMAT_VERSION = 4
#: the oldest format this release still reads
OLDEST_FORMAT = 2
#: methods whose artifacts need no format-3 key (written as format 2: older releases read them)
_FORMAT2_METHODS = ("edge-popup", "supermask")
#: methods that format 4 introduced
_FORMAT4_METHODS = ("gem-miner",)
#: per-tensor keys of an artifact, other than the tensor's state
TENSOR_KEYS = ("mask", "mask_shape", "fingerprint", "kept", "alpha", "flips", "redraws", "redraw_bits", "slot", "nm")
#: the keys that carry the artifact's information per weight (what ``bits_per_weight`` counts)
_PAYLOAD_KEYS = ("mask", "nm", "flips", "redraws", "slot")
META = "__popup__."


class MaskError(ValueError):
    """A mask file that cannot be trusted for this model; the message says why and what to do."""


def artifact_format(method: str, options: bool = False) -> int:
    """The format an artifact of ``method`` is written in: the oldest that can hold it (edge-popup and supermask
    files stay format 2, readable by older releases; the other methods 3; ``options``: it records an addition of
    format 4, an N:M structure or a paper-code option)."""
    if options or method in _FORMAT4_METHODS:
        return 4
    return OLDEST_FORMAT if method in _FORMAT2_METHODS else 3


# -- bits and digests ---------------------------------------------------------------------------------------------

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


def bits_for(largest: int) -> int:
    """The width at which unsigned values up to ``largest`` are packed."""
    return max(1, int(largest).bit_length())


def nm_layout(n: int, m: int, groups: int) -> tuple[int, int, int]:
    """``(C, g, bits)`` of an N:M code: C = C(m, n) patterns per group, g groups per chunk (the most whose base-C
    number fits an int64, at most ``groups``), ``bits`` per chunk."""
    patterns = math.comb(m, n)
    per = max(1, min(groups, int(63 / math.log2(patterns)) if patterns > 1 else groups))
    while patterns ** per >= 2**63:  # float log2 rounding: stay exact
        per -= 1
    return patterns, per, bits_for(patterns ** per - 1)


def _binomials(m: int) -> np.ndarray:
    return np.array([[math.comb(p, j) for j in range(m + 1)] for p in range(m)], dtype=np.int64)


def pack_nm(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M code of ``mask`` (module docstring); every group keeps exactly ``n``, which the caller ensures."""
    bits = nm_groups(mask.detach().cpu(), m).numpy().astype(np.int64)
    count = np.cumsum(bits, axis=1)  # at a kept position p, its rank i among the group's kept ones (1-based)
    ranks = (bits * _binomials(m)[np.arange(m), np.minimum(count, m)]).sum(axis=1)
    patterns, per, width = nm_layout(n, m, len(ranks))
    chunks = np.zeros(-(-len(ranks) // per) * per, dtype=np.int64)
    chunks[: len(ranks)] = ranks
    values = (chunks.reshape(-1, per) * patterns ** np.arange(per, dtype=np.int64)).sum(axis=1)
    return pack_uint(torch.from_numpy(values), width)


def unpack_nm(sd: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], n: int, m: int) -> np.ndarray:
    """The mask bits (the tensor's flat C order, uint8 0/1) of tensor ``name``'s N:M code, checked: its size, every
    value in range."""
    groups = math.prod(shape) // m
    patterns, per, width = nm_layout(n, m, groups)
    chunks = -(-groups // per)
    values = unpack_uint(_packed(sd, f"{name}.nm", chunks * width), chunks, width)
    if values.size and (values.min() < 0 or values.max() >= patterns ** per):
        raise MaskError(f"tensor {name}: an N:M code is out of range: the mask file is corrupt; download it again")
    digits = (values[:, None] // patterns ** np.arange(per, dtype=np.int64)) % patterns
    ranks, padding = digits.reshape(-1)[:groups], digits.reshape(-1)[groups:]
    if padding.any():
        raise MaskError(f"tensor {name}: its N:M code pads with non-zero values: the mask file is corrupt")
    table, left, bits = _binomials(m), np.full(groups, n), np.zeros((groups, m), dtype=np.uint8)
    for p in range(m - 1, -1, -1):  # colex unranking: the largest position p with C(p, left) <= rank is kept
        value = table[p, left]
        take = (left > 0) & (value <= ranks)
        bits[take, p] = 1
        ranks, left = ranks - value * take, left - take
    return nm_ungroup(torch.from_numpy(bits), shape).reshape(-1).numpy()


def sha256(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sha256 over the tensors' bytes in order, as the file stores a digest (uint8[32])."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update((t.view(torch.uint8) if t.dtype == torch.bool else t).numpy())  # the buffer itself, no copy
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def checksum(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The file's checksum: sha256 over every other key's name and tensor, in name order."""
    names = sorted(n for n in tensors if n != META + "checksum")
    return sha256([torch.tensor(list(n.encode()), dtype=torch.uint8) for n in names] + [tensors[n] for n in names])


# -- writing: what the model gives, encoded in the order the module docstring lists it ------------------------------

@dataclass
class Header:
    """How the weights were drawn and which method found the mask (``__popup__.*``)."""

    method: str
    seed: int
    k: float
    weight_init: str
    free: bool = False  # a learned density per tensor (supermask)
    structure: str | None = None  # N:M ("2:4")
    slots: int = 0
    redraw_every: int = 0
    redraw_rate: float = 0.0
    learn_norm: bool = False
    learn_bias: bool = False

    @property
    def format(self) -> int:
        return artifact_format(self.method, self.structure is not None or self.learn_norm or self.learn_bias
                               or "," in self.weight_init)


@dataclass
class MaskedTensor:
    """What the file records of one masked tensor: its seeded ``weight`` (fingerprinted) and its payload, the
    ``mask`` or, for a slot machine, each weight's ``slot``; ``alpha``, the ``flips`` and ``redraws`` of the kept
    weights where its method has them."""

    weight: torch.Tensor
    mask: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    flips: torch.Tensor | None = None
    redraws: torch.Tensor | None = None


def encode(header: Header, frozen: list[torch.Tensor], tensors: Iterable[tuple[str, MaskedTensor]],
           state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mask file's tensors: the header, the fingerprint of the ``frozen`` tensors, one entry per masked tensor
    (``tensors`` may be a generator: each is packed before the next is read, so a model's masks are never all held
    at once), the model's other ``state`` (BatchNorm statistics, layers kept dense) and the checksum over it all."""
    out: dict[str, torch.Tensor] = {
        META + "format_version": torch.tensor([header.format]),
        META + "generator_version": torch.tensor([GENERATOR_VERSION]),
        META + "seed": torch.tensor([header.seed]),
        META + "k": torch.tensor([header.k], dtype=torch.float64),
        META + "weight_init": torch.tensor(list(header.weight_init.encode()), dtype=torch.uint8),
        META + "frozen_fingerprint": sha256(frozen),
    }
    if header.method not in _FORMAT2_METHODS:
        out[META + "method"] = torch.tensor(list(header.method.encode()), dtype=torch.uint8)
    if header.method == "slot-machine":
        out[META + "slots"] = torch.tensor([header.slots])
    if header.method == "iterand":
        out[META + "redraw_every"] = torch.tensor([header.redraw_every])
        out[META + "redraw_rate"] = torch.tensor([header.redraw_rate], dtype=torch.float64)
    if header.free:
        out[META + "free_density"] = torch.tensor([1])
    if header.structure is not None:
        out[META + "structure"] = torch.tensor(list(header.structure.encode()), dtype=torch.uint8)
    for key in _LEARNED:
        if getattr(header, key):
            out[META + key] = torch.tensor([1])
    for name, tensor in tensors:
        out.update(_tensor_entries(name, tensor, header))
    out.update({name: t.detach().cpu().contiguous().clone() for name, t in state.items()})
    out[META + "checksum"] = checksum(out)
    return out


def _records_kept(method: str, free: bool) -> bool:
    """Whether each tensor's kept count is in the file (a density not round(k*n): free, global top-k, Gem-Miner)."""
    return free or method in ("global-topk", "gem-miner")


def _tensor_entries(name: str, t: MaskedTensor, header: Header) -> dict[str, torch.Tensor]:
    out = {f"{name}.mask_shape": torch.tensor(list(t.weight.shape)), f"{name}.fingerprint": sha256([t.weight.float()])}
    if t.slot is not None:
        out[f"{name}.slot"] = pack_uint(t.slot, bits_for(header.slots - 1))
        return out
    out[f"{name}.mask"] = pack_mask(t.mask)
    if header.structure is not None:
        n, m = parse_structure(header.structure)
        if nm_applies(t.mask.shape, m):
            code = pack_nm(t.mask, n, m)
            if code.numel() < out[f"{name}.mask"].numel():
                out[f"{name}.nm"] = code
                del out[f"{name}.mask"]
    if _records_kept(header.method, header.free):
        out[f"{name}.kept"] = torch.tensor([int(t.mask.sum())])
    if t.alpha is not None:
        out[f"{name}.alpha"] = t.alpha.reshape(1).cpu()
    if t.flips is not None:
        out[f"{name}.flips"] = pack_mask(t.flips)
    if t.redraws is not None:
        bits = bits_for(int(t.redraws.max()) if t.redraws.numel() else 0)
        out[f"{name}.redraws"] = pack_uint(t.redraws, bits)
        out[f"{name}.redraw_bits"] = torch.tensor([bits])
    return out


def write_mask_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a mask file atomically (its parent created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}  # one key: safetensors writes a metadata map in random order, i.e. other bytes
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    return path


# -- reading and checking a file on its own ---------------------------------------------------------------------------

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


def check_format(sd: dict[str, torch.Tensor]) -> None:
    """Raise :class:`MaskError` unless ``sd`` is an intact mask file this release reads (format, generator,
    checksum)."""
    if META + "format_version" not in sd:
        if any(n.endswith(".weight") for n in sd):
            raise MaskError("this is a dense checkpoint (it holds weights, not timm-popup masks): a --method "
                            "dense / finetune / random-subnet run loads with timm_popup.methods.load_dense(directory), "
                            "a plain timm checkpoint with plain timm; a mask is the model.safetensors written by "
                            "timm_popup.save_pretrained")
        raise MaskError("this file holds no timm-popup mask (no __popup__.format_version): pass a "
                        "model.safetensors written by timm_popup.save_pretrained")
    version = int(sd[META + "format_version"].item())
    if version > FORMAT_VERSION:
        raise MaskError(f"this mask uses format version {version}, newer than this timm-popup reads "
                        f"(up to {FORMAT_VERSION}): install the newer timm-popup that wrote it")
    if version < OLDEST_FORMAT:
        raise MaskError(f"this mask uses format version {version} (masks of generator version "
                        f"{int(sd[META + 'generator_version'].item())}), which this timm-popup no longer reads: "
                        f"find the mask again with this release (format {FORMAT_VERSION})")
    generator = int(sd[META + "generator_version"].item())
    if generator != GENERATOR_VERSION:
        raise MaskError(f"this mask was found on weights of generator version {generator}, this timm-popup "
                        f"generates version {GENERATOR_VERSION}: use a timm-popup release that matches")
    if META + "checksum" not in sd or not torch.equal(sd[META + "checksum"], checksum(sd)):
        raise MaskError("the mask file's checksum does not match its contents: it is corrupt; download it again")


def scalar(sd: dict[str, torch.Tensor], key: str):
    """The one value of the ``__popup__.`` entry ``key``."""
    return sd[META + key].item()


def free_density(sd: dict[str, torch.Tensor]) -> bool:
    """Whether the file records a learned density per tensor (a supermask) instead of round(k*n)."""
    return META + "free_density" in sd and bool(sd[META + "free_density"].item())


def recorded_method(sd: dict[str, torch.Tensor]) -> str:
    """The training method an artifact records (format 2: edge-popup, or supermask for a free-density file)."""
    if META + "method" in sd:
        return bytes(sd[META + "method"].tolist()).decode()
    return "supermask" if free_density(sd) else "edge-popup"


#: what an artifact records as trained besides its masks (format 4; ``timm_popup.convert``'s learn_norm / learn_bias)
_LEARNED = ("learn_norm", "learn_bias")


def recorded_learned(sd: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Whether the file's norm layers / biases were trained with the scores (their values are in the file)."""
    return {key: META + key in sd and bool(sd[META + key].item()) for key in _LEARNED}


def recorded_popup_args(sd: dict[str, torch.Tensor]) -> dict:
    """The seed, k and weight distribution the file records."""
    return dict(seed=int(scalar(sd, "seed")), k=float(scalar(sd, "k")),
                weight_init=bytes(sd[META + "weight_init"].tolist()).decode())


def recorded_structure(sd: dict[str, torch.Tensor]) -> str | None:
    """The N:M structure the file records (``"2:4"``), None for unstructured masks."""
    if META + "structure" not in sd:
        return None
    n, m = parse_structure(bytes(sd[META + "structure"].tolist()).decode(errors="replace"))
    return f"{n}:{m}"


def stored_tensors(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each masked tensor's name and shape."""
    return {n[: -len(".mask_shape")]: tuple(sd[n].tolist()) for n in sd if n.endswith(".mask_shape")}


def _packed(sd: dict[str, torch.Tensor], key: str, count: int) -> torch.Tensor:
    """The packed array ``key`` of ``count`` bits, checked for its size (a short or long one is corrupt)."""
    if key not in sd or sd[key].numel() != -(-count // 8):
        found = "no" if key not in sd else f"{sd[key].numel()} bytes"
        raise MaskError(f"{key} holds {found}, not the {-(-count // 8)} bytes of its {count} bits: the mask file is "
                        "corrupt; download it again")
    return sd[key]


def decode_tensor(sd: dict[str, torch.Tensor], name: str, n: int, method: str, k: float, topk_kept: int,
                  shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """One tensor's verified payload: its mask bits and what its method adds (flips, re-draw events, slots).
    A top-k mask must keep ``topk_kept`` (round(k*n), ``timm_popup.layers.num_kept``) of its ``n`` weights; under
    the file's N:M structure (where it applies to ``shape``) exactly N of every group of M."""
    if method == "slot-machine":
        slots = int(scalar(sd, "slots"))
        bits = bits_for(slots - 1)
        choice = unpack_uint(_packed(sd, f"{name}.slot", n * bits), n, bits)
        if choice.size and int(choice.max()) >= slots:
            raise MaskError(f"tensor {name} chooses candidate {int(choice.max())} of {slots}: the mask file is "
                            "corrupt; download it again")
        return dict(bits=np.ones(n, dtype=np.uint8), slot=choice)
    structure = recorded_structure(sd)
    nm = parse_structure(structure) if structure is not None else None
    if nm is not None and not (shape is not None and nm_applies(shape, nm[1])):
        nm = None
    if f"{name}.nm" in sd:
        if nm is None:
            raise MaskError(f"tensor {name} holds an N:M code but no N:M structure applies to it: the mask file is "
                            "corrupt; download it again")
        bits = unpack_nm(sd, name, shape, *nm)
    else:
        bits = unpack_bits(_packed(sd, f"{name}.mask", n), n)
    if nm is not None and not (nm_groups(torch.from_numpy(bits).view(shape), nm[1]).sum(dim=1) == nm[0]).all():
        raise MaskError(f"tensor {name} does not keep exactly {nm[0]} of every group of {nm[1]} weights, which its "
                        f"structure {structure} requires: the mask file is corrupt; download it again")
    kept = int(np.count_nonzero(bits))
    if _records_kept(method, free_density(sd)):
        if f"{name}.kept" not in sd or kept != int(sd[f"{name}.kept"].item()):
            raise MaskError(f"tensor {name} keeps {kept} of {n} weights, not the count the file records: the mask "
                            "file is corrupt; download it again")
    elif kept != topk_kept:
        raise MaskError(f"tensor {name} keeps {kept} of {n} weights, not round(k*n) for k={k}: the mask was saved "
                        "with another k or is corrupt")
    out = dict(bits=bits)
    if method == "signed-supermask":
        out["flips"] = unpack_bits(_packed(sd, f"{name}.flips", kept), kept)
    if method == "iterand":
        width = int(sd[f"{name}.redraw_bits"].item())
        out["redraws"] = unpack_uint(_packed(sd, f"{name}.redraws", kept * width), kept, width)
    return out


def artifact_info(sd: dict[str, torch.Tensor]) -> dict:
    """What a mask artifact holds: format, method, seed, k, weight distribution, layers, kept/total weights and
    the bits it stores per weight (its masks and what its method adds, per weight of the masked tensors)."""
    check_format(sd)
    method = recorded_method(sd)
    layers = stored_tensors(sd)
    total = sum(math.prod(s) for s in layers.values())
    structure = recorded_structure(sd)
    nm = parse_structure(structure) if structure is not None else (1, 1)
    kept = sum(int(np.count_nonzero(unpack_bits(sd[f"{n}.mask"], math.prod(s)))) if f"{n}.mask" in sd
               else math.prod(s) * nm[0] // nm[1] if f"{n}.nm" in sd else math.prod(s) for n, s in layers.items())
    payload = sum(sd[f"{n}.{key}"].numel() * 8 for n in layers for key in _PAYLOAD_KEYS if f"{n}.{key}" in sd)
    density = {"supermask": "free", "global-topk": "global top-k", "slot-machine": "all (one of K values each)",
               "gem-miner": "learned (at most k)"}
    info = dict(format_version=int(scalar(sd, "format_version")), method=method, **recorded_popup_args(sd),
                generator_version=int(scalar(sd, "generator_version")), layers=len(layers),
                total_weights=total, kept_weights=kept, density=density.get(method, "top-k"),
                bits_per_weight=round(payload / max(total, 1), 3))
    if method == "slot-machine":
        info["slots"] = int(scalar(sd, "slots"))
    if structure is not None:
        info["structure"] = structure
    info.update({key: True for key, value in recorded_learned(sd).items() if value})
    return info


def read_header(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's ``__popup__.*`` entries alone (its masks are not read); raises whatever safetensors raises."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys() if key.startswith(META)}
