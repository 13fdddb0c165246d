"""Fuzz the artifact readers for longer than the test suite does (issue 27): real artifacts of the seven mask methods
(edge-popup, supermask, global-topk, biprop, iterand, signed-supermask, slot-machine), each case one field of the
mask file or config.json mutated (checksum recomputed), driven through the Python loader and the CLI. The harness
is tests/artifact_fuzz.py (Hypothesis; why not atheris: its docstring). Prints the cases tried, the outcomes of each
reader by kind, the process's peak resident memory and every finding (a traceback, another exception type, a
message of several lines, a case past the time bound, an allocation past the memory bound); exits 1 on a finding.

    python bench/fuzz_artifacts.py                      # 2000 cases, all readers
    python bench/fuzz_artifacts.py --cases 200 --seed 1 --readers "python local-dir" "cli info"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from artifact_fuzz import (  # noqa: E402
    CASE_SECONDS,
    MEMORY_BOUND,
    METHODS,
    READERS,
    Outcomes,
    field_space,
    make_artifacts,
    mutations,
    peak_rss,
    run_case,
)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readers", nargs="+", default=list(READERS), choices=list(READERS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="timm-popup-fuzz-") as tmp:
        root = Path(tmp)
        artifacts = make_artifacts(root / "artifacts")
        keys, paths = field_space(artifacts)
        baseline = peak_rss()
        outcomes = Outcomes()
        start = time.perf_counter()

        @hypothesis_seed(args.seed)
        @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def run(data: st.DataObject) -> None:
            method = data.draw(st.sampled_from(METHODS))
            run_case(artifacts[method], data.draw(mutations(keys[method], paths)), root / "case", outcomes,
                     tuple(args.readers))
            if outcomes.cases % 100 == 0:
                print(f"  {outcomes.cases} cases, {len(outcomes.findings)} findings", file=sys.stderr, flush=True)

        run()
        elapsed = time.perf_counter() - start
    print(f"cases tried: {outcomes.cases} ({len(keys)} methods, {sum(map(len, keys.values()))} mask-file keys, "
          f"{len(paths)} config.json paths; readers: {', '.join(args.readers)}) in {elapsed:.0f} s")
    print("outcomes by kind:")
    for kind, count in sorted(outcomes.counts.items()):
        print(f"  {kind:<55} {count}")
    print(f"peak resident memory: {peak_rss() / 2**20:.0f} MiB (after building the artifacts: {baseline / 2**20:.0f} "
          f"MiB); bound per case: {MEMORY_BOUND / 2**20:.0f} MiB of address space above the process's, "
          f"{CASE_SECONDS} s")
    print(f"findings: {len(outcomes.findings)}")
    for finding in outcomes.findings:
        print(f"  {finding}")
    return 1 if outcomes.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
