"""Ray start-up for jobs and tests: join a cluster when there is one, else start a local one.

    init_ray(num_train_workers=2)

Inside ``ray job submit`` (``RAY_ADDRESS`` is set) this connects to the cluster and
leaves its resources alone. Without ``RAY_ADDRESS`` it always starts a Ray of its own
(``address="local"``), also when a ``ray start`` cluster runs on the machine (plain
``ray.init()`` would join that one and then refuse the CPU count); ``RAY_ADDRESS=auto``
joins it. On a laptop the local Ray's logical CPU
count leaves room for Ray Data next to the Train workers (see
``vlforge.data.pipeline`` for the plan): ``num_train_workers * worker_cpus``
for Train plus ``max(2, cores)`` for data.
"""

from __future__ import annotations

import logging
import os


def local_cpus(num_train_workers: int, worker_cpus: float = 1.0, data_cpus: int | None = None) -> int:
    cores = os.cpu_count() or 1
    data = data_cpus if data_cpus is not None else max(2, cores)
    return int(num_train_workers * worker_cpus + data + 0.999)


def init_ray(num_train_workers: int = 2, worker_cpus: float = 1.0, data_cpus: int | None = None,
             address: str | None = None, quiet: bool = True, **kwargs):
    """``ray.init`` that suits both a laptop and ``ray job submit``; a no-op when Ray is up."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    logging_level = logging.WARNING if quiet else logging.INFO
    if address:
        return ray.init(address=address, logging_level=logging_level, **kwargs)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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
