"""hf_vq: vector-quantized (PQF / additive quantization) compression for Hugging Face models.

    >>> import hf_vq
    >>> config = hf_vq.quantize_(model, hf_vq.VQConfig(k=256))   # any nn.Module, in place
    >>> hf_vq.size_report(model).ratio

The public names are imported on first use (so `import hf_vq.codec` imports no transformers, timm or
huggingface_hub); `import hf_vq` registers hf_vq with transformers and timm as soon as either is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .integrations import install as _install_integrations

__version__ = "0.1.0"

#: public name -> the module defining it
_EXPORTS = {
    "FORMAT_VERSION": "config", "LayerLayout": "config", "VQConfig": "config", "Recipe": "config",
    "CompressionRecord": "config",
    "CodesError": "nn", "VQConv2d": "nn", "VQEmbedding": "nn", "VQLinear": "nn", "VQModuleMixin": "nn",
    "build_skeleton_": "nn", "vq_modules": "nn",
    "VQConv1D": "integrations.transformers",
    "quantize_": "pipeline", "dequantize_": "pipeline", "plan": "pipeline", "permute_": "pipeline",
    "PermutationReport": "pipeline", "fit_config": "pipeline",
    "find_channel_spaces": "graph",
    "CheckpointError": "serialization", "SizeReport": "serialization", "checkpoint_size_report": "serialization",
    "load_compressed_": "serialization", "size_report": "serialization",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_vq' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .config import FORMAT_VERSION, CompressionRecord, LayerLayout, Recipe, VQConfig
    from .graph import find_channel_spaces
    from .integrations.transformers import VQConv1D
    from .nn import CodesError, VQConv2d, VQEmbedding, VQLinear, VQModuleMixin, build_skeleton_, vq_modules
    from .pipeline import PermutationReport, dequantize_, fit_config, permute_, plan, quantize_
    from .serialization import CheckpointError, SizeReport, checkpoint_size_report, load_compressed_, size_report

_install_integrations()  # transformers' from_pretrained and timm's create_model understand hf_vq checkpoints
