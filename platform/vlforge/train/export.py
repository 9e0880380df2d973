"""Export: one fp32 safetensors state dict + config from a training checkpoint (ZeRO 0-3).

    export_checkpoint("out/ray_results/run/checkpoint_...", "out/export/run", cfg)
    model = load_export("out/export/run")      # the single-device model, in eval mode

The directory gets ``model.safetensors`` (model-level names, fp32, no shared
tensors), ``model.json`` (registry name, overrides, method) and ``config.yaml``
(the resolved training config). Consolidation runs on CPU through DeepSpeed's
``zero_to_fp32`` (``vlforge.train.checkpoint.module_weights``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlforge.config import TrainRunConfig, dump_yaml


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: TrainRunConfig) -> Path:
    from safetensors.torch import save_file

    import torch

    from vlforge.models import create_model
    from vlforge.train.checkpoint import module_weights
    from vlforge.train.engine import fit_shapes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        reference = create_model(cfg.model, **cfg.model_overrides)
    sd = fit_shapes(module_weights(checkpoint_dir), reference)
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(checkpoint_dir)})
    (out / "model.json").write_text(json.dumps(
        {"model": cfg.model, "overrides": cfg.model_overrides, "method": cfg.method}, indent=1))
    (out / "config.yaml").write_text(dump_yaml(cfg))
    return out


def load_export(directory: str | os.PathLike):
    """The single-device model from an export directory, weights loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    from vlforge.models import create_model

    directory = Path(directory)
    spec = json.loads((directory / "model.json").read_text())
    model = create_model(spec["model"], **spec["overrides"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.eval()
