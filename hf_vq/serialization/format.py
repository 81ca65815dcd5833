"""What is written to disk: tensor names, dtypes and shapes of a compressed checkpoint, and its metadata.

A compressed folder is a regular Hugging Face model folder:

* `config.json` — the model's own config (transformers' or timm's) plus `quantization_config`, the
  [`VQConfig`] scheme and the per-module layout (no recipe: see [`hf_vq.config.Recipe`]);
* `model.safetensors` (or shards with `model.safetensors.index.json`) — for every compressed module
  `<name>.codes` (uint8 `[rows, packed_bytes]`, codes bit-packed to exactly `ceil(log2 k)` bits),
  `<name>.codebooks` (fp16 `[M, k, d]`) and, for modules with per-output-channel scales (format 3),
  `<name>.scales` (fp16 `[rows]`); every other tensor as-is. Tied modules are stored once. A codebook set shared
  by several modules (format 2) is one tensor `vq_shared_codebooks_<set>` (fp16 `[M, k, d]`; under the base-model
  prefix for transformers heads, e.g. `bert.vq_shared_codebooks_d4`) and its modules have no `<name>.codebooks`.
  The safetensors metadata carries `hf_vq_format_version`, `hf_vq_spec` and `hf_vq_record` (the
  [`CompressionRecord`] as JSON: base model, licence, recipe, calibration, permutation, fidelity).

Nothing is ever pickled.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

import torch

from ..codec.packing import bits_for, packed_row_bytes
from ..config import SHARED_CODEBOOKS, LayerLayout, VQConfig, shared_codebooks_key

__all__ = ["WEIGHTS_NAME", "INDEX_NAME", "CODES", "CODEBOOKS", "SCALES", "SAFETENSORS_DTYPES", "DTYPE_NAMES",
           "FLOAT_DTYPE_NAMES", "FOLDED_SUFFIXES", "RECORD_KEY", "CheckpointError", "is_shared_codebooks_key",
           "find_shared_key", "expected_tensors", "metadata_for"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CODES, CODEBOOKS, SCALES = "codes", "codebooks", "scales"
#: BatchNorm running statistics fold into the affine vectors (the paper's size convention).
FOLDED_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
#: The safetensors metadata key holding the compression record (JSON).
RECORD_KEY = "hf_vq_record"

#: safetensors' dtype names and the torch dtypes hf_vq reads them as
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch.int64 -> "I64", ...
FLOAT_DTYPE_NAMES = {name for name, dtype in SAFETENSORS_DTYPES.items() if dtype.is_floating_point}


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded as it is (names the file or tensor and the fix)."""


def is_shared_codebooks_key(key: str) -> bool:
    """Whether a state-dict key is a shared codebook set (`[prefix.]vq_shared_codebooks_<set>`)."""
    return key.rpartition(".")[2].startswith(SHARED_CODEBOOKS)


def find_shared_key(keys: Iterable[str], codebook_set: str) -> str | None:
    """The key of shared set `codebook_set` among `keys` (at the top level or under a base-model prefix)."""
    name = shared_codebooks_key(codebook_set)
    return next((key for key in keys if key == name or key.endswith("." + name)), None)


def expected_tensors(name: str, layout: LayerLayout, keys: Container[str]
                     ) -> dict[str, tuple[set[str], tuple[int, ...]]]:
    """The stored tensors of compressed module `name`: key -> (accepted safetensors dtypes, shape).

    Codes are bit-packed uint8 `[rows, packed_bytes]`; codebooks float `[M, k, d]`, under the module's own key or,
    for a shared set, the set's key as found in `keys` (the checkpoint's tensor names); scales float `[rows]`.
    """
    rows, cols = layout.matrix_shape
    n_codes = (cols // layout.d) * layout.num_codebooks
    codebooks_key = f"{name}.{CODEBOOKS}"
    if layout.codebook_set is not None:  # stored once for the set
        codebooks_key = find_shared_key(keys, layout.codebook_set) or shared_codebooks_key(layout.codebook_set)
    out = {f"{name}.{CODES}": ({"U8"}, (rows, packed_row_bytes(n_codes, bits_for(layout.k)))),
           codebooks_key: (FLOAT_DTYPE_NAMES, (layout.num_codebooks, layout.k, layout.d))}
    if layout.scales:
        out[f"{name}.{SCALES}"] = (FLOAT_DTYPE_NAMES, (rows,))
    return out


def metadata_for(config: VQConfig) -> dict[str, str]:
    """The safetensors metadata of a compressed checkpoint (strings only)."""
    out = {"format": "pt", "hf_vq_format_version": str(config.version), "hf_vq_spec": config.spec}
    if config.record is not None:
        out[RECORD_KEY] = config.record.to_json()
    return out


def entry_of(tensor: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    """`(safetensors dtype name, shape)` of an in-memory tensor, as [`expected_tensors`] compares them."""
    return DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape)


def as_entries(state_dict: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Header-like entries `{key: (dtype name, shape)}` of an in-memory state dict."""
    return {key: entry_of(t) for key, t in state_dict.items()}
