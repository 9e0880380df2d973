"""Ray start-up for jobs and tests: join a cluster when there is one, else start a local one.

    init_ray(num_train_workers=2)

Inside ``ray job submit`` (``RAY_ADDRESS`` is set) this connects to the cluster and
leaves its resources alone. On a laptop it starts a local Ray whose logical CPU
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
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", "vlforge.runtime.quiet_local_workers")
    return ray.init(
        num_cpus=local_cpus(num_train_workers, worker_cpus, data_cpus),
        include_dashboard=False,
        logging_level=logging_level,
        runtime_env=runtime_env,
        **kwargs,
    )


def quiet_local_workers() -> None:
    """Worker setup on a local Ray without a dashboard: Ray Train's placement-group cleaner asks the
    state API (served by the dashboard) about its controller every second and logs a warning each
    time it is unavailable; without a dashboard it always is."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
