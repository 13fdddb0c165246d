"""``timm-popup``: inspect, evaluate, export and publish edge-popup mask artifacts.

    timm-popup info ARTIFACT                         what a mask holds, its size, and whether it verifies
    timm-popup eval MODEL_OR_ARTIFACT --dataset D    top-1/top-5, loss and images/s; a JSON result line
    timm-popup export ARTIFACT OUTPUT_DIR            fold the mask into a plain timm checkpoint
    timm-popup push ARTIFACT_DIR REPO_ID             upload an artifact directory to the Hub in one commit

ARTIFACT is a directory written by ``timm_popup.save_pretrained`` (config.json + model.safetensors), a
``model.safetensors`` mask file (``--model ARCH`` when no config.json lies beside it) or ``hf-hub:org/name``.
Exit status: 0 success, 2 bad input (usage, missing file, unknown model or dataset), 1 failure (a mask that
does not verify, a network error, ...). Errors are one line on stderr; ``--traceback`` shows the whole story.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import timm.data
import torch
import torch.nn.functional as F
from timm.models import filter_pretrained_cfg, get_pretrained_cfg_value, is_model, list_models, model_entrypoint
from timm.models._hub import get_model_args, save_config_for_hf
from torch import nn

from ._io import atomic_write
from .convert import convert, popup_layers
from .masks import MaskError, artifact_info, load_masks, read_mask_file

__all__ = ["main", "PLAIN_TWINS", "Artifact", "resolve_artifact", "build_model", "dense_state_dict",
           "export_plain"]

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_HUB_PREFIX = "hf-hub:"
_POPUP_ARGS = ("k", "weight_init", "seed", "dense")

#: popup architectures and the plain timm architecture their folded weights load into, logit for logit.
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


class CliError(Exception):
    """A failure the CLI reports as one line; ``exit_code`` 2 marks bad input, 1 anything else."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _usage(message: str) -> CliError:
    return CliError(message, exit_code=2)


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------------------------------------ artifacts


@dataclasses.dataclass
class Artifact:
    """A resolved ARTIFACT argument: the local mask file and, where there is one, its config.json."""

    source: str
    mask_file: Path
    config: dict[str, Any] | None
    architecture: str | None
    directory: Path | None = None  # holds config.json + model.safetensors: loadable as local-dir:
    hub_id: str | None = None  # org/name[@revision] for hf-hub: artifacts


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"{path} is not readable JSON ({_one_line(e)}): write the artifact again") from e
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CliError(f"{path} names no architecture: it is not a timm config.json")
    return config


def _download(spec: str) -> Artifact:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub_id = spec[len(_HUB_PREFIX):]
    repo_id, _, revision = hub_id.partition("@")
    paths = {}
    # model.safetensors is fetched here, before timm sees the repo: without one, timm's hf-hub loader would
    # fall back to a pickled pytorch_model.bin.
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths[name] = Path(hf_hub_download(repo_id, name, revision=revision or None))
        except HFValidationError as e:
            raise _usage(f"{spec!r} is not a valid Hub id: use hf-hub:org/name[@revision] ({_one_line(e)})") from e
        except LocalEntryNotFoundError as e:  # offline or unreachable, and not in the cache
            raise CliError(f"could not download {name} of {repo_id} from {constants.ENDPOINT} and it is not "
                           f"cached: {_one_line(e)}") from e
        except RepositoryNotFoundError as e:
            raise _usage(f"repository {repo_id} was not found on {constants.ENDPOINT}: check the id (a private or "
                         "gated repo needs a token: HF_TOKEN or `hf auth login`)") from e
        except RevisionNotFoundError as e:
            raise _usage(f"{repo_id} has no revision {revision!r}") from e
        except EntryNotFoundError as e:
            raise _usage(f"{repo_id} has no {name}: it is not a timm-popup artifact (config.json + "
                         "model.safetensors)") from e
        except (HfHubHTTPError, OSError) as e:
            raise CliError(f"could not download {name} of {repo_id}: {_one_line(e)}") from e
    config = _read_config(paths[CONFIG_NAME])
    return Artifact(spec, paths[WEIGHTS_NAME], config, config["architecture"], hub_id=hub_id)


def resolve_artifact(spec: str, model: str | None = None) -> Artifact:
    """Find the mask file and config of ``spec``: a directory, a mask file or ``hf-hub:org/name[@rev]``.

    ``model`` names the architecture of a mask file that has no config.json beside it.
    """
    if spec.startswith(_HUB_PREFIX):
        art = _download(spec)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise _usage(f"{spec} does not exist: pass an artifact directory (config.json + model.safetensors), "
                         "a model.safetensors file or hf-hub:org/name")
        directory = path if path.is_dir() else None
        if directory is not None and not (directory / WEIGHTS_NAME).is_file():
            raise _usage(f"{directory} holds no {WEIGHTS_NAME}: it is not a timm-popup artifact directory")
        if directory is None and path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
            directory = path.parent  # the mask file of an artifact directory: use its config too
        mask_file = directory / WEIGHTS_NAME if directory is not None else path
        config = None
        if directory is not None and (directory / CONFIG_NAME).is_file():
            config = _read_config(directory / CONFIG_NAME)
        elif directory is not None:
            directory = None  # no config.json: not loadable as local-dir:, needs --model
        art = Artifact(spec, mask_file, config, config["architecture"] if config else None, directory=directory)
    if model is not None:
        if art.architecture is not None and art.architecture != model:
            raise _usage(f"{spec} is a {art.architecture} artifact (config.json) but --model says {model}: "
                         "drop --model")
        art.architecture = model
    return art


def _is_registered_popup(architecture: str) -> bool:
    return is_model(architecture) and model_entrypoint(architecture).__module__.startswith("timm_popup.")


def _require_architecture(art: Artifact) -> str:
    if art.architecture is None:
        raise _usage(f"{art.mask_file} has no config.json beside it: pass --model ARCH (e.g. --model popup_resnet50) "
                     "to name the architecture it was saved from")
    if not is_model(art.architecture):
        raise RuntimeError(f"Unknown model ({art.architecture})")
    return art.architecture


def build_model(art: Artifact) -> nn.Module:
    """Build the popup model of ``art`` and load its mask through timm's own loading path, verifying it.

    Registered popup architectures load as ``local-dir:`` / ``hf-hub:`` / ``pretrained_cfg_overlay=dict(file=)``;
    an architecture made popup with ``timm_popup.convert`` is rebuilt the same way and loaded with ``load_masks``
    (as its model card shows). Either way the fingerprints are checked before the mask is applied.
    """
    architecture = _require_architecture(art)
    if _is_registered_popup(architecture):
        if art.hub_id is not None:
            return timm.create_model(_HUB_PREFIX + art.hub_id, pretrained=True).eval()
        if art.directory is not None:
            return timm.create_model(f"local-dir:{art.directory}", pretrained=True).eval()
        kwargs: dict[str, Any] = dict(pretrained_cfg_overlay=dict(file=str(art.mask_file)))
        classifier = get_pretrained_cfg_value(architecture, "classifier")
        shape_key = f"{classifier}.mask_shape" if isinstance(classifier, str) else None
        tensors = read_mask_file(art.mask_file)
        if shape_key in tensors:
            # The loader re-initialises a classifier of another shape (another num_classes) instead of failing;
            # here the file is all there is, so build the head it was saved with.
            kwargs["num_classes"] = int(tensors[shape_key][0])
        return timm.create_model(architecture, pretrained=True, **kwargs).eval()
    config = art.config or {}
    info = artifact_info(read_mask_file(art.mask_file))
    model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k not in _POPUP_ARGS}
    dense = (config.get("model_args") or {}).get("dense") or (config.get("timm_popup") or {}).get("dense") or ()
    kwargs = dict(pretrained_cfg=config["pretrained_cfg"]) if config.get("pretrained_cfg") else {}
    model = timm.create_model(architecture, **kwargs, **model_args)
    convert(model, k=info["k"], weight_init=info["weight_init"], seed=info["seed"], dense=tuple(dense))
    return load_masks(model, art.mask_file).eval()


def dense_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the fp32 dense checkpoint of the same network.

    Parameters: every weight/bias the plain network would train (frozen ones here are non-persistent buffers;
    scores are not among them). Bytes: all of its tensors, BatchNorm statistics included, as save_pretrained
    counts them for the model card.
    """
    persistent = set(model.state_dict())
    params = [t for n, t in model.named_parameters() if n.rsplit(".", 1)[-1] != "scores"]
    params += [t for n, t in model.named_buffers() if n not in persistent]
    buffers = [t for n, t in model.named_buffers() if n in persistent]
    return sum(t.numel() for t in params), sum(t.numel() * t.element_size() for t in params + buffers)


# ----------------------------------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    art = resolve_artifact(args.artifact, args.model)
    info = artifact_info(read_mask_file(art.mask_file))
    file_bytes = art.mask_file.stat().st_size
    dense_bytes = (art.config or {}).get("timm_popup", {}).get("dense_bytes")
    dense_from = "config.json" if dense_bytes else "masked layers only"
    dense_bytes = dense_bytes or info["total_weights"] * 4
    dense_params = None
    verified, verification = None, "skipped (--no-verify)"
    if not args.no_verify:
        _require_architecture(art)
        try:
            model = build_model(art)
        except MaskError as e:
            verified, verification = False, _one_line(e)
        else:
            verified = True
            dense_params, dense_bytes = dense_size(model)
            dense_from = "built model"
            layers = len(popup_layers(model))
            verification = (f"OK: the weights regenerated from seed {model.popup_cfg['seed']} match all {layers} "
                            f"layer fingerprints and the mask applies to {art.architecture}")
    result = dict(artifact=art.source, mask_file=str(art.mask_file), architecture=art.architecture,
                  **info, file_bytes=file_bytes, dense_params=dense_params, dense_fp32_bytes=dense_bytes,
                  dense_bytes_from=dense_from,
                  ratio=round(dense_bytes / file_bytes, 2), verified=verified, verification=verification)
    if args.json:
        print(json.dumps(result))
    else:
        kept, total = info["kept_weights"], info["total_weights"]
        rows = [
            ("artifact", art.source),
            ("mask file", f"{art.mask_file} ({file_bytes:,} bytes)"),
            ("format", f"version {info['format_version']} (weight generator version {info['generator_version']})"),
            ("architecture", f"{art.architecture} ({'config.json' if art.config else '--model'})"
             if art.architecture else "unknown (no config.json; pass --model to verify)"),
            ("seed", str(info["seed"])),
            ("k", f"{info['k']} (fraction of weights kept per layer)"),
            ("weight init", info["weight_init"]),
            ("layers", f"{info['layers']} masked"),
            ("weights kept", f"{kept:,} of {total:,} ({100 * kept / max(total, 1):.1f}%)"),
            ("size", f"{file_bytes:,} bytes; the fp32 dense checkpoint is {dense_bytes:,} bytes "
                     f"({f'{dense_params:,} params, ' if dense_params else ''}{dense_from}): "
                     f"{dense_bytes / file_bytes:.1f}x larger"),
            ("verification", verification),
        ]
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
    if verified is False:
        print(f"timm-popup: error: {art.source} does not verify: {verification}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------- eval


def _looks_like_artifact(spec: str) -> bool:
    return spec.startswith(_HUB_PREFIX) or Path(spec).expanduser().exists() or spec.endswith(".safetensors") or (
        "/" in spec or os.sep in spec)


def _eval_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    spec = args.model_or_artifact
    if _looks_like_artifact(spec):
        return build_model(resolve_artifact(spec, args.model))
    if args.model is not None:
        raise _usage("--model names the architecture of a mask file; pass the model name itself instead")
    # A fresh (random-mask) model gets the dataset's classes; a pretrained one keeps its head.
    kwargs = {} if args.pretrained else dict(num_classes=num_classes)
    return timm.create_model(spec, pretrained=args.pretrained, **kwargs).eval()


def _limit(split_ds: Any, limit: int) -> Any:
    import datasets

    if isinstance(split_ds, datasets.IterableDataset):
        return split_ds.take(limit)
    return split_ds.select(range(min(limit, len(split_ds))))


def cmd_eval(args: argparse.Namespace) -> int:
    from timm.utils import accuracy
    from tqdm import tqdm

    from .data import build_transforms, create_loader, label_mapping, open_dataset

    if args.limit is not None and args.limit < 1:
        raise _usage("--limit must be a positive number of images")
    if args.split is not None and "," in args.split:
        raise _usage("--split takes one split name")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ds = open_dataset(args.dataset, split=args.split, image_column=args.image_column, label_column=args.label_column,
                      notify=lambda message: print(message, file=sys.stderr))
    split = args.split or ds.eval_split
    if split is None:
        raise _usage(f"dataset {args.dataset} has no validation/test split (splits: {list(ds.splits)}): pass --split")
    if args.limit is not None:
        ds = dataclasses.replace(ds, splits={**ds.splits, split: _limit(ds.splits[split], args.limit)})
    model = _eval_model(args, ds.num_classes)
    if ds.num_classes > model.num_classes:
        raise _usage(f"{args.model_or_artifact} predicts {model.num_classes} classes but dataset {args.dataset} has "
                     f"{ds.num_classes}: evaluate it on the dataset it was trained for")
    # the artifact's outputs are named: each dataset label goes to the output of the class of the same name
    label_map = label_mapping(ds.class_names, model.pretrained_cfg.get("label_names"), what=args.model_or_artifact)
    data_config = timm.data.resolve_data_config({}, model=model)
    # The paper's 32x32 / 28x28 networks were trained on plain ToTensor + Normalize, not resize + center crop.
    transform = build_transforms(data_config, is_training=False, cifar_style=max(data_config["input_size"][1:]) <= 32)
    loader = create_loader(ds, split, transform, batch_size=args.batch_size, shuffle=False,
                           num_workers=args.workers, pin_memory=device.type == "cuda", label_map=label_map)
    model.to(device)
    top_k = min(5, model.num_classes)
    count, correct1, correct5, loss_sum = 0, 0.0, 0.0, 0.0
    start = time.perf_counter()
    total = math.ceil(min(args.limit or math.inf, ds.num_rows.get(split) or math.inf) / args.batch_size)
    with torch.no_grad(), tqdm(loader, total=total if math.isfinite(total) else None, desc=f"eval {split}",
                               unit="batch", file=sys.stderr, dynamic_ncols=True) as bar:
        for images, labels in bar:
            if int(labels.min()) < 0:
                raise _usage(f"split {split!r} of {args.dataset} holds unlabeled images (label -1): evaluate a "
                             "labeled split")
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            output = model(images).float()
            acc1, acc5 = accuracy(output, labels, topk=(1, top_k))
            n = labels.numel()
            count += n
            correct1 += acc1.item() * n / 100
            correct5 += acc5.item() * n / 100
            loss_sum += F.cross_entropy(output, labels, reduction="sum").item()
            bar.set_postfix(top1=f"{100 * correct1 / count:.2f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if count == 0:
        raise _usage(f"split {split!r} of {args.dataset} is empty")
    top1, top5, loss = 100 * correct1 / count, 100 * correct5 / count, loss_sum / count
    popup = getattr(model, "popup_cfg", None)
    params = dense_size(model)[0] if popup else sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = dict(
        model=args.model_or_artifact, architecture=model.pretrained_cfg.get("architecture"),
        top1=round(top1, 4), top1_err=round(100 - top1, 4), top5=round(top5, 4), top5_err=round(100 - top5, 4),
        loss=round(loss, 4), param_count=round(params / 1e6, 2), img_size=data_config["input_size"][-1],
        crop_pct=data_config.get("crop_pct"), interpolation=data_config.get("interpolation"),
        images=count, images_per_sec=round(count / elapsed, 2), batch_size=args.batch_size, device=str(device),
        dataset=args.dataset, split=split)
    if top_k != 5:
        result["top5_is_top"] = top_k  # fewer than 5 classes: "top5" is top-num_classes (always 100)
    if popup:
        kept = sum(int(layer.get_mask().sum()) for layer in popup_layers(model).values())
        result.update(k=popup["k"], weight_init=popup["weight_init"], seed=popup["seed"], kept_weights=kept)
    print(f" * Acc@1 {top1:.3f} ({100 - top1:.3f}) Acc@{top_k} {top5:.3f} ({100 - top5:.3f}) loss {loss:.4f} "
          f"on {count} images, {count / elapsed:.1f} images/s", file=sys.stderr)
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------------- export


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict of an eval-mode popup ``model``: no scores, every weight as it computes.

    Each popup layer's weight is ``weight * mask`` (exactly the tensor its forward uses) and its pinned bias is
    written as zeros; the frozen norm scale/shift (1/0) and embeddings are written explicitly; BatchNorm
    running statistics and dense layers come from the state dict.
    """
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in popup_layers(model).items():
            out[f"{name}.weight"] = layer.masked_weight().detach().clone()
            if layer.bias is not None:
                out[f"{name}.bias"] = layer.bias.detach().clone()
        for name, tensor in state.items():
            if name.rsplit(".", 1)[-1] != "scores":
                out.setdefault(name, tensor.detach().clone())
        for name, tensor in model.named_buffers():
            out.setdefault(name, tensor.detach().clone())
    return out


def plain_twin(architecture: str) -> str | None:
    """The plain timm architecture a popup one exports to (itself for a ``convert``-ed timm model)."""
    if architecture in PLAIN_TWINS:
        return PLAIN_TWINS[architecture]
    return architecture if is_model(architecture) and not _is_registered_popup(architecture) else None


def export_plain(model: nn.Module, twin: str) -> tuple[nn.Module, float]:
    """A plain ``twin`` model holding ``model``'s folded weights, and the max |logit difference| between them.

    Fails unless the plain model's state dict is covered exactly (layer-scale gammas, which popup models
    leave out, are set to 1) and its logits match the popup model's on a random batch.
    """
    model.eval()
    state = dense_state_dict(model)
    plain_args = {k: v for k, v in get_model_args(model).items() if k not in _POPUP_ARGS}
    pretrained_cfg = filter_pretrained_cfg(dict(model.pretrained_cfg), remove_source=True, remove_null=True)
    pretrained_cfg.pop("tag", None)
    pretrained_cfg["architecture"] = twin
    plain = timm.create_model(twin, pretrained_cfg=pretrained_cfg, **plain_args).eval()
    target = plain.state_dict()
    persistent = set(model.state_dict())
    extra = sorted(n for n in set(state) - set(target) if n in persistent or n.endswith((".weight", ".bias")))
    missing = sorted(n for n in set(target) - set(state) if n.rsplit(".", 1)[-1] != "gamma")
    if extra or missing:
        raise CliError(f"{twin} does not match the popup model (tensors only in the popup model: {extra[:3]}, only "
                       f"in {twin}: {missing[:3]}): it cannot be exported to {twin}")
    folded = {n: state[n] if n in state else torch.ones_like(t) for n, t in target.items()}
    try:
        plain.load_state_dict(folded, strict=True)
    except RuntimeError as e:
        raise CliError(f"{twin} does not match the popup model: {_one_line(e)[:300]}") from e
    input_size = timm.data.resolve_data_config({}, model=model)["input_size"]
    x = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x), plain(x)
    diff = (expected - got).abs().max().item()
    if not torch.allclose(got, expected, rtol=0, atol=1e-6 * max(1.0, expected.abs().max().item())):
        raise CliError(f"the exported {twin} computes other logits than the popup model (max |diff| {diff:.3g}): "
                       "not exported")
    return plain, diff


def cmd_export(args: argparse.Namespace) -> int:
    art = resolve_artifact(args.artifact, args.model)
    architecture = _require_architecture(art)
    twin = args.model_name or plain_twin(architecture)
    if twin is None:
        raise _usage(f"{architecture} has no plain timm twin to export to; exportable: {', '.join(PLAIN_TWINS)}, "
                     "and any timm architecture made popup with timm_popup.convert()")
    if not is_model(twin):
        raise RuntimeError(f"Unknown model ({twin})")
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise _usage(f"{out} exists and is not a directory")
    model = build_model(art)
    plain, diff = export_plain(model, twin)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create {out}: {e.strerror}") from e
    tensors = {n: t.contiguous() for n, t in plain.state_dict().items()}
    labels = {k: art.config[k] for k in ("label_names", "label_descriptions") if art.config and art.config.get(k)}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: save_config_for_hf(plain, tmp, model_config=labels))
    logits = "bitwise identical" if diff == 0 else f"max |diff| {diff:.3g}"
    print(f"exported {architecture} -> {twin}: {out / WEIGHTS_NAME} ({(out / WEIGHTS_NAME).stat().st_size:,} bytes) "
          f"and {out / CONFIG_NAME}; logits vs the popup model: {logits}")
    print(f"load it with plain timm: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


# ----------------------------------------------------------------------------------------------------------- push


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_artifact

    directory = Path(args.artifact_dir).expanduser()
    if not directory.is_dir():
        raise _usage(f"{directory} is not a directory: pass an artifact directory written by save_pretrained")
    url = push_artifact(directory, args.repo_id, token=args.token, private=args.private,
                        commit_message=args.commit_message)
    print(f"pushed {directory} to {args.repo_id}: {url}")
    return 0


# ----------------------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-popup", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="on error, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    arch_help = "architecture of a mask file that has no config.json beside it (e.g. popup_resnet50)"

    info = commands.add_parser("info", help="what an artifact holds, its size and whether it verifies")
    info.add_argument("artifact", metavar="ARTIFACT", help="artifact directory, model.safetensors or hf-hub:org/name")
    info.add_argument("--model", default=None, help=arch_help)
    info.add_argument("--no-verify", action="store_true", help="do not build the model and check the fingerprints")
    info.add_argument("--json", action="store_true", help="print one machine-readable JSON line")
    info.set_defaults(handler=cmd_info)

    ev = commands.add_parser("eval", help="top-1/top-5 of a model or artifact on a dataset; a JSON result line")
    ev.add_argument("model_or_artifact", metavar="MODEL_OR_ARTIFACT",
                    help="a model name (popup_conv4, ...), an artifact directory / mask file or hf-hub:org/name")
    ev.add_argument("--dataset", required=True,
                    help="Hub dataset id, save_to_disk directory, image folder or a built-in name (fashion-mnist)")
    ev.add_argument("--split", default=None, help="split to evaluate (default: the validation/test split found)")
    ev.add_argument("--pretrained", action="store_true", help="load the registry's mask for a model name")
    ev.add_argument("--model", default=None, help=arch_help)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    ev.add_argument("--image-column", default=None)
    ev.add_argument("--label-column", default=None)
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N images")
    ev.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    ev.set_defaults(handler=cmd_eval)

    ex = commands.add_parser("export", help="fold the mask into a plain timm checkpoint (loads without timm-popup)")
    ex.add_argument("artifact", metavar="ARTIFACT")
    ex.add_argument("output_dir", metavar="OUTPUT_DIR")
    ex.add_argument("--model-name", default=None,
                    help="plain timm architecture to write (default: the popup one's twin, e.g. resnet50)")
    ex.add_argument("--model", default=None, help=arch_help)
    ex.set_defaults(handler=cmd_export)

    push = commands.add_parser("push", help="upload an artifact directory to the Hugging Face Hub in one commit")
    push.add_argument("artifact_dir", metavar="ARTIFACT_DIR")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--commit-message", default=None)
    push.set_defaults(handler=cmd_push)
    return parser


def _unknown_model(message: str) -> str:
    name = re.search(r"Unknown model \((.*)\)", message)
    name = name.group(1) if name else ""
    pool = list_models("popup_*") if name.startswith("popup_") or not is_model(name.removeprefix("popup_")) else []
    close = difflib.get_close_matches(name, pool or list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; popup models: {', '.join(list_models('popup_*'))}"
    return f"unknown model {name!r}{hint}"


def _is_data_error(e: Exception) -> bool:
    # timm_popup.data imports `datasets` (seconds); only `eval` needs it, and only it can raise DataError.
    data = sys.modules.get(f"{__package__}.data")
    return data is not None and isinstance(e, data.DataError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``timm-popup`` console script; returns the exit status."""
    from huggingface_hub.errors import HfHubHTTPError

    parser = _parser()
    args = parser.parse_args(argv)
    token = getattr(args, "token", None)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.traceback:
            raise
        if isinstance(e, CliError):
            code, message = e.exit_code, str(e)
        elif isinstance(e, RuntimeError) and str(e).startswith("Unknown model"):
            code, message = 2, _unknown_model(str(e))
        elif isinstance(e, FileNotFoundError) or _is_data_error(e):
            code, message = 2, str(e)
        elif isinstance(e, (MaskError, HfHubHTTPError, RuntimeError, OSError, ValueError)):
            code, message = 1, str(e)
        else:
            raise
        message = _one_line(message)
        if token:
            message = message.replace(token, "***")
        print(f"timm-popup: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
