"""DeepSpeed op builds: a lock left by a killed process is removed, a live build's lock is not; every
process builds with the same ninja (the one beside the interpreter), whatever PATH it was started with."""

from __future__ import annotations

import os
import sys
import time

from vlforge.train.engine import STALE_LOCK_S, clear_stale_locks, ninja_first_on_path


def test_only_stale_build_locks_are_removed(tmp_path):
    old, fresh = tmp_path / "shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    then = time.time() - STALE_LOCK_S - 60
    os.utime(old, (then, then))
    assert clear_stale_locks(str(tmp_path)) == [str(old)]
    assert not old.exists() and fresh.exists()
    assert clear_stale_locks(str(tmp_path / "absent")) == []


def test_the_ninja_beside_the_interpreter_comes_first_on_path(tmp_path, monkeypatch):
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", str(bindir)]))
    assert ninja_first_on_path() is None  # no ninja there: PATH untouched
    assert os.environ["PATH"].split(os.pathsep)[0] == "/usr/local/bin"

    (bindir / "ninja").write_text("#!/bin/sh\n")
    (bindir / "ninja").chmod(0o755)
    assert ninja_first_on_path() == str(bindir)
    assert os.environ["PATH"].split(os.pathsep) == [str(bindir), "/usr/local/bin", "/usr/bin"]
    ninja_first_on_path()  # idempotent
    assert os.environ["PATH"].split(os.pathsep) == [str(bindir), "/usr/local/bin", "/usr/bin"]
