"""Where a run ran: Python and package versions, the git commit, the host and the Ray cluster size.

``environment_tags()`` is what ``Tracker.log_environment`` tags a run with (``vlforge.env.*``);
``mlflow_context_tags()`` are MLflow's own source / user tags, set when a run is created.
The commit is ``VLFORGE_GIT_COMMIT`` when set, else asked of git in the checkout the ``vlforge``
package is imported from.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import vlforge

log = logging.getLogger("vlforge.tracking")

_ENV_PACKAGES = ("torch", "ray", "deepspeed", "mlflow", "transformers")


def environment_info() -> dict[str, str]:
    """Versions, git commit, hostname and (when Ray is up) cluster size, as strings."""
    from importlib import metadata

    info = {"python": sys.version.split()[0], "vlforge": vlforge.__version__}
    for pkg in _ENV_PACKAGES:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    info.update(git_info(Path(vlforge.__file__).resolve().parent))
    info["hostname"] = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                resources = ray.cluster_resources()
                info["ray.nodes"] = str(sum(1 for node in ray.nodes() if node.get("Alive")))
                info["ray.cpus"] = f"{resources.get('CPU', 0):g}"
                info["ray.gpus"] = f"{resources.get('GPU', 0):g}"
        except Exception as exc:
            log.debug("could not read the Ray cluster size: %s", exc)
    return info


def environment_tags(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``environment_info()`` and ``extra`` as ``vlforge.env.*`` tags, plus MLflow's
    ``mlflow.source.git.commit`` when the commit is known."""
    env = environment_info()
    env.update({k: str(v) for k, v in (extra or {}).items()})
    tags = {f"vlforge.env.{k}": v for k, v in env.items()}
    if env.get("git_commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = env["git_commit"]
    return tags


def mlflow_context_tags() -> dict[str, str]:
    """MLflow's context tags for a new run (source, user, git), without its run name; {} on failure."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: v for k, v in resolve_tags().items() if k != "mlflow.runName"}
    except Exception:
        return {}


def git_info(where: Path) -> dict[str, str]:
    """``git_commit`` (and ``git_dirty``) of the checkout at ``where``; ``unknown`` without git."""
    commit = os.environ.get("VLFORGE_GIT_COMMIT")
    if commit:
        return {"git_commit": commit}
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"git_commit": commit, "git_dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}
