"""A DeepSpeed op-build lock left by a killed process is removed; a live build's lock is not."""

from __future__ import annotations

import os
import time

from vlforge.train.engine import STALE_LOCK_S, clear_stale_locks


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
