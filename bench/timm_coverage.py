"""Edge-popup coverage of timm: the smallest model of every timm model family through six checks.

For each module of ``timm.list_modules()`` (a "family") the smallest registered model (parameters counted on
the meta device, cached in ``timm_coverage_models.json`` beside this script) is run in its own subprocess,
with a timeout, through:

* (a) build + convert: ``timm_popup.convert`` on the plain model; the registry route ``popup_<name>`` builds
  the same frozen tensors;
* (b) train step: only scores are trainable, and every score tensor gets a non-zero gradient;
* (c) coverage: every weight tensor (>= 2 dims) of the plain model is masked, every other parameter frozen
  by a named policy;
* (d) k=1: the folded k=1 network equals plain timm loaded with the same weights;
* (e) save -> load: ``save_pretrained`` then ``timm.create_model("local-dir:DIR", pretrained=True)`` (config.json
  read and checked, the model rebuilt from it alone) gives bitwise-equal logits;
* (export): ``timm-popup export DIR OUT`` on that artifact, loaded by plain timm's ``local-dir:`` loader, gives the
  popup model's logits; and the checkpoint of the weight-learning methods (``save_dense``, here of a
  random subnetwork) reloads with the same logits.

Usage::

    python bench/timm_coverage.py                          # every family, summary table
    python bench/timm_coverage.py --families beit,nfnet --markdown results/timm_coverage.md
    python bench/timm_coverage.py --refresh                # recount the smallest model of each family
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SELECTION_FILE = HERE / "timm_coverage_models.json"
#: families whose smallest model is larger than this are skipped (named in the summary)
MAX_PARAMS = 150_000_000
CHECKS = ("a", "b", "c", "d", "e", "export")
CHECK_TITLES = {
    "a": "build + convert", "b": "forward/backward, every score gets a gradient",
    "c": "every weight masked or frozen by a policy", "d": "k=1 equals plain timm",
    "e": "save -> load bitwise", "export": "plain timm checkpoint; dense checkpoint",
}
# A child reports each finished check on its own stdout line behind this tag, so a parent that has to kill it
# (timeout) still knows which checks had finished and which one hung.
TAG = "@@timm_coverage@@ "
K, SEED = 0.5, 0
BATCH = 2  # BatchNorm in train mode needs more than one value per channel
ATOL = RTOL = 1e-5


# --------------------------------------------------------------------------------------------- results


@dataclass
class Check:
    """One check's outcome: ``ok`` is None when it did not run (an earlier check failed, or a timeout)."""

    ok: bool | None = None
    reason: str = ""
    detail: str = ""  # traceback tail, for the report; never in the table

    @property
    def label(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.ok]


@dataclass
class FamilyResult:
    family: str
    model: str
    params: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=lambda: {c: Check() for c in CHECKS})
    seconds: float = 0.0
    k1_max_diff: float | None = None  # check (d): max |popup - plain| of the logits
    k1_bitwise: bool | None = None
    error: str = ""  # the run itself failed: timeout, crash

    @property
    def passed(self) -> bool:
        return not self.error and all(c.ok for c in self.checks.values())

    def reason(self) -> str:
        """One line: the run error, or each failing check's reason."""
        parts = [self.error] if self.error else []
        parts += [f"{name}: {c.reason}" for name, c in self.checks.items() if c.ok is False]
        return "; ".join(parts)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilyResult:
        data = dict(data)
        data["checks"] = {name: Check(**c) for name, c in data.get("checks", {}).items()}
        return cls(**data)


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message (file:line in function)`` of the innermost frame outside torch."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
    # "Error(s) in loading state_dict for X:" says nothing without the next line (which keys)
    msg = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    frames = traceback.extract_tb(e.__traceback__)
    where = next((f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1] if frames else None)
    loc = f" ({Path(where.filename).name}:{where.lineno} in {where.name})" if where else ""
    return f"{type(e).__name__}: {msg}{loc}"


def _tail(e: BaseException, lines: int = 12) -> str:
    tail = "".join(traceback.format_exception(e)).rstrip().splitlines()[-lines:]
    return "\n".join(line if len(line) <= 400 else line[:397] + "..." for line in tail)  # strict-load key lists


# --------------------------------------------------------------------------------------------- selection


def _count_family(module: str) -> dict[str, Any]:
    """Parameter count of every model of ``module``, built on the meta device (no memory, no init cost)."""
    import timm
    import torch
    from timm.models._registry import _module_to_models

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    for name in sorted(_module_to_models[module]):
        if name.startswith("popup_"):  # timm_popup's own registry entries are not timm families
            continue
        try:
            with torch.device("meta"):
                model = timm.create_model(name)
            counts[name] = sum(p.numel() for p in model.parameters())
        except Exception as e:  # deprecated aliases raise; the family still has other models
            failures[name] = _one_line(e)
    return dict(counts=counts, failures=failures)


def select_models(refresh: bool = False, jobs: int = 1, path: Path = SELECTION_FILE,
                  max_params: int = MAX_PARAMS) -> dict[str, Any]:
    """The smallest model of every timm family: ``{"families": {family: {model, params}}, "skipped": ...}``.

    The parameter counts of every model are cached in ``path``; they are rebuilt only with ``refresh`` or for
    another timm version (another ``max_params`` re-picks from the cached counts).
    """
    import timm

    cached = json.loads(path.read_text()) if path.is_file() and not refresh else {}
    if cached.get("timm") == timm.__version__ and "counts" in cached:
        counts, failures, seconds = cached["counts"], cached["meta_failures"], cached["seconds"]
    else:
        modules = [m for m in timm.list_modules() if not m.startswith("popup")]
        t0 = time.time()
        if jobs > 1:
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(jobs) as pool:
                counted = dict(zip(modules, pool.map(_count_family, modules), strict=True))
        else:
            counted = {m: _count_family(m) for m in modules}
        counts = {m: found["counts"] for m, found in counted.items()}
        failures = {name: why for found in counted.values() for name, why in found["failures"].items()}
        seconds = round(time.time() - t0, 1)
    families, skipped = {}, {}
    for module, found in counts.items():
        if not found:
            continue
        # fewest parameters, then the shortest, then alphabetical name: a stable choice across reruns
        name = min(found, key=lambda n: (found[n], len(n), n))
        entry = dict(model=name, params=found[name], candidates=len(found))
        (families if entry["params"] <= max_params else skipped)[module] = entry
    selection = dict(timm=timm.__version__, max_params=max_params, seconds=seconds, families=families,
                     skipped=skipped, unbuildable=sorted(m for m, found in counts.items() if not found),
                     meta_failures=failures, counts=counts)
    if selection != cached:
        path.write_text(json.dumps(selection, indent=1, sort_keys=True) + "\n")
    return selection


# --------------------------------------------------------------------------------------------- the checks


def _first_tensor(out: Any) -> Any:
    """The first tensor of a model output (tensor, tuple/list, or dict)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _input_shape(model: Any, kwargs: dict[str, Any], input_size: Sequence[int] | None) -> tuple[int, ...]:
    """(C, H, W): an explicit ``input_size``, else the ``img_size`` kwarg, else the model's pretrained cfg."""
    if input_size is not None:
        return tuple(input_size)
    chans = kwargs.get("in_chans", 3)
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        return (chans, h, w)
    return tuple(model.pretrained_cfg["input_size"])


def _names(names: Iterable[str], limit: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def _logits(model: Any, x: Any) -> Any:
    import torch

    model.eval()
    with torch.no_grad():
        return _first_tensor(model(x)).float()


def check_train_step(popup: Any, x: Any) -> str | None:
    """Check (b); returns the failure reason or None."""
    import timm_popup

    masks = timm_popup.popup_masks(popup)
    popup.train()
    for module in popup.modules():
        # Stochastic depth can drop a whole branch for every sample of a 2-image batch (nest_tiny, nextvit_small
        # at their default drop_path_rate): a zero gradient by chance, not a masking failure. Dropout too.
        if "Drop" in type(module).__name__:
            module.eval()
    scores = {id(m.scores): name for name, m in masks.items()}
    trainable = {name for name, p in popup.named_parameters() if p.requires_grad and id(p) not in scores}
    frozen_scores = [name for name, m in masks.items() if not m.scores.requires_grad]
    problems = []
    if trainable:
        problems.append(f"{len(trainable)} trainable non-score parameters: {_names(sorted(trainable))}")
    if frozen_scores:
        problems.append(f"{len(frozen_scores)} scores not trainable: {_names(frozen_scores)}")
    popup.zero_grad(set_to_none=True)
    out = _first_tensor(popup(x))
    loss = out.float().pow(2).mean()
    loss.backward()
    no_grad = [name for name, m in masks.items() if m.scores.grad is None]
    zero = [name for name, m in masks.items() if m.scores.grad is not None and not m.scores.grad.any()]
    bad = [name for name, m in masks.items() if m.scores.grad is not None and not m.scores.grad.isfinite().all()]
    if no_grad:
        problems.append(f"{len(no_grad)}/{len(masks)} scores without .grad: {_names(no_grad)}")
    if zero:
        problems.append(f"{len(zero)}/{len(masks)} scores with all-zero grad: {_names(zero)}")
    if bad:
        problems.append(f"{len(bad)} scores with non-finite grad: {_names(bad)}")
    popup.zero_grad(set_to_none=True)
    return "; ".join(problems) or None


def check_coverage(popup: Any, plain: Any) -> str | None:
    """Check (c): every plain parameter is either masked (weights, >= 2 dims; a fan-in-1 weight, whose every
    entry is a whole output, may instead keep all its seeded values: policy ``weight:all``) or frozen by a named
    policy."""
    import fnmatch

    import timm_popup

    masks = timm_popup.popup_masks(popup)
    config = popup.popup_config
    frozen, dense = dict(config.frozen), tuple(config.dense)
    plain_params = dict(plain.named_parameters())
    unmasked, unfrozen, shape = [], [], []
    for name, p in plain_params.items():
        # dense globs name modules, and a dense module keeps its submodules' parameters too
        owners = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        if dense and any(fnmatch.fnmatchcase(owner, pat) for owner in owners for pat in dense):
            continue
        leaf = name.rpartition(".")[2]
        if leaf.startswith("weight") and p.ndim >= 2:
            if name not in masks and frozen.get(name) != "weight:all":
                unmasked.append(name)
            elif name not in masks:
                continue
            elif tuple(masks[name].weight.shape) != tuple(p.shape):
                shape.append(f"{name} {tuple(masks[name].weight.shape)} != {tuple(p.shape)}")
        elif name not in frozen and name not in masks:
            unfrozen.append(name)
    unknown = [n for n in list(masks) + list(frozen) if n not in plain_params]
    problems = []
    if unmasked:
        problems.append(f"{len(unmasked)} weights not masked: {_names(unmasked)}")
    if unfrozen:
        problems.append(f"{len(unfrozen)} parameters neither masked nor frozen: {_names(unfrozen)}")
    if shape:
        problems.append(f"shape mismatch: {_names(shape)}")
    if unknown:
        problems.append(f"{len(unknown)} masked/frozen names not in the plain model: {_names(unknown)}")
    return "; ".join(problems) or None


def _same_frozen(a: Any, b: Any) -> str | None:
    """Whether two popup models hold the same masked and frozen tensors (convert vs registry route)."""
    import torch

    import timm_popup

    ma, mb = timm_popup.popup_masks(a), timm_popup.popup_masks(b)
    if set(ma) != set(mb):
        return f"masked tensors differ: {_names(sorted(set(ma) ^ set(mb)))}"
    differ = [n for n in ma if not torch.equal(ma[n].weight, mb[n].weight)]
    if differ:
        return f"{len(differ)} frozen weights differ: {_names(differ)}"
    if a.popup_config.frozen != b.popup_config.frozen:
        return "popup_config.frozen differs"
    return None


def run_checks(model_name: str, kwargs: dict[str, Any] | None = None, *, family: str = "",
               input_size: Sequence[int] | None = None, report: Callable[[str, Check], None] | None = None,
               workdir: str | os.PathLike | None = None) -> FamilyResult:
    """All checks on ``model_name`` built with ``kwargs``; ``report(check, outcome)`` after each one."""
    import safetensors.torch
    import timm
    import torch

    import timm_popup

    def dense_state_dict(model: Any) -> dict[str, Any]:
        from timm_popup.export import dense_state_dict  # imported late: a missing export fails its checks only

        return dense_state_dict(model)

    kwargs = dict(kwargs or {})
    result = FamilyResult(family=family or model_name, model=model_name, kwargs=kwargs)
    t0 = time.time()
    report = report or (lambda name, check: None)

    def run(name: str, fn: Callable[[], str | None]) -> bool:
        check = result.checks[name]
        try:
            reason = fn()
            check.ok, check.reason = reason is None, reason or ""
        except Exception as e:
            check.ok, check.reason, check.detail = False, _one_line(e), _tail(e)
        report(name, check)
        return bool(check.ok)

    def build(popup: bool, k: float = K) -> Any:
        torch.manual_seed(0)  # the plain init consumes the global generator; make both routes see the same
        model = timm.create_model(model_name, **kwargs)
        return timm_popup.convert(model, k=k, seed=SEED) if popup else model

    state: dict[str, Any] = {}

    def a() -> str | None:
        state["plain"] = plain = build(popup=False)
        result.params = sum(p.numel() for p in plain.parameters())
        state["popup"] = popup = build(popup=True)
        if not timm_popup.popup_masks(popup):
            return "no tensor was masked"
        torch.manual_seed(0)
        registry = timm.create_model("popup_" + model_name, k=K, seed=SEED, **kwargs)
        differs = _same_frozen(popup, registry)
        return f"registry route popup_{model_name}: {differs}" if differs else None

    if not run("a", a):
        result.seconds = time.time() - t0
        return result
    plain, popup = state["plain"], state["popup"]
    shape = _input_shape(plain, kwargs, input_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=gen)
    xe = x[:1]  # eval comparisons need no batch statistics: one image halves their cost on the large models

    run("b", lambda: check_train_step(popup, x))
    run("c", lambda: check_coverage(popup, plain))

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        logits = _logits(popup, xe)

        def e() -> str | None:
            # as a user loads a found mask: config.json read (and checked) by timm's local-dir: loader, the model
            # rebuilt from its model_args alone
            timm_popup.save_pretrained(popup, tmp / "artifact")
            loaded = timm.create_model(f"local-dir:{tmp / 'artifact'}", pretrained=True)
            again = _logits(loaded, xe)
            if torch.equal(logits, again):
                return None
            return f"reloaded logits differ, max |diff| {(logits - again).abs().max().item():.3g}"

        def export() -> str | None:
            from timm_popup import cli
            from timm_popup.methods import make_dense, make_random_subnet, save_dense

            # `timm-popup export ARTIFACT OUT` (fold, compare the logits, write timm's files, shared modules too),
            # then plain timm's local-dir: loader, as a user of the exported checkpoint would
            if not (tmp / "artifact" / "config.json").is_file():
                timm_popup.save_pretrained(popup, tmp / "artifact")
            if cli.main(["export", str(tmp / "artifact"), str(tmp / "plain")]) != 0:
                return "timm-popup export failed (its one line is above)"
            loaded = timm.create_model(f"local-dir:{tmp / 'plain'}", pretrained=True)
            again = _logits(loaded, xe)
            if not torch.allclose(logits, again, rtol=RTOL, atol=ATOL):
                return f"plain timm logits differ, max |diff| {(logits - again).abs().max().item():.3g}"
            # the weight-learning methods' checkpoint (dense, finetune, random-subnet all write it with save_dense):
            # random-subnet has both kinds of tensor, fixed-mask weights and frozen tensors made trainable again
            trained = make_random_subnet(build(popup=True))
            save_dense(trained, tmp / "dense")
            reloaded = make_dense(build(popup=True))
            reloaded.load_state_dict(safetensors.torch.load_file(str(tmp / "dense" / "model.safetensors")))
            want, got = _logits(trained, xe), _logits(reloaded, xe)
            if not torch.allclose(want, got, rtol=RTOL, atol=ATOL):
                diff = (want - got).abs().max().item()
                return f"the save_dense checkpoint reloads with other logits, max |diff| {diff:.3g}"
            return None

        run("e", e)
        run("export", export)

    def d() -> str | None:
        popup1 = build(popup=True, k=1.0)
        masks = timm_popup.popup_masks(popup1)
        partial = [n for n, m in masks.items() if not bool(m.get_mask().all())]
        plain.load_state_dict(dense_state_dict(popup1), strict=True)
        y1, y = _logits(popup1, xe), _logits(plain, xe)
        result.k1_max_diff = (y1 - y).abs().max().item()
        result.k1_bitwise = torch.equal(y1, y)
        problems = [f"{len(partial)} masks not all-ones at k=1: {_names(partial)}"] if partial else []
        if not torch.allclose(y1, y, rtol=RTOL, atol=ATOL):
            problems.append(f"k=1 logits differ from plain timm, max |diff| {result.k1_max_diff:.3g}")
        return "; ".join(problems) or None

    run("d", d)
    result.seconds = time.time() - t0
    return result


# --------------------------------------------------------------------------------------------- driver


def _child(family: str, model: str, kwargs: dict[str, Any], threads: int) -> int:
    """``--one``: run the checks in this process, one tagged JSON line per check and one for the result."""
    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)

    def report(name: str, check: Check) -> None:
        print(TAG + json.dumps(dict(check=name, **asdict(check))), flush=True)

    result = run_checks(model, kwargs, family=family, report=report)
    print(TAG + json.dumps(dict(result=asdict(result))), flush=True)
    return 0


def _parse_child(result: FamilyResult, stdout: str) -> bool:
    """Fill ``result`` from a child's tagged lines; True when the final result line was there."""
    for line in stdout.splitlines():
        if not line.startswith(TAG):
            continue
        data = json.loads(line[len(TAG):])
        if "result" in data:
            final = FamilyResult.from_dict(data["result"])
            result.__dict__.update({k: v for k, v in final.__dict__.items() if k != "family"})
            return True
        name = data.pop("check")
        result.checks[name] = Check(**data)
    return False


def run_family(family: str, model: str, kwargs: dict[str, Any] | None = None, *, timeout: float = 600,
               threads: int = 1) -> FamilyResult:
    """The checks on one family in a subprocess: a crash or hang there becomes this family's error."""
    kwargs = dict(kwargs or {})
    result = FamilyResult(family=family, model=model, kwargs=kwargs)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", family, "--model", model,
           "--kwargs", json.dumps(kwargs), "--threads", str(threads)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        _parse_child(result, stdout)
        running = next((c for c, check in result.checks.items() if check.ok is None), "?")
        result.error = f"timeout after {timeout:g} s in check {running}"
        result.seconds = time.time() - t0
        return result
    if not _parse_child(result, stdout):
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        result.error = f"child exited {rc}: {lines[-1][:200] if lines else 'no output'}"
    result.seconds = time.time() - t0
    return result


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _k1_cell(r: FamilyResult) -> str:
    if r.k1_max_diff is None:
        return "-"
    return "0 (bitwise)" if r.k1_bitwise else f"{r.k1_max_diff:.1g}"


def format_table(results: Sequence[FamilyResult], width: int = 110) -> str:
    """The terminal summary: one row per family, the failure reason cut to ``width`` characters."""
    head = ["family", "model", "params", *CHECKS, "k=1 |diff|", "s", "reason"]
    rows = [[r.family, r.model, _fmt_params(r.params), *(r.checks[c].label for c in CHECKS), _k1_cell(r),
             f"{r.seconds:.0f}", (lambda s: s if len(s) <= width else s[:width - 3] + "...")(r.reason())]
            for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_markdown(results: Sequence[FamilyResult], selection: dict[str, Any] | None = None,
                    wall: float | None = None) -> str:
    """The README table: the checks, the run conditions, one row per family, the skipped families."""
    import timm
    import torch

    passed = sum(r.passed for r in results)
    lines = [
        f"{passed}/{len(results)} timm families pass every check "
        f"(timm {timm.__version__}, torch {torch.__version__}, CPU"
        + (f", {wall / 60:.1f} min" if wall is not None else "") + ").",
        "",
        "Checks: " + "; ".join(f"**{c}** {CHECK_TITLES[c]}" for c in CHECKS) + ".",
        "",
        "| family | model | params | " + " | ".join(CHECKS) + " | k=1 \\|diff\\| | reason |",
        "|---|---|--:|" + "|".join(":-:" for _ in CHECKS) + "|--:|---|",
    ]
    for r in results:
        cells = [r.family, f"`{r.model}`", _fmt_params(r.params), *(r.checks[c].label for c in CHECKS),
                 _k1_cell(r), _md_escape(r.reason() if len(r.reason()) <= 300 else r.reason()[:297] + "...")]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = (selection or {}).get("skipped") or {}
    if skipped:
        lines += ["", f"Skipped (smallest model above {MAX_PARAMS / 1e6:.0f}M parameters): " + ", ".join(
            f"{fam} (`{e['model']}`, {_fmt_params(e['params'])})" for fam, e in sorted(skipped.items())) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help="comma-separated timm modules (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per family (default 600)")
    parser.add_argument("--jobs", type=int, default=1, help="families run at once (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per family (default cores/jobs)")
    parser.add_argument("--markdown", type=Path, help="write the summary table as Markdown here")
    parser.add_argument("--json", type=Path, help="write every result (with tracebacks) as JSON here")
    parser.add_argument("--refresh", action="store_true", help="recount the smallest model of every family")
    parser.add_argument("--one", metavar="FAMILY", help=argparse.SUPPRESS)  # the per-family child
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    if args.one:
        return _child(args.one, args.model, json.loads(args.kwargs), threads)

    t0 = time.time()
    selection = select_models(refresh=args.refresh, jobs=args.jobs)
    families = selection["families"]
    wanted = [f.strip() for f in args.families.split(",")] if args.families else sorted(families)
    unknown = [f for f in wanted if f not in families]
    if unknown:
        skipped = [f for f in unknown if f in selection["skipped"]]
        parser.error(f"not a selected timm family: {', '.join(unknown)}"
                     + (f" ({', '.join(skipped)} above {MAX_PARAMS / 1e6:.0f}M parameters)" if skipped else ""))

    def one(family: str) -> FamilyResult:
        r = run_family(family, families[family]["model"], timeout=args.timeout, threads=threads)
        status = "pass" if r.passed else "FAIL " + r.reason()[:150]
        print(f"[{time.time() - t0:6.0f} s] {family:28s} {r.model:36s} {r.seconds:5.0f} s  {status}", flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, wanted))
    wall = time.time() - t0
    print()
    print(format_table(results))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{sum(r.passed for r in results)}/{len(results)} families pass; wall {wall:.0f} s "
          f"({args.jobs} job(s), {threads} thread(s) each); load average {load}")
    if selection["skipped"] and not args.families:
        print("skipped (> {:.0f}M parameters): {}".format(MAX_PARAMS / 1e6, ", ".join(
            f"{f} ({e['model']}, {_fmt_params(e['params'])})" for f, e in sorted(selection["skipped"].items()))))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(results, selection, wall))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
