"""timm integration: load a dense timm model and write a compressed folder in timm's hf-hub layout.

The folder keeps timm's conventions (config.json with `architecture`, `num_classes`, `pretrained_cfg`)
plus the `quantization_config`, so that `timm.data.resolve_data_config` keeps working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_folder, save_weights, size_report
from ..config import VQConfig
from .hub import render_model_card

__all__ = ["load_dense", "save_compressed", "timm_config"]


def load_dense(ref: str, *, pretrained: bool = False) -> nn.Module:
    """A dense timm model from a folder written by `save_for_hf` / hf_vq, or from an architecture name."""
    import timm

    if Path(ref).is_dir():
        return timm.create_model(f"local-dir:{Path(ref).resolve()}", pretrained=True)
    if not timm.is_model(ref):
        raise ValueError(f"{ref!r} is neither a folder nor a timm architecture name (see timm.list_models()).")
    return timm.create_model(ref, pretrained=pretrained)


def timm_config(model: nn.Module) -> dict[str, Any]:
    """config.json content in timm's `save_for_hf` layout."""
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    for key in ("hf_hub_id", "url", "file", "hf_hub_filename", "source", "state_dict"):
        pretrained_cfg.pop(key, None)
    config = {
        "architecture": pretrained_cfg.pop("architecture", None) or type(model).__name__.lower(),
        "num_classes": getattr(model, "num_classes", None),
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": pretrained_cfg,
    }
    global_pool = getattr(model, "global_pool", None)
    if isinstance(global_pool, str):
        config["global_pool"] = global_pool
    return config


def save_compressed(model: nn.Module, save_directory: str | os.PathLike, *, base_model: str | None = None,
                    fidelity: dict | None = None, model_args: dict | None = None) -> Path:
    """Write a compressed timm model (config.json, model.safetensors, README.md) atomically."""
    vq_config: VQConfig = model.vq_config
    config = timm_config(model)
    if model_args:
        config["model_args"] = model_args
    config["quantization_config"] = vq_config.to_dict()
    with atomic_folder(save_directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_weights(model, tmp)
        render_model_card(base_model=base_model, library_name="timm", config_spec=vq_config.spec,
                          size=size_report(model), fidelity=fidelity).save(tmp / "README.md")
    return Path(save_directory)
