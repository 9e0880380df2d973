"""Ray start-up for jobs and tests: join a cluster when there is one, else start a local one.

    init_ray(num_train_workers=2)

Inside ``ray job submit`` (``RAY_ADDRESS`` is set) this connects to the cluster and
leaves its resources alone. Without ``RAY_ADDRESS`` it always starts a Ray of its own
(``address="local"``), also when a ``ray start`` cluster runs on the machine (plain
``ray.init()`` would join that one and then refuse the CPU count); ``RAY_ADDRESS=auto``
joins it. A local Ray runs Train without Ray Train's preemption watcher (one actor
process per run, for clusters whose nodes get drained); set
``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1`` to keep it. On a laptop the local Ray's logical CPU
count leaves room for Ray Data next to the Train workers (see
``vlforge.data.pipeline`` for the plan): ``num_train_workers * worker_cpus``
for Train plus ``max(2, cores)`` for data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep glibc's allocator from handing large tensors back to the OS after every use.

    By default glibc serves allocations above 128 KiB-32 MiB with fresh ``mmap`` pages and
    unmaps them on free, so each CPU forward pass faults in and zeroes its activations again:
    measured here, EfficientNet-Lite0 at 128 px on one thread took 10.5 ms per image of which
    5.9 ms was kernel time, and 4.1 ms with no kernel time once ``mmap`` was off
    (``M_MMAP_MAX=0``) and the heap kept up to 1 GiB of freed memory (``M_TRIM_THRESHOLD``).
    Called in the driver, Train workers and decode tasks; a no-op off glibc or when done.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("VLFORGE_TUNE_MALLOC", "1") == "0":
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 1 << 30) and mallopt(m_top_pad, 64 << 20)
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


HOME_ENV = "VLFORGE_HOME"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's own switch (default on)


def in_ray_job_working_dir(cwd: str | os.PathLike | None = None) -> bool:
    """True inside the temporary copy of ``ray job submit --working-dir`` (Ray deletes it later)."""
    parts = os.path.abspath(cwd or os.getcwd()).split(os.sep)
    return "runtime_resources" in parts and any(p.startswith("working_dir_files") for p in parts)


def persistent_workdir(log=print) -> str | None:
    """Move to a directory that outlives the job when relative paths would otherwise vanish.

    Relative paths in configs (the corpus, ``storage_path``, the default ``./mlflow.db`` store
    and its ``./mlruns`` artifacts) resolve against the working directory. Under ``ray job
    submit --working-dir .`` that is Ray's temporary copy of the directory, which is deleted
    with the job's runtime resources, so the job moves to ``$VLFORGE_HOME`` (default
    ``~/vlforge``) first and says so. ``VLFORGE_HOME`` set explicitly applies to any run.
    Returns the new working directory, or None when nothing changed.
    """
    home = os.environ.get(HOME_ENV)
    if not home and not in_ray_job_working_dir():
        return None
    home = os.path.abspath(os.path.expanduser(home or "~/vlforge"))
    os.makedirs(home, exist_ok=True)
    os.chdir(home)
    log(
        f"working directory {home} (relative paths, results and the default MLflow store live here; "
        f"set {HOME_ENV} to change it)"
    )
    return home


def local_cpus(num_train_workers: int, worker_cpus: float = 1.0, data_cpus: int | None = None) -> int:
    cores = os.cpu_count() or 1
    data = data_cpus if data_cpus is not None else max(2, cores)
    return int(num_train_workers * worker_cpus + data + 0.999)


def init_ray(
    num_train_workers: int = 2,
    worker_cpus: float = 1.0,
    data_cpus: int | None = None,
    address: str | None = None,
    quiet: bool = True,
    **kwargs,
):
    """``ray.init`` that suits both a laptop and ``ray job submit``; a no-op when Ray is up."""
    import ray

    tune_malloc()
    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    logging_level = logging.WARNING if quiet else logging.INFO
    if address:
        return ray.init(address=address, logging_level=logging_level, **kwargs)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train starts a preemption watcher actor for every run, a process of its own (one was seen at
    # 9 s of CPU on 2 cores) that polls whether a node is being drained. A local Ray on one machine is
    # never drained; the driver passes this setting to each run's controller.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # The dashboard serves the state API, which Ray Train's placement-group cleaner asks whether a
    # run's controller is alive: without it, the workers' CPUs of a run whose controller was killed
    # (a trial that Tune stopped early) stay reserved until Ray shuts down. Bound to 127.0.0.1.
    return ray.init(
        address="local",
        num_cpus=local_cpus(num_train_workers, worker_cpus, data_cpus),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging_level,
        **kwargs,
    )
