"""The package's C sources (``csrc/``), compiled on first use with the system C compiler into a per-user cache and
loaded with ctypes, so the package needs no build step: a wheel is pure Python, and where no compiler (or no
library a source links) is found, each caller keeps a pure-PyTorch path.

A library is cached under a tag of its source, the compiler and its version, the flags and the platform: a change
to any of them compiles anew, and a cached file is only ever replaced whole (compiled to a temp file, renamed).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SOURCES", "cache_dir", "load"]

#: the C sources shipped with the package
SOURCES = Path(__file__).with_name("csrc")


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$TIMM_POPUP_CACHE``, else ``$XDG_CACHE_HOME/timm_popup`` (~/.cache)."""
    if os.environ.get("TIMM_POPUP_CACHE"):
        return Path(os.environ["TIMM_POPUP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "timm_popup"


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    return shlex.split(cc)


def _compile(cc: list[str], flags: Sequence[str], source: Path, libraries: Sequence[str], target: Path) -> None:
    """Compile into a temp file beside ``target``, renamed onto it on success."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*cc, *flags, str(source), "-o", tmp, *libraries]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: str, variants: Sequence[tuple[Sequence[str], Sequence[str]]]) -> tuple[ctypes.CDLL, list[str]]:
    """``csrc/<source>`` compiled (once per user, cached) and loaded. ``variants``: what to try in order, each the
    flags (before the source) and the libraries (after it); the first that compiles is kept. Returns the library
    and why each variant before it failed (empty when the first compiled, or the cached file was loaded). Raises
    RuntimeError when none compiles."""
    path = SOURCES / source
    cc = _compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:
        raise RuntimeError(f"{' '.join(cc)} --version failed")
    tag = hashlib.sha256("\0".join([path.read_text(), " ".join(cc), version.stdout, repr(list(map(list, variants))),
                                    sys.platform, platform.machine()]).encode()).hexdigest()[:16]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{path.stem}-{tag}.so"
    failures: list[str] = []
    if not target.exists():
        for flags, libraries in variants:
            try:
                _compile(cc, flags, path, libraries, target)
                break
            except RuntimeError as err:
                failures.append(str(err))
        else:
            raise RuntimeError("; ".join(failures))
    return ctypes.CDLL(str(target)), failures
