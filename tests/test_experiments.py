"""Sweeps: a 2x2 grid is interrupted after its first cell, resumes without re-running it, writes table and PNG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from timm_popup.experiments import Cell, _series, grid, main, read_results

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 400


def _dataset(path: Path) -> Path:
    rng = np.random.default_rng(0)

    def split(n: int) -> datasets.Dataset:
        labels = [i % 2 for i in range(n)]
        images = []
        for y in labels:  # class 1 is brighter: learnable in one epoch
            images.append(Image.fromarray(rng.integers(0, 150, (32, 32, 3), dtype=np.uint8) + np.uint8(80 * y)))
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split(48), "test": split(16)}).save_to_disk(str(path))
    return path


def test_grid_expands_and_collapses_k_for_methods_without_a_mask():
    cells = grid(["popup_conv2"], ["edge-popup", "dense"], [0.3, 0.5], seeds=[0, 1])
    assert [c.id for c in cells] == ["popup_conv2-edge-popup-k0.3-s0", "popup_conv2-edge-popup-k0.3-s1",
                                     "popup_conv2-edge-popup-k0.5-s0", "popup_conv2-edge-popup-k0.5-s1",
                                     "popup_conv2-dense-s0", "popup_conv2-dense-s1"]
    assert Cell("popup_conv4", k=0.5, width=2.0, weight_init="kaiming_normal").train_args() == [
        "--model", "popup_conv4", "--method", "edge-popup", "--seed", "0", "--k", "0.5",
        "--weight-init", "kaiming_normal", "--model-kwargs", "width=2"]


def test_series_averages_over_seeds():
    rows = [dict(model="m", method="edge-popup", k=0.5, top1=t) for t in (60.0, 70.0)] + \
           [dict(model="m", method="edge-popup", k=0.3, top1=50.0)]
    assert _series(rows, "k", ["model"]) == {("m",): [(0.3, 50.0, 0.0, 1), (0.5, 65.0, 7.0710678118654755, 2)]}


def test_bad_k_and_empty_sweep_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--out", str(tmp_path), "--model", "popup_conv2", "--k", "1.5"])
    assert "outside (0, 1]" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no finished runs" in capsys.readouterr().err


def test_interrupted_grid_resumes_without_rerunning_finished_cells(tmp_path):
    data = _dataset(tmp_path / "data")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "timm_popup.experiments", "run", "--out", str(out), "--model", "popup_conv2",
           "--k", "0.3", "0.7", "--seed", "0", "1", "--", "--dataset", str(data), "--epochs", "1",
           "--batch-size", "16", "--workers", "0", "--model-kwargs", "width=0.125", "--keep-checkpoints", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(read_results(out)) < 1:  # kill the sweep (and its running cell) once one cell has finished
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first cell did not finish in time"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished = next(iter(read_results(out)))
    stamp = (out / "runs" / finished / "metrics.jsonl").stat().st_mtime_ns

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{finished}: done, skipped" in second.stderr
    assert (out / "runs" / finished / "metrics.jsonl").stat().st_mtime_ns == stamp  # not run again

    results = read_results(out)
    assert sorted(results) == sorted(c.id for c in grid(["popup_conv2"], ks=[0.3, 0.7], seeds=[0, 1]))
    assert all(0 <= r["top1"] <= 100 and r["epochs"] == 1 for r in results.values())
    table = (out / "results.csv").read_text().splitlines()
    assert table[0].startswith("cell,model,method,k,width,weight_init,seed,top1") and len(table) == 5
    png = out / "accuracy_vs_k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in second.stdout
    assert [json.loads(line)["cell"] for line in (out / "results.jsonl").read_text().splitlines()].count(finished) == 1
