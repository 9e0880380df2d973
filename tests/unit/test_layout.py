"""The package lives under platform/, which must not shadow the standard library."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cwd", [REPO, REPO / "jobs"])
def test_stdlib_platform_still_imports(cwd):
    code = "import platform, vlforge; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout
    system, path = out.split()
    assert system == "Linux"
    assert not path.startswith(str(REPO)), path


def test_platform_dir_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_cli_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "vlforge.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "data" in out
    out = subprocess.run(
        [sys.executable, "-m", "vlforge.cli", "data", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for sub in ("build-corpus", "ingest", "ls", "verify", "upload", "stream"):
        assert sub in out
