"""hf_vq: vector-quantized (PQF / additive quantization) compression for Hugging Face models.

    >>> import hf_vq
    >>> config = hf_vq.quantize_(model, hf_vq.VQConfig(k=256))   # any nn.Module, in place
    >>> hf_vq.size_report(model).ratio
"""

from .checkpoint import CheckpointError, SizeReport, checkpoint_size_report, load_compressed_, size_report
from .config import FORMAT_VERSION, LayerLayout, VQConfig
from .nn import CodesError, VQConv1D, VQConv2d, VQEmbedding, VQLinear, VQModuleMixin
from .quantize import build_skeleton_, dequantize_, plan, quantize_, vq_modules
from .permute import PermutationReport, find_channel_spaces, permute_
from .integrations import timm as _timm_integration
from .integrations import transformers_quantizer as _transformers_quantizer

_transformers_quantizer.register()  # transformers' from_pretrained understands quant_method "hf_vq"
_timm_integration.register()  # timm's create_model loads hf_vq checkpoints (registered once timm is imported)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "CodesError", "LayerLayout", "SizeReport", "VQConfig", "VQConv1D",
    "VQConv2d", "VQEmbedding", "VQLinear", "VQModuleMixin", "build_skeleton_", "checkpoint_size_report",
    "dequantize_", "find_channel_spaces", "load_compressed_", "PermutationReport", "permute_", "plan", "quantize_", "size_report", "vq_modules", "__version__",
]
