"""How far training moved a run's mask: the share of its kept weights that its initial scores already kept.

    python scripts/mask_drift.py RUN_DIR [RUN_DIR ...]

A run's initial scores are seeded (``--seed``), so the model its config.json builds without the mask holds them.
"""

from __future__ import annotations

import sys

import timm

import timm_popup


def kept_from_the_start(run_dir: str) -> float:
    """Percent of the found mask's kept weights that the initial scores' mask keeps too."""
    found = timm_popup.popup_masks(timm.create_model(f"local-dir:{run_dir}", pretrained=True))
    start = timm_popup.popup_masks(timm.create_model(f"local-dir:{run_dir}", pretrained=False))
    kept = same = 0
    for name, mask in found.items():
        now, then = mask.get_mask().bool(), start[name].get_mask().bool()
        kept += int(now.sum())
        same += int((now & then).sum())
    return 100.0 * same / kept


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print(f"{run}: {kept_from_the_start(run):.1f}% of the kept weights were kept at the start")
