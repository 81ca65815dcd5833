"""Pure tensor algorithms: k-means, product and additive quantization, bit-packing. No nn.Module, no Hub."""

from .aq import aq_decode, aq_encode, aq_quantize, aq_relative_error, aq_update_codebooks, residual_init
from .kmeans import assign, kmeans
from .packing import bits_for, code_dtype, pack_codes, packed_row_bytes, unpack_codes
from .permutation import ObjectiveTerm, permutation_objective, search_permutation
from .pq import clamp_k, decode, quantize_matrix, relative_error, split_blocks

__all__ = [
    "aq_decode", "aq_encode", "aq_quantize", "aq_relative_error", "aq_update_codebooks", "residual_init",
    "assign", "kmeans", "bits_for", "code_dtype", "pack_codes", "packed_row_bytes", "unpack_codes",
    "ObjectiveTerm", "permutation_objective", "search_permutation", "clamp_k", "decode", "quantize_matrix", "relative_error", "split_blocks",
]
