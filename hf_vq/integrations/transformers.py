"""transformers integration: the user-facing side.

`import hf_vq` registers the quantizer (see `transformers_quantizer.py`), after which the plain
transformers API does everything:

```python
>>> import hf_vq
>>> from transformers import AutoModel
>>> model = AutoModel.from_pretrained("org/dense", quantization_config=hf_vq.VQConfig(k=256))  # compress on load
>>> model.save_pretrained("dense-vq")             # config.json + quantization_config, safetensors, model card
>>> model = AutoModel.from_pretrained("dense-vq")  # rebuilds the VQ modules, loads codes and codebooks
>>> dense = model.dequantize()                     # back to nn.Linear / nn.Embedding
```

This module adds what the CLI needs on top: loading a dense model of any architecture
([`load_dense`]) and writing a complete folder with tokenizer files and a model card with
fidelity figures ([`save_compressed`]).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_folder, checkpoint_size_report
from .hub import compression_record, render_model_card
from .transformers_quantizer import HfVQQuantizer, attach_, register

__all__ = ["HfVQQuantizer", "register", "load_dense", "save_compressed"]

# Files of a transformers / sentence-transformers folder that are not weights and travel with the model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".index.json")
_SKIP_FILES = {"README.md", ".gitattributes", "config.json", "generation_config.json"}


def load_dense(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the dense model of a transformers folder with the class named in its config (`architectures[0]`).

    Args:
        folder (`str` or `os.PathLike`): a local transformers model folder.
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the loaded weights.

    Returns:
        `PreTrainedModel`: the model class of `architectures[0]`, or `AutoModel` if transformers lacks it.
    """
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
    fidelity: dict[str, Any] | None = None,
    max_shard_size: int | str = "50GB",
) -> Path:
    """Write a compressed transformers model as a Hugging Face folder, atomically.

    The weights and config.json are written by `model.save_pretrained` (so the folder loads back with
    `from_pretrained` and no extra argument); the dense model's tokenizer and other non-weight files are
    copied next to them, and the model card records `base_model` and the fidelity figures.

    Args:
        model (`PreTrainedModel`): a transformers model compressed with [`hf_vq.quantize_`] or loaded
            with a `VQConfig`.
        save_directory (`str` or `os.PathLike`): the output folder, replaced only once everything is written.
        source_dir (`str` or `os.PathLike`, *optional*): the dense model's folder; its tokenizer and other
            non-weight files are copied.
        base_model (`str`, *optional*): Hub id of the dense model, recorded in the model card.
        fidelity (`dict`, *optional*): figures to print in the model card (e.g. embedding cosine to the dense model).
        max_shard_size (`int` or `str`, defaults to `"50GB"`): shard the safetensors above this size.

    Returns:
        `Path`: `save_directory`.

    Raises:
        `ValueError`: if `model` is not a compressed transformers model.
    """
    config = getattr(model, "vq_config", None)
    if config is None or attach_(model, config) is None:
        raise ValueError("save_compressed needs a transformers PreTrainedModel compressed with hf_vq.quantize_.")
    with atomic_folder(save_directory) as tmp:
        if source_dir is not None:
            for path in Path(source_dir).iterdir():
                if path.name in _SKIP_FILES or path.name.endswith(_WEIGHT_SUFFIXES) or path.name.startswith("."):
                    continue
                if path.is_dir():
                    if path.name not in ("onnx", "openvino"):
                        shutil.copytree(path, tmp / path.name)
                else:
                    shutil.copy2(path, tmp / path.name)
        type(model).save_pretrained(model, tmp, max_shard_size=max_shard_size)
        card = render_model_card(base_model=base_model, library_name="transformers", config=config,
                                 size=checkpoint_size_report(tmp), fidelity=fidelity, source_dir=source_dir,
                                 **compression_record(model))
        card.save(tmp / "README.md")
    return Path(save_directory)
