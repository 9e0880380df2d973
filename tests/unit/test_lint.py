"""The code passes ruff (pycodestyle, pyflakes, import order, pyupgrade; rules in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed (it is in the dev extras: pip install -e '.[dev]')")
    return [found]


def test_ruff_check_passes():
    out = subprocess.run([*_ruff(), "check", "platform", "jobs", "tests", "scripts"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
