"""``timm-popup``: inspect, evaluate, export and publish edge-popup mask artifacts; prepare datasets.

    timm-popup info ARTIFACT                         what a mask holds, its size, and whether it verifies
    timm-popup eval MODEL_OR_ARTIFACT --dataset D    top-1/top-5, loss and images/s; a JSON result line
    timm-popup export ARTIFACT OUTPUT_DIR            fold the mask into a plain timm checkpoint
    timm-popup export ARTIFACT --onnx OUT.onnx       the folded network as ONNX, checked with ONNX Runtime
    timm-popup push ARTIFACT_DIR REPO_ID             upload an artifact directory to the Hub in one commit
    timm-popup prepare SRC DST --max-side N          a dataset re-encoded once at a maximum side (faster decoding)

ARTIFACT is a directory written by ``timm_popup.save_pretrained`` (config.json + model.safetensors), a
``model.safetensors`` mask file (``--model ARCH`` when no config.json lies beside it) or ``hf-hub:org/name``.
Exit status: 0 success, 2 bad input (usage, missing file, unknown model or dataset), 1 failure (a mask that
does not verify, a network error, ...). Errors are one line on stderr; ``--traceback`` shows the whole story.
"""

from __future__ import annotations

import argparse
import contextlib
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

import timm
import timm.data
import torch
import torch.nn.functional as F
from timm.models import is_model, list_models
from torch import nn

from .artifacts import (
    HUB_PREFIX,
    LOCAL_PREFIX,
    ArtifactError,
    build_model,
    dense_size,
    require_architecture,
    resolve_artifact,
)
from .convert import popup_masks
from .export import PLAIN_TWINS, ExportError, export_plain, plain_twin, save_plain
from .hub import CONFIG_NAME, WEIGHTS_NAME
from .maskfile import MaskError, artifact_info, read_mask_file
from .onnx_export import OnnxError, export_onnx, require_onnx

__all__ = ["main"]

class CliError(Exception):
    """A failure the CLI reports as one line; ``exit_code`` 2 marks bad input, 1 anything else."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _usage(message: str) -> CliError:
    return CliError(message, exit_code=2)


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
        require_architecture(art)
        try:
            model = build_model(art)
        except MaskError as e:
            verified, verification = False, _one_line(e)
        else:
            verified = True
            dense_params, dense_bytes = dense_size(model)
            dense_from = "built model"
            layers = len(popup_masks(model))
            verification = (f"OK: the weights regenerated from seed {model.popup_config.seed} match all {layers} "
                            f"tensor fingerprints and the mask applies to {art.architecture}")
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
            ("method", info["method"]),
            ("k", f"{info['k']} (fraction of weights kept " + {
                "global-topk": "in the whole network)",
                "gem-miner": "in the whole network, at most: the density is learned)",
            }.get(info["method"], "per layer)")),
            *([("structure", f"{info['structure']} (N of every M consecutive input weights)")]
              if "structure" in info else []),
            ("weight init", info["weight_init"]),
            *([("learned", ", ".join(key for key in ("learn_norm", "learn_bias") if info.get(key))
                + " (trained with the scores, values in the artifact)")]
              if info.get("learn_norm") or info.get("learn_bias") else []),
            ("layers", f"{info['layers']} masked"),
            ("weights kept", f"{kept:,} of {total:,} ({100 * kept / max(total, 1):.1f}%)"),
            ("bits/weight", f"{info['bits_per_weight']} stored per masked weight (the masks and what the "
                            "method adds)"),
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
    return spec.startswith((HUB_PREFIX, LOCAL_PREFIX)) or Path(spec).expanduser().exists() or spec.endswith(
        ".safetensors") or (
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

    from .data import (
        DECODE_CHOICES,
        build_transforms,
        choose_decode,
        create_loader,
        finish_images,
        label_mapping,
        open_dataset,
    )

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
    if args.decode not in DECODE_CHOICES:
        raise _usage(f"--decode must be one of {', '.join(DECODE_CHOICES)}")
    try:
        pipeline, decode = choose_decode(args.decode, transform, device=device, streaming=ds.streaming)
    except ValueError as e:
        raise _usage(str(e)) from e
    print(f"decode: {decode}", file=sys.stderr)
    loader = create_loader(ds, split, pipeline or transform, batch_size=args.batch_size, shuffle=False,
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
            images, labels = finish_images(images, device), labels.to(device, non_blocking=True)
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
    popup = getattr(model, "popup_config", None)
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
        kept = sum(int(mask.get_mask().sum()) for mask in popup_masks(model).values())
        result.update(k=popup.k, weight_init=popup.weight_init, seed=popup.seed, kept_weights=kept)
    print(f" * Acc@1 {top1:.3f} ({100 - top1:.3f}) Acc@{top_k} {top5:.3f} ({100 - top5:.3f}) loss {loss:.4f} "
          f"on {count} images, {count / elapsed:.1f} images/s", file=sys.stderr)
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------------- export


def _export_model(args: argparse.Namespace) -> tuple[nn.Module, str, dict[str, Any]]:
    """The popup model to export (an artifact's, or a ``popup_`` model name's), its architecture and the artifact's
    label names; built with ``exportable=True`` for ONNX, as timm's own export builds its models."""
    spec = args.artifact
    layers = timm.layers.set_layer_config(exportable=True) if args.onnx else contextlib.nullcontext()
    if not _looks_like_artifact(spec) and is_model(spec):
        if args.model is not None:
            raise _usage("--model names the architecture of a mask file; pass the model name itself instead")
        if not spec.startswith("popup_"):
            raise _usage(f"{spec} is a plain timm model: export popup_{spec} or an artifact")
        with layers:
            model = timm.create_model(spec, pretrained=args.pretrained).eval()
        return model, model.pretrained_cfg["architecture"], {}
    art = resolve_artifact(spec, args.model)
    architecture = require_architecture(art)
    with layers:
        model = build_model(art)
    labels = {k: art.config[k] for k in ("label_names", "label_descriptions") if art.config and art.config.get(k)}
    return model, architecture, labels


def _export_onnx(args: argparse.Namespace, model: nn.Module, architecture: str) -> None:
    out = Path(args.onnx).expanduser()
    if args.images < 1 or (args.img_size is not None and args.img_size < 1):
        raise _usage("--images and --img-size must be positive")
    if out.is_dir() or not out.parent.is_dir():
        raise _usage(f"--onnx {out}: name a file in an existing directory (e.g. model.onnx)")
    input_size = None
    if args.img_size:
        input_size = (timm.data.resolve_data_config({}, model=model)["input_size"][0], args.img_size, args.img_size)
    try:
        done = export_onnx(model, out, input_size=input_size, opset=args.opset, dynamic_size=args.dynamic_size,
                           images=args.images)
    except OnnxError as e:
        raise CliError(str(e)) from e
    axes = "batch, height and width" if args.dynamic_size else "batch"
    print(f"exported {architecture} -> {out} ({out.stat().st_size:,} bytes, ONNX opset {done.opset}, input "
          f"{'x'.join(map(str, done.input_size))}, dynamic {axes}); ONNX Runtime vs the popup model on "
          f"{done.images} images: the same top-1 on every one, max |logit diff| {done.max_abs_diff:.3g}")


def cmd_export(args: argparse.Namespace) -> int:
    if args.output_dir is None and args.onnx is None:
        raise _usage("nothing to write: give OUTPUT_DIR (a plain timm checkpoint) and/or --onnx FILE.onnx")
    if args.onnx:
        try:
            require_onnx()
        except OnnxError as e:
            raise CliError(str(e)) from e
    model, architecture, labels = _export_model(args)
    if args.onnx:
        _export_onnx(args, model, architecture)
    if args.output_dir is None:
        return 0
    twin = args.model_name or plain_twin(architecture)
    if twin is None:
        raise _usage(f"{architecture} has no plain timm twin to export to; exportable: {', '.join(PLAIN_TWINS)}, "
                     "and any timm architecture made popup with timm_popup.convert()")
    if not is_model(twin):
        raise RuntimeError(f"Unknown model ({twin})")
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise _usage(f"{out} exists and is not a directory")
    try:
        plain, diff = export_plain(model, twin)
    except ExportError as e:
        raise CliError(str(e)) from e
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create {out}: {e.strerror}") from e
    save_plain(plain, out, model_config=labels)
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


# -------------------------------------------------------------------------------------------------------- prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import PrepareOptions, open_dataset, prepare_dataset

    if args.workers < 0:
        raise _usage("--workers must be 0 (this process) or more")
    options = PrepareOptions(max_side=args.max_side, quality=args.quality, shard_size=args.shard_size)
    options.check()
    ds = open_dataset(args.source, split=args.split, image_column=args.image_column, label_column=args.label_column,
                      notify=lambda message: print(message, file=sys.stderr))
    out = prepare_dataset(ds, args.destination, options, workers=args.workers)
    print(f"prepared {args.source} at a maximum side of {args.max_side} px in {out}: train on it with --dataset "
          f"{out} (its runs record the preparation)")
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
    ev.add_argument("--decode", default="auto", metavar="{auto,cpu,gpu}",
                    help="where images are decoded and transformed: gpu (nvJPEG on the evaluating GPU), cpu (the "
                         "workers), auto (the GPU when evaluating on one); small images and other transforms run "
                         "Pillow's reference path (default auto)")
    ev.add_argument("--image-column", default=None)
    ev.add_argument("--label-column", default=None)
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N images")
    ev.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    ev.set_defaults(handler=cmd_eval)

    ex = commands.add_parser("export", help="fold the mask into a plain timm checkpoint (loads without timm-popup) "
                                            "and/or an ONNX file checked with ONNX Runtime")
    ex.add_argument("artifact", metavar="ARTIFACT", help="artifact directory, model.safetensors, hf-hub:org/name or a "
                                                         "popup_ model name")
    ex.add_argument("output_dir", metavar="OUTPUT_DIR", nargs="?", default=None,
                    help="write the plain timm checkpoint (model.safetensors + config.json) here")
    ex.add_argument("--model-name", default=None,
                    help="plain timm architecture to write (default: the popup one's twin, e.g. resnet50)")
    ex.add_argument("--model", default=None, help=arch_help)
    ex.add_argument("--pretrained", action="store_true", help="a popup_ model name: load the registry's mask")
    ex.add_argument("--onnx", default=None, metavar="FILE.onnx",
                    help="write the folded network as ONNX (timm's export: exportable layers, dynamic batch)")
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ex.add_argument("--dynamic-size", action="store_true", help="ONNX: dynamic height and width too")
    ex.add_argument("--img-size", type=int, default=None, help="ONNX: traced input size (default: the model's)")
    ex.add_argument("--images", type=int, default=8,
                    help="ONNX: random images on which ONNX Runtime must give the popup model's top-1 (default 8)")
    ex.set_defaults(handler=cmd_export)

    push = commands.add_parser("push", help="upload an artifact directory to the Hugging Face Hub in one commit")
    push.add_argument("artifact_dir", metavar="ARTIFACT_DIR")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--commit-message", default=None)
    push.set_defaults(handler=cmd_push)

    prep = commands.add_parser("prepare", help="re-encode a dataset once at a maximum side into Parquet shards "
                                                "(FFCV's max_resolution: faster decoding; resumable)")
    prep.add_argument("source", metavar="SRC",
                      help="Hub dataset id, save_to_disk directory, image folder or a built-in name (fashion-mnist)")
    prep.add_argument("destination", metavar="DST", help="a new directory (or the one a stopped run left to finish)")
    prep.add_argument("--max-side", type=int, required=True, help="the longest side an image keeps, in pixels")
    prep.add_argument("--quality", type=int, default=90, help="JPEG quality of resized JPEGs (default 90)")
    prep.add_argument("--shard-size", type=int, default=5000, help="images per Parquet shard (default 5000)")
    prep.add_argument("--workers", type=int, default=0, help="processes encoding shards side by side (default 0: "
                                                             "this one)")
    prep.add_argument("--split", default=None, help="only these splits (comma-separated; default all)")
    prep.add_argument("--image-column", default=None)
    prep.add_argument("--label-column", default=None)
    prep.set_defaults(handler=cmd_prepare)
    return parser


def _unknown_model(message: str) -> str:
    name = re.search(r"Unknown model \((.*)\)", message)
    name = name.group(1) if name else ""
    pool = list_models("popup_*") if name.startswith("popup_") or not is_model(name.removeprefix("popup_")) else []
    close = difflib.get_close_matches(name, pool or list_models(), n=4, cutoff=0.6)
    # every timm model has its popup_ name in the registry: too many to print, so name the rule instead
    hint = f"; did you mean {', '.join(close)}?" if close else \
        "; a popup model is popup_<a timm model name>, e.g. popup_resnet50 (timm.list_models('popup_*'))"
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
        elif isinstance(e, ArtifactError):
            code, message = 2 if e.bad_input else 1, str(e)
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
