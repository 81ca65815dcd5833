"""transformers integration: load a dense model, write a compressed folder that `from_pretrained` reads.

The `HfQuantizer` that makes `from_pretrained` rebuild VQ modules lives next to this (its own issue);
this module holds what the CLI needs: loading a dense model of any architecture and writing
config.json (with `quantization_config`) + model.safetensors + tokenizer files + model card.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_folder, save_weights, size_report
from ..config import VQConfig
from .hub import render_model_card

__all__ = ["load_dense", "save_compressed"]

# Files of a transformers / sentence-transformers folder that are not weights and travel with the model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".index.json")
_SKIP_FILES = {"README.md", ".gitattributes", "config.json"}


def load_dense(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the dense model of a transformers folder with the class named in its config (`architectures[0]`)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(folder, dtype=dtype)


def save_compressed(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    base_model: str | None = None,
    fidelity: dict | None = None,
) -> Path:
    """Write a compressed transformers model as a Hugging Face folder, atomically.

    Args:
        model: a transformers `PreTrainedModel` compressed with [`hf_vq.quantize_`].
        save_directory: the output folder (replaced only once everything is written).
        source_dir: the dense model's folder; its tokenizer and other non-weight files are copied.
        base_model: Hub id of the dense model, recorded in the model card.
        fidelity: figures to print in the model card (e.g. embedding cosine to the dense model).
    """
    vq_config: VQConfig = model.vq_config
    config_dict = model.config.to_dict()
    config_dict["quantization_config"] = vq_config.to_dict()
    if base_model:
        config_dict["_name_or_path"] = base_model
    with atomic_folder(save_directory) as tmp:
        if source_dir is not None:
            for path in Path(source_dir).iterdir():
                if path.name in _SKIP_FILES or path.name.endswith(_WEIGHT_SUFFIXES) or path.name.startswith("."):
                    continue
                if path.is_dir():
                    if path.name in ("onnx", "openvino"):
                        continue
                    shutil.copytree(path, tmp / path.name)
                else:
                    shutil.copy2(path, tmp / path.name)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        save_weights(model, tmp)
        card = render_model_card(base_model=base_model, library_name="transformers", config_spec=vq_config.spec,
                                 size=size_report(model), fidelity=fidelity)
        card.save(tmp / "README.md")
    return Path(save_directory)
