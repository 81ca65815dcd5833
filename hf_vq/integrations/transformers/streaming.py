"""Compress a transformers model folder without holding its dense weights in memory.

The architecture is built on the meta device (accelerate's `init_empty_weights`); [`hf_vq.pipeline.quantize_streaming_`]
then reads one block's tensors at a time from the folder's safetensors files (single or sharded) through
[`folder_loader`], each tensor read on its own, so memory holds the compressed model plus one dense block.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel

from ...config import VQConfig
from ...pipeline.streaming import quantize_streaming_
from ...serialization import CheckpointError, read_header, weight_files

__all__ = ["empty_model", "folder_loader", "compress_streaming"]


def empty_model(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model class of a folder's config (`architectures[0]`, or `AutoModel`), built on the meta device."""
    import transformers

    config = AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights():
        model = (cls or AutoModel)._from_config(config, dtype=dtype) if cls else AutoModel.from_config(config, dtype=dtype)
    return model.eval()


def folder_loader(folder: str | os.PathLike, model: nn.Module) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """`load(keys)` reading the named tensors of `model` from the folder's safetensors files, one tensor at a time.

    Stored keys are matched to the model's with or without its `base_model_prefix` (a `LlamaForCausalLM` folder read
    by `LlamaModel`, and the other way round).

    Raises:
        [`CheckpointError`]: if the folder has no safetensors weights (nothing pickled is read).
    """
    where: dict[str, tuple[Path, str]] = {}
    for path in weight_files(folder):
        for stored in read_header(path):
            where[stored] = (path, stored)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def locate(key: str) -> tuple[Path, str] | None:
        for candidate in (key, f"{prefix}.{key}", key[len(prefix) + 1:] if key.startswith(prefix + ".") else None):
            if candidate and candidate in where:
                return where[candidate]
        return None

    def load(keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key in keys:
            hit = locate(key)
            if hit is not None:
                by_file.setdefault(hit[0], []).append((key, hit[1]))
        out = {}
        for path, items in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key, stored in items:
                    # a copy: the tensor safetensors returns may view the file's memory map, and one such view kept
                    # (a block's norm weight) would keep the whole shard mapped, every page read counted in the RSS
                    # (measured: +0.18 GB per streamed Llama block, the size of its dense weights)
                    out[key] = f.get_tensor(stored).to(torch.float32, copy=True)
        return out

    return load


def compress_streaming(folder: str | os.PathLike, config: VQConfig, *, calibration: Any = None,
                       device: torch.device | str | None = None, progress: bool = True,
                       base_model: str | None = None, accelerator: Any = None) -> nn.Module:
    """Compress the transformers model in `folder` block by block (see the module docstring); returns the model.

    Under `accelerate launch`, pass the `PartialState` / `Accelerator` (or [`hf_vq.integrations.accelerate.launched_workers`]'s workers) as
    `accelerator`: each process reads every block and encodes its share of the layers; all end with the same model.

    Raises:
        [`CheckpointError`]: if the folder holds no safetensors weights.
        `ValueError`: for what streaming cannot do (see [`hf_vq.pipeline.quantize_streaming_`]).
    """
    if not any(Path(folder).glob("*.safetensors")):
        raise CheckpointError(f"{folder} has no safetensors weights; streaming reads safetensors only (nothing pickled).")
    model = empty_model(folder)
    quantize_streaming_(model, config, folder_loader(folder, model), calibration=calibration, device=device,
                        progress=progress, base_model=base_model, accelerator=accelerator)
    return model
