"""timm's own tests/test_models.py (our version: tests/test_timm_registry.py) on popup_ models beside plain ones.

Runs the test file twice with pytest, on ``popup_<name>`` and on plain ``<name>`` (``TIMM_REGISTRY_PLAIN=1``), for
the models matching ``--models`` (timm name filters; the test file's default is timm's tiny ``test_*`` models;
``'*'`` is every timm model, hours), and prints, per timm test, how many pass / fail / skip for each, then every
test that fails for the popup model where it passes for the plain one (a regression; the exit status is 1 if any).

Usage::

    python bench/timm_registry.py                                  # timm's test_* models (about 10 min, 2 cores)
    python bench/timm_registry.py --models 'resnet18,efficientnet_b0,vit_tiny_*' -- -x
    python bench/timm_registry.py --json results/timm_registry/test_models.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_timm_registry.py"


def run(plain: bool, models: str, extra: list[str]) -> dict[str, str]:
    """``{test id without the popup_ prefix: passed / failed / skipped}`` of one pytest run."""
    env = dict(os.environ, TIMM_REGISTRY_PLAIN="1" if plain else "0")
    env["TIMM_REGISTRY_MODELS"] = models
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS),
                        f"--junitxml={report}", *extra], env=env, cwd=ROOT, check=False)
        if not report.exists():
            raise SystemExit("pytest wrote no report: see its output above")
        outcomes = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            outcome = {"failure": "failed", "error": "failed"}.get(kind, kind)
            outcomes[re.sub(r"\bpopup_", "", case.get("name"))] = outcome
        return outcomes


_RANK = {"passed": 0, "skipped": 1, "failed": 2}


def by_architecture(outcomes: dict[str, str]) -> dict[str, str]:
    """Outcomes keyed without pretrained tags (timm's ``include_tags`` lists plain ``test_resnet.r160_in1k`` where
    the popup model, which has no trained weights, is ``test_resnet``): an architecture's worst outcome."""
    out: dict[str, str] = {}
    for test, outcome in outcomes.items():
        key = re.sub(r"\.[^\]\-]+\]$", "]", test)
        out[key] = max(out.get(key, "passed"), outcome, key=_RANK.__getitem__)
    return out


def summarize(popup: dict[str, str], plain: dict[str, str]) -> list[str]:
    """Print the per-test counts; return the tests popup fails where plain passes."""
    kinds = list(dict.fromkeys(test.split("[")[0] for test in [*popup, *plain]))  # in the order they ran
    width = max(map(len, kinds)) + 2
    print(f"\n{'timm test':{width}} {'popup pass/fail/skip':>22} {'plain pass/fail/skip':>22}")
    for kind in [*kinds, None]:
        cells = []
        for outcomes in (popup, plain):
            c = Counter(o for t, o in outcomes.items() if kind is None or t.split("[")[0] == kind)
            cells.append(f"{c['passed']}/{c['failed']}/{c['skipped']}")
        print(f"{kind or 'all':{width}} {cells[0]:>22} {cells[1]:>22}")
    popup_arch, plain_arch = by_architecture(popup), by_architecture(plain)
    regressions = sorted(t for t, o in plain_arch.items() if o == "passed" and popup_arch.get(t) != "passed")
    print(f"popup fails where plain passes: {len(regressions)}" + "".join(f"\n  {t}" for t in regressions))
    return regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="test_*", help="comma-separated timm name filters (default: test_*)")
    parser.add_argument("--json", default=None, help="also write every test's outcome for both runs here")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    popup = run(False, args.models, args.pytest_args)
    plain = run(True, args.models, args.pytest_args)
    regressions = summarize(popup, plain)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"popup": popup, "plain": plain}, indent=1) + "\n")
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
