"""The GPU benchmark: edge-popup (and every other method) against the dense network, one training step at a time.

    python bench/gpu.py                  # one GPU, under 5 minutes
    python bench/gpu.py --compile        # also the popup step under torch.compile (minutes of compilation more)

A training step is SGD with momentum, bf16 autocast, channels_last (convnets), random batches already on the GPU
(the model, not the input pipeline, is measured). For resnet50 b256, wide_resnet50_2 b128 and vit_base_patch16_224
b128 it prints dense and popup ms/step (median of CUDA-event timings), img/s, the ratio and the peak-memory ratio;
then every other method on resnet50; a host-sync check of a popup step (``torch.cuda.set_sync_debug_mode``); and
CPU-vs-GPU mask equality (the C kernels on the CPU against the keyed selection on the GPU, on trained scores and on
tensors full of ties). Without a GPU it says so and prints the CPU proxy: the extra device ops a popup step
dispatches per masked tensor (bench/opcount.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import timm
import timm.data
import torch
import torch.nn.functional as F
from opcount import extra_ops_per_masked_tensor, keyed_path

import timm_popup
from timm_popup import layers
from timm_popup.methods import MethodOptions, get_method

#: model -> (batch, channels_last)
MODELS = {"resnet50": (256, True), "wide_resnet50_2": (128, True), "vit_base_patch16_224": (128, False)}
OTHER_METHODS = ("global-topk", "biprop", "signed-supermask", "slot-machine", "iterand", "supermask")


def make_step(model: torch.nn.Module, batch: int, device: torch.device, channels_last: bool = True,
              compile_model: bool = False) -> Callable[[], None]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).train().to(memory_format=fmt)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=5e-5)
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    if SMOKE.enabled:
        batch, size = 2, (size[0], 32, 32)
    x = torch.randn(batch, *size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    forward = torch.compile(model) if compile_model else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
    return step


class SMOKE:
    """``--smoke``: every line of the benchmark on the CPU with tiny inputs (its test; no figure means anything)."""

    enabled = False


def step_ms(step: Callable[[], None], reps: int, warm: int, device: torch.device) -> float:
    """Median milliseconds per step: CUDA events on a GPU, the wall clock elsewhere (smoke runs)."""
    for _ in range(warm):
        step()
    times = []
    for _ in range(reps):
        if device.type != "cuda":
            start_s = time.perf_counter()
            step()
            times.append((time.perf_counter() - start_s) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, device: torch.device, reps: int, warm: int, method: str | None = None,
            compile_model: bool = False) -> tuple[float, float]:
    """(median ms per step, peak GiB) of one model's training step."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    base = name.removeprefix("popup_")
    batch, channels_last = MODELS[base]
    kwargs = dict(img_size=32) if SMOKE.enabled and base.startswith("vit") else {}
    model = timm.create_model(name, num_classes=1000, **kwargs)
    if method not in (None, "edge-popup"):
        get_method(method).prepare(model, options=MethodOptions())
    # a slot machine's candidates and scores are 5-D (K, out, in, kh, kw): Module.to(channels_last) refuses them
    step = make_step(model, batch, device, channels_last and method != "slot-machine", compile_model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = step_ms(step, reps, warm, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 1.0
    del model, step
    return ms, peak


def sync_check(device: torch.device) -> str:
    if device.type != "cuda":
        return "host-sync check: needs CUDA (tests/test_native.py checks the keyed path's ops on the CPU)"
    step = make_step(timm.create_model("popup_resnet50", num_classes=1000), 32, device)
    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        torch.cuda.synchronize()
        return "no host sync in a popup_resnet50 training step"
    except RuntimeError as e:
        return f"HOST SYNC in a popup training step: {str(e).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def mask_equality(device: torch.device) -> str:
    model = timm.create_model("popup_resnet50", num_classes=1000)
    step = make_step(model, 16, device)
    for _ in range(3):  # trained scores, not only their initial draw
        step()
    cases = {name: (mask.scores.detach(), mask.k) for name, mask in timm_popup.popup_masks(model).items()}
    gen = torch.Generator().manual_seed(0)
    for n in (1000, 70_001) if SMOKE.enabled else (1000, 70_001, 2_359_296):
        scores = torch.randn(n, generator=gen)
        scores[: n // 3] = scores[n // 3: 2 * (n // 3)].neg()  # ties, +-v among them
        cases.update({f"ties n={n} k={k}": (scores.to(device), k) for k in (0.1, 0.5, 0.9)})
    bad = []
    for name, (scores, k) in cases.items():
        with keyed_path(device.type == "cpu"):  # a smoke run compares the keyed path on the CPU instead
            on_device = layers.topk_mask(scores, k).cpu()
        if not torch.equal(on_device, layers.topk_mask(scores.cpu(), k)):
            bad.append(name)
    checked = len(cases)
    return f"CPU (C kernels) vs GPU (keyed) masks: {checked - len(bad)}/{checked} identical" + (
        f"; DIFFERENT: {', '.join(bad)}" if bad else "")


def cpu_proxy(dense: str) -> None:
    print("no CUDA device: the GPU benchmark needs one. CPU proxy of the GPU path (the keyed selection, as "
          "TIMM_POPUP_NATIVE=0 runs it):")
    step, fwd_bwd = extra_ops_per_masked_tensor(dense, keyed=True)
    print(f"  popup_{dense} vs {dense}: {step:+.2f} leaf device ops per masked tensor per training step (optimizer "
          f"included), {fwd_bwd:+.2f} in forward + backward alone")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--methods", nargs="*", default=list(OTHER_METHODS), help="methods timed on resnet50")
    parser.add_argument("--compile", action="store_true", help="also time the popup step under torch.compile")
    parser.add_argument("--proxy-model", default="resnet50", help="without a GPU: the model of the CPU proxy")
    parser.add_argument("--smoke", action="store_true", help="run every part on the CPU, tiny inputs (a test)")
    args = parser.parse_args()
    SMOKE.enabled = args.smoke
    if not torch.cuda.is_available() and not args.smoke:
        cpu_proxy(args.proxy_model)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU smoke run (no figure means anything)"
    print(f"{where}, torch {torch.__version__}, timm {timm.__version__}; bf16 autocast, SGD, "
          f"batches on the GPU; median of {args.reps} steps after {args.warm}", flush=True)
    print(f"{'model, batch':34s} {'dense ms':>9s} {'img/s':>7s} {'popup ms':>9s} {'img/s':>7s} {'ratio':>6s} "
          f"{'memory':>7s}")
    for name in args.models:
        batch = MODELS[name][0]
        dense_ms, dense_peak = measure(name, device, args.reps, args.warm)
        popup_ms, popup_peak = measure(f"popup_{name}", device, args.reps, args.warm)
        print(f"{f'{name}, {batch}':34s} {dense_ms:9.1f} {batch / dense_ms * 1e3:7.0f} {popup_ms:9.1f} "
              f"{batch / popup_ms * 1e3:7.0f} {popup_ms / dense_ms:5.2f}x {popup_peak / dense_peak:6.2f}x", flush=True)
        if args.compile:
            c_ms, c_peak = measure(f"popup_{name}", device, args.reps, args.warm, compile_model=True)
            d_ms, d_peak = measure(name, device, args.reps, args.warm, compile_model=True)
            print(f"{f'  compiled: {name}, {batch}':34s} {d_ms:9.1f} {batch / d_ms * 1e3:7.0f} {c_ms:9.1f} "
                  f"{batch / c_ms * 1e3:7.0f} {c_ms / d_ms:5.2f}x {c_peak / d_peak:6.2f}x", flush=True)
        if name == "resnet50":
            for method in args.methods:
                ms, peak = measure("popup_resnet50", device, args.reps, args.warm, method=method)
                print(f"{f'  {method}':34s} {'':9s} {'':7s} {ms:9.1f} {batch / ms * 1e3:7.0f} {ms / dense_ms:5.2f}x "
                      f"{peak / dense_peak:6.2f}x", flush=True)
    print(sync_check(device))
    print(mask_equality(device))
    print(f"wall {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
