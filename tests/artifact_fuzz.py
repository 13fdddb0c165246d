"""A fuzz harness for the artifact readers: real artifacts of every mask method, each field of their mask file and
config.json mutated (checksum recomputed, so the mutation reaches the field's own check), driven through the
Python loader (``timm.create_model("local-dir:...")`` and ``pretrained_cfg_overlay=dict(file=...)``) and the CLI
(``timm-popup info``, verified and ``--no-verify``). The only outcomes allowed: a load, or a one-line
:class:`~timm_popup.MaskError` (the CLI: exit 1 or 2 and one ``timm-popup: error:`` line). Anything else (another
exception type, a traceback, a message of several lines, a case running past ``CASE_SECONDS``, an allocation past
``MEMORY_BOUND`` above what the process held before) is a finding.

Hypothesis, not atheris: the mutations are structured (a field, a dtype, a size, a value: the checksum must be
recomputed for a mutation to reach any check past it), which Hypothesis generates and shrinks to the smallest
failing field in plain pytest; atheris mutates bytes under coverage guidance, and almost every byte mutation of a
safetensors file stops at the checksum (safetensors' own parser is fuzzed upstream).

Used by tests/test_fuzz_artifacts.py (a bounded run) and bench/fuzz_artifacts.py (a long one).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import resource
import shutil
import signal
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from hypothesis import strategies as st

import timm_popup
from timm_popup import cli
from timm_popup.maskfile import META, checksum
from timm_popup.methods import MethodOptions, get_method

#: the artifacts fuzzed, by name: (method, model arguments): every mask method (the dense-weight methods write no
#: mask file) and format 4's additions on edge-popup (an N:M structure; learned norms and biases with a distribution
#: that has options)
KINDS: dict[str, tuple[str, dict]] = {
    **{method: (method, {}) for method in ("edge-popup", "supermask", "global-topk", "biprop", "iterand",
                                           "signed-supermask", "slot-machine", "gem-miner")},
    "edge-popup-2:4": ("edge-popup", dict(structure="2:4", k=0.5)),
    "edge-popup-options": ("edge-popup", dict(learn_norm=True, learn_bias=True, init_mode="fan_out",
                                              scale_fan=True)),
}
METHODS = tuple(KINDS)
ARCH = "popup_conv2"
MODEL_KWARGS = dict(width=0.125, num_classes=4)
#: extra address space one case may take (the artifacts are a few kB, the model about 300 kB: a crafted size that
#: were believed would ask for GiB to TiB)
MEMORY_BOUND = 1 << 30
CASE_SECONDS = 120
DTYPES = (torch.int64, torch.int32, torch.float64, torch.float32, torch.bfloat16, torch.uint8, torch.bool)
INTS = (0, 1, -1, 2, 3, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63))
FLOATS = (0.0, -0.0, 1.0, 0.5, 1.5, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan)
JSON_VALUES = (None, True, False, 0, 1, -1, 3, 4, 2**20, 2**31, 2**70, 0.5, 1.5, -0.0, 1e308, math.nan, math.inf, "",
               "x", "resnet18", "popup_resnet18", "popup_conv4", "kaiming_normal", "slot-machine", "../x", [], [0],
               [1, 2, 3], ["fc"], {}, {"a": 1}, "x" * 5000)


def make_artifacts(root: Path) -> dict[str, Path]:
    """One artifact directory of each of :data:`KINDS` (a tiny popup_conv2, its scores fixed)."""
    options = MethodOptions(slots=4, redraw_every=1, redraw_rate=0.5)
    out = {}
    for kind, (method, kwargs) in KINDS.items():
        spec = get_method(method)
        torch.manual_seed(0)
        model = timm.create_model(ARCH, **{"k": 0.3, **MODEL_KWARGS, **kwargs},
                                  **({"weight_init": spec.weight_init} if spec.weight_init else {}))
        model = spec.prepare(model, options=options)
        if spec.after_update:
            spec.after_update(model, 1)
        out[kind] = spec.save(model, root / kind)
    return out


# -- mutations ------------------------------------------------------------------------------------------------------

@dataclass
class Mutation:
    """What is changed: ``target`` "mask" or "config", the key or dotted path, how, and with what."""

    target: str
    key: str
    how: str
    value: Any = None

    def __str__(self) -> str:
        value = repr(self.value)
        return f"{self.target}:{self.key} {self.how} {value[:60]}"


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() or dtype.is_floating_point else t.to(torch.int64).to(dtype)


def apply_to_mask(sd: dict[str, torch.Tensor], m: Mutation) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    t = sd.get(m.key)
    if m.how == "delete":
        sd.pop(m.key, None)
    elif m.how == "dtype":
        sd[m.key] = _cast(t, m.value)
    elif m.how == "int":
        sd[m.key] = torch.full_like(t.to(torch.int64), 0).fill_(m.value) if t.numel() else torch.tensor([m.value])
    elif m.how == "float":
        sd[m.key] = torch.full(t.shape or (1,), m.value, dtype=torch.float64)
    elif m.how == "resize":  # drop or append elements
        flat = t.reshape(-1)
        sd[m.key] = flat[:max(0, flat.numel() + m.value)].clone() if m.value < 0 else torch.cat(
            [flat, torch.zeros(m.value, dtype=flat.dtype)])
    elif m.how == "reshape2d":
        sd[m.key] = t.reshape(1, -1).clone()
    elif m.how == "shape":  # a mask_shape with these dims
        sd[m.key] = torch.tensor(m.value, dtype=torch.int64)
    elif m.how == "bytes":  # a text or payload replaced
        sd[m.key] = torch.tensor(list(m.value), dtype=torch.uint8)
    elif m.how == "flip":  # one bit of a packed array
        flat = t.reshape(-1).clone()
        if flat.numel():
            i = m.value % flat.numel()
            flat[i] = (flat[i].to(torch.int64) ^ 1).to(flat.dtype)
        sd[m.key] = flat.view(t.shape)
    elif m.how == "rename":
        sd[m.value] = sd.pop(m.key)
    elif m.how == "add":
        sd[m.value] = torch.tensor([1])
    if m.key != META + "checksum" or m.how == "rename":
        sd[META + "checksum"] = checksum(sd)  # a forger recomputes it: the mutation reaches the field's own check
    return sd


def _paths(config: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}{key}"
            yield path
            yield from _paths(value, path + ".")


def apply_to_config(config: dict, m: Mutation) -> dict:
    config = json.loads(json.dumps(config))
    *parents, last = m.key.split(".")
    holder = config
    for p in parents:
        holder = holder[p]
    if m.how == "delete":
        holder.pop(last, None)
    else:
        holder[last] = m.value
    return config


@st.composite
def mutations(draw: st.DrawFn, mask_keys: list[str], config_paths: list[str]) -> Mutation:
    """A mutation of one field of a mask file (``mask_keys``) or a config.json (``config_paths``)."""
    if draw(st.integers(0, 3)) == 0:
        key = draw(st.sampled_from(config_paths))
        if draw(st.booleans()) and draw(st.booleans()):
            return Mutation("config", key, "delete")
        return Mutation("config", key, "set", draw(st.sampled_from(JSON_VALUES)))
    key = draw(st.sampled_from(mask_keys))
    how = draw(st.sampled_from(("delete", "dtype", "int", "float", "resize", "reshape2d", "shape", "bytes", "flip",
                                "rename", "add")))
    value: Any = None
    if how == "dtype":
        value = draw(st.sampled_from(DTYPES))
    elif how == "int":
        value = draw(st.sampled_from(INTS))
    elif how == "float":
        value = draw(st.sampled_from(FLOATS))
    elif how == "resize":
        value = draw(st.sampled_from((-1, -8, -10**9, 1, 7, 4096)))
    elif how == "shape":
        value = draw(st.lists(st.sampled_from((0, 1, 3, 8, 2**20, 2**31, 2**40, -1)), min_size=0, max_size=9))
    elif how == "bytes":
        value = draw(st.one_of(st.sampled_from((b"", b"edge-popup", b"supermask", b"slot-machine", b"kaiming_normal",
                                                 b"\xff\xfe", b"x" * 100, struct.pack("<q", 2**40))),
                               st.binary(max_size=40)))
    elif how == "flip":
        value = draw(st.integers(0, 2**16))
    elif how == "rename":
        value = draw(st.sampled_from(("__popup__.unknown", "bad name", "x..y", "fc.weight.extra", key + "2",
                                      "features.0.weight.mask_shape")))
    elif how == "add":
        value = draw(st.sampled_from(("__popup__.extra", "extra.weight.mask_shape", "extra.weight.mask",
                                      "features.0.weight.slot", "features.0.weight.kept", "layer.x")))
    return Mutation("mask", key, how, value)


# -- driving the readers -------------------------------------------------------------------------------------------

@dataclass
class Outcomes:
    """What each reader did, by kind, and every finding (a case that broke the rules) with what happened."""

    counts: Counter = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    cases: int = 0

    def record(self, reader: str, kind: str, mutation: Mutation, detail: str = "") -> None:
        self.counts[f"{reader}: {kind}"] += 1
        if kind not in ("loaded", "one-line error"):
            self.findings.append(f"{reader} {kind} on {mutation}: {detail[:500]}")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def bounded(memory: int = MEMORY_BOUND, seconds: int = CASE_SECONDS) -> Iterator[None]:
    """At most ``memory`` more bytes of address space than now and ``seconds`` of time (main thread, Linux)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = _address_space()
    resource.setrlimit(resource.RLIMIT_AS, (used + memory, hard))

    def alarm(signum: int, frame: Any) -> None:
        raise _Timeout(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int:
    return int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _kind(e: BaseException) -> tuple[str, str]:
    text = str(e)
    if isinstance(e, _Timeout):
        return "hang", text
    if isinstance(e, MemoryError) or "can't allocate memory" in text or "Unable to allocate" in text:
        return "allocation beyond the bound", f"{type(e).__name__}: {text}"
    if isinstance(e, (timm_popup.MaskError, json.JSONDecodeError)) and text and "\n" not in text.strip():
        return "one-line error", text
    return "unexpected error", f"{type(e).__name__}: {text}"


def _python(directory: Path) -> None:
    timm.create_model(f"local-dir:{directory}", pretrained=True)


def _python_file(directory: Path) -> None:
    timm.create_model(ARCH, pretrained=True, **MODEL_KWARGS,
                      pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors")))


def _cli(argv: list[str]) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except BaseException as e:  # what main lets through is a traceback for the user
        if isinstance(e, _Timeout):
            raise
        kind, detail = _kind(e)
        return ("unexpected error" if kind == "one-line error" else kind), detail
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return "loaded", ""
    if code in (1, 2) and len(lines) == 1 and lines[0].startswith("timm-popup: error: "):
        if "allocate" in lines[0]:
            return "allocation beyond the bound", lines[0]
        return "one-line error", lines[0]
    return "unexpected error", f"exit {code}: {err.getvalue()[-500:]}"


READERS = {
    "python local-dir": lambda d: _python(d),
    "python file=": lambda d: _python_file(d),
    "cli info": lambda d: _cli(["info", str(d)]),
    "cli info --no-verify": lambda d: _cli(["info", str(d), "--no-verify", "--json"]),
}


def write_case(base: Path, mutation: Mutation, out: Path) -> None:
    """``base`` artifact directory with ``mutation`` applied, written to ``out`` (replaced)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sd = safetensors.torch.load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    if mutation.target == "mask":
        sd = apply_to_mask(sd, mutation)
    else:
        config = apply_to_config(config, mutation)
    safetensors.torch.save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))


def run_case(base: Path, mutation: Mutation, work: Path, outcomes: Outcomes, readers: tuple[str, ...]) -> None:
    """Apply ``mutation`` to ``base`` and drive each reader on the result, recording what happened."""
    write_case(base, mutation, work)
    outcomes.cases += 1
    for reader in readers:
        try:
            with bounded():
                result = READERS[reader](work)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            outcomes.record(reader, *_kind(e)[:1], mutation, _kind(e)[1])
            continue
        kind, detail = result if isinstance(result, tuple) else ("loaded", "")
        outcomes.record(reader, kind, mutation, detail)


def field_space(artifacts: dict[str, Path]) -> tuple[dict[str, list[str]], list[str]]:
    """The keys of each artifact's mask file and the paths of its config.json (every field is a target)."""
    keys = {m: sorted(safetensors.torch.load_file(str(d / "model.safetensors"))) for m, d in artifacts.items()}
    paths = sorted({p for d in artifacts.values() for p in _paths(json.loads((d / "config.json").read_text()))})
    return keys, paths
