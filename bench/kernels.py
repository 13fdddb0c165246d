"""Fused C kernels (timm_popup.native) versus the PyTorch path they replace, side by side.

    python bench/kernels.py [--rounds 5]

1. Per-step mask work (forward and backward) over every weight tensor of resnet18: the keyed selection (what
   runs on GPUs and without a compiler) versus the training path's fused kernels (selection through the
   previous step's hint and the masked weight in one call, then the backward). Whole training steps are
   bench/step_time.py's.
2. Weight generation throughput (weights/s): numpy (``init.draw_reference``) versus the C generator, per family.

Timings are interleaved medians of a CPU checked idle first (``machine.check_idle``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch
from machine import check_idle
from opcount import keyed_path

import timm_popup  # noqa: F401  (registers popup_*)
from timm_popup import layers, native
from timm_popup.init import draw_reference as _draw


def _median_ms(fns: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - t0) / reps)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def bench_mask_work(rounds: int, k: float = 0.5) -> None:
    shapes = [tuple(p.shape) for p in timm.create_model("resnet18", num_classes=10).parameters() if p.dim() > 1]
    gen = torch.Generator().manual_seed(0)
    tensors = [((torch.randn(s, generator=gen) * 0.05).requires_grad_(), torch.randn(s, generator=gen),
                torch.randn(s, generator=gen)) for s in shapes]
    hints = [native.new_hint() for _ in shapes]

    selections = [native.Selection() for _ in shapes]

    # every row runs forward and backward through autograd, as a training step does
    def torch_path() -> None:  # the keyed selection, as a GPU (or a machine without a compiler) runs it
        with keyed_path():
            for (scores, weight, grad), selection in zip(tensors, selections, strict=True):
                layers.fused_masked_weight(scores, weight, k, selection).backward(grad)

    def fused_path() -> None:  # what PopupMask.forward runs: selection + masked weight in one call
        for (scores, weight, grad), hint in zip(tensors, hints, strict=True):
            native.masked_weight(scores, weight, k, hint)[0].backward(grad)

    def fused_no_hint() -> None:
        for scores, weight, grad in tensors:
            native.masked_weight(scores, weight, k)[0].backward(grad)

    def drift() -> None:  # scores move a little between steps, as in training: the hint must follow
        with torch.no_grad():
            for scores, _, _ in tensors:
                scores.add_(scores, alpha=1e-3)
                scores.grad = None

    fns = {"keyed (GPU path)": torch_path, "fused, hinted": fused_path, "fused, no hint": fused_no_hint}
    res = _median_ms({name: (lambda f=f: (drift(), f())) for name, f in fns.items()}, rounds, 3)
    n = sum(s.numel() for s, _, _ in tensors)
    print(f"\nmask work per training step (forward + backward), resnet18 weights ({len(shapes)} tensors, "
          f"{n / 1e6:.1f}M weights, k={k}, {torch.get_num_threads()} threads; {_load()})")
    base = res["keyed (GPU path)"]
    for name, ms in res.items():
        print(f"  {name:22s} {ms:8.2f} ms  {base / ms:5.1f}x")


def bench_generation(rounds: int, n: int = 1 << 23) -> None:
    print(f"\ngeneration of {n / 1e6:.1f}M weights ({torch.get_num_threads()} threads; {_load()})")
    key = 0x0123456789ABCDEF
    for family in native.FAMILIES:
        res = _median_ms({"numpy": lambda f=family: _draw((n,), f, 0.1, key),
                          "C": lambda f=family: native.generate((n,), key, f, 0.1)}, rounds, 1)
        print(f"  {family:8s} numpy {res['numpy'] / n * 1e6:6.2f} ns/w ({n / res['numpy'] / 1e6:6.2f} Gw/s)   "
              f"C {res['C'] / n * 1e6:6.2f} ns/w ({n / res['C'] / 1e6:6.2f} Gw/s)   {res['numpy'] / res['C']:5.1f}x")
    res = _median_ms({"sign bits": lambda: native.sign_bits((n,), key)}, rounds, 1)
    print(f"  sign bits (packed)  C {res['sign bits'] / n * 1e6:6.2f} ns/w")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--allow-busy", action="store_true", help="time even when the CPU is busy (warns)")
    args = parser.parse_args()
    check_idle(args.allow_busy)
    print(f"native kernels available: {native.available()}")
    bench_mask_work(args.rounds)
    bench_generation(args.rounds)


if __name__ == "__main__":
    main()
