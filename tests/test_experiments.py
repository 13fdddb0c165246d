"""Sweeps: a 2x2 grid is interrupted after its first cell, resumes without re-running it, writes table and PNG."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from timm_popup.experiments import SUITES, Cell, _series, grid, main, read_results, run_grid, suite_cells, suite_table

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


_FAKE_TRAIN = '''
import json, os, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
seed = int(sys.argv[sys.argv.index("--seed") + 1])
out.mkdir(parents=True, exist_ok=True)
start = time.time()
if seed == int(os.environ.get("FAIL_SEED", "-1")):
    sys.exit("this cell fails")
time.sleep(1.0)
(out / "model.safetensors").write_bytes(b"x" * (100 + seed))
(out / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, val_top1=50.0 + seed, val_top5=90.0, val_loss=1.0,
                                                   start=start, end=time.time())) + "\\n")
'''


def _fake_script(tmp_path: Path) -> Path:
    script = tmp_path / "fake_train.py"
    script.write_text(_FAKE_TRAIN)
    return script


def test_jobs_run_cells_at_once_and_a_failure_keeps_the_finished_ones(tmp_path, monkeypatch):
    script = _fake_script(tmp_path)
    cells = grid(["popup_conv2"], ks=[0.5], seeds=[0, 1, 2, 3])
    log = io.StringIO()
    results = run_grid(cells, tmp_path / "ok", train_script=script, jobs=2, log=log)
    assert sorted(results) == sorted(c.id for c in cells)
    # each cell's result has its own line, under its own number (its start line ends before it finishes)
    assert f"[4/4] {cells[3].id}: top-1 53.00% in " in log.getvalue()
    assert [results[c.id]["artifact_bytes"] for c in cells] == [100, 101, 102, 103]
    spans = [json.loads((tmp_path / "ok" / "runs" / c.id / "metrics.jsonl").read_text()) for c in cells[:2]]
    assert spans[0]["start"] < spans[1]["end"] and spans[1]["start"] < spans[0]["end"]  # the first two overlapped
    assert len(read_results(tmp_path / "ok")) == 4

    monkeypatch.setenv("FAIL_SEED", "0")
    with pytest.raises(RuntimeError, match="popup_conv2-edge-popup-k0.5-s0 failed"):
        run_grid(cells, tmp_path / "bad", train_script=script, jobs=2, log=open(os.devnull, "w"))
    # seed 1 ran beside the failing cell and is kept; nothing started after the failure
    assert list(read_results(tmp_path / "bad")) == ["popup_conv2-edge-popup-k0.5-s1"]
    assert not (tmp_path / "bad" / "runs" / cells[3].id).exists()


def test_suites_expand_to_their_rows_and_share_the_default_cells():
    options, structure = (suite_cells(SUITES[name]) for name in ("options", "structure"))
    for cells in (options, structure):
        assert len({c.id for c in cells}) == len(cells)
    by_variant = defaultdict(list)
    for c in options:
        by_variant[c.variant].append(c)
    assert {c.model for c in by_variant["learn-norm"]} == {"popup_resnet18"}  # Conv4 has no norms
    assert {c.k for c in by_variant["global-topk-density"]} == {0.05}
    constant = next(c for c in by_variant["supermask-constant"] if c.k == 0.05)
    assert constant.train_args()[-2:] == ["--score-init-constant", "-2.9444"]  # logit(0.05): starts at k
    resnet = next(c for c in by_variant["scale-fan"] if c.model == "popup_resnet18")
    assert resnet.train_args()[-3:] == ["--img-size", "28", "--scale-fan"]
    assert resnet.id.endswith("-s0-scale-fan") and by_variant[None][0].id.endswith("-s0")
    shared = {c.id for c in options} & {c.id for c in structure}
    assert shared == {c.id for c in by_variant[None] if c.k == 0.5}  # run once for both tables
    longer = suite_cells(SUITES["gem-miner"])  # another budget (--epochs 6): other cells, never a shared id
    assert not {c.id for c in longer} & {c.id for c in options} and SUITES["gem-miner"].train_args[-2:] == (
        "--epochs", "6")
    assert [c.seed for c in options[:3]] == [0, 0, 0] and options[-1].seed == 2  # seed by seed


def test_suite_table_gives_means_differences_and_sizes():
    suite = SUITES["structure"]
    rows = [dict(model="popup_conv4", variant=None, k=0.5, top1=t, artifact_bytes=2048, wall_s=1.0)
            for t in (70.0, 72.0)]
    rows += [dict(model="popup_conv4", variant="nm2-4", k=0.5, top1=t, artifact_bytes=1024, wall_s=1.0)
             for t in (69.0, 70.0)]
    table = suite_table(suite, rows)
    assert "| --k 0.5 (unstructured) | 71.00 +- 1.41 | 2.0 |" in table
    assert "| --structure 2:4 | 69.50 +- 0.71 (-1.50) | 1.0 |" in table
    assert "| --structure 2:4 |  |  |" in table  # a model without runs yet: empty cells, not an error
    assert "4 runs" in table
