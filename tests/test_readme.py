"""The README's two commands are what CI runs, each sets up what it needs on a fresh machine, and its examples run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


# Runs in a fresh process (huggingface_hub reads HF_ENDPOINT at import) in an empty directory: the README's Python
# blocks verbatim, then its command-line block, against a loopback Hub that holds what they name.
_EXAMPLES = r"""
import json, os, re, shlex, subprocess, sys
import timm, timm_popup

readme = open(sys.argv[1]).read()
use, routes = re.findall(r"```python\n(.*?)```", readme, re.S)
# what the blocks name: two artifacts, the registry tag's mask and org/name on this Hub
timm_popup.save_pretrained(timm.create_model("popup_resnet18", num_classes=10), "out/popup_resnet18")
timm_popup.save_pretrained(timm.create_model("popup_resnet50", num_classes=10), "out/popup_resnet50")
registry = timm.models.get_pretrained_cfg("popup_wide_resnet50_2").hf_hub_id
timm_popup.push_to_hub(timm.create_model("popup_wide_resnet50_2", seed=4), registry)
timm_popup.push_to_hub(timm.create_model("popup_conv4", seed=2), "org/name")
use_ns = {}
exec(use, use_ns)  # the Use section (writes out/popup_conv4)
loaded = {}
exec(routes.replace("timm.create_model(", "loaded[len(loaded)] = timm.create_model("), {"loaded": loaded})
commands = re.findall(r"```bash\n(timm-popup .*?)```", readme, re.S)[0]
ran = []
for line in commands.splitlines():
    argv = shlex.split(line, comments=True)
    if argv[1] in ("eval", "prepare"):  # ImageNet is not here; tests/test_cli.py and tests/test_prepare.py run
        continue                         # them on generated datasets
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
    ran.append(argv[1])
features = [tuple(f.shape) for f in use_ns["backbone"](use_ns["images"])]
print(json.dumps(dict(seeds=[m.popup_config.seed for m in loaded.values()], ran=ran, features=features,
                      plain=sorted(os.listdir("out/resnet50-plain")))))
"""


def test_the_readmes_python_and_command_line_examples_run(tmp_path):
    try:
        from hub_server import HubServer, client_env
    except ImportError:  # tests/ turned into a package
        from tests.hub_server import HubServer, client_env

    work = tmp_path / "work"
    work.mkdir()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # timm-popup of this Python
    with HubServer() as endpoint:
        proc = subprocess.run([sys.executable, "-c", _EXAMPLES, str(ROOT / "README.md")], cwd=work,
                              env=client_env(endpoint, tmp_path / "hf_home", PATH=path), capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tensor(0.5000)" in proc.stdout  # the Use block's printed density
    # the registry tag, hf-hub: and local-dir: routes each built the seeded network their mask was found on
    assert result["seeds"] == [4, 2, 1]
    assert result["ran"] == ["info", "export", "export", "push"]
    assert result["plain"] == ["config.json", "model.safetensors"]
    assert result["features"] == [[2, 256, 56, 56], [2, 512, 28, 28], [2, 1024, 14, 14]]  # the backbone's stages


def test_every_figure_the_readme_states_is_the_one_its_docs_state():
    """The README quotes its figures from docs/ (where each has its command and load): a figure measured again and
    changed in one place only would leave two values."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    docs = " ".join(" ".join(path.read_text().split()) for path in sorted((ROOT / "docs").glob("*.md")))
    figures = re.findall(r"[+]\d+\.\d+\b|\d+\.\d+%|\d+(?:\.\d+)?x\b|\d+(?:\.\d+)? [MG]B\b|\d+ img/s|\d+ s wall|"
                         r"\d+/\d+ families", readme)
    assert len(figures) >= 12  # the Measured table, the main job and the coverage figures
    assert [f for f in figures if f not in docs] == []
