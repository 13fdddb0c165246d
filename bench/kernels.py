"""Fused C kernels (timm_popup.native) versus the PyTorch path they replace, side by side.

    python bench/kernels.py [--rounds 5] [--step]

1. Per-step mask work over every weight tensor of resnet18: PyTorch's ``layers.topk_mask`` + ``weight * mask``
   + the straight-through backward, versus the fused select (with the previous step's hint) + masked weight +
   backward kernels.
2. Weight generation throughput: numpy (``init._draw``) versus the C generator, per family.
3. ``--step``: whole training steps (resnet18 @32px batch 64, Conv4 batch 128): dense, popup as in layers.py, and
   popup with ``PopupMask.forward`` routed through ``native.masked_weight`` (the proposed integration).

Timings are interleaved medians; on a shared machine they are indicative only, so the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

import timm_popup  # noqa: F401  (registers popup_*)
from timm_popup import layers, native
from timm_popup.init import _draw
from timm_popup.models import ConvNet


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
    tensors = [(torch.randn(s, generator=gen) * 0.05, torch.randn(s, generator=gen), torch.randn(s, generator=gen))
               for s in shapes]
    hints = [native.new_hint() for _ in shapes]

    def torch_path() -> None:
        for scores, weight, grad in tensors:
            out = weight * layers.topk_mask(scores, k)
            (grad * weight).mul_(scores.sign())
            del out

    def fused_path() -> None:
        for (scores, weight, grad), hint in zip(tensors, hints, strict=True):
            thr, cut = torch.ops.timm_popup.topk_select(scores, layers.num_kept(scores.numel(), k), hint)
            torch.ops.timm_popup.masked_weight(scores, weight, thr, cut)
            torch.ops.timm_popup.ste_backward(grad, weight, scores)

    def fused_no_hint() -> None:
        for scores, weight, grad in tensors:
            out, _ = native.masked_weight(scores, weight, k)
            native.ste_backward(grad, weight, scores)
            del out

    def drift() -> None:  # scores move a little between steps, as in training: the hint must follow
        for scores, _, _ in tensors:
            scores.add_(scores, alpha=1e-3)

    fns = {"pytorch (layers.py)": torch_path, "fused, hinted": fused_path, "fused, no hint": fused_no_hint}
    res = _median_ms({name: (lambda f=f: (drift(), f())) for name, f in fns.items()}, rounds, 3)
    n = sum(s.numel() for s, _, _ in tensors)
    print(f"\nmask work per training step, resnet18 weights ({len(shapes)} tensors, {n / 1e6:.1f}M weights, k={k}, "
          f"{torch.get_num_threads()} threads; {_load()})")
    base = res["pytorch (layers.py)"]
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


def _fused_forward(self: layers.PopupMask, placeholder: torch.Tensor) -> torch.Tensor:
    """PopupMask.forward with the training path of mode "topk" routed through the fused kernels."""
    if self.mode == "topk" and self.training:
        hint = self.__dict__.setdefault("_native_hint", native.new_hint())
        return native.masked_weight(self.scores, self.weight, self.k, hint)[0]
    return _original_forward(self, placeholder)


_original_forward = layers.PopupMask.forward


def bench_steps(rounds: int) -> None:
    cases = [("resnet18 @32 b64", lambda: timm.create_model("resnet18", num_classes=10),
              lambda: timm.create_model("popup_resnet18", num_classes=10), 64),
             ("Conv4 b128", lambda: ConvNet(stages=(64, 128)), lambda: timm.create_model("popup_conv4"), 128)]
    for title, make_dense, make_popup, batch in cases:
        torch.manual_seed(0)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        models = {"dense": make_dense().train(), "popup (layers.py)": make_popup().train()}
        models["popup (fused)"] = models["popup (layers.py)"]

        def step_fn(model: torch.nn.Module, fused: bool, x: torch.Tensor = x, y: torch.Tensor = y
                    ) -> Callable[[], None]:
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)

            def step() -> None:
                layers.PopupMask.forward = _fused_forward if fused else _original_forward
                try:
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                finally:
                    layers.PopupMask.forward = _original_forward

            return step

        res = _median_ms({name: step_fn(m, "fused" in name) for name, m in models.items()}, rounds, 2)
        print(f"\ntraining step, {title} ({torch.get_num_threads()} threads; {_load()})")
        for name, ms in res.items():
            print(f"  {name:20s} {ms:8.1f} ms  {ms / res['dense']:5.2f}x dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step", action="store_true", help="also time whole training steps")
    args = parser.parse_args()
    print(f"native kernels available: {native.available()}")
    bench_mask_work(args.rounds)
    bench_generation(args.rounds)
    if args.step:
        bench_steps(args.rounds)


if __name__ == "__main__":
    main()
