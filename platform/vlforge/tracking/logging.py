"""Rank-aware printing for code that runs on every training worker.

    from vlforge.tracking.logging import print0, get_rank

    print0(f"step {step} loss {loss:.4f}")    # printed once, by global rank 0

The rank comes from the ``RANK`` environment variable (torchrun, DeepSpeed launchers)
when set, else from the Ray Train context when this process is a Train worker, else 0
(a driver or a plain script prints).
"""

from __future__ import annotations

import builtins
import os
import sys
from typing import Any


def get_rank() -> int:
    """The global rank of this process: ``RANK``, else Ray Train's world rank, else 0."""
    env = os.environ.get("RANK")
    if env not in (None, ""):
        try:
            return int(env)
        except ValueError:
            pass
    if "ray" in sys.modules:
        try:
            import ray.train

            return int(ray.train.get_context().get_world_rank())
        except Exception:
            pass
    return 0


def _stdout():
    """``sys.stdout``, or the process's own stdout when ``print`` has been patched (Ray Train's
    workers replace it with one that both prints to a wrapped ``sys.stdout`` and logs the line,
    and the driver then showed every line twice)."""
    patched = getattr(builtins.print, "__module__", "builtins") != "builtins"
    return (sys.__stdout__ or sys.stdout) if patched else sys.stdout


def say(*args: Any, **kwargs: Any) -> None:
    """``print`` on any rank, flushed, shown once in the driver's output (see :func:`_stdout`)."""
    kwargs.setdefault("flush", True)
    kwargs.setdefault("file", _stdout())
    print(*args, **kwargs)


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on global rank 0 only; other ranks stay silent. Flushes by default; shown once
    in the driver's output also inside Ray Train workers (see :func:`_stdout`)."""
    if get_rank() == 0:
        say(*args, **kwargs)
