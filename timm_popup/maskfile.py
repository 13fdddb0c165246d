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

Each key's dtype, size, when it is needed and the values it may hold are declared once, in :data:`HEADER_FIELDS`
and :data:`TENSOR_FIELDS`; :func:`check_format` checks a file against them before anything is unpacked.

Version history: 1 keyed masks by module name (``conv1.mask``) on generator version 1; 2 keys them by tensor
name on generator version 2 (any weight tensor of any module is masked). A version-1 file is refused with the
reason.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ._io import atomic_write
from .init import check_weight_init
from .layers import MAX_SLOTS, METHOD_MODES, num_kept
from .native import nm_applies, nm_groups, nm_ungroup, parse_structure
from .reference import GENERATOR_VERSION

__all__ = ["FORMAT_VERSION", "OLDEST_FORMAT", "META", "TENSOR_KEYS", "MaskError", "artifact_format", "pack_mask",
           "unpack_bits", "unpack_mask", "pack_uint", "unpack_uint", "bits_for", "sha256", "Header", "MaskedTensor",
           "encode", "write_mask_file", "read_mask_file", "check_format", "recorded_method", "recorded_popup_args",
           "recorded_learned", "read_header", "scalar", "free_density", "stored_tensors", "decode_tensor",
           "artifact_info", "checksum", "recorded_structure", "nm_layout", "pack_nm", "unpack_nm",
           "Field", "HEADER_FIELDS", "TENSOR_FIELDS", "MAX_SLOTS", "check_header", "check_fields", "invalid",
           "valid_name"]

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
    planes = unpack_bits(packed, n * bits).reshape(n, bits)
    out = np.zeros(n, dtype=np.int64)
    for b in range(bits):  # one plane at a time: memory stays n*bits bytes, not 8x that
        out |= planes[:, b].astype(np.int64) << b
    return out


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
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy (any dtype, bfloat16 too)
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
    checksum) whose every field follows the format's rules (:func:`check_fields`)."""
    if META + "format_version" not in sd:
        if any(n.endswith(".weight") for n in sd):
            raise MaskError("this is a dense checkpoint (it holds weights, not timm-popup masks): a --method "
                            "dense / finetune / random-subnet run loads with timm_popup.methods.load_dense(directory), "
                            "a plain timm checkpoint with plain timm; a mask is the model.safetensors written by "
                            "timm_popup.save_pretrained")
        raise MaskError("this file holds no timm-popup mask (no __popup__.format_version): pass a "
                        "model.safetensors written by timm_popup.save_pretrained")
    version = _value(sd, META + "format_version", HEADER_FIELDS["format_version"])
    if version > FORMAT_VERSION:
        raise MaskError(f"this mask uses format version {version}, newer than this timm-popup reads "
                        f"(up to {FORMAT_VERSION}): install the newer timm-popup that wrote it")
    if version < OLDEST_FORMAT:
        raise MaskError(f"this mask uses format version {version} (older than {OLDEST_FORMAT}), which this "
                        f"timm-popup no longer reads: find the mask again with this release (format {FORMAT_VERSION})")
    if META + "generator_version" not in sd:
        raise invalid(META + "generator_version", "is missing")
    generator = _value(sd, META + "generator_version", HEADER_FIELDS["generator_version"])
    if generator != GENERATOR_VERSION:
        raise MaskError(f"this mask was found on weights of generator version {generator}, this timm-popup "
                        f"generates version {GENERATOR_VERSION}: use a timm-popup release that matches")
    if META + "checksum" not in sd or not torch.equal(sd[META + "checksum"], checksum(sd)):
        raise MaskError("the mask file's checksum does not match its contents: it is corrupt; download it again")
    check_fields(sd)


# -- every field's rule, declared once ----------------------------------------------------------------------------
#
# The checksum catches corruption, not a file crafted by someone who recomputes it: a file from the Hub is checked
# here, field by field, before anything is unpacked or built (the payload length each shape implies bounds every
# later allocation by a small multiple of the file). A new field is one entry in HEADER_FIELDS or TENSOR_FIELDS.

_MAX_TEXT = 64  # bytes of a text field (a method or distribution name)
_MAX_NDIM = 8
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MAX_NAME = 1024
_SLT_METHODS = tuple(m for m in METHOD_MODES if m not in _FORMAT2_METHODS)


def invalid(key: str, reason: str) -> MaskError:
    """The one-line error of a file that breaks the format's own rules at ``key``."""
    return MaskError(f"the mask file is invalid: {key} {reason}; no timm-popup release writes that (the file is "
                     "damaged or was altered and its checksum recomputed): do not use it")


def valid_name(name: str) -> bool:
    """Whether ``name`` is a name a model's tensor can have (dotted identifiers, e.g. ``layer1.0.conv1.weight``)."""
    return len(name) <= _MAX_NAME and _NAME.fullmatch(name) is not None


Rule = Callable[[Any, dict], "str | None"]


@dataclass(frozen=True)
class Field:
    """One key of the format (module docstring): its dtype; ``size(ctx)``, the elements it must hold (an int, or a
    (fewest, most) range); ``needed(ctx)``, whether the file must hold it (True), must not (False) or may (None);
    ``rule(value, ctx)``, why its value is impossible (None: it is fine). ``text``: UTF-8 bytes, read as a str.
    ``ctx`` holds the values of the fields checked before it (absent ones are None) and, per tensor, ``n``."""

    dtype: torch.dtype
    size: Callable[[dict], int | tuple[int, int]] = lambda ctx: 1
    needed: Callable[[dict], bool | None] = lambda ctx: True
    rule: Rule = lambda value, ctx: None
    text: bool = False


def _between(lo: float, hi: float, *, open_low: bool = False) -> Rule:
    def rule(value: Any, ctx: dict) -> str | None:
        ok = math.isfinite(value) and (lo < value if open_low else lo <= value) and value <= hi
        return None if ok else f"is {value!r}, outside {'(' if open_low else '['}{lo}, {hi}]"
    return rule


def _one_of(known: Iterable[str], what: str) -> Rule:
    known = tuple(known)
    return lambda value, ctx: None if value in known else f"is {value!r}, not a known {what} ({', '.join(known)})"


def _method(ctx: dict) -> str:
    return ctx.get("method") or ("supermask" if ctx.get("free_density") else "edge-popup")


def _kept(ctx: dict) -> int:
    """The kept weights of the tensor in ``ctx``: recorded (free density, global top-k) or round(k*n)."""
    return ctx["kept"] if ctx["kept"] is not None else num_kept(ctx["n"], ctx["k"])


def _bytes_of(bits: Callable[[dict], int]) -> Callable[[dict], int]:
    return lambda ctx: -(-bits(ctx) // 8)


def _zero_padding(bits: Callable[[dict], int]) -> Rule:
    """The bits after the last value are 0, as the writer leaves them."""
    def rule(packed: torch.Tensor, ctx: dict) -> str | None:
        used = bits(ctx) % 8
        return None if not used or int(packed[-1]) >> used == 0 else "has bits set past its last value"
    return rule


def _shape(shape: tuple[int, ...], ctx: dict) -> str | None:
    if any(d < 1 or d > 2**31 for d in shape):
        return f"is {list(shape)}: every dimension of a weight is between 1 and 2**31"
    if num_kept(math.prod(shape), ctx["k"]) < 1:  # convert refuses a k that cuts a tensor out of the network
        return f"is {list(shape)}: at k={ctx['k']} round(k*n) keeps none of its weights, which no popup model holds"
    return None


def _distribution(value: str, ctx: dict) -> str | None:
    try:
        canonical = check_weight_init(value)
    except ValueError:
        return f"is {value!r}, not a known weight distribution"
    if canonical != value:
        return f"is {value!r}, not a distribution's full name as the writer records it ({canonical!r})"
    if "," in value and ctx["format_version"] < 4:
        return f"is {value!r}: a distribution with options is a field of format 4, not {ctx['format_version']}"
    return None


def _method_rule(value: str, ctx: dict) -> str | None:
    reason = _one_of(_SLT_METHODS, "method")(value, ctx)
    if reason is None and value in _FORMAT4_METHODS and ctx["format_version"] < 4:
        return f"is {value!r}, a method of format 4, not {ctx['format_version']}"
    return reason


def _format4(ctx: dict) -> bool | None:
    """A field format 4 added: a file may hold it from format 4 on, and no older file does."""
    return None if ctx["format_version"] >= 4 else False


def _structure(value: str, ctx: dict) -> str | None:
    try:
        n, m = parse_structure(value)
    except ValueError:
        return f"is {value!r}, not an N:M structure (1 <= N < M <= 32)"
    if f"{n}:{m}" != value or not math.isclose(ctx["k"], n / m, rel_tol=0, abs_tol=1e-3):
        return f"is {value!r}, which keeps k = {n / m:.4g}, but the file records k={ctx['k']}"
    return None


def _nm(ctx: dict) -> tuple[int, int] | None:
    """The file's N:M structure where it applies to the tensor in ``ctx`` (its dim 1 divides into groups of M)."""
    if ctx.get("structure") is None:
        return None
    nm = parse_structure(ctx["structure"])
    return nm if nm_applies(ctx["mask_shape"], nm[1]) else None


def _nm_bits(ctx: dict) -> int:
    n, m = _nm(ctx)
    groups = ctx["n"] // m
    _, per, width = nm_layout(n, m, groups)
    return -(-groups // per) * width


_FORMAT_RULE = _between(OLDEST_FORMAT, FORMAT_VERSION)
_MASK_BITS = lambda ctx: ctx["n"]  # noqa: E731
_NM_BITS = _nm_bits
_FLIP_BITS = _kept
_REDRAW_BITS = lambda ctx: _kept(ctx) * ctx["redraw_bits"]  # noqa: E731
_SLOT_BITS = lambda ctx: ctx["n"] * bits_for(ctx["slots"] - 1)  # noqa: E731

#: ``__popup__.<name>``, in the order they are checked (a rule may read the fields above it)
HEADER_FIELDS: dict[str, Field] = {
    "format_version": Field(torch.int64, rule=_FORMAT_RULE),
    "generator_version": Field(torch.int64, rule=_between(GENERATOR_VERSION, GENERATOR_VERSION)),
    "checksum": Field(torch.uint8, size=lambda ctx: 32),
    "frozen_fingerprint": Field(torch.uint8, size=lambda ctx: 32),
    "seed": Field(torch.int64),  # every int64 is a seed
    "k": Field(torch.float64, rule=_between(0, 1, open_low=True)),
    "weight_init": Field(torch.uint8, size=lambda ctx: (1, _MAX_TEXT), text=True, rule=_distribution),
    "free_density": Field(torch.int64, needed=lambda ctx: None if ctx["format_version"] != 3 else False,
                          rule=_between(1, 1)),
    # format 2 holds no method (edge-popup, or supermask with free_density); format 3 names one of the others;
    # format 4 names one where it is not edge-popup or supermask (N:M or options added to those)
    "method": Field(torch.uint8, size=lambda ctx: (1, _MAX_TEXT), text=True,
                    needed=lambda ctx: True if ctx["format_version"] == 3 else
                    (None if ctx["format_version"] > 3 and not ctx["free_density"] else False),
                    rule=_method_rule),
    "slots": Field(torch.int64, needed=lambda ctx: _method(ctx) == "slot-machine", rule=_between(2, MAX_SLOTS)),
    "redraw_every": Field(torch.int64, needed=lambda ctx: _method(ctx) == "iterand", rule=_between(1, 2**62)),
    "redraw_rate": Field(torch.float64, needed=lambda ctx: _method(ctx) == "iterand",
                         rule=_between(0, 1, open_low=True)),
    # format 4's additions, each only where it is used
    "structure": Field(torch.uint8, size=lambda ctx: (3, 5), text=True, needed=lambda ctx: _format4(ctx),
                       rule=_structure),
    "learn_norm": Field(torch.int64, needed=lambda ctx: _format4(ctx), rule=_between(1, 1)),
    "learn_bias": Field(torch.int64, needed=lambda ctx: _format4(ctx), rule=_between(1, 1)),
}

#: ``NAME.<suffix>`` of each masked tensor ``NAME``, in the order they are checked (``mask_shape`` first: it gives n)
TENSOR_FIELDS: dict[str, Field] = {
    "mask_shape": Field(torch.int64, size=lambda ctx: (1, _MAX_NDIM), rule=_shape),
    "fingerprint": Field(torch.uint8, size=lambda ctx: 32),
    "kept": Field(torch.int64, needed=lambda ctx: _records_kept(_method(ctx), bool(ctx["free_density"])),
                  rule=lambda v, ctx: None if 0 <= v <= ctx["n"] else f"is {v}, not a count of {ctx['n']} weights"),
    "nm": Field(torch.uint8, size=_bytes_of(_NM_BITS), needed=lambda ctx: None if _nm(ctx) else False,
                rule=_zero_padding(_NM_BITS)),
    "mask": Field(torch.uint8, size=_bytes_of(_MASK_BITS),
                  needed=lambda ctx: _method(ctx) != "slot-machine" and ctx["nm"] is None,
                  rule=_zero_padding(_MASK_BITS)),
    "alpha": Field(torch.float32, needed=lambda ctx: _method(ctx) == "biprop", rule=_between(0, math.inf)),
    "flips": Field(torch.uint8, size=_bytes_of(_FLIP_BITS), needed=lambda ctx: _method(ctx) == "signed-supermask",
                   rule=_zero_padding(_FLIP_BITS)),
    "redraw_bits": Field(torch.int64, needed=lambda ctx: _method(ctx) == "iterand", rule=_between(1, 63)),
    "redraws": Field(torch.uint8, size=_bytes_of(_REDRAW_BITS), needed=lambda ctx: _method(ctx) == "iterand",
                     rule=_zero_padding(_REDRAW_BITS)),
    "slot": Field(torch.uint8, size=_bytes_of(_SLOT_BITS), needed=lambda ctx: _method(ctx) == "slot-machine",
                  rule=_zero_padding(_SLOT_BITS)),
}


def _value(sd: dict[str, torch.Tensor], key: str, field: Field, ctx: dict | None = None) -> Any:
    """The value of ``key`` once its dtype and size are checked (a scalar, a str, a tuple of ints or the tensor)."""
    t, ctx = sd[key], ctx or {}
    if t.dtype != field.dtype:
        raise invalid(key, f"is {t.dtype}, not {field.dtype}")
    size = field.size(ctx)
    lo, hi = size if isinstance(size, tuple) else (size, size)
    if t.dim() != 1:
        raise invalid(key, f"has shape {list(t.shape)}, not one dimension")
    if not lo <= t.numel() <= hi:
        unit = "bytes" if field.dtype == torch.uint8 else "values"
        raise invalid(key, f"holds {t.numel()} {unit}, not the {lo if lo == hi else f'{lo} to {hi}'} {unit} the "
                      "format implies")
    if field.text:
        try:
            return bytes(t.tolist()).decode()
        except UnicodeDecodeError:
            raise invalid(key, "is not UTF-8 text") from None
    if isinstance(size, tuple):
        return tuple(t.tolist())
    return t.item() if size == 1 and field.dtype != torch.uint8 else t


def _check(sd: dict[str, torch.Tensor], key: str, field: Field, ctx: dict) -> Any:
    needed = field.needed(ctx)
    if key not in sd:
        if needed:
            raise invalid(key, "is missing")
        return None
    if needed is False:
        raise invalid(key, f"is not a field of a {_method(ctx)} file of format {ctx['format_version']}")
    value = _value(sd, key, field, ctx)
    reason = field.rule(value, ctx)
    if reason:
        raise invalid(key, reason)
    return value


def check_header(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``__popup__.*`` values of ``sd`` (a whole file or :func:`read_header`'s part), each checked against its
    rule (:data:`HEADER_FIELDS`; not the checksum, which needs the whole file), ``method`` resolved for format 2."""
    ctx: dict[str, Any] = {}
    for name, field in HEADER_FIELDS.items():
        ctx[name] = _check(sd, META + name, field, ctx)
    unknown = sorted(key for key in sd if key.startswith(META) and key[len(META):] not in HEADER_FIELDS)
    if unknown:
        raise invalid(unknown[0], f"is not a field of format {ctx['format_version']}")
    return dict(ctx, method=_method(ctx))


def check_fields(sd: dict[str, torch.Tensor]) -> None:
    """Raise :class:`MaskError`, naming the key, unless every key of ``sd`` follows the format's rules: each
    field's dtype, size (the payload length a shape implies, the bits a method implies) and value (k in (0, 1], a
    known method, distribution and version, names a model can have). Nothing is unpacked: this bounds what is."""
    ctx = check_header(sd)
    bad = next((key for key in sd if not key.startswith(META) and not valid_name(key)), None)
    if bad is not None:
        raise invalid(repr(bad[:80]), "is not a name a model's tensor can have")
    tensors = [key[: -len(".mask_shape")] for key in sd if key.endswith(".mask_shape")]
    if not tensors:
        raise invalid("NAME.mask_shape", "is in no key: the file masks no tensor")
    for name in tensors:
        tensor_ctx = dict(ctx, n=0)
        for suffix, field in TENSOR_FIELDS.items():
            tensor_ctx[suffix] = _check(sd, f"{name}.{suffix}", field, tensor_ctx)
            if suffix == "mask_shape":
                tensor_ctx["n"] = math.prod(tensor_ctx[suffix])


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
    """The file's ``__popup__.*`` entries and the masked tensors' shapes (``NAME.mask_shape``, at most ``_MAX_NDIM``
    values each), its masks not read; raises whatever safetensors raises."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys() if key.startswith(META) or (
            key.endswith(".mask_shape") and math.prod(f.get_slice(key).get_shape()) <= _MAX_NDIM)}
