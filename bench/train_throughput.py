"""Training throughput (images/s) of edge-popup versus the learned-dense baseline, through the training
script's own loop (``timm_popup.train.train_one_epoch`` under Accelerate), side by side.

    python bench/train_throughput.py [--models popup_conv4 popup_resnet18_cifar] [--steps 5] [--rounds 3]
    accelerate launch --mixed_precision bf16 bench/train_throughput.py --models popup_resnet50   # on a GPU

Both methods build the same network from the same seeds (``timm_popup.train.create_model``), get the recipe's
optimizer and timm schedule, and train on the same random batches, made once on the device, so the ratio
isolates what edge-popup adds (top-k selection, straight-through backward) from data loading. Rounds interleave the two
methods; the median images/s of the rounds is reported with the popup / dense ratio.
"""

from __future__ import annotations

import argparse
import statistics

import timm
import torch
from accelerate import Accelerator
from machine import check_idle
from torch import nn

import timm_popup  # noqa: F401  (registers popup_*)
from timm_popup import train
from timm_popup.methods import get_method

CPU_MODELS = {"popup_conv4": 128, "popup_resnet18_cifar": 64}
GPU_MODELS = {**CPU_MODELS, "popup_resnet50": 256, "popup_wide_resnet50_2": 128}


def setup(name: str, method_name: str, batch: int, steps: int, accelerator: Accelerator) -> dict:
    method = get_method(method_name)
    input_size = tuple(timm.models.get_pretrained_cfg(name).input_size)
    num_classes = 10 if max(input_size[1:]) <= 32 else 1000
    model = train.create_model(name, method=method, num_classes=num_classes, input_size=input_size)
    recipe = train.resolve_recipe("auto", model_name=name, method=method, overrides=dict(batch_size=batch))
    optimizer = train.build_optimizer(model, recipe, lr=train.scaled_lr(recipe, batch * accelerator.num_processes))
    # Batches made once, on the device: a host-side loader (one CPU thread under `accelerate launch`) measured
    # itself, not the model (dense resnet50 1,155 vs 4,635 img/s on an H200).
    gen = torch.Generator(device=accelerator.device).manual_seed(accelerator.process_index)
    loader = [(torch.randn(batch, *input_size, generator=gen, device=accelerator.device),
               torch.randint(0, num_classes, (batch,), generator=gen, device=accelerator.device))
              for _ in range(steps)]
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = train.build_scheduler(optimizer.optimizer, recipe, updates_per_epoch=len(loader))
    return dict(model=model, optimizer=optimizer, loader=loader, scheduler=scheduler, updates=0,
                loss_fn=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing))


def run_epoch(case: dict, accelerator: Accelerator) -> float:
    stats, case["updates"] = train.train_one_epoch(
        case["model"], case["loader"], case["optimizer"], case["loss_fn"], accelerator, epoch=0,
        num_updates=case["updates"], scheduler=case["scheduler"], progress=False)
    return stats["img_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="popup_* models (default: by device)")
    parser.add_argument("--batch-size", type=int, default=None, help="per process (default: per model)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--allow-busy", action="store_true", help="time even when the CPU is busy (warns)")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.device.type == "cpu" and accelerator.is_main_process:
        check_idle(args.allow_busy)
    defaults = GPU_MODELS if accelerator.device.type == "cuda" else CPU_MODELS
    models = {name: defaults.get(name, 64) for name in args.models} if args.models else defaults
    accelerator.print(f"device {accelerator.device}, {accelerator.num_processes} process(es), "
                      f"{accelerator.mixed_precision} mixed precision, {torch.get_num_threads()} threads")
    accelerator.print(f"{'model (batch, input)':42s} {'popup img/s':>12s} {'dense img/s':>12s} {'popup/dense':>12s}")
    for name, batch in models.items():
        batch = args.batch_size or batch
        cases = {m: setup(name, m, batch, args.steps, accelerator) for m in ("edge-popup", "dense")}
        for case in cases.values():  # warm-up: allocator, kernel selection, mask cache
            run_epoch(case, accelerator)
        rates: dict[str, list[float]] = {m: [] for m in cases}
        for _ in range(args.rounds):
            for method, case in cases.items():
                rates[method].append(run_epoch(case, accelerator))
        popup, dense = (statistics.median(rates[m]) for m in ("edge-popup", "dense"))
        size = "x".join(map(str, timm.models.get_pretrained_cfg(name).input_size[1:]))
        accelerator.print(f"{f'{name} ({batch}, {size})':42s} {popup:12.1f} {dense:12.1f} {popup / dense:12.2f}")
        del cases
        accelerator.free_memory()


if __name__ == "__main__":
    main()
