"""Pure tensor algorithms: k-means, product quantization, bit-packing. No nn.Module, no Hub."""

from .kmeans import assign, kmeans
from .packing import bits_for, code_dtype, pack_codes, packed_row_bytes, unpack_codes
from .permutation import ObjectiveTerm, permutation_objective, search_permutation
from .pq import clamp_k, decode, quantize_matrix, relative_error, split_blocks

__all__ = [
    "assign", "kmeans", "bits_for", "code_dtype", "pack_codes", "packed_row_bytes", "unpack_codes",
    "ObjectiveTerm", "permutation_objective", "search_permutation", "clamp_k", "decode", "quantize_matrix", "relative_error", "split_blocks",
]
