"""The README's two commands are what CI runs: its install line verbatim, its main command as a smoke run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_bash_block(text: str, after: str) -> str:
    section = text[text.index(after):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines())


def test_ci_runs_the_readme_install_line_and_a_smoke_run_of_the_main_command():
    readme = (ROOT / "README.md").read_text()
    install = _first_bash_block(readme, "## Install")
    main = _first_bash_block(readme, "Main job")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci  # verbatim, as one line
    assert "apt-get install -y dataset-fashion-mnist" in install
    assert install.rstrip().endswith('pip install -e ".[dev]"')
    assert "|| true) >/dev/null 2>&1;" in install  # harmless where apt-get is missing or not allowed
    smoke = [line for line in ci if line.startswith(main + " ")]
    assert len(smoke) == 1 and "--train-samples" in smoke[0] and ci.index(smoke[0]) > ci.index(install)
    assert "python -m pytest -q" in ci
    # the Training section shows the same command
    assert main in " ".join(line.rstrip("\\").strip() for line in readme[readme.index("## Training"):].splitlines())
