"""Training checkpoints: DeepSpeed shards per rank plus ``vlforge_state.json``, and weight loading.

A checkpoint directory (one per ``ray.train.report``) holds::

    ds/                      DeepSpeed tag directory: model states, zero_pp_rank_<r>_* shards of every rank
    latest                   DeepSpeed's pointer to the tag
    vlforge_state.json       stage index and name, optimizer steps done in the stage, epoch, batches
                             consumed in that epoch, global step, world size, ZeRO stage, loss history

Every rank writes its own shard into its own local directory and reports it;
Ray Train merges the per-rank directories into one checkpoint in storage.

``module_weights(path)`` reads fp32 module weights (model-level names) from a
checkpoint directory (ZeRO 0-3, via DeepSpeed's ``zero_to_fp32``) or an export
(``model.safetensors``), for stage hand-off and ``init: <path>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from vlforge.data.storage import local_path

TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
STATE_FILE = "vlforge_state.json"


class CheckpointMismatch(RuntimeError):
    """A checkpoint that cannot be resumed as configured (e.g. another number of workers)."""


def save(engine, directory: str | os.PathLike, state: dict[str, Any], rank: int) -> Path:
    """Write this rank's DeepSpeed shard (and, on rank 0, the state file) under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # universal_checkpoint_info lets DeepSpeed's ds_to_universal convert this checkpoint (no tensor parallelism here).
    engine.save_checkpoint(
        str(directory),
        tag=TAG,
        client_state={"vlforge": state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}},
    )
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state))
    return directory


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def check_resumable(state: dict[str, Any], world_size: int, zero_stage: int, universal: bool = False) -> None:
    """Raise ``CheckpointMismatch`` unless this checkpoint can resume ``world_size`` workers at ``zero_stage``
    (another worker count needs ``universal``: a converted ``ds_universal/`` beside ``ds/``)."""
    if state["world_size"] != world_size and state["zero_stage"] > 0 and not universal:
        raise CheckpointMismatch(
            f"checkpoint of stage {state['stage']!r} (step {state['step']}) was written by "
            f"{state['world_size']} workers with ZeRO-{state['zero_stage']}; this run has {world_size}. "
            "ZeRO optimizer shards are per rank: resume with "
            f"num_workers={state['world_size']}, or set deepspeed.universal_resume=true to convert it to a "
            "DeepSpeed universal checkpoint first (by hand: python -m deepspeed.checkpoint.ds_to_universal "
            f"--input_folder <checkpoint>/{TAG} --output_folder <checkpoint>/{UNIVERSAL_TAG}), or start a new "
            "run from its weights only (stage init: <checkpoint path>)."
        )
    if state["zero_stage"] != zero_stage:
        raise CheckpointMismatch(
            f"checkpoint was written with ZeRO-{state['zero_stage']}, this run uses ZeRO-{zero_stage}; resume "
            "with the same zero_stage, or start a new run from its weights only (stage init: <checkpoint path>)."
        )


def convert_to_universal(directory: str | os.PathLike) -> Path:
    """Run DeepSpeed's ``ds_to_universal`` on ``<directory>/ds`` into ``<directory>/ds_universal`` (CPU)."""
    import subprocess
    import sys

    directory = Path(directory)
    out = directory / UNIVERSAL_TAG
    if out.is_dir():
        return out
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(directory / TAG),
            "--output_folder",
            str(out),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise CheckpointMismatch(
            f"converting {directory} to a universal checkpoint failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return out


def load(engine, directory: str | os.PathLike, universal: bool = False) -> dict[str, Any]:
    """Restore module, optimizer and schedule state into ``engine``; returns the vlforge state.
    ``universal``: from ``ds_universal/`` (the engine must be built with ``checkpoint.load_universal``)."""
    tag = UNIVERSAL_TAG if universal else TAG
    path, client = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{tag}")
    return client["vlforge"] if client and "vlforge" in client else read_state(directory)


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (others, such as a distillation task's ``teacher.*``, dropped),
    with the prefix removed; ``sd`` unchanged when no key has the prefix (an export)."""
    if prefix and any(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def module_weights(path: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """fp32 model weights from a checkpoint directory or an export; keys without ``prefix``."""
    path = Path(local_path(str(path)))
    if (path / "model.safetensors").exists() or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path if path.suffix == ".safetensors" else path / "model.safetensors"))
    tag_dir = path / TAG
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{path}: neither an export (model.safetensors) nor a checkpoint ({TAG}/)")
    if not list(tag_dir.glob("*optim_states.pt")):
        # ZeRO-0 (plain data parallel): the module state is whole in the model-states file.
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)
    return strip_prefix({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, prefix)
