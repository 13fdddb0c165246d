"""Training step time of popup models versus the same dense timm model, measured side by side.

    python bench/step_time.py [--steps 10] [--rounds 3]

Rows: dense (weights trained), popup (ours: the fused selection + masking of ``timm_popup.native``), popup with a
2:4 structure (``structure="2:4"``: the keyed N:M selection, PyTorch ops), and reference rows with the mask chosen by
the paper's full sort (Algorithm 1) and by torch.kthvalue. Each row's
timing is interleaved with the others
in rounds, on the current device, and reported as the median step time and its ratio to dense.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from machine import check_idle

import timm_popup  # noqa: F401  (registers popup_*)
from timm_popup import layers
from timm_popup.models import ConvNet


def sort_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The paper's Algorithm 1: sort every score of the layer, keep the top k."""
    flat = scores.detach().abs().flatten()
    out = torch.zeros_like(flat, dtype=torch.bool)
    idx = flat.sort().indices
    out[idx[flat.numel() - layers.num_kept(flat.numel(), k):]] = True
    return out.view_as(scores)


def kthvalue_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The official code's suggested speed-up: threshold at torch.kthvalue (ties not handled)."""
    flat = scores.detach().abs().flatten()
    keep = layers.num_kept(flat.numel(), k)
    return (flat >= flat.kthvalue(flat.numel() - keep + 1).values).view_as(scores)


def with_selection(mask_fn: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A training forward that selects with ``mask_fn`` and applies the mask with the straight-through rule."""
    def masked_weight(scores: torch.Tensor, weight: torch.Tensor, k: float, hint: torch.Tensor) -> torch.Tensor:
        return layers._StraightThrough.apply(scores, weight, mask_fn(scores, k))
    return masked_weight


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def bench_case(title: str, dense: torch.nn.Module, popup: torch.nn.Module, structured: torch.nn.Module, batch: int,
               size: int, steps: int, rounds: int, device: torch.device) -> None:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    dense, popup, structured = (m.to(device).train() for m in (dense, popup, structured))
    ours = layers.fused_masked_weight
    rows = {
        "dense": (dense, ours),
        "popup (ours)": (popup, ours),
        "popup 2:4 (ours)": (structured, ours),
        "popup, full sort (paper)": (popup, with_selection(sort_mask)),
        "popup, kthvalue": (popup, with_selection(kthvalue_mask)),
    }
    fns = {name: step_fn(model, x, y) for name, (model, _) in rows.items()}
    times: dict[str, list[float]] = {name: [] for name in rows}
    try:
        for _ in range(rounds):
            for name, (_, masked_weight) in rows.items():
                layers.fused_masked_weight = masked_weight
                fns[name]()  # warm-up for this selection
                for _ in range(steps):
                    t0 = time.perf_counter()
                    fns[name]()
                    times[name].append(time.perf_counter() - t0)
    finally:
        layers.fused_masked_weight = ours
    base = statistics.median(times["dense"])
    print(f"\n{title}  (batch {batch}, {size}x{size}, {device.type}, {torch.get_num_threads()} threads)")
    print(f"  {'':28s} {'ms/step':>9s} {'x dense':>8s}")
    for name in rows:
        t = statistics.median(times[name])
        print(f"  {name:28s} {t * 1e3:9.1f} {t / base:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-busy", action="store_true", help="time even when the CPU is busy (warns)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    check_idle(args.allow_busy)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    def popup(name: str, **kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
        return timm.create_model(name, **kwargs), timm.create_model(name, structure="2:4", **kwargs)

    bench_case("resnet18 vs popup_resnet18", timm.create_model("resnet18", num_classes=10),
               *popup("popup_resnet18", num_classes=10), 64, 32, args.steps, args.rounds, device)
    bench_case("Conv4 vs popup_conv4", ConvNet(stages=(64, 128)), *popup("popup_conv4"),
               128, 32, args.steps, args.rounds, device)
    if device.type == "cuda":
        bench_case("resnet50 vs popup_resnet50", timm.create_model("resnet50", num_classes=10),
                   *popup("popup_resnet50", num_classes=10), 64, 224, args.steps, args.rounds, device)


if __name__ == "__main__":
    main()
