"""Working directory under ``ray job submit`` and the allocator setting (vlforge.runtime)."""

from __future__ import annotations

import os

import pytest

from vlforge.runtime import in_ray_job_working_dir, persistent_workdir

pytestmark = pytest.mark.unit


def test_ray_job_working_dir_is_recognised():
    ray_copy = "/tmp/ray/session_2026-12-01_09-00-00_1_2/runtime_resources/working_dir_files/_ray_pkg_abc123"
    assert in_ray_job_working_dir(ray_copy)
    assert not in_ray_job_working_dir("/work/main")


def test_persistent_workdir_moves_out_of_the_temporary_copy(tmp_path, monkeypatch):
    ray_copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    ray_copy.mkdir(parents=True)
    monkeypatch.chdir(ray_copy)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VLFORGE_HOME", raising=False)
    said = []
    home = persistent_workdir(said.append)
    assert home == str(tmp_path / "home" / "vlforge") == os.getcwd()
    assert said and home in said[0]


def test_persistent_workdir_leaves_a_normal_run_alone_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLFORGE_HOME", raising=False)
    assert persistent_workdir(lambda _m: None) is None and os.getcwd() == str(tmp_path)
    monkeypatch.setenv("VLFORGE_HOME", str(tmp_path / "elsewhere"))
    assert persistent_workdir(lambda _m: None) == str(tmp_path / "elsewhere") == os.getcwd()
