"""What a compression is, as data: the user's scheme ([`VQConfig`]), each module's layout ([`LayerLayout`]), how it
was computed ([`Recipe`]) and what came out of it ([`CompressionRecord`]). No torch modules, no Hugging Face."""

from .layout import (DEFAULT_BLOCK_SIZE, FORMAT_VERSION, LAYER_KINDS, MAX_K, METHODS, MIN_K, SHARE_SCOPES,
                     SHARED_CODEBOOKS, LayerLayout, block_size_key, fits_kernel, shared_codebooks_key)
from .record import AUTO_TUNE_BITS, AUTO_TUNE_STEPS, CompressionRecord, Recipe
from .vq_config import VQConfig

__all__ = ["FORMAT_VERSION", "LayerLayout", "VQConfig", "Recipe", "CompressionRecord", "DEFAULT_BLOCK_SIZE",
           "LAYER_KINDS", "METHODS", "SHARE_SCOPES", "SHARED_CODEBOOKS", "MIN_K", "MAX_K", "block_size_key",
           "shared_codebooks_key", "fits_kernel", "AUTO_TUNE_BITS", "AUTO_TUNE_STEPS"]
