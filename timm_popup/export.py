"""Fold a popup model into the plain timm model it is: masked weights as they compute, frozen tensors as set."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import timm.data
import torch
from timm.models import filter_pretrained_cfg, get_model_args, is_model, model_entrypoint
from torch import nn
from torch.nn.utils import parametrize

from ._io import atomic_write
from .config import POPUP_ARGS
from .convert import folded, popup_masks

__all__ = ["PLAIN_TWINS", "ExportError", "dense_state_dict", "plain_twin", "export_plain", "unshared", "save_plain",
           "semi_structured_unsupported", "export_semi_structured"]

#: timm's Hub layout (hub.py's artifacts add a README.md card)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

#: hand-written popup architectures and the plain timm architecture their folded weights load into.
#: ConvNeXt: the popup versions have no layer scale; the plain ones get gamma = 1, an exact no-op.
PLAIN_TWINS = {
    "popup_resnet18": "resnet18",
    "popup_resnet34": "resnet34",
    "popup_resnet50": "resnet50",
    "popup_resnet101": "resnet101",
    "popup_wide_resnet50_2": "wide_resnet50_2",
    "popup_wide_resnet101_2": "wide_resnet101_2",
    "popup_vit_tiny_patch16_224": "vit_tiny_patch16_224",
    "popup_vit_small_patch16_224": "vit_small_patch16_224",
    "popup_convnext_atto": "convnext_atto",
    "popup_convnext_tiny": "convnext_tiny",
}


class ExportError(ValueError):
    """The popup model cannot be written as the plain architecture asked for; the message says why."""


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain timm state dict of a popup ``model``: no scores, every tensor as the model computes with it.

    Each masked tensor is written as its masked value (exactly the tensor the model reads), each frozen tensor
    (norm scale/shift, biases, gains, embeddings) at its frozen value, and BatchNorm running statistics and
    dense modules from the state dict, all under the plain model's names.
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mod_name, module in model.named_modules(remove_duplicate=False):  # shared modules: every path
            if parametrize.is_parametrized(module):
                for tensor_name in module.parametrizations:
                    key = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
                    out[key] = getattr(module, tensor_name).detach().clone()
        for name, tensor in model.state_dict().items():
            if ".parametrizations." not in f".{name}":
                out.setdefault(name, tensor.detach().clone())
        # A frozen tensor is a (non-persistent) buffer, missing from the state dict, until a weight-learning method
        # (methods.make_dense / finetune / random-subnet) turns it back into a parameter, which the state dict holds.
        buffers = dict(model.named_buffers(remove_duplicate=False))
        frozen = {id(buffers[name]) for name in model.popup_config.frozen if name in buffers}
        for name, tensor in buffers.items():
            if id(tensor) in frozen:
                out.setdefault(name, tensor.detach().clone())
    return out


def unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor contiguous, on the CPU and in its own memory, ready for safetensors.

    A module shared by several blocks (CoaT's shared convolutional position encodings) appears in a state dict
    under every name it is reachable by, all of them the same tensor, and safetensors refuses to write tensors
    that share memory. Its ``save_model`` drops the duplicate names, but timm's loader (``pretrained_cfg_overlay=
    dict(file=...)``, ``local-dir:``) loads strictly and wants every name: so each duplicate is cloned instead.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def save_plain(plain: nn.Module, directory: str | os.PathLike, *, model_config: Mapping[str, Any] | None = None
               ) -> Path:
    """Write a plain timm model as timm's Hub layout: ``model.safetensors`` (every state-dict name, shared modules
    included) and ``config.json``, each atomically; plain timm loads it with ``local-dir:`` or ``file=``."""
    from timm.models._hub import save_config_for_hf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = unshared(plain.state_dict())
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(
        tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: save_config_for_hf(
        plain, tmp, model_config=dict(model_config or {})))
    return directory


def _is_popup_entry(architecture: str) -> bool:
    return is_model(architecture) and model_entrypoint(architecture).__module__.startswith("timm_popup.")


def plain_twin(architecture: str) -> str | None:
    """The plain timm architecture a popup one exports to: ``popup_<name>`` -> ``<name>`` or a PLAIN_TWINS entry."""
    if architecture in PLAIN_TWINS:
        return PLAIN_TWINS[architecture]
    base = architecture.removeprefix("popup_")
    return base if is_model(base) and not _is_popup_entry(base) else None


def export_plain(model: nn.Module, twin: str, *, input_size: Sequence[int] | None = None) -> tuple[nn.Module, float]:
    """A plain ``twin`` model holding ``model``'s folded weights, and the max |logit difference| between them.

    Fails unless the plain model's state dict is covered exactly (layer-scale gammas, which the hand-written
    ConvNeXts leave out, are set to 1) and its logits match the popup model's on a random batch of
    ``input_size`` (default: the model's data config; a model built with another ``img_size`` needs it given).
    """
    model.eval()
    state = dense_state_dict(model)
    plain_args = {k: v for k, v in get_model_args(model).items() if k not in POPUP_ARGS}
    pretrained_cfg = filter_pretrained_cfg(dict(model.pretrained_cfg), remove_source=True, remove_null=True)
    pretrained_cfg.pop("tag", None)
    pretrained_cfg["architecture"] = twin
    plain = timm.create_model(twin, pretrained_cfg=pretrained_cfg, **plain_args).eval()
    target = plain.state_dict()
    extra = sorted(set(state) - set(target))
    missing = sorted(n for n in set(target) - set(state) if n.rsplit(".", 1)[-1] != "gamma")
    if extra or missing:
        raise ExportError(f"{twin} does not match the popup model (tensors only in the popup model: {extra[:3]}, "
                          f"only in {twin}: {missing[:3]}): it cannot be exported to {twin}")
    folded = {n: state[n] if n in state else torch.ones_like(t) for n, t in target.items()}
    try:
        plain.load_state_dict(folded, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{twin} does not match the popup model: {' '.join(str(e).split())[:300]}") from e
    input_size = input_size or timm.data.resolve_data_config({}, model=model)["input_size"]
    x = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x), plain(x)
    diff = (expected - got).abs().max().item()
    if not torch.allclose(got, expected, rtol=0, atol=1e-6 * max(1.0, expected.abs().max().item())):
        raise ExportError(f"the exported {twin} computes other logits than the popup model (max |diff| {diff:.3g}): "
                          "not exported")
    return plain, diff


#: the dtypes whose semi-structured kernels take a 2:4 pattern (float32's take 1:2, int8 needs quantised weights)
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_unsupported(device: torch.device | str | None = None) -> str | None:
    """Why ``device`` (default: the current CUDA device) cannot run PyTorch's semi-structured (2:4) sparse weights,
    or None where it can: they run on NVIDIA GPUs of compute capability 8.0 or newer (Ampere, Hopper ...) only."""
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        where = "no CUDA GPU is available" if not torch.cuda.is_available() else f"the device asked for is {device}"
        return (f"semi-structured sparse weights (torch.sparse.to_sparse_semi_structured) run on NVIDIA GPUs of "
                f"compute capability 8.0+ only, and {where}: deploy the folded dense model "
                "(timm-popup export) here")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"semi-structured sparse weights need compute capability 8.0+ (Ampere or newer); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}: deploy the folded dense model instead")
    return None


def export_semi_structured(model: nn.Module, *, dtype: torch.dtype = torch.float16,
                           device: torch.device | str | None = None) -> tuple[nn.Module, dict[str, str]]:
    """The folded network of a 2:4 popup ``model`` (``structure="2:4"``) for sparse inference: a copy in eval mode
    on ``device`` (default the current CUDA device) in ``dtype`` (float16 or bfloat16), whose ``nn.Linear`` weights
    that kept the 2:4 structure are ``torch.sparse.to_sparse_semi_structured`` tensors; everything else is the
    dense folded tensor. ``model`` is left as it was.

    Returns the copy and, per masked tensor that stayed dense, why (not a linear layer's weight, a dim 1 not in
    groups of 4, or a shape the sparse kernels refuse: float16 needs rows in multiples of 32, columns of 64).
    Raises :class:`ExportError` on a model without the 2:4 structure or a device without the kernels
    (:func:`semi_structured_unsupported`)."""
    structure = getattr(getattr(model, "popup_config", None), "structure", None)
    if structure != "2:4":
        raise ExportError(f"semi-structured sparse export needs a 2:4 model (structure='2:4'), this one has "
                          f"structure={structure!r}: train it with --structure 2:4")
    if dtype not in _SEMI_STRUCTURED_DTYPES:
        raise ExportError(f"semi-structured 2:4 weights are float16 or bfloat16, not {dtype} (float32's sparse "
                          "kernels take 1:2 pairs)")
    reason = semi_structured_unsupported(device)
    if reason is not None:
        raise ExportError(reason)
    from torch.sparse import to_sparse_semi_structured

    plain = folded(model).eval().to(device=device or "cuda", dtype=dtype)
    dense: dict[str, str] = {}
    for name, mask in popup_masks(model).items():
        owner, _, tensor_name = name.rpartition(".")
        module = plain.get_submodule(owner)
        if not isinstance(module, nn.Linear) or tensor_name != "weight":
            dense[name] = "not a linear layer's weight"
            continue
        if mask.structure is None:
            dense[name] = f"its {tuple(mask.weight.shape)[1]} input features do not split into groups of 4"
            continue
        weight = module._buffers.pop("weight")  # folded() holds the masked weight as a buffer
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        except (RuntimeError, ValueError) as e:  # the kernels' shape constraints
            module.register_buffer("weight", weight)
            dense[name] = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return plain, dense
