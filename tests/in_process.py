"""``train_accelerate.main(argv)`` run in the test's own process (no launcher, no subprocess): the script loaded
from its file, a fresh Accelerate state each run, the global RNG left as it was."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "train_accelerate.py"


def train_main() -> Callable[[list[str]], int]:
    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location("train_accelerate", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def main(argv: list[str]) -> int:
        rng = torch.get_rng_state()
        AcceleratorState._reset_state(True)
        try:
            return script.main(argv)
        finally:
            AcceleratorState._reset_state(True)
            torch.set_rng_state(rng)

    return main
