"""A popup model's folded network as ONNX, the way timm exports its own models, checked with ONNX Runtime.

timm's route (its ``onnx_export.py`` script, ``timm.utils.onnx.onnx_export``): the model built with
``exportable=True`` (SAME-padding convs as ``Conv2dSameExport``, no scripted activations), eval mode, one forward
before the trace, the TorchScript-based exporter with a dynamic batch axis (``dynamic_size`` adds height and width),
the exporter's default opset unless one is asked for, then ``onnx.checker``. Here the traced network is
``convert.folded(model)``: the masked weights and frozen tensors as the plain tensors the popup model computes with
(the network TorchScript compiles too), so the graph holds no scores, no top-k and no custom op.

The file is then run with ONNX Runtime on a batch of images and must give the popup model's top-1 on every image;
the largest |logit difference| is reported. It is written to a temporary name and renamed only once it passed, so a
failed export leaves nothing. Where timm cannot export the plain ``<name>`` either, the error says so in one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import timm
import timm.data
import torch
from timm.models import get_model_args
from torch import nn

from ._io import atomic_write
from .config import POPUP_ARGS
from .convert import folded
from .export import plain_twin

__all__ = ["OnnxError", "OnnxExport", "INSTALL_HINT", "require_onnx", "export_onnx", "plain_exports"]

INSTALL_HINT = "pip install 'timm-popup[onnx]' (or: pip install onnx onnxruntime)"


class OnnxError(ValueError):
    """The model cannot be written as ONNX, or the file does not compute what the model does; the message says
    why in one line."""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how the ONNX Runtime check went."""

    path: Path
    input_size: tuple[int, int, int]
    opset: int
    images: int  #: the check batch: ONNX Runtime's top-1 equals the popup model's on every one
    max_abs_diff: float  #: the largest |logit difference| on that batch


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """``onnx`` and ``onnxruntime``, or an :class:`OnnxError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise OnnxError(f"ONNX export needs the {e.name} package: {INSTALL_HINT}") from e
    return onnx, onnxruntime


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    # the tracer warns about every Python-level shape test it freezes (timm's models have many); the check with
    # ONNX Runtime below is what tells whether the graph computes the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _trace(model: nn.Module, file: str, *, input_size: Sequence[int], opset: int | None, dynamic_size: bool,
           batch_size: int = 2) -> None:
    from timm.utils.onnx import onnx_export

    # redirect_stdout: on failure torch's exporter prints the whole graph; the error says what failed in one line
    with _quiet_tracer(), contextlib.redirect_stdout(io.StringIO()):
        onnx_export(model, file, input_size=tuple(input_size), batch_size=batch_size, opset=opset,
                    dynamic_size=dynamic_size, check=True)


def plain_exports(architecture: str, model_args: dict[str, Any], *, input_size: Sequence[int],
                  opset: int | None = None, dynamic_size: bool = False) -> str | None:
    """None if timm exports the plain twin of ``architecture`` (built as the popup model was, random weights) to
    ONNX; else the first line of timm's error."""
    import tempfile

    twin = plain_twin(architecture)
    if twin is None:
        return f"{architecture} has no plain timm twin"
    try:
        plain = timm.create_model(twin, exportable=True, **model_args).eval()
        with tempfile.TemporaryDirectory() as tmp:
            _trace(plain, str(Path(tmp) / "plain.onnx"), input_size=input_size, opset=opset, dynamic_size=dynamic_size)
    except Exception as e:  # noqa: BLE001 - any failure of timm's own export is the answer
        return _first_line(e)
    return None


def _images(images: torch.Tensor | int, input_size: Sequence[int]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    return torch.randn((images, *input_size), generator=torch.Generator().manual_seed(0))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: Sequence[int] | None = None,
    opset: int | None = None,
    dynamic_size: bool = False,
    images: torch.Tensor | int = 8,
    batch_size: int = 2,
) -> OnnxExport:
    """Write ``model`` (a popup model; built with ``exportable=True`` as timm's export builds its models) as the
    ONNX file ``path`` and check it with ONNX Runtime.

    ``input_size`` (C, H, W; default: the model's data config) is the traced size; the batch axis is dynamic, and
    so are height and width with ``dynamic_size``. ``opset``: the exporter's default unless given. ``images`` (a
    batch, or how many seeded random images of ``input_size``) must get the popup model's top-1 from ONNX
    Runtime, every one of them. Raises :class:`OnnxError` (one line) if a package is missing, the export fails
    (saying whether timm exports the plain model), or the file computes another top-1; nothing is left at
    ``path`` then.
    """
    onnx, onnxruntime = require_onnx()
    path = Path(path)
    model.eval()
    architecture = model.pretrained_cfg.get("architecture", type(model).__name__) if hasattr(
        model, "pretrained_cfg") else type(model).__name__
    input_size = tuple(input_size or timm.data.resolve_data_config({}, model=model)["input_size"])
    network = folded(model) if hasattr(model, "popup_config") else model
    x = _images(images, input_size)
    with torch.no_grad():
        expected = model(x).float()
    result: dict[str, Any] = {}

    def write(tmp: str) -> None:
        try:
            _trace(network, tmp, input_size=input_size, opset=opset, dynamic_size=dynamic_size,
                   batch_size=batch_size)
        except Exception as e:  # noqa: BLE001 - reported in one line, with what timm does with the plain model
            raise _export_failed(model, architecture, e, input_size=input_size, opset=opset,
                                 dynamic_size=dynamic_size) from e
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).float()
        if got.shape != expected.shape:
            raise OnnxError(f"the ONNX graph of {architecture} outputs shape {tuple(got.shape)} where the model "
                            f"outputs {tuple(expected.shape)}: not written")
        result["diff"] = (got - expected).abs().max().item()
        disagree = int((got.argmax(-1) != expected.argmax(-1)).sum())
        if disagree:
            raise OnnxError(f"the ONNX graph of {architecture} gives another top-1 than the popup model on "
                            f"{disagree} of {len(x)} images (max |logit diff| {result['diff']:.3g}): not written")
        result["opset"] = max(entry.version for entry in onnx.load(tmp, load_external_data=False).opset_import
                              if entry.domain in ("", "ai.onnx"))

    atomic_write(path, write)
    return OnnxExport(path=path, input_size=input_size, opset=result["opset"], images=len(x),
                      max_abs_diff=result["diff"])


def _export_failed(model: nn.Module, architecture: str, error: Exception, **export: Any) -> OnnxError:
    model_args = {k: v for k, v in get_model_args(model).items() if k not in POPUP_ARGS}
    plain = plain_exports(architecture, model_args, **export)
    if plain is not None:
        return OnnxError(f"{architecture} cannot be exported to ONNX, and timm cannot export the plain "
                         f"{plain_twin(architecture) or 'model'} either ({plain})")
    return OnnxError(f"ONNX export of {architecture} failed although timm exports its plain twin: "
                     f"{_first_line(error)} (a timm-popup bug; --traceback shows where)")
