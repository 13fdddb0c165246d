"""Dense against 2:4 semi-structured sparse inference of a popup model trained with ``structure="2:4"``.

Builds each model with the 2:4 structure (random scores: the timing does not depend on which weights are kept),
folds it twice with ``timm_popup.export``: the dense folded network and the one whose linear layers are
``torch.sparse.to_sparse_semi_structured`` weights (``export_semi_structured``), both float16 in eval mode, and
times their forward passes side by side (CUDA events, after warm-up), printing the ratio and the max abs logit
difference. Sparse tensor cores exist on NVIDIA GPUs of compute capability 8.0+ only: anywhere else it prints
why and exits 0.

    python bench/sparse_inference.py                                  # vit_small, vit_tiny at batch 64
    python bench/sparse_inference.py --models popup_vit_base_patch16_224 --batch-size 256
"""

from __future__ import annotations

import argparse

import timm
import torch

import timm_popup  # noqa: F401  (registers the popup_* models)
from timm_popup.convert import folded
from timm_popup.export import export_semi_structured, semi_structured_unsupported


def _time(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> float:
    """Median milliseconds of one forward (CUDA events, after warm-up)."""
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["popup_vit_small_patch16_224", "popup_vit_tiny_patch16_224"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = p.parse_args()
    reason = semi_structured_unsupported()
    if reason is not None:
        print(f"not timed: {reason}")
        return 0
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    print(f"{device}, {args.dtype}, batch {args.batch_size}, median of {args.rounds} forwards")
    print(f"{'model':36s} {'dense ms':>9s} {'2:4 ms':>9s} {'speed-up':>9s} {'sparse linears':>15s} {'max |diff|':>11s}")
    for name in args.models:
        model = timm.create_model(name, structure="2:4").eval()
        dense = folded(model).eval().to(device="cuda", dtype=dtype)
        sparse, _ = export_semi_structured(model, dtype=dtype)
        size = model.pretrained_cfg["input_size"]
        x = torch.randn(args.batch_size, *size, device="cuda", dtype=dtype)
        with torch.inference_mode():
            diff = (dense(x).float() - sparse(x).float()).abs().max().item()
        linears = [m for m in sparse.modules() if isinstance(m, torch.nn.Linear)]
        converted = sum(isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor) for m in linears)
        t_dense, t_sparse = _time(dense, x, args.rounds), _time(sparse, x, args.rounds)
        print(f"{name:36s} {t_dense:9.3f} {t_sparse:9.3f} {t_dense / t_sparse:8.2f}x "
              f"{converted:7d} of {len(linears):<5d} {diff:11.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
