"""The code passes ruff (pycodestyle, pyflakes, import order, pyupgrade), is ruff-formatted, and keeps
the import-layer contract (lint-imports); all configured in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINTED = ("platform", "jobs", "tests", "scripts")


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed (it is in the dev extras: pip install -e '.[dev]')")
    return [found]


def test_ruff_check_passes():
    out = subprocess.run(
        [*_ruff(), "check", "platform", "jobs", "tests", "scripts"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_applied():
    """``ruff format`` (its defaults, line length from pyproject.toml) leaves nothing to change."""
    out = subprocess.run([*_ruff(), "format", "--check", *LINTED], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr


def test_layer_contract_holds():
    """The import layers under [tool.importlinter] in pyproject.toml (lint-imports, from import-linter)."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail("lint-imports is not installed (import-linter is in the dev extras: pip install -e '.[dev]')")
    out = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr
    assert "1 kept, 0 broken" in out.stdout
