"""Export: one fp32 safetensors state dict + config from a training checkpoint (ZeRO 0-3).

    export_checkpoint("out/ray_results/run/checkpoint_...", "out/export/run", cfg)
    model = load_export("out/export/run")      # the single-device model, in eval mode

The directory is a model directory (``vlforge.models.io``): ``model.safetensors``
(model-level names, fp32, no shared tensors) and ``model.json`` (registry name,
overrides, method, VQA answers), plus ``config.yaml`` (the resolved training
config). Consolidation runs on CPU through DeepSpeed's ``zero_to_fp32``
(``vlforge.train.checkpoint.module_weights``). A distillation run exports the
student only.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlforge.config import TrainRunConfig, dump_yaml
from vlforge.models.io import build_from_spec, load_model_dir, save_model_dir
from vlforge.tasks import CAPTION_METHODS, model_spec, task_prefix
from vlforge.train.checkpoint import module_weights
from vlforge.train.engine import fit_shapes


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: TrainRunConfig) -> Path:
    import torch

    spec = model_spec(cfg)
    if cfg.method in (*CAPTION_METHODS, "vlkd"):
        reference = build_from_spec(spec)  # on the CPU: a pretrained LM or teacher refuses the meta device
    else:
        with torch.device("meta"):
            reference = build_from_spec(spec)
    sd = fit_shapes(module_weights(checkpoint_dir, task_prefix(cfg.method)), reference)
    out = save_model_dir(sd, spec, out_dir, {"source": str(checkpoint_dir)})
    (out / "config.yaml").write_text(dump_yaml(cfg))
    return out


def load_export(directory: str | os.PathLike):
    """The single-device model from an export directory, weights loaded strictly, in eval mode."""
    return load_model_dir(directory)
