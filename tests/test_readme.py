"""The README's two commands are what CI runs, and each sets up what it needs on a fresh machine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [" ".join(line.rstrip("\\").strip() for line in block.strip().splitlines())
            for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _commands(script: Path) -> list[str]:
    """The lines of a shell script that do something (no comments, no blank lines, no `set`/`cd` preamble)."""
    lines = [line.strip() for line in script.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set -", "cd "))]


def test_ci_runs_exactly_the_two_commands_at_the_top_of_the_readme():
    readme = (ROOT / "README.md").read_text()
    top = readme[readme.index("## Quick start"):readme.index("## Use")]
    main, tests = _bash_blocks(top)
    assert (main, tests) == ("bash scripts/main.sh", "bash scripts/test.sh")
    assert _commands(ROOT / ".ci" / "run") == [main, tests]  # exactly these two, nothing installed before them


def test_the_two_commands_set_up_what_they_need_then_run_the_main_job_and_the_tests():
    readme = (ROOT / "README.md").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    # the Debian data where apt-get may install it, harmless where it may not; the package in .venv
    assert "apt-get install -y dataset-fashion-mnist" in setup and "|| true) >/dev/null 2>&1" in setup
    assert "python3 -m venv .venv" in setup and 'pip install -q -e ".[dev]"' in setup
    for name in ("main.sh", "test.sh"):
        assert ". scripts/setup.sh" in _commands(ROOT / "scripts" / name), name
    # the main job is the Training section's command (resumed when run again), the tests are pytest
    training = _bash_blocks(readme[readme.index("## Training"):])[0]
    assert training.startswith("accelerate launch train_accelerate.py --model popup_conv4 --dataset fashion-mnist")
    main = _commands(ROOT / "scripts" / "main.sh")[-1]
    assert main == f'exec {training} "${{resume[@]}}" "$@"'
    assert 'resume=(--resume latest)' in _commands(ROOT / "scripts" / "main.sh")
    assert _commands(ROOT / "scripts" / "test.sh")[-1] == 'exec python -m pytest -q "$@"'
