"""Artifact size and load time: a popup mask artifact versus the fp32 dense checkpoint of the same network.

For each architecture this writes (1) the popup artifact with ``timm_popup.save_pretrained`` and (2) the dense
model's fp32 state dict as ``model.safetensors`` (what timm publishes), then times, side by side in one run:
``timm.create_model(popup_X, pretrained=True, file=artifact)`` (regenerate the weights, verify fingerprints,
apply the mask) against ``timm.create_model(X, pretrained=True, file=dense)`` and plain ``timm.create_model(X)``.
Each load runs in a fresh subprocess, as a user's would. The popup child also regenerates every masked weight once
more after loading (``PopupMask.regenerate``, the generator alone) and reports the throughput in weights/s.

    python bench/artifact.py                     # resnet18, resnet50, wide_resnet50_2
    python bench/artifact.py --models resnet18 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import check_idle, load_line

_LOAD = r"""
import json, sys, time
import timm, torch
spec = json.loads(sys.argv[1])
if spec["plugin"]:
    import timm_popup  # noqa: F401
torch.set_num_threads(spec["threads"])
t = time.perf_counter()
kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=spec["file"])) if spec["file"] else {}
model = timm.create_model(spec["name"], **kwargs)
out = {"seconds": time.perf_counter() - t}
if spec["plugin"]:
    masks = list(timm_popup.popup_masks(model).values())
    t = time.perf_counter()
    for m in masks:
        m.regenerate(seed=m.seed, k=m.k, weight_init=m.weight_init)
    out.update(regen_seconds=time.perf_counter() - t, weights=sum(m.weight.numel() for m in masks))
print(json.dumps(out))
"""


def _timed(name: str, file: str | None, plugin: bool, threads: int) -> dict[str, float]:
    """``seconds`` to load; for popup also ``regen_seconds`` to regenerate its ``weights`` masked weights."""
    spec = json.dumps(dict(name=name, file=file, plugin=plugin, threads=threads))
    out = subprocess.run([sys.executable, "-c", _LOAD, spec], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-busy", action="store_true", help="time even when the CPU is busy (warns)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "wide_resnet50_2"])
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process loads per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    check_idle(args.allow_busy)
    print(f"{args.threads} threads")

    import safetensors.torch
    import timm

    import timm_popup

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-artifact-") as tmp:
        for arch in args.models:
            popup = timm.create_model(f"popup_{arch}")
            artifact = timm_popup.save_pretrained(popup, Path(tmp) / f"popup_{arch}") / "model.safetensors"
            dense_file = Path(tmp) / f"{arch}.safetensors"
            dense = timm.create_model(arch)
            safetensors.torch.save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(dense_file))
            del popup, dense
            times: dict[str, list[float]] = {key: [] for key in ("popup", "dense_file", "dense_init", "regen")}
            for _ in range(args.rounds):  # interleaved, so machine noise hits all three alike
                popup_run = _timed(f"popup_{arch}", str(artifact), True, args.threads)
                times["popup"].append(popup_run["seconds"])
                times["regen"].append(popup_run["regen_seconds"])
                times["dense_file"].append(_timed(arch, str(dense_file), False, args.threads)["seconds"])
                times["dense_init"].append(_timed(arch, None, False, args.threads)["seconds"])
            med = {key: statistics.median(v) for key, v in times.items()}
            row = dict(model=arch, artifact_bytes=artifact.stat().st_size, dense_bytes=dense_file.stat().st_size,
                       popup_load_s=round(med["popup"], 2), dense_load_s=round(med["dense_file"], 2),
                       dense_create_s=round(med["dense_init"], 2))
            row["size_ratio"] = round(row["dense_bytes"] / row["artifact_bytes"], 1)
            row["load_ratio"] = round(med["popup"] / med["dense_file"], 2)
            row["weights"] = popup_run["weights"]
            row["regen_weights_per_s"] = round(popup_run["weights"] / med["regen"])
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nmachine: {load_line()} (after the run)")
    print("| model | artifact | fp32 dense | dense / artifact | popup load (s) | dense load (s) | popup / dense "
          "| dense create, no weights (s) | regeneration (weights/s) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['artifact_bytes'] / 1e6:.2f} MB | {r['dense_bytes'] / 1e6:.1f} MB | "
              f"{r['size_ratio']}x | {r['popup_load_s']} | {r['dense_load_s']} | {r['load_ratio']}x | "
              f"{r['dense_create_s']} | {r['regen_weights_per_s'] / 1e6:.0f}M ({r['weights'] / 1e6:.1f}M weights) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
