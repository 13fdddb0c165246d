"""timm's own model contract (its tests/test_models.py) on ``popup_<name>`` beside plain ``<name>``.

For each family representative of the coverage harness (``timm_coverage.py``: the smallest model of every timm
module), in its own subprocess with a timeout, the plain timm model (the control) and its popup version go through
the checks that tools built on timm rely on:

* ``features``: ``create_model(name, features_only=True)``: one output per ``feature_info`` entry, channels as
  announced, no NaN; the popup model's feature_info (channels, reductions, module names) equals the plain one's;
* ``getter``: the same with ``feature_cls='getter'`` (``forward_intermediates``);
* ``fx_fwd``: torchvision's ``create_feature_extractor`` with timm's leaf modules and functions, eval; the traced
  graph's output equals the module's;
* ``fx_bwd``: the traced graph in training mode, backward: every trainable parameter gets a gradient (popup: the
  scores are the only trainable tensors, by design);
* ``jit``: ``torch.jit.script`` (``set_scriptable(True)``), one forward (popup: equal to the eager model's output);
* ``fx_jit``: the fx graph scripted, one forward;
* ``onnx``: ONNX export as timm's ``onnx_export.py`` does it (``exportable=True``, dynamic batch, ``onnx.checker``)
  at the TorchScript size: for plain, timm's own export of the plain model; for popup, ``timm-popup export --onnx``'s
  function, which also runs the file with ONNX Runtime and needs the popup model's top-1 on 8 images.

The summary counts, per check, the families that pass with the popup model and with the plain one; a check that
fails for popup where it passes for plain is a regression.

Usage::

    python bench/timm_contract.py --jobs 2 --threads 1 --markdown results/timm_contract/summary.md \\
        --json results/timm_contract/results.json
    python bench/timm_contract.py --families vision_transformer,resnet
    python bench/timm_contract.py --checks onnx --jobs 2 --markdown results/timm_contract/onnx.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKS = ("features", "getter", "fx_fwd", "fx_bwd", "jit", "fx_jit", "onnx")
CHECK_TITLES = {
    "features": "`features_only=True`", "getter": "`features_only=True, feature_cls='getter'`",
    "fx_fwd": "torchvision fx feature extraction, forward", "fx_bwd": "torchvision fx feature extraction, backward",
    "jit": "`torch.jit.script`", "fx_jit": "fx trace, then `torch.jit.script`",
    "onnx": "ONNX export as timm's `onnx_export.py` (popup: ONNX Runtime gives its top-1)",
}
TAG = "@@timm_contract@@ "
# timm's test sizes (tests/test_models.py): features at <= 96 px, fx and TorchScript at <= 128 px
TARGET_FEAT_SIZE, TARGET_FX_SIZE, TARGET_JIT_SIZE = 96, 128, 128


def _coverage() -> Any:
    """The coverage harness (model selection, one-line errors), loaded beside this file."""
    if "timm_coverage" not in sys.modules:
        spec = importlib.util.spec_from_file_location("timm_coverage", HERE / "timm_coverage.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["timm_coverage"]


def input_size(model: Any, target: int | None, override: Sequence[int] | None = None) -> tuple[int, ...]:
    """timm's ``_get_input_size``: the cfg's size, shrunk to ``target`` unless fixed (or its min_input_size)."""
    if override is not None:
        return tuple(override)
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size"):
        return size
    if target and max(size) > target:
        return tuple(cfg["min_input_size"]) if cfg.get("min_input_size") else tuple(min(x, target) for x in size)
    return size


def _fx_model(model: Any, train: bool = False) -> Any:
    """timm's ``_create_fx_model``: trace with timm's leaf modules / functions, return the last node(s)."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return, eval_return = [train_nodes[-1]], [eval_nodes[-1]]
    if train:  # several outputs in training mode (distilled heads): the nodes that feed the output
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=eval_return,
                                     tracer_kwargs=tracer_kwargs)


def _cat(out: Any) -> Any:
    import torch

    if isinstance(out, dict):
        out = tuple(out.values())
    return torch.cat([o.flatten(1) for o in out], 1) if isinstance(out, (tuple, list)) else out


def _feature_info(model: Any) -> list[tuple]:
    info = model.feature_info
    return list(zip(info.channels(), info.reduction(), info.module_name(), strict=True))


def plain_feature_info(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, list[list]]:
    """The plain model's feature_info for each features check, built on the meta device (no weights, no forward)."""
    import timm
    import torch

    out = {}
    for check, extra in (("features", {}), ("getter", dict(feature_cls="getter"))):
        with torch.device("meta"):
            model = timm.create_model(name, features_only=True, **dict(kwargs or {}), **extra)
        out[check] = [list(i) for i in _feature_info(model)]
    return out


def run_contract(name: str, kwargs: dict[str, Any] | None = None, *, popup: bool,
                 sizes: dict[str, Sequence[int]] | None = None, reference: dict[str, Any] | None = None,
                 report: Callable[[str, dict[str, Any]], None] | None = None,
                 checks: Sequence[str] = CHECKS) -> dict[str, Any]:
    """The ``checks`` on ``name`` (``popup_<name>`` with ``popup``): ``{check: {"ok", "reason"}}`` plus ``"info"``
    (the feature_info of each features check, which the popup run compares with the plain run's ``reference``).
    ``sizes`` overrides the input size per check group (``feat``, ``fx``, ``jit``)."""
    import timm
    import torch

    cov = _coverage()
    kwargs, sizes, reference = dict(kwargs or {}), dict(sizes or {}), dict(reference or {})
    full = ("popup_" + name) if popup else name
    out: dict[str, Any] = {"info": {}}

    def run(check: str, fn: Callable[[], str | None]) -> None:
        if check not in checks:
            return
        try:
            reason = fn()
            out[check] = dict(ok=reason is None, reason=reason or "")
        except Exception as e:
            out[check] = dict(ok=False, reason=cov._one_line(e), detail="".join(
                traceback.format_exception(e)).splitlines()[-1][:300])
        if report:
            report(check, out[check])

    def create(**extra: Any) -> Any:
        torch.manual_seed(0)
        return timm.create_model(full, **kwargs, **extra)

    def features(check: str, **extra: Any) -> str | None:
        model = create(features_only=True, **extra).eval()
        info = _feature_info(model)
        out["info"][check] = [list(i) for i in info]
        if popup and check in reference and [list(i) for i in info] != reference[check]:
            return f"feature_info differs from plain timm: {info} != {reference[check]}"
        x = torch.randn(1, *input_size(model, TARGET_FEAT_SIZE, sizes.get("feat")))
        with torch.no_grad():
            outputs = model(x)
        fmt = getattr(model, "output_fmt", "NCHW")
        axis = -1 if str(fmt).endswith("C") else 1
        if len(outputs) != len(info):
            return f"{len(outputs)} outputs for {len(info)} feature_info entries"
        for (channels, reduction, _), o in zip(info, outputs, strict=True):
            if o.shape[axis] != channels or o.shape[0] != 1 or torch.isnan(o).any():
                return f"output {tuple(o.shape)} does not match feature_info channels {channels}"
            spatial = o.shape[1:3] if axis == -1 else o.shape[-2:]
            if any(s > math.ceil(x.shape[-2 + i] / reduction) + 1 for i, s in enumerate(spatial)):
                return f"output {tuple(o.shape)} larger than reduction {reduction} allows"
        return None

    def fx_fwd() -> str | None:
        model = create().eval()
        x = torch.randn(1, *input_size(model, TARGET_FX_SIZE, sizes.get("fx")))
        with torch.no_grad():
            expected = _cat(model(x))
            got = _cat(_fx_model(model)(x))
        if not torch.equal(got, expected):
            return f"traced output differs, max |diff| {(got - expected).abs().max().item():.3g}"
        return None

    def fx_bwd() -> str | None:
        model = create(num_classes=42).train()
        x = torch.randn(2, *input_size(model, TARGET_FX_SIZE, sizes.get("fx")))
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fx = _fx_model(model, train=True)
        _cat(fx(x)).float().mean().backward()
        missing = [n for n, p in trainable.items() if p.grad is None]
        if missing:
            return f"{len(missing)}/{len(trainable)} trainable parameters without gradient: {missing[:3]}"
        if popup and not all(n.endswith(".scores") for n in trainable):
            return f"trainable tensors other than scores: {[n for n in trainable if not n.endswith('.scores')][:3]}"
        return None

    def jit(after_fx: bool) -> str | None:
        with timm.set_scriptable(True):
            model = create().eval()
        x = torch.randn(1, *input_size(model, TARGET_JIT_SIZE, sizes.get("jit")))
        scripted = torch.jit.script(_fx_model(model) if after_fx else model)
        with torch.no_grad():
            got = _cat(scripted(x))
            expected = _cat(model(x)) if popup else None
        if got.shape[0] != 1 or torch.isnan(got).any():
            return f"scripted output {tuple(got.shape)} has NaNs or the wrong batch size"
        if expected is not None and not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
            return f"scripted popup output differs from eager, max |diff| {(got - expected).abs().max().item():.3g}"
        return None

    def onnx() -> str | None:
        import tempfile

        from timm_popup.onnx_export import OnnxError, export_onnx, plain_exports

        model = create(exportable=True).eval()
        size = input_size(model, TARGET_JIT_SIZE, sizes.get("jit"))
        if not popup:
            return plain_exports(name, kwargs, input_size=size)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                export_onnx(model, Path(tmp) / "model.onnx", input_size=size)
            except OnnxError as e:
                return str(e)
        return None

    run("features", lambda: features("features"))
    run("getter", lambda: features("getter", feature_cls="getter"))
    run("fx_fwd", fx_fwd)
    run("fx_bwd", fx_bwd)
    run("jit", lambda: jit(False))
    run("fx_jit", lambda: jit(True))
    run("onnx", onnx)
    return out


# --------------------------------------------------------------------------------------------- driver


def _child(model: str, kwargs: dict[str, Any], threads: int, checks: Sequence[str] = CHECKS) -> int:
    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    if hasattr(torch._C, "_jit_set_profiling_executor"):  # as timm's tests: the legacy executor compiles slowly
        torch._C._jit_set_profiling_executor(True)
        torch._C._jit_set_profiling_mode(False)
    import timm_popup  # noqa: F401  registers popup_<name>

    plain = run_contract(model, kwargs, popup=False, checks=checks)
    print(TAG + json.dumps(dict(side="plain", result=plain)), flush=True)
    popup = run_contract(model, kwargs, popup=True, reference=plain["info"], checks=checks)
    print(TAG + json.dumps(dict(side="popup", result=popup)), flush=True)
    return 0


def run_family(family: str, model: str, *, timeout: float, threads: int,
               checks: Sequence[str] = CHECKS) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model, "--threads", str(threads),
           "--checks", ",".join(checks)]
    row: dict[str, Any] = dict(family=family, model=model, plain={}, popup={}, error="")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        stderr, row["error"] = "", f"timeout after {timeout:g} s"
    for line in stdout.splitlines():
        if line.startswith(TAG):
            data = json.loads(line[len(TAG):])
            row[data["side"]] = data["result"]
    if not row["popup"] and not row["error"]:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        row["error"] = f"child failed: {lines[-1][:200] if lines else 'no output'}"
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _ok(row: dict[str, Any], side: str, check: str) -> bool | None:
    result = row.get(side, {}).get(check)
    return None if result is None else bool(result["ok"])


def summary(rows: Sequence[dict[str, Any]], checks: Sequence[str] = CHECKS) -> list[dict[str, Any]]:
    """Per check: families passing with popup, with plain, and popup failures where plain passes."""
    out = []
    for check in checks:
        plain = [r["family"] for r in rows if _ok(r, "plain", check)]
        popup = [r["family"] for r in rows if _ok(r, "popup", check)]
        out.append(dict(check=check, plain=len(plain), popup=len(popup), families=len(rows),
                        regressions=sorted(set(plain) - set(popup)), popup_only=sorted(set(popup) - set(plain))))
    return out


def format_markdown(rows: Sequence[dict[str, Any]], wall: float | None = None, jobs: int = 1,
                    threads: int = 1, checks: Sequence[str] = CHECKS) -> str:
    import timm
    import torch

    lines = [f"timm's model contract on {len(rows)} timm family representatives (the coverage harness's "
             f"selection; timm {timm.__version__}, torch {torch.__version__}, CPU"
             + (f", {wall / 60:.1f} min with {jobs} job(s) x {threads} thread(s)" if wall else "") + ").", "",
             "| timm test | popup_ models pass | plain timm pass | popup fails where plain passes |",
             "|---|--:|--:|---|"]
    for s in summary(rows, checks):
        regress = ", ".join(s["regressions"]) or "none"
        lines.append(f"| {CHECK_TITLES[s['check']]} | {s['popup']}/{s['families']} | {s['plain']}/{s['families']} "
                     f"| {regress} |")
    lines += ["", "| family | model | " + " | ".join(checks) + " | plain fails (reason) |",
              "|---|---|" + "|".join(":-:" for _ in checks) + "|---|"]
    for r in rows:
        cells = []
        for c in checks:
            p, q = _ok(r, "popup", c), _ok(r, "plain", c)
            cells.append({(True, True): "pass", (False, False): "both fail", (True, False): "popup only",
                          (False, True): "**FAIL**"}.get((p, q), "-"))
        why = "; ".join(f"{c}: {r['plain'][c]['reason']}" for c in checks
                        if _ok(r, "plain", c) is False)[:240].replace("|", "\\|")
        lines.append(f"| {r['family']} | `{r['model']}` | " + " | ".join(cells) + f" | {r['error'] or why} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated timm modules (default: all selected)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per family (default 900)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per family (default 1)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated, of {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    if not checks or set(checks) - set(CHECKS):
        parser.error(f"--checks {args.checks}: choose among {', '.join(CHECKS)}")
    if args.one:
        return _child(args.one, {}, args.threads, checks)

    cov = _coverage()
    families = cov.select_models()["families"]
    wanted = [f.strip() for f in args.families.split(",")] if args.families else sorted(families)
    unknown = [f for f in wanted if f not in families]
    if unknown:
        parser.error(f"not a selected timm family: {', '.join(unknown)}")
    t0 = time.time()

    def one(family: str) -> dict[str, Any]:
        row = run_family(family, families[family]["model"], timeout=args.timeout, threads=args.threads,
                         checks=checks)
        bad = [c for c in checks if _ok(row, "plain", c) and not _ok(row, "popup", c)]
        status = row["error"] or ("REGRESSION " + ", ".join(bad) if bad else "ok")
        print(f"[{time.time() - t0:6.0f} s] {family:28s} {row['model']:36s} {row['seconds']:5.0f} s  {status}",
              flush=True)
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, wanted))
    wall = time.time() - t0
    print()
    for s in summary(rows, checks):
        print(f"{s['check']:9s} popup {s['popup']:3d}/{s['families']}  plain {s['plain']:3d}/{s['families']}  "
              f"popup fails where plain passes: {', '.join(s['regressions']) or 'none'}")
    print(f"wall {wall:.0f} s ({args.jobs} job(s), {args.threads} thread(s) each); load average "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(rows, wall, args.jobs, args.threads, checks))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if not any(s["regressions"] for s in summary(rows, checks)) else 1


if __name__ == "__main__":
    sys.exit(main())
