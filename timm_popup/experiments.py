"""Sweeps: a grid of training runs (k, width, weight distribution, method, seed), resumable, with paper-style plots.

    python -m timm_popup.experiments run --out sweeps/fmnist --model popup_conv2 popup_conv4 \\
        --k 0.1 0.3 0.5 0.7 0.9 --method edge-popup dense --seed 0 1 -- --dataset fashion-mnist --epochs 10
    python -m timm_popup.experiments plot sweeps/fmnist

Each cell is one run of ``train_accelerate.py`` (a subprocess, so cells cannot leak state into each other) in
``OUT/runs/CELL``; flags after ``--`` go to every run. A finished cell is recorded in ``OUT/results.jsonl`` and
never run again; an interrupted one resumes from its last epoch checkpoint. ``OUT/results.csv`` is the table
(every config, seed, final and best top-1, top-5, time) and ``OUT/*.png`` the figures: accuracy versus k with
dense as a horizontal line (the paper's Fig. 3), versus width (Fig. 4), by weight distribution (Fig. 7), and
edge-popup versus supermask (Fig. 6); mean +- std over seeds.

    python -m timm_popup.experiments compare [--out results/slt_fmnist]

(also what ``python -m timm_popup.experiments`` alone runs) is the strong-lottery-ticket comparison: every
mask-learning method of ``timm_popup.methods`` on Fashion-MNIST at one budget (``COMPARE_*`` below: Conv4 and
a ResNet-18 at small width, k in {0.05, 0.1, 0.3, 0.5}, 2 seeds, the same data, epochs, batch and recipe for
all), written as ``comparison.md`` (mean +- std top-1 per method, model and k) and ``slt_comparison.png``.

    python -m timm_popup.experiments suite options|structure|gem-miner [--out results/variants_fmnist] [--jobs 2]

runs a suite: rows of variants (a method and its flags, ``SUITES`` below) against the paper's default on the
same models, k and seeds, written as ``OUT/SUITE.md`` (mean +- std top-1, the difference to the default, the
artifact size). ``options``: the paper code's and the follow-ups' options; ``structure``: 2:4 masks against
unstructured k = 0.5; ``gem-miner``: Gem-Miner against edge-popup over 6 epochs. They share one directory, so
common cells run once.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._io import atomic_write

__all__ = ["Cell", "grid", "run_grid", "read_results", "write_table", "plot_results", "compare_cells",
           "comparison_table", "plot_comparison", "Variant", "Suite", "SUITES", "suite_cells", "suite_table", "main"]

RESULTS_JSONL, RESULTS_CSV = "results.jsonl", "results.csv"
_TABLE_FIELDS = ["cell", "model", "method", "k", "width", "weight_init", "seed", "top1", "best_top1", "top5",
                 "loss", "epochs", "train_time_s", "wall_s", "variant", "artifact_bytes"]  # new columns last


@dataclass(frozen=True)
class Cell:
    """One run of the grid. ``None`` leaves the value to the training script's default."""

    model: str
    method: str = "edge-popup"
    k: float | None = None
    width: float | None = None
    weight_init: str | None = None
    seed: int = 0
    options: tuple[str, ...] = ()  # the method's own flags (e.g. iterand's --redraw-every), not part of the id
    variant: str | None = None  # a suite's name for what ``options`` change (part of the id: the same cell
    # with other options is another run)

    @property
    def id(self) -> str:
        parts = [self.model, self.method]
        parts += [f"k{self.k:g}"] if self.k is not None else []
        parts += [f"w{self.width:g}"] if self.width is not None else []
        parts += [self.weight_init] if self.weight_init else []
        return "-".join([*parts, f"s{self.seed}", *([self.variant] if self.variant else [])])

    def train_args(self) -> list[str]:
        args = ["--model", self.model, "--method", self.method, "--seed", str(self.seed)]
        if self.k is not None:
            args += ["--k", f"{self.k:g}"]
        if self.weight_init:
            args += ["--weight-init", self.weight_init]
        if self.width is not None:
            args += ["--model-kwargs", f"width={self.width:g}"]
        return args + list(self.options)


# The strong-lottery-ticket comparison (``compare``): one budget for every method.
COMPARE_MODELS = {"popup_conv4": 0.5, "popup_resnet18_cifar": 0.125}  # model -> width multiplier
COMPARE_KS = (0.05, 0.1, 0.3, 0.5)
COMPARE_SEEDS = (0, 1)
# Each method's weights: the scaled distributions keep the signal's scale at small k in Conv4, which has no
# normalisation (paper section 4.5); biprop binarises normal weights (its paper's), slot machines choose among
# uniform values (theirs) and prune nothing, so k does not scale them; Gem-Miner's scores start U(0, 1) (its own).
COMPARE_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "edge-popup": ("scaled_signed_constant", ()),
    "global-topk": ("scaled_signed_constant", ()),
    "iterand": ("scaled_signed_constant", ("--redraw-every", "20", "--redraw-rate", "0.1")),
    "signed-supermask": ("scaled_signed_constant", ()),
    "biprop": ("scaled_kaiming_normal", ()),
    "slot-machine": ("kaiming_uniform", ("--slots", "8")),
    # one freezing event at the end of epoch 1 of 2 (its period of 5 epochs would leave none in this budget)
    "gem-miner": ("scaled_signed_constant", ("--freeze-every", "1")),
}
COMPARE_TRAIN_ARGS = ("--dataset", "fashion-mnist", "--epochs", "2", "--train-samples", "4000", "--val-samples",
                      "2000", "--batch-size", "64", "--workers", "0", "--log-with", "none", "--log-every", "1000")
COMPARE_OUT = "results/slt_fmnist"
COMPARE_THREADS = 1  # one compute thread per run: the same numbers on any machine (summation order)


def compare_cells(models: Mapping[str, float] = COMPARE_MODELS, ks: Sequence[float] = COMPARE_KS,
                  seeds: Sequence[int] = COMPARE_SEEDS,
                  methods: Mapping[str, tuple[str, tuple[str, ...]]] = COMPARE_METHODS) -> list[Cell]:
    """The cells of the comparison: every model (at its width) x method x k x seed, k-free methods once."""
    cells: dict[str, Cell] = {}
    for (model, width), (method, (init, options)), k, seed in itertools.product(
            models.items(), methods.items(), ks, seeds):
        cell = Cell(model, method, k if _uses_k(method) else None, width, init, seed, tuple(options))
        cells.setdefault(cell.id, cell)
    return list(cells.values())


def _method_order(method: str) -> int:
    order = list(COMPARE_METHODS)
    return order.index(method) if method in order else len(order)


def comparison_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Markdown: top-1 (mean +- std over seeds, percent) per model, method and k; k-free methods in one column."""
    series = _series([dict(r, k=r["k"] if r["k"] is not None else 1.0) for r in rows], "k", ["model", "method"])
    ks = sorted({p[0] for points in series.values() for p in points})
    lines = []
    for model in sorted({m for m, _ in series}):
        lines += [f"**{model}** (top-1 %, mean +- std over seeds)", "",
                  "| method | " + " | ".join("all weights" if k == 1.0 else f"k={k:g}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for (m, method), points in sorted(series.items(), key=lambda item: _method_order(item[0][1])):
            if m != model:
                continue
            cells = {p[0]: f"{p[1]:.2f} +- {p[2]:.2f}" for p in points}
            lines.append(f"| {method} | " + " | ".join(cells.get(k, "") for k in ks) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_comparison(out: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Top-1 versus k, one panel per model, one line per method; k-free methods (slot machines) as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        by_method = _series([r for r in mine if r["k"] is not None], "k", ["method"])
        for (method,), points in sorted(by_method.items(), key=lambda item: _method_order(item[0][0])):
            xs, means, stds, _ = zip(*points, strict=True)
            ax.errorbar([100 * x for x in xs], means, yerr=stds, marker="o", capsize=3, label=method)
        for (method,), points in _series([dict(r, k=1.0) for r in mine if r["k"] is None], "k", ["method"]).items():
            _, mean, std, _ = points[0]
            ax.axhline(mean, color="k", ls="--", label=f"{method} (all weights)")
            ax.axhspan(mean - std, mean + std, color="k", alpha=0.1)
        width = next((r["width"] for r in mine if r.get("width")), None)
        ax.set(title=model + (f" (width {width:g})" if width else ""), xlabel="% of weights kept (k)",
               ylabel="top-1 (%)", xscale="log")
        ax.minorticks_off()  # the log axis's minor labels (6x10^0 ...) would crowd the k ticks
        ax.set_xticks([100 * k for k in sorted({r["k"] for r in mine if r["k"] is not None})])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "slt_comparison.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


# Suites: variants (rows) against the paper's default on the same models, k and seeds.
@dataclass(frozen=True)
class Variant:
    """One row of a suite: a method and its flags. ``{logit_k}`` in a flag is the logit of the cell's k."""

    name: str  # the row's slug, part of each cell's id; "" is the suite's baseline
    label: str  # what the table shows: the flags a user types
    method: str = "edge-popup"
    options: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # only these models (empty: every model of the suite)
    ks: tuple[float, ...] = ()  # only these k (empty: every k of the suite)


@dataclass(frozen=True)
class Suite:
    """Variants on models (each with the flags it needs) x k x seeds, with one budget for all (``train_args``)."""

    title: str
    models: Mapping[str, tuple[float | None, tuple[str, ...]]]  # model -> (width, its flags)
    ks: tuple[float, ...]
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...]
    notes: tuple[str, ...] = ()  # what the table's reader needs: why a row is missing somewhere
    train_args: tuple[str, ...] = ()  # the suite's own budget, after SUITE_TRAIN_ARGS (so it overrides them)


SUITE_OUT = "results/variants_fmnist"
SUITE_WEIGHT_INIT = "signed_constant"  # the paper's U_k, unscaled: --scale-fan is one of the rows
# COMPARE's budget; the cifar recipe for every model (timm's ResNet-18 at 28 px would get the imagenet one)
SUITE_TRAIN_ARGS = (*COMPARE_TRAIN_ARGS, "--recipe", "cifar")
SUITE_THREADS = 1
_BASELINE = Variant("", "edge-popup (the paper's default)")
_CONV4 = {"popup_conv4": (0.5, ())}
_RESNET18 = {"popup_resnet18": (None, ("--img-size", "28"))}  # timm's ImageNet ResNet-18 on 28 px images
SUITES: dict[str, Suite] = {
    "options": Suite(
        "The paper code's options and the follow-ups' against the paper's default", {**_CONV4, **_RESNET18},
        ks=(0.05, 0.5), seeds=(0, 1, 2), variants=(
            _BASELINE,
            Variant("learn-norm", "--learn-norm", options=("--learn-norm",), models=tuple(_RESNET18)),
            Variant("learn-bias", "--learn-bias", options=("--learn-bias",), models=tuple(_RESNET18)),
            Variant("fan-out", "--init-mode fan_out", options=("--init-mode", "fan_out")),
            Variant("linear", "--nonlinearity linear", options=("--nonlinearity", "linear")),
            Variant("scale-fan", "--scale-fan", options=("--scale-fan",)),
            Variant("score-uniform", "--score-init uniform", options=("--score-init", "uniform")),
            Variant("gem-miner", "--method gem-miner --freeze-every 1", "gem-miner", ("--freeze-every", "1")),
            Variant("supermask", "--method supermask", "supermask"),
            Variant("supermask-constant", "--method supermask --score-init-constant logit(k)", "supermask",
                    ("--score-init-constant", "{logit_k}")),
            Variant("global-topk", "--method global-topk", "global-topk"),
            Variant("global-topk-density", "--method global-topk --density-epochs 1", "global-topk",
                    ("--density-epochs", "1"), ks=(0.05,)),
        ), notes=(
            "popup_conv4 has no norms and no biases: --learn-norm / --learn-bias run on the ResNet only.",
            "--density-epochs changes nothing at k >= 0.5 (biprop's schedule starts at 0.5): run at k = 0.05 only.",
            "Gem-Miner freezes once, at the end of epoch 1 of 2 (--freeze-every 1).",
        )),
    "structure": Suite(
        "2:4 structured masks against unstructured k = 0.5",
        {**_CONV4, **_RESNET18, "popup_vit_tiny_patch16_224": (None, ("--model-kwargs", "patch_size=4",
                                                                      "--img-size", "28"))},
        ks=(0.5,), seeds=(0, 1, 2), variants=(
            Variant("", "--k 0.5 (unstructured)"),
            Variant("nm2-4", "--structure 2:4", options=("--structure", "2:4")),
        )),
    # Gem-Miner is made for many freezing events: 6 epochs give it 5 (the options suite's 2 epochs give it one)
    "gem-miner": Suite(
        "Gem-Miner against edge-popup over 6 epochs", {**_CONV4, **_RESNET18}, ks=(0.05, 0.5), seeds=(0, 1, 2),
        variants=(
            Variant("ep6", "edge-popup"),
            Variant("gem-miner-ep6", "--method gem-miner --freeze-every 1", "gem-miner", ("--freeze-every", "1")),
        ), notes=("6 epochs (--epochs 6): Gem-Miner freezes at the end of epochs 1 to 5.",),
        train_args=("--epochs", "6")),
}


def suite_cells(suite: Suite) -> list[Cell]:
    """The suite's cells, seed by seed (a sweep stopped early has every row on its first seeds)."""
    cells = []
    for seed, variant, (model, (width, flags)), k in itertools.product(
            suite.seeds, suite.variants, suite.models.items(), suite.ks):
        if (variant.models and model not in variant.models) or (variant.ks and k not in variant.ks):
            continue
        logit_k = f"{math.log(k / (1 - k)):.4f}" if 0 < k < 1 else "0"
        options = tuple(o.format(logit_k=logit_k) for o in variant.options)
        cells.append(Cell(model, variant.method, k if _uses_k(variant.method) else None, width, SUITE_WEIGHT_INIT,
                          seed, (*flags, *options), variant.name or None))
    return cells


def suite_table(suite: Suite, rows: Iterable[Mapping[str, Any]]) -> str:
    """Markdown: per model, a row per variant, per k its top-1 (mean +- std over seeds), the difference to the
    baseline's mean and the mean artifact size."""
    by_cell: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cell[(r["model"], r.get("variant") or "", r["k"])].append(r)
    lines = [f"**{suite.title}** (top-1 %, mean +- std over seeds {', '.join(map(str, suite.seeds))}; "
             "in brackets the difference to the first row; artifact in KiB)", ""]
    for model, (width, flags) in suite.models.items():
        shown = " ".join([model, *([f"width {width:g}"] if width else []), *flags])
        lines += [f"*{shown}*", "", "| variant | " + " | ".join(f"k={k:g} | KiB" for k in suite.ks) + " |",
                  "|---|" + "---|---|" * len(suite.ks)]
        base = {k: by_cell.get((model, suite.variants[0].name, k)) for k in suite.ks}
        for variant in suite.variants:
            if variant.models and model not in variant.models:
                continue
            cells = []
            for k in suite.ks:
                runs = by_cell.get((model, variant.name, k))
                if not runs:
                    cells += ["", ""]
                    continue
                mean, std = _mean_std([r["top1"] for r in runs])
                text = f"{mean:.2f} +- {std:.2f}"
                if variant is not suite.variants[0] and base[k]:
                    text += f" ({mean - _mean_std([r['top1'] for r in base[k]])[0]:+.2f})"
                sizes = [r["artifact_bytes"] for r in runs if r.get("artifact_bytes")]
                cells += [text, f"{sum(sizes) / len(sizes) / 1024:.1f}" if sizes else ""]
            lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
        lines.append("")
    walls = [r["wall_s"] for r in rows if r.get("wall_s")]
    lines.append(f"{len(walls)} runs, {sum(walls) / 60:.1f} minutes of run wall time in all.")
    lines += [f"- {note}" for note in suite.notes]
    return "\n".join(lines) + "\n"


def _uses_k(method: str) -> bool:
    """Whether ``--k`` means anything to a method (dense learns no mask): a k axis collapses for the others."""
    from .methods import METHODS

    return method not in METHODS or METHODS[method].uses_k


def grid(models: Sequence[str], methods: Sequence[str] = ("edge-popup",), ks: Sequence[float | None] = (None,),
         widths: Sequence[float | None] = (None,), weight_inits: Sequence[str | None] = (None,),
         seeds: Sequence[int] = (0,)) -> list[Cell]:
    """Every combination, in a stable order; a method that takes no k gets one cell for the whole k axis."""
    cells: dict[str, Cell] = {}
    for model, method, k, width, init, seed in itertools.product(models, methods, ks, widths, weight_inits, seeds):
        cell = Cell(model, method, k if _uses_k(method) else None, width, init, seed)
        cells.setdefault(cell.id, cell)
    return list(cells.values())


def read_results(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Finished cells by id (a torn last line from a killed sweep is ignored: that cell simply runs again)."""
    path = Path(out) / RESULTS_JSONL
    results = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[row["cell"]] = row
    return results


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise RuntimeError(f"{run_dir} finished without a logged epoch")
    last = rows[-1]
    artifact = run_dir / "model.safetensors"
    return dict(top1=last["val_top1"], best_top1=max(r["val_top1"] for r in rows), top5=last["val_top5"],
                loss=last["val_loss"], epochs=last["epoch"], train_time_s=last.get("train_time_s"),
                artifact_bytes=artifact.stat().st_size if artifact.is_file() else None)


def default_train_script() -> Path:
    # the recipe lives beside the package in a source checkout; elsewhere pass --train-script
    return Path(__file__).resolve().parents[1] / "train_accelerate.py"


def run_grid(cells: Iterable[Cell], out: str | os.PathLike, train_args: Sequence[str] = (), *,
             train_script: str | os.PathLike | None = None, launcher: Sequence[str] = (),
             log: Any = sys.stderr, threads: int | None = None, jobs: int = 1) -> dict[str, dict[str, Any]]:
    """Run every cell not yet in ``out/results.jsonl``; returns all results. Resumable at any point. ``threads``
    pins each run's compute threads (results depend on the summation order, so on the thread count); ``jobs``
    runs that many cells at once (each its own process; with ``threads`` 1, one per core)."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    script = Path(train_script) if train_script else default_train_script()
    if not script.is_file():
        raise FileNotFoundError(f"training script {script} not found: pass --train-script path/to/train_accelerate.py")
    if jobs < 1:
        raise ValueError(f"jobs {jobs}: run at least one cell at a time")
    cells = list(cells)
    done = read_results(out)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None

    stop = threading.Event()  # set by a failed cell: the others start no more runs

    def run(i: int, cell: Cell) -> dict[str, Any] | None:
        if stop.is_set():
            return None
        run_dir = out / "runs" / cell.id
        resumed = (run_dir / "checkpoints").is_dir()
        cmd = [*(launcher or [sys.executable]), str(script), *cell.train_args(), *train_args,
               "--output-dir", str(run_dir), "--resume", "latest"]  # starts fresh when there is no checkpoint
        print(f"[{i}/{len(cells)}] {cell.id}: {'resuming' if resumed else 'running'}", file=log, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "sweep.log").write_text(proc.stdout)
        if proc.returncode != 0:
            stop.set()
            tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
            raise RuntimeError(f"cell {cell.id} failed (exit {proc.returncode}); log: {run_dir / 'sweep.log'}\n{tail}")
        wall = round(time.perf_counter() - start, 1)
        return dict(cell=cell.id, **asdict(cell), **_final_metrics(run_dir), wall_s=wall)

    todo: dict[str, tuple[int, Cell]] = {}
    for i, cell in enumerate(cells, 1):
        if cell.id in done:
            print(f"[{i}/{len(cells)}] {cell.id}: done, skipped", file=log, flush=True)
        else:
            todo.setdefault(cell.id, (i, cell))
    errors = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, i, cell): i for i, cell in todo.values()}
        for future in as_completed(futures):
            if future.exception() is not None:
                errors.append(future.exception())
            elif (row := future.result()) is not None:  # recorded as it finishes: a killed sweep keeps it
                # several cells run at once, so the line that started one no longer ends with its result
                print(f"[{futures[future]}/{len(cells)}] {row['cell']}: top-1 {row['top1']:.2f}% in {row['wall_s']} s",
                      file=log, flush=True)
                with open(out / RESULTS_JSONL, "a") as f:  # one line per finished cell, appended whole
                    f.write(json.dumps(row) + "\n")
                done[row["cell"]] = row
                write_table(done.values(), out / RESULTS_CSV)
    if errors:
        raise errors[0]
    return done


def write_table(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """The results table as CSV (written atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_TABLE_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _series(rows: Iterable[Mapping[str, Any]], x: str, group: Sequence[str]) -> dict[tuple, list[tuple]]:
    """``{group values: [(x, mean top-1, std, n seeds), ...]}``, sorted by x, averaging over seeds."""
    acc: dict[tuple, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(x) is not None:
            acc[tuple(r.get(g) for g in group)][r[x]].append(r["top1"])
    return {g: [(xv, *_mean_std(v), len(v)) for xv, v in sorted(points.items())] for g, points in acc.items()}


def plot_results(out: str | os.PathLike, rows: Iterable[Mapping[str, Any]] | None = None) -> list[Path]:
    """Draw the paper-style figures the results allow; returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = list(rows if rows is not None else read_results(out).values())
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        written.append(out / name)

    def errorbars(ax: Any, points: list[tuple], label: str, **kw: Any) -> None:
        xs, means, stds, _ = zip(*points, strict=True)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label, **kw)

    models = sorted({r["model"] for r in rows})
    masked = [r for r in rows if _uses_k(r["method"])]
    flat = _series([r for r in rows if not _uses_k(r["method"])], "seed", ["model", "method", "width"])

    # Fig. 3: top-1 versus k, one panel per model, dense (learned weights) as a horizontal band
    if len({r["k"] for r in masked}) > 1:
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            for (method, init, width), pts in _series([r for r in masked if r["model"] == model], "k",
                                                      ["method", "weight_init", "width"]).items():
                label = " ".join([method, *([init] if init else []), *([f"w{width:g}"] if width else [])])
                errorbars(ax, [(100 * p[0], *p[1:]) for p in pts], label)
            for (m, method, width), pts in flat.items():  # dense: one value per seed, drawn across all k
                if m == model:
                    mean, std = _mean_std([p[1] for p in pts])
                    ax.axhline(mean, color="k", ls="--", label=method + (f" w{width:g}" if width else ""))
                    ax.axhspan(mean - std, mean + std, color="k", alpha=0.1)
            ax.set(title=model, xlabel="% of weights kept (k)", ylabel="top-1 (%)")
            ax.legend(fontsize=7)
        save(fig, "accuracy_vs_k.png")

    # Fig. 4: top-1 versus width, one line per k (and dense)
    if len({r["width"] for r in rows if r["width"] is not None}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for (model, method, k), pts in _series(rows, "width", ["model", "method", "k"]).items():
            errorbars(ax, pts, f"{model} {method}" + (f" k={k:g}" if k is not None else ""))
        ax.set(xlabel="width multiplier", ylabel="top-1 (%)", title="accuracy versus width")
        ax.legend(fontsize=7)
        save(fig, "accuracy_vs_width.png")

    # Fig. 7: by weight distribution, one line per distribution over k
    if len({r["weight_init"] for r in masked}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for (model, init), pts in _series(masked, "k", ["model", "weight_init"]).items():
            errorbars(ax, [(100 * p[0], *p[1:]) for p in pts], f"{model} {init or 'default'}")
        ax.set(xlabel="% of weights kept (k)", ylabel="top-1 (%)", title="by weight distribution")
        ax.legend(fontsize=7)
        save(fig, "accuracy_by_distribution.png")

    # Fig. 6: edge-popup versus supermask (Zhou et al.)
    if {"edge-popup", "supermask"} <= {r["method"] for r in rows}:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        pairs = [r for r in rows if r["method"] in ("edge-popup", "supermask")]
        for (model, method), pts in _series(pairs, "k", ["model", "method"]).items():
            errorbars(ax, [(100 * p[0], *p[1:]) for p in pts], f"{model} {method}")
        ax.set(xlabel="% of weights kept (k)", ylabel="top-1 (%)", title="edge-popup versus supermask")
        ax.legend(fontsize=7)
        save(fig, "edge_popup_vs_supermask.png")
    return written


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # the module alone runs the comparison the README shows
        argv = ["compare"]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m timm_popup.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a grid, then write the table and plots")
    run.add_argument("--out", required=True, help="sweep directory (results, runs, plots)")
    run.add_argument("--model", nargs="+", required=True)
    run.add_argument("--method", nargs="+", default=["edge-popup"])
    run.add_argument("--k", nargs="+", type=float, default=[None])
    run.add_argument("--width", nargs="+", type=float, default=[None])
    run.add_argument("--weight-init", nargs="+", default=[None])
    run.add_argument("--seed", nargs="+", type=int, default=[0])
    run.add_argument("--train-script", default=None, help="path to train_accelerate.py (default: the checkout's)")
    run.add_argument("--launcher", default=None, help="prefix for each run, e.g. 'accelerate launch' "
                                                      "(default: this Python)")
    compare = sub.add_parser("compare", help="the strong-lottery-ticket comparison on Fashion-MNIST (resumable)")
    compare.add_argument("--out", default=COMPARE_OUT, help=f"sweep directory (default {COMPARE_OUT})")
    compare.add_argument("--seed", nargs="+", type=int, default=list(COMPARE_SEEDS))
    compare.add_argument("--k", nargs="+", type=float, default=list(COMPARE_KS))
    compare.add_argument("--model", nargs="+", default=list(COMPARE_MODELS), choices=list(COMPARE_MODELS))
    compare.add_argument("--method", nargs="+", default=list(COMPARE_METHODS), choices=list(COMPARE_METHODS))
    compare.add_argument("--train-script", default=None, help="path to train_accelerate.py (default: the checkout's)")
    suite = sub.add_parser("suite", help="a suite of variants against the paper's default (resumable)")
    suite.add_argument("name", choices=list(SUITES))
    suite.add_argument("--out", default=SUITE_OUT, help=f"sweep directory (default {SUITE_OUT})")
    suite.add_argument("--jobs", type=int, default=1, help="runs at once, each on one compute thread (default 1)")
    suite.add_argument("--train-script", default=None, help="path to train_accelerate.py (default: the checkout's)")
    plot = sub.add_parser("plot", help="(re)draw the table and plots of a sweep directory")
    plot.add_argument("out")
    args = parser.parse_args(argv)
    for k in getattr(args, "k", None) or []:
        if k is not None and not 0 < k <= 1:
            parser.error(f"--k {k} is outside (0, 1]: k is the fraction of weights KEPT")
    return args, train_args


def main(argv: Sequence[str] | None = None) -> int:
    args, train_args = _parse(argv)
    if args.command == "run":
        cells = grid(args.model, args.method, args.k, args.width, args.weight_init, args.seed)
        try:
            results = run_grid(cells, args.out, train_args, train_script=args.train_script,
                               launcher=args.launcher.split() if args.launcher else ())
        except (RuntimeError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        del results  # the table and figures cover every finished cell in --out, earlier grids' included
    if args.command == "compare":
        cells = compare_cells({m: COMPARE_MODELS[m] for m in args.model}, args.k, args.seed,
                              {m: COMPARE_METHODS[m] for m in args.method})
        print(f"strong-lottery-ticket comparison: {len(cells)} runs into {args.out} (resumable)", file=sys.stderr)
        try:
            rows = list(run_grid(cells, args.out, [*COMPARE_TRAIN_ARGS, *train_args], train_script=args.train_script,
                                 threads=COMPARE_THREADS).values())
        except (RuntimeError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        write_table(rows, Path(args.out) / RESULTS_CSV)
        table = comparison_table(rows)
        atomic_write(Path(args.out) / "comparison.md", lambda tmp: Path(tmp).write_text(table))
        print(table)
        print(plot_comparison(args.out, rows))
        return 0
    if args.command == "suite":
        chosen = SUITES[args.name]
        cells = suite_cells(chosen)
        print(f"suite {args.name}: {len(cells)} runs into {args.out} (resumable)", file=sys.stderr)
        try:
            results = run_grid(cells, args.out, [*SUITE_TRAIN_ARGS, *chosen.train_args, *train_args],
                               train_script=args.train_script, threads=SUITE_THREADS, jobs=args.jobs)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        write_table(results.values(), Path(args.out) / RESULTS_CSV)
        table = suite_table(chosen, [results[c.id] for c in cells])
        atomic_write(Path(args.out) / f"{args.name}.md", lambda tmp: Path(tmp).write_text(table))
        print(table)
        return 0
    rows = list(read_results(args.out).values())
    if args.command == "plot":
        if not rows:
            print(f"error: {args.out} holds no finished runs ({RESULTS_JSONL}): run a sweep first", file=sys.stderr)
            return 2
    write_table(rows, Path(args.out) / RESULTS_CSV)
    for path in plot_results(args.out, rows):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
