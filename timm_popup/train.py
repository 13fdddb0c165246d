"""What ``train_accelerate.py`` is made of: recipes, checks, model / optimizer / schedule, the epoch loops and the
per-epoch log. Checkpoints, recovery, signals and the output directory's lock are ``timm_popup.runstate``'s (its
names used here are importable from this module too).

Every function takes explicit arguments (no global ``args``), so tests and other scripts can call them; only the
script parses argv. Errors a user can fix are :class:`TrainError` (a ``ValueError`` with a one-line message), raised
before any training starts.

Determinism: the data order of epoch ``e`` is a function of (seed, e) and each example's augmentation of (seed, e,
the example) alone (:func:`seed_epoch`, :func:`set_loader_epoch`, ``create_loader(seeded_draws=True)``), so a run
resumed from a checkpoint, at an epoch's end or inside it, continues exactly as the uninterrupted run would have,
and ends with the same mask.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import timm
import timm.data
import timm.optim
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin, set_seed
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import AverageMeter, accuracy, distribute_bn
from torch import nn
from tqdm.auto import tqdm

from .convert import popup_masks
from .data import (
    BUILTIN_DATASETS,
    Augmentation,
    DataError,
    ImageDataset,
    add_split_slice,
    build_transforms,
    channel_stats,
    check_held_out,
    choose_decode,
    create_loader,
    finish_images,
    fit_stats,
    has_class_names,
    is_split_slice,
    open_dataset,
    peek_image,
)
from .init import DEFAULT_WEIGHT_INIT, WEIGHT_INITS, weight_distribution
from .layers import MASK_MODES, METHOD_MODES, check_score_init
from .maskfile import pack_mask
from .methods import Method, MethodOptions, artifact_file, frozen_weights
from .native import parse_structure
from .runstate import (
    CHECKPOINTS_DIR,
    TRAINER_STATE,
    EpochProgress,
    TrainError,
    WriteError,
    check_checkpoint,
    check_fresh_output_dir,
    check_resume_compatible,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prepare_output_dir,
    read_trainer_state,
    save_checkpoint,
    use_portable_checkpoints,
    write_error_cause,
)

__all__ = [
    "TrainError", "Recipe", "RECIPES", "default_recipe", "resolve_recipe", "scaled_lr", "check_model_name",
    "check_seed", "choose_threads", "check_checkpoint",
    "check_k", "check_weight_init", "check_init_artifact", "prepare_output_dir", "check_fresh_output_dir",
    "find_checkpoint", "read_trainer_state", "check_resume_compatible", "load_data", "resolve_input_size",
    "input_stats", "create_model",
    "is_cifar_style", "default_augmentation", "resolve_augmentation", "SHORT_BUDGET_EPOCHS", "build_mixup",
    "build_loaders", "Loaders", "loader_transforms", "build_optimizer", "build_scheduler", "seed_epoch",
    "set_loader_epoch",
    "train_one_epoch", "evaluate", "sync_batchnorm_stats", "NORM_CALIBRATION_IMAGES", "needs_norm_calibration",
    "build_calibration_loader", "recalibrate_norms", "use_portable_checkpoints", "save_checkpoint",
    "load_checkpoint", "WriteError", "write_error_cause", "list_checkpoints", "MetricsLog", "mask_digest", "dataset_id",
    "count_weights", "TRAINER_STATE", "CHECKPOINTS_DIR", "METRICS_CSV", "METRICS_JSONL",
]

METRICS_CSV, METRICS_JSONL = "metrics.csv", "metrics.jsonl"


# ------------------------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters. ``batch_size`` is per process; ``lr`` is for ``lr_base_size`` images per
    optimizer step and scaled linearly to the real global batch (NVIDIA's rule), or used as is when
    ``lr_base_size`` is None."""

    name: str
    epochs: int
    batch_size: int
    opt: str
    lr: float
    lr_base_size: int | None
    momentum: float
    nesterov: bool
    weight_decay: float
    sched: str
    warmup_epochs: float
    warmup_lr: float
    min_lr: float
    label_smoothing: float
    clip_grad: float | None
    grad_accum: int


RECIPES: dict[str, Recipe] = {
    # The paper's CIFAR-10 recipe (section 4.1): SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, cosine, 100 epochs.
    "cifar": Recipe(name="cifar", epochs=100, batch_size=128, opt="sgd", lr=0.1, lr_base_size=None, momentum=0.9,
                    nesterov=False, weight_decay=1e-4, sched="cosine", warmup_epochs=0, warmup_lr=0.0, min_lr=0.0,
                    label_smoothing=0.0, clip_grad=None, grad_accum=1),
    # The official ImageNet configs (NVIDIA's ResNet-50 v1.5 hyper-parameters): lr 0.256 per 256 images,
    # momentum 0.875, wd 1/32768, label smoothing 0.1, 5 warmup epochs, cosine, 100 epochs.
    "imagenet": Recipe(name="imagenet", epochs=100, batch_size=256, opt="sgd", lr=0.256, lr_base_size=256,
                       momentum=0.875, nesterov=False, weight_decay=3.0517578125e-5, sched="cosine", warmup_epochs=5,
                       warmup_lr=0.0, min_lr=0.0, label_smoothing=0.1, clip_grad=None, grad_accum=1),
}
_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "none")


def default_recipe(model_name: str) -> str:
    """``cifar`` for the paper's small 32x32 / 28x28 networks, ``imagenet`` for the others."""
    input_size = timm.models.get_pretrained_cfg(model_name).input_size
    return "cifar" if max(input_size[1:]) <= 32 else "imagenet"


def resolve_recipe(name: str, *, model_name: str, method: Method, overrides: Mapping[str, Any]) -> Recipe:
    """Recipe ``name`` (``auto``: :func:`default_recipe`), then the method's changes, then ``overrides`` (the
    values the user gave; ``None`` means not given). An explicit ``lr`` is used as is (no batch scaling); a run
    shorter than the recipe's warmup keeps the warmup's share of the recipe's length."""
    if name == "auto":
        name = default_recipe(model_name)
    if name not in RECIPES:
        raise TrainError(f"unknown recipe {name!r}; choose one of: auto, {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise TrainError(f"unknown recipe setting(s) {unknown}; known: {sorted(fields)}")
    changes = dict(method.recipe_overrides.get(name, {}))
    if "lr" in given and "lr_base_size" not in given:
        changes["lr_base_size"] = None
    changes.update(given)
    base = RECIPES[name]
    recipe = dataclasses.replace(base, **changes)
    if "warmup_epochs" not in given and recipe.warmup_epochs >= recipe.epochs:
        # a short run (e.g. a smoke test of the ImageNet recipe): keep warmup's share of the recipe's length
        recipe = dataclasses.replace(recipe, warmup_epochs=base.warmup_epochs * recipe.epochs / base.epochs)
    _check_recipe(recipe)
    return recipe


def _check_recipe(r: Recipe) -> None:
    checks = [
        (r.epochs >= 1, f"--epochs must be at least 1, got {r.epochs}"),
        (r.batch_size >= 1, f"--batch-size must be at least 1, got {r.batch_size}"),
        (r.grad_accum >= 1, f"--grad-accum must be at least 1, got {r.grad_accum}"),
        (r.lr > 0 and math.isfinite(r.lr), f"--lr must be a positive number, got {r.lr}"),
        (r.lr_base_size is None or r.lr_base_size >= 1, f"--lr-base-size must be positive, got {r.lr_base_size}"),
        (r.weight_decay >= 0, f"--weight-decay must be >= 0, got {r.weight_decay}"),
        (0 <= r.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {r.label_smoothing}"),
        (r.clip_grad is None or r.clip_grad > 0, f"--clip-grad must be positive, got {r.clip_grad}"),
        (0 <= r.warmup_epochs < r.epochs or r.warmup_epochs == 0,
         f"--warmup-epochs ({r.warmup_epochs}) must be less than --epochs ({r.epochs})"),
        (r.sched in _SCHEDULES, f"unknown --sched {r.sched!r}; choose one of: {', '.join(_SCHEDULES)}"),
        (r.opt == "sgd" or r.opt in timm.optim.list_optimizers(),
         f"unknown --opt {r.opt!r}; use sgd or a timm optimizer name (timm.optim.list_optimizers())"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainError(message)


def scaled_lr(recipe: Recipe, global_batch: int) -> float:
    """The learning rate for ``global_batch`` images per optimizer step."""
    if recipe.lr_base_size is None:
        return recipe.lr
    return recipe.lr * global_batch / recipe.lr_base_size


# ------------------------------------------------------------------------------------------ checks before training


def check_model_name(name: str) -> str:
    """``name`` if it is a registered popup_* model; else a :class:`TrainError` suggesting close names."""
    base = timm.models.split_model_name_tag(name)[0]
    # popup_<any timm model> is in timm's registry (timm_popup.models.popup_any), a tag split off first
    if base.startswith("popup_") and timm.is_model(base):
        return base
    if timm.is_model(f"popup_{base}"):
        raise TrainError(f"{name!r} is not an edge-popup model; did you mean popup_{base}? "
                         "(timm.list_models('popup_*') lists them)")
    close = difflib.get_close_matches(base, timm.list_models("popup_*"), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TrainError(f"unknown model {name!r}{hint} (timm.list_models('popup_*') lists the popup models)")


def check_seed(seed: int) -> int:
    """``seed`` if numpy and torch take it (an unsigned 32-bit number); else a :class:`TrainError`."""
    if not 0 <= seed <= _MAX_SEED:
        raise TrainError(f"--seed {seed} is outside 0 .. {_MAX_SEED}: it seeds the data order and augmentation "
                         "through numpy and torch, which take unsigned 32-bit seeds; pass e.g. --seed 0")
    return seed


_MAX_SEED = 2**32 - 1


def choose_threads(threads: int | None = None, *, env: Mapping[str, str] | None = None,
                   cpus: int | None = None) -> tuple[int, str]:
    """How many threads this process computes with (``torch.set_num_threads``), and why.

    ``threads`` (``--threads``) wins. Else ``OMP_NUM_THREADS`` is respected, except the ``1`` that a launcher sets
    when nobody asked (``accelerate launch`` without ``--num_cpu_threads_per_process``, ``torchrun``): a launched
    process cannot tell that default from a chosen 1, and one thread leaves the other cores idle (the main job
    ran at 214 img/s on 2 cores with one thread, 306 with two). Otherwise each process gets an equal share of the
    CPUs it may run on (``os.sched_getaffinity``): all of them for a single process. Results depend on the thread
    count (another count sums in another order), so a run repeats exactly only with the same count.
    """
    env = os.environ if env is None else env
    if threads is not None:
        if threads < 1:
            raise TrainError(f"--threads {threads}: pass at least 1 (or leave it out: the CPUs' share)")
        return threads, "--threads"
    launched = any(name in env for name in _LAUNCHER_VARS)
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1 and not (launched and int(given) == 1):
        return int(given), "OMP_NUM_THREADS"
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = env.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) >= 1 else 1
    why = (f"the {cpus} CPUs this process may use" if processes == 1 else
           f"a 1/{processes} share of the {cpus} CPUs, one of {processes} processes on this machine")
    if launched and given == "1":
        why += "; the launcher's default OMP_NUM_THREADS=1 is not used, --threads 1 asks for one"
    return max(1, cpus // processes), why


# set by `accelerate launch` (its simple launcher) and torchrun (multi-process): their OMP_NUM_THREADS=1 is a default
_LAUNCHER_VARS = ("ACCELERATE_MIXED_PRECISION", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def check_k(k: float | None, method: Method) -> float | None:
    """``k`` (the fraction of weights KEPT) if valid for ``method``; ``None`` means the model's default."""
    if k is None:
        return None
    if not method.uses_k:
        raise TrainError(f"--k has no meaning for --method {method.name} (nothing is masked); drop it")
    if not (math.isfinite(k) and 0 < k <= 1):
        raise TrainError(f"--k {k} is outside (0, 1]: k is the fraction of weights KEPT (0.5 keeps half)")
    return float(k)


def check_structure(structure: str, method: Method) -> str:
    """``--structure N:M`` as the model argument (``"2:4"``), if ``method`` keeps a top-k per tensor to group."""
    n, m = parse_structure(structure)
    mode = MASK_MODES.get(METHOD_MODES.get(method.name, ""))
    if mode is None or mode.unstructured_because:
        why = mode.unstructured_because if mode is not None else f"{method.name} trains weights, it finds no mask"
        raise TrainError(f"--structure {structure}: --method {method.name} cannot keep an N:M structure ({why})")
    return f"{n}:{m}"


def check_weight_init(weight_init: str | None, method: Method) -> str | None:
    """The weight distribution to build with (``None``: the model's default, the paper's U_k)."""
    weight_init = weight_init or method.weight_init
    if weight_init is None:
        return None
    name = weight_init.partition(",")[0]  # a full name carries the distribution's options after the first comma
    if name not in WEIGHT_INITS:
        close = difflib.get_close_matches(name, list(WEIGHT_INITS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise TrainError(f"unknown --weight-init {name!r}; {hint}choose one of: {', '.join(WEIGHT_INITS)}")
    try:
        return weight_distribution(weight_init)
    except ValueError as e:
        raise TrainError(f"--weight-init: {e}") from e


def check_popup_options(*, learn_norm: bool = False, learn_bias: bool = False, score_init: str | None = None,
                        score_init_constant: float | None = None, init_mode: str | None = None,
                        nonlinearity: str | None = None, scale_fan: bool = False) -> dict[str, Any]:
    """The model arguments of the paper code's options that were given (``timm_popup.convert``: what trains besides
    the scores, how the weights are drawn, how the scores start), checked; a one-line ``TrainError`` otherwise."""
    if score_init is not None and score_init_constant is not None:
        raise TrainError("--score-init and --score-init-constant both say how scores start: pass one")
    if score_init_constant is not None:
        score_init = f"constant={score_init_constant}"
    out = dict(learn_norm=learn_norm or None, learn_bias=learn_bias or None, score_init=score_init,
               init_mode=init_mode, nonlinearity=nonlinearity, scale_fan=scale_fan or None)
    out = {key: value for key, value in out.items() if value is not None}
    try:
        if score_init is not None:
            out["score_init"] = check_score_init(score_init)
        weight_distribution(DEFAULT_WEIGHT_INIT, mode=init_mode, nonlinearity=nonlinearity)
    except ValueError as e:
        raise TrainError(str(e)) from e
    return out


def check_method_options(method: Method, *, slots: int | None = None, redraw_every: int | None = None,
                         redraw_rate: float | None = None, freeze_every: int | None = None,
                         score_l2: float | None = None, density_epochs: int | None = None,
                         epochs: int | None = None) -> MethodOptions:
    """The method's options (:class:`MethodOptions`; ``None``: the default); an option of another method is an
    error rather than silently ignored."""
    given = dict(slots=slots, redraw_every=redraw_every, redraw_rate=redraw_rate, freeze_every=freeze_every,
                 score_l2=score_l2, density_epochs=density_epochs)
    owners = dict(slots="slot-machine", redraw_every="iterand", redraw_rate="iterand", freeze_every="gem-miner",
                  score_l2="gem-miner", density_epochs="global-topk")
    for name, value in given.items():
        if value is not None and owners[name] != method.name:
            raise TrainError(f"--{name.replace('_', '-')} is an option of --method {owners[name]}, not of "
                             f"{method.name}; drop it")
    try:
        options = MethodOptions(**{name: value for name, value in given.items() if value is not None})
    except ValueError as e:
        raise TrainError(str(e)) from e
    if method.name == "gem-miner" and epochs is not None and (epochs - 1) // options.freeze_every < 1:
        raise TrainError(f"gem-miner freezes weights every --freeze-every {options.freeze_every} epochs before the "
                         f"last, and {epochs} epochs leave no freezing event, so nothing holds it to k: train more "
                         "epochs or freeze more often")
    return options


def check_init_artifact(path: str | None, method: Method) -> Path | None:
    """The mask file ``--init-artifact`` names (a run's directory or its ``model.safetensors``), if ``method``
    takes one; checked for existence here, verified against the model when the method loads it."""
    if path is None:
        if method.init_artifact == "required":
            raise TrainError(f"--method {method.name} needs --init-artifact: the directory (or model.safetensors) "
                             "written by an edge-popup run")
        return None
    if method.init_artifact == "unused":
        raise TrainError(f"--init-artifact has no meaning for --method {method.name}; drop it")
    file = artifact_file(path)
    if not file.is_file():
        raise TrainError(f"--init-artifact {path}: no such file (pass an edge-popup run's output directory or its "
                         "model.safetensors)")
    return file


def compile_plugin(backend: str | None, mode: str | None = None) -> TorchDynamoPlugin | None:
    """Accelerate's torch.compile settings for ``--compile BACKEND [--compile-mode MODE]`` (None: the launcher's
    own ``--dynamo_backend``, if any, applies); an unknown backend is a one-line error before any work."""
    if backend is None:
        if mode is not None:
            raise TrainError("--compile-mode needs --compile")
        return None
    import torch._dynamo

    known = sorted({*torch._dynamo.list_backends(), "aot_eager", "eager"})
    if backend not in known:
        raise TrainError(f"--compile {backend!r} is not a torch.compile backend; choose one of: {', '.join(known)}")
    return TorchDynamoPlugin(backend=backend, mode=mode)


# ---------------------------------------------------------------------------------------------------------- data


def dataset_id(name: str) -> str:
    """How a dataset is named in a model card: the Hub id of a built-in, a local path's folder name."""
    if name in BUILTIN_DATASETS and not Path(name).exists():
        return BUILTIN_DATASETS[name]
    return Path(name).name if Path(name).expanduser().exists() else name


def load_data(name: str, *, train_split: str | None = None, val_split: str | None = None,
              image_column: str | None = None, label_column: str | None = None, streaming: bool = False,
              cache_dir: str | os.PathLike | None = None, train_samples: int | None = None,
              val_samples: int | None = None, seed: int = 0,
              notify: Callable[[str], None] | None = None) -> ImageDataset:
    """Load a dataset for training and check that it has a train and a validation split (``notify`` is told where a
    built-in dataset such as ``fashion-mnist`` is read from).

    ``cache_dir`` is where built-in datasets are converted and where ``datasets`` caches downloads and image-folder
    conversions (default: their usual places). ``train_samples`` / ``val_samples`` keep a subset: a seeded random
    one for training, the first rows for validation (so every run and every later evaluation sees the same images).
    """
    requested = [train_split, val_split] if train_split and val_split else None
    ds = open_dataset(name, split=requested, image_column=image_column, label_column=label_column,
                      streaming=streaming, cache_dir=cache_dir, notify=notify)
    for flag, split in (("--train-split", train_split), ("--val-split", val_split)):
        if split is not None and split not in ds.splits:
            if is_split_slice(split):  # e.g. train[:80%], its other part detected or given as a split name
                ds = add_split_slice(ds, split)
                continue
            raise DataError(f"unknown split {split!r} ({flag}) for dataset {name!r}; available splits: "
                            f"{list(ds.splits)}")
    train_split, val_split = train_split or ds.train_split, val_split or ds.eval_split
    if requested is None and train_split and val_split and train_split != val_split:
        check_held_out(ds, train_split, val_split)
    if train_split is None:
        raise DataError(f"dataset {name!r} has no train split (splits: {list(ds.splits)}); pass --train-split")
    if val_split is None:
        raise DataError(f"dataset {name!r} has no validation/test split (splits: {list(ds.splits)}); pass "
                        "--val-split")
    if val_split == train_split:
        raise DataError(f"--val-split and --train-split are both {train_split!r}; validate on held-out images")
    splits = dict(ds.splits)
    num_rows = dict(ds.num_rows)
    for split, n, shuffle in ((train_split, train_samples, True), (val_split, val_samples, False)):
        if n is None:
            continue
        if n < 1:
            raise DataError(f"the number of {split} samples must be positive, got {n}")
        part = splits[split]
        if isinstance(part, datasets.IterableDataset):
            splits[split] = part.take(n)
        else:
            part = part.shuffle(seed=seed) if shuffle else part
            splits[split] = part.select(range(min(n, len(part))))
        num_rows[split] = min(n, num_rows[split]) if num_rows.get(split) is not None else n
    return dataclasses.replace(ds, splits=splits, num_rows=num_rows, train_split=train_split, eval_split=val_split)


def resolve_input_size(model_name: str, ds: ImageDataset, *, in_chans: int | None = None,
                       img_size: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) to build the model for.

    The paper's small networks (32x32 / 28x28 inputs) take the data as it is: grayscale images give a 1-channel
    model, 28x28 images a 28x28 one. ImageNet-style models keep their input size (timm's transforms resize).
    """
    channels, height, width = timm.models.get_pretrained_cfg(model_name).input_size
    if max(height, width) <= 32:
        image = peek_image(ds, ds.train_split)
        channels = 1 if image.mode in ("1", "L", "I", "I;16", "F", "LA") else 3
        height, width = image.height, image.width
    if in_chans is not None:
        if in_chans not in (1, 3):
            raise TrainError(f"--in-chans must be 1 or 3, got {in_chans}")
        channels = in_chans
    if img_size is not None:
        if img_size < 8:
            raise TrainError(f"--img-size must be at least 8, got {img_size}")
        height = width = img_size
    return channels, height, width


def input_stats(model_name: str, ds: ImageDataset, input_size: tuple[int, int, int], *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) per channel: given values win; the paper's small networks (no normalisation
    layer of their own) get the training data's statistics; ImageNet-style models keep their configured ones."""
    channels = input_size[0]
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, channels):
            raise TrainError(f"{name} takes 1 or {channels} values (one per input channel), got {len(values)}")
    if std is not None and min(std) <= 0:
        raise TrainError(f"--std values must be positive, got {list(std)}")
    default = timm.models.get_pretrained_cfg(model_name)
    if (mean is None or std is None) and max(default.input_size[1:]) <= 32:
        data_mean, data_std = channel_stats(ds, ds.train_split, input_size, seed=seed)
        mean, std = mean or data_mean, std or data_std
    mean = fit_stats(mean or default.mean, channels, "mean")
    std = fit_stats(std or default.std, channels, "std")
    return tuple(mean), tuple(std)


def is_cifar_style(data_config: Mapping[str, Any]) -> bool:
    """Whether the input is a small image fed as it is (no resize + center crop): at most 32 pixels, the same
    rule as ``timm-popup eval``, so it evaluates exactly as training did."""
    return max(data_config["input_size"][1:]) <= 32


#: Below this many epochs a small-image run gets no augmentation by default: one epoch of Conv4 on Fashion-MNIST
#: (60,000 images) reaches a lower accuracy with the paper's pad-and-crop than without (README, Training).
SHORT_BUDGET_EPOCHS = 10


def default_augmentation(data_config: Mapping[str, Any], *, epochs: int) -> Augmentation:
    """The augmentation a run gets unless told otherwise, by input size, channels and budget.

    Small images (<= 32 px, the paper's networks): the paper's CIFAR augmentation (pad-and-crop 4, horizontal flip)
    for a run of at least :data:`SHORT_BUDGET_EPOCHS` epochs, none for a shorter one (augmentation only pays back
    over many epochs). Larger images: timm ``train.py``'s defaults (random resized crop, flip, colour jitter 0.4).
    Grayscale data is never flipped: digits, letters and most one-channel data are not mirror-symmetric.
    """
    channels = data_config["input_size"][0]
    hflip = 0.5 if channels == 3 else 0.0
    if is_cifar_style(data_config):
        if epochs < SHORT_BUDGET_EPOCHS:
            return Augmentation()
        return Augmentation(pad_crop=4, hflip=hflip)
    return Augmentation(scale=(0.08, 1.0), hflip=hflip, color_jitter=0.4)


def resolve_augmentation(data_config: Mapping[str, Any], *, epochs: int, no_aug: bool = False,
                         overrides: Mapping[str, Any] | None = None) -> Augmentation:
    """:func:`default_augmentation` (or none at all with ``no_aug``, timm's ``--no-aug``), then the values the user
    gave (``None``: not given)."""
    given = {key: (tuple(value) if isinstance(value, list) else value)
             for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(Augmentation)})
    if unknown:
        raise TrainError(f"unknown augmentation setting(s) {unknown}")
    if no_aug:
        if given:
            raise TrainError(f"--no-aug turns every augmentation off; drop it or the augmentation flags "
                             f"({', '.join('--' + k.replace('_', '-') for k in sorted(given))})")
        return Augmentation()
    return dataclasses.replace(default_augmentation(data_config, epochs=epochs), **given)


def build_mixup(augmentation: Augmentation, *, num_classes: int, label_smoothing: float,
                batch_size: int) -> timm.data.Mixup | None:
    """timm's ``Mixup`` (which also applies the label smoothing) when mixup or cutmix is on, else ``None``."""
    if not augmentation.uses_mixup:
        return None
    if batch_size % 2:
        raise TrainError(f"--mixup / --cutmix mix each batch with its reverse and need an even --batch-size, got "
                         f"{batch_size}")
    return timm.data.Mixup(mixup_alpha=augmentation.mixup, cutmix_alpha=augmentation.cutmix,
                           prob=augmentation.mixup_prob, switch_prob=augmentation.mixup_switch_prob,
                           mode=augmentation.mixup_mode, label_smoothing=label_smoothing, num_classes=num_classes)


class Loaders(NamedTuple):
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    decode: str  # which pipeline decodes the training images, where and why (choose_decode's line)


def build_loaders(ds: ImageDataset, data_config: Mapping[str, Any], *, batch_size: int, workers: int, seed: int,
                  num_processes: int = 1, process_index: int = 0, pin_memory: bool = False,
                  augmentation: Augmentation | None = None, decode: str | None = None,
                  device: torch.device | str = "cpu") -> Loaders:
    """Train and validation loaders, and which pipeline they run.

    The train loader covers the whole split (Accelerate shards it when prepared), except when streaming: each
    process then reads only its own part of the stream. The validation loader always holds this process's
    contiguous part of the split and is used unprepared (no padding duplicates), its sums reduced across processes.
    ``augmentation`` applies to the train split only (``None``: none). ``decode`` (``--decode``: auto, cpu, gpu; None:
    the reference PIL transforms) places the tensor pipeline for a training ``device``
    (:func:`timm_popup.data.choose_decode`); batches then end on the device with :func:`~timm_popup.data.finish_images`.
    """
    train_tf, eval_tf, line = loader_transforms(data_config, augmentation=augmentation, decode=decode, device=device,
                                                streaming=ds.streaming)
    shards = dict(num_shards=num_processes, shard_index=process_index)
    train_loader = create_loader(ds, ds.train_split, train_tf, batch_size=batch_size, shuffle=True,
                                 num_workers=workers, seed=seed, drop_last=True, pin_memory=pin_memory,
                                 seeded_draws=True, **(shards if ds.streaming else {}))
    val_loader = create_loader(ds, ds.eval_split, eval_tf, batch_size=batch_size, shuffle=False, num_workers=workers,
                               seed=seed, pin_memory=pin_memory, **shards)
    rows = ds.num_rows.get(ds.train_split)
    if rows is not None and rows < batch_size * num_processes:
        raise TrainError(f"the train split has {rows} images, fewer than one batch of {batch_size} per process "
                         f"x {num_processes}; lower --batch-size")
    return Loaders(train_loader, val_loader, line)


def loader_transforms(data_config: Mapping[str, Any], *, augmentation: Augmentation | None = None,
                      decode: str | None = None, device: torch.device | str = "cpu", streaming: bool = False
                      ) -> tuple[Any, Any, str]:
    """The train and eval transforms (reference PIL transforms or tensor pipelines) and the line saying which."""
    cifar_style = is_cifar_style(data_config)
    train_tf = build_transforms(dict(data_config), is_training=True, cifar_style=cifar_style,
                                augmentation=augmentation)
    eval_tf = build_transforms(dict(data_config), is_training=False, cifar_style=cifar_style)
    if decode is None:
        return train_tf, eval_tf, "pil (the reference transforms)"
    train_pipe, line = choose_decode(decode, train_tf, device=device, streaming=streaming)
    eval_pipe, _ = choose_decode(decode, eval_tf, device=device, streaming=streaming)
    return train_pipe or train_tf, eval_pipe or eval_tf, line


# --------------------------------------------------------------------------------------------------------- model


def create_model(model_name: str, *, method: Method, num_classes: int, input_size: tuple[int, int, int],
                 k: float | None = None, weight_init: str | None = None, seed: int = 0,
                 model_kwargs: Mapping[str, Any] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, init_artifact: Path | None = None,
                 label_names: Sequence[str] | None = None, options: MethodOptions | None = None,
                 popup_options: Mapping[str, Any] | None = None) -> nn.Module:
    """The popup model for ``method`` (with its ``options``), built for ``input_size`` (C, H, W) and
    ``num_classes``, then prepared by the method (``init_artifact``: the mask artifact finetune / random-subnet
    start from; ``popup_options``: :func:`check_popup_options`).

    ``label_names`` (the dataset's class names) go into the model's ``pretrained_cfg``, so timm writes them into the
    artifact's ``config.json`` and loaders know which output is which class; integer ids are not recorded as names.

    The data config the model carries (``pretrained_cfg``: input size, per-channel ``mean``/``std``, default the
    model's) is the one training uses, so the artifact's ``config.json`` tells an evaluator exactly how to feed it.
    """
    default = timm.models.get_pretrained_cfg(model_name)
    channels, height, width = input_size
    overlay: dict[str, Any] = dict(input_size=(channels, height, width),
                                   mean=fit_stats(mean or default.mean, channels, "mean"),
                                   std=fit_stats(std or default.std, channels, "std"))
    if max(height, width) <= 32:
        overlay["crop_pct"] = 1.0  # small images are fed whole: timm's eval transform then resizes nothing away
    if label_names is not None:
        if len(label_names) != num_classes:
            raise TrainError(f"{len(label_names)} label names for {num_classes} classes")
        if has_class_names(label_names):
            # with the head's class count beside them: timm drops names recorded for another number of classes
            overlay.update(label_names=tuple(str(name) for name in label_names), num_classes=num_classes)
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    kwargs.update(num_classes=num_classes, in_chans=channels, seed=seed, pretrained_cfg_overlay=overlay)
    kwargs.update(popup_options or {})  # check_popup_options: learned norms / biases, distribution, score init
    weight_init = weight_init or method.weight_init
    if weight_init is not None:
        kwargs["weight_init"] = weight_init
    if not method.uses_k:
        kwargs["k"] = 1.0  # nothing is masked; k=1 also leaves scaled distributions unscaled
    elif k is not None:
        kwargs["k"] = k
    if (height, width) != tuple(default.input_size[1:]):
        kwargs["img_size"] = height if height == width else (height, width)
    try:
        model = timm.create_model(model_name, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" not in kwargs:
            raise TrainError(f"cannot build {model_name} with {model_kwargs or {}}: {e}") from e
        kwargs.pop("img_size")  # size-agnostic (global pooling): the transforms alone set the input size
        model = timm.create_model(model_name, **kwargs)
    return method.prepare(model, init_artifact=init_artifact, options=options)


def build_optimizer(model: nn.Module, recipe: Recipe, *, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over the trainable tensors only (scores, for edge-popup); biases and 1-d tensors get no
    weight decay. Asserts that no frozen seeded weight reaches it."""
    opt = recipe.opt
    if opt == "sgd":  # timm's "sgd" means Nesterov; say which explicitly
        opt = "nesterov" if recipe.nesterov else "momentum"
    optimizer = timm.optim.create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=recipe.weight_decay,
                                               momentum=recipe.momentum)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not trained:
        raise TrainError("the model has no trainable tensors")
    if any(id(w) in trained for w in frozen_weights(model)):
        raise AssertionError("a frozen popup weight reached the optimizer")
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, *,
                    updates_per_epoch: int | None) -> Scheduler | None:
    """timm's scheduler for the recipe, stepped every optimizer update (or every epoch if the epoch length is
    unknown, e.g. a stream without a size); ``None`` for a constant learning rate."""
    if recipe.sched == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs,
        warmup_lr=recipe.warmup_lr, min_lr=recipe.min_lr, step_on_epochs=not updates_per_epoch,
        updates_per_epoch=updates_per_epoch or 0)
    return scheduler


# ------------------------------------------------------------------------------------------------ determinism


def _derived_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"timm-popup/train|{seed}|{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed Python, NumPy and torch (all devices) for epoch ``epoch`` of this process (Accelerate's process index
    is added), so the epoch's augmentation and dropout depend on (seed, epoch, rank) only, never on what ran
    before; a resumed run needs no RNG state to continue exactly."""
    set_seed(_derived_seed(seed, epoch), device_specific=True)


def set_loader_epoch(loader: torch.utils.data.DataLoader, seed: int, epoch: int) -> None:
    """Make the loader's order and worker seeds a function of (seed, epoch): Accelerate's seedable sampler
    (or a stream's shuffle buffer) takes the epoch, and the generator that seeds the workers is reseeded."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(_derived_seed(seed, epoch))


# ------------------------------------------------------------------------------------------------------ loops


def _batches(loader: Iterable, accelerator: Accelerator, lockstep: bool) -> Iterator[Any]:
    """``loader``'s batches; with ``lockstep``, stop on every process as soon as one has none left, so
    processes reading their own part of a stream never wait on each other's all-reduce."""
    it = iter(loader)
    while True:
        batch = next(it, None)
        if batch is not None and len(batch[1]) == 0:  # a stream's batch skipped on resume (data.loaders)
            continue
        if lockstep:
            have = torch.tensor([0 if batch is None else 1], device=accelerator.device)
            torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
            if not have.item():
                return
        if batch is None:
            return
        yield batch


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    accelerator: Accelerator, *, epoch: int, num_updates: int, scheduler: Scheduler | None = None,
                    clip_grad: float | None = None, total_steps: int | None = None, lockstep: bool = False,
                    log_every: int = 10, desc: str | None = None, progress: bool = True,
                    mixup_fn: Callable | None = None, after_update: Callable[[int], None] | None = None,
                    resume: EpochProgress | None = None,
                    at_update: Callable[[int, int, int | None, Callable[[], EpochProgress]], None] | None = None
                    ) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns the epoch's mean train loss / top-1 (over all processes), images/s and
    the new optimizer-update count. The progress bar (loss, accuracy, lr, images/s) is on the main process.
    ``mixup_fn`` (timm's ``Mixup``) mixes each batch and makes soft targets (``loss_fn`` must take them); top-1
    then counts the class with the largest share of each mixed target. ``after_update`` (the method's hook, e.g.
    IteRand's re-draws) is called with the update count after every optimizer update.

    ``resume`` continues the epoch where a recovery checkpoint left it (``loader`` already past its first
    ``resume.step`` batches: ``runstate.position_loader``), with its metric sums; ``at_update`` (``runstate.Recovery``)
    is called after every optimizer update with (batches read, update count, ``total_steps``, a function making this
    process's :class:`EpochProgress`)."""
    model.train()
    losses, top1 = AverageMeter(), AverageMeter()  # fed device tensors: no host sync per step
    world = accelerator.num_processes
    start, seen, first = time.perf_counter(), 0, 1
    if resume is not None:
        for meter, total in ((losses, resume.loss_sum), (top1, resume.top1_sum)):  # float32 sums, as saved
            meter.sum, meter.count = torch.tensor(total, dtype=torch.float32, device=accelerator.device), resume.count
        start, first = start - resume.time_s, resume.step + 1
    bar = tqdm(total=total_steps, initial=first - 1, desc=desc or f"epoch {epoch + 1}", unit="batch", leave=False,
               dynamic_ncols=True, disable=not (progress and accelerator.is_main_process), file=sys.stderr)
    try:
        for step, (images, targets) in enumerate(_batches(loader, accelerator, lockstep), first):
            images = finish_images(images, accelerator.device)
            targets = targets.to(accelerator.device, non_blocking=True)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            with accelerator.accumulate(model):
                output = model(images)
                loss = loss_fn(output, targets)
                accelerator.backward(loss)
                if clip_grad is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                num_updates += 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=num_updates)
                if after_update is not None:
                    after_update(num_updates)
            n = targets.size(0)
            losses.update(loss.detach().float(), n)
            hard = targets.argmax(-1) if targets.ndim > 1 else targets
            top1.update(accuracy(output.detach(), hard, topk=(1,))[0], n)
            seen += n
            if at_update is not None and accelerator.sync_gradients:
                at_update(step, num_updates, total_steps, lambda step=step, updates=num_updates: EpochProgress(
                    epoch=epoch, step=step, num_updates=updates, loss_sum=float(losses.sum), top1_sum=float(top1.sum),
                    count=losses.count, time_s=time.perf_counter() - start))
            bar.update()
            if step % log_every == 0 and not bar.disable:
                rate = seen * world / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{losses.avg.item():.4f}", acc=f"{top1.avg.item():.2f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.4g}", img_s=f"{rate:.0f}")
    except BaseException:  # a stop (preemption, a lost peer): what is printed next starts a line of its own
        bar.leave = not bar.disable
        raise
    finally:
        bar.close()
    sums = torch.tensor([float(losses.sum), float(top1.sum), float(losses.count)], dtype=torch.float64,
                        device=accelerator.device)
    if world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss_sum, top1_sum, count = sums.tolist()
    elapsed = time.perf_counter() - start  # after the sync above: a GPU's queued work belongs to the epoch
    if scheduler is not None:
        scheduler.step(epoch + 1)  # epoch-stepped schedules only; no-op when stepped per update
    if count == 0:
        raise TrainError("the training loader yielded no batch; lower --batch-size or check the train split")
    loss = loss_sum / count
    if not math.isfinite(loss):
        raise TrainError(f"the training loss became {loss} in epoch {epoch + 1}; lower --lr or add --clip-grad")
    return dict(loss=loss, top1=top1_sum / count, img_per_s=count / elapsed, time_s=elapsed), num_updates


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device | str = "cpu",
             accelerator: Accelerator | None = None, desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` on ``loader``; with ``accelerator``, each
    process evaluates its own part and the sums are combined, so every process returns the same numbers."""
    model.eval()
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    show = accelerator is None or accelerator.is_main_process
    for images, targets in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show, file=sys.stderr,
                                dynamic_ncols=True):
        images, targets = finish_images(images, device), targets.to(device, non_blocking=True)
        output = model(images).float()
        acc1, acc5 = accuracy(output, targets, topk=(1, min(5, output.size(1))))
        n = targets.size(0)
        losses.update(F.cross_entropy(output, targets).item(), n)
        top1.update(acc1.item(), n)
        top5.update(acc5.item(), n)
    sums = torch.tensor([losses.sum, top1.sum, top5.sum, losses.count], dtype=torch.float64, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss_sum, top1_sum, top5_sum, count = sums.tolist()
    if count == 0:
        raise TrainError("the validation split is empty")
    return dict(loss=loss_sum / count, top1=top1_sum / count, top5=top5_sum / count, count=int(count))


def sync_batchnorm_stats(model: nn.Module, accelerator: Accelerator) -> None:
    """Average BatchNorm running statistics over processes: they are not broadcast (``broadcast_buffers=False``
    keeps the frozen weights, also buffers, off the wire), so each process tracked its own."""
    if accelerator.num_processes > 1:
        distribute_bn(model, accelerator.num_processes, reduce=True)


#: training images whose forwards re-estimate the norms' statistics of a model whose masks are sampled in training
NORM_CALIBRATION_IMAGES = 2048


def _running_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def needs_norm_calibration(model: nn.Module) -> bool:
    """Whether ``model``'s training forwards sample other masks than its eval masks (the supermask) while it has
    norms with running statistics: those statistics then describe the sampled networks, not the eval one (a
    supermask ResNet-18 evaluated with them sits at chance on Fashion-MNIST; with statistics of its eval mask, 50%)."""
    return any(MASK_MODES[m.mode].samples for m in popup_masks(model).values()) and bool(_running_norms(model))


def build_calibration_loader(ds: ImageDataset, data_config: Mapping[str, Any], *, batch_size: int, workers: int,
                             seed: int, images: int = NORM_CALIBRATION_IMAGES, decode: str | None = None,
                             device: torch.device | str = "cpu") -> torch.utils.data.DataLoader:
    """The first ``images`` of the train split, evaluation transforms, in order: the same batches on every process
    (so the statistics agree without a reduction) and no draw from the training sampler or its augmentation."""
    split = ds.splits[ds.train_split]
    rows = ds.num_rows.get(ds.train_split)
    split = split.take(images) if rows is None else split.select(range(min(images, rows)))
    ds = dataclasses.replace(ds, splits={**ds.splits, ds.train_split: split},
                             num_rows={**ds.num_rows, ds.train_split: min(images, rows) if rows else None})
    _, transform, _ = loader_transforms(data_config, decode=decode, device=device, streaming=ds.streaming)
    return create_loader(ds, ds.train_split, transform, batch_size=batch_size, shuffle=False, num_workers=workers,
                         seed=seed)


@torch.no_grad()
def recalibrate_norms(model: nn.Module, loader: Iterable, *, device: torch.device | str = "cpu") -> int:
    """Re-estimate the running statistics of ``model``'s norm layers under its eval masks (as :func:`evaluate` runs
    it): reset, then a cumulative average over ``loader``'s batches. Returns the number of images; the model is
    left in eval mode."""
    norms = _running_norms(model)
    momenta = [m.momentum for m in norms]
    model.eval()
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every calibration batch counts the same
            m.train()
        for images, _ in loader:
            model(finish_images(images, device))
            seen += len(images)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    return seen


def mask_digest(model: nn.Module) -> str:
    """sha256 of what the output holds: every popup layer's mask plus the rest of the state (BN statistics; the
    weights themselves in dense mode), scores excluded. Equal on all processes when training stayed in sync."""
    h = hashlib.sha256()
    for name, mask in sorted(popup_masks(model).items()):
        h.update(name.encode())
        h.update(pack_mask(mask.get_mask()).numpy().tobytes())
    for name, tensor in sorted(model.state_dict().items()):
        if not name.endswith("scores"):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- checkpoints


class MetricsLog:
    """Per-epoch rows in ``metrics.csv`` and ``metrics.jsonl`` (main process only).

    A fresh run starts both files anew; a resumed run keeps the rows of epochs its checkpoint covers and drops
    any later ones (logged by the killed run after its last checkpoint), so every epoch appears exactly once.
    """

    def __init__(self, output_dir: Path, *, keep_epochs: int = 0) -> None:
        self.csv_path, self.jsonl_path = output_dir / METRICS_CSV, output_dir / METRICS_JSONL
        rows = []
        if keep_epochs and self.jsonl_path.is_file():
            rows = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()]
            rows = [row for row in rows if row.get("epoch", math.inf) <= keep_epochs]
        self.csv_path.unlink(missing_ok=True)
        self.jsonl_path.unlink(missing_ok=True)
        self._fields: list[str] | None = None
        for row in rows:
            self.append(row)

    def append(self, row: Mapping[str, Any]) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(dict(row)) + "\n")
        new = self._fields is None
        if new:
            self._fields = list(row)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(dict(row))

    def rows(self) -> list[dict[str, Any]]:
        if not self.jsonl_path.is_file():
            return []
        return [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()]


def count_weights(model: nn.Module) -> tuple[int, int, int]:
    """(masked weights, kept weights, trainable tensor elements) for the start-of-run summary."""
    masks = popup_masks(model).values()
    total = sum(mask.weight.numel() for mask in masks)
    kept = sum(int(mask.get_mask().sum()) for mask in masks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, kept, trainable
