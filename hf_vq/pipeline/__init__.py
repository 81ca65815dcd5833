"""The compression pipeline on a model: select modules and plan layouts, permute, encode, swap VQ modules in.

`quantize_` is the one verb; everything else (the CLI, transformers' `from_pretrained`, timm, scripts) calls it.
"""

from .encode import encode_unit, encoding_units, entry_weights
from .hooks import register_model_hook
from .parallel import Workers
from .permute import PermutationReport, SpaceReport, permute_, shard_groups
from .quantize import dequantize_, quantize_
from .select import fit_config, head_module, plan, select_modules, stem_module

__all__ = ["quantize_", "dequantize_", "plan", "fit_config", "select_modules", "head_module", "stem_module",
           "permute_", "shard_groups", "PermutationReport", "SpaceReport", "encode_unit", "encoding_units",
           "entry_weights", "register_model_hook", "Workers"]
