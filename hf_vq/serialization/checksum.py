"""Integrity of stored tensors: a CRC32 of every tensor's bytes in the safetensors metadata, checked on load.

A flipped byte in a codes tensor (with k a power of two every byte value is a valid code) or NaN bytes in a codebook
load without any other error and silently change the model's outputs. Every file hf_vq writes carries
`hf_vq_checksums` in its metadata: `{"crc32": {tensor name: "8 hex digits"}}` over the bytes exactly as stored; every
loader (transformers on one device or with a `device_map`, timm, `load_compressed_`) checks every tensor of every
file it reads before the model is returned. Files without the key (written before checksums, or by other tools)
load unchecked. Set the environment variable `HF_VQ_VERIFY=0` (or pass `verify=False` where a loader takes it) to
skip the check, e.g. to salvage a damaged file.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from .format import CheckpointError

__all__ = ["CHECKSUMS_KEY", "VERIFY_ENV", "tensor_crc32", "checksums_json", "parse_checksums", "verify_enabled",
           "ChecksumError"]

#: The safetensors metadata key holding the checksums (JSON).
CHECKSUMS_KEY = "hf_vq_checksums"
#: Environment variable that turns verification off when set to 0 / false / no / off.
VERIFY_ENV = "HF_VQ_VERIFY"


class ChecksumError(CheckpointError):
    """A stored tensor whose bytes differ from the checksum recorded when it was saved."""


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor` as safetensors stores them (C order, native little-endian)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_crc32(tensor: torch.Tensor | memoryview | bytes) -> str:
    """CRC32 of a tensor's stored bytes (or of raw bytes), as 8 hex digits."""
    data = tensor if isinstance(tensor, (memoryview, bytes, bytearray)) else _bytes_of(tensor)
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def checksums_json(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The `hf_vq_checksums` metadata value of the tensors about to be written (tensors on meta are skipped)."""
    sums = {key: tensor_crc32(t) for key, t in state_dict.items() if t.device.type != "meta"}
    return json.dumps({"crc32": sums}, separators=(",", ":"), sort_keys=True)


def parse_checksums(metadata: Mapping[str, str], where: Any) -> dict[str, str] | None:
    """The per-tensor CRC32s of a file's metadata, or None when it records none.

    Raises:
        `ChecksumError`: if the metadata value is not hf_vq's JSON (the header was damaged).
    """
    raw = metadata.get(CHECKSUMS_KEY)
    if raw is None:
        return None
    try:
        sums = json.loads(raw)["crc32"]
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise TypeError("not a name -> hex mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise ChecksumError(f"{where}: the '{CHECKSUMS_KEY}' metadata is damaged ({err}). Re-download the file or "
                            f"save the model again (or set {VERIFY_ENV}=0 to load it unchecked).") from None
    return sums


def verify_enabled(verify: bool | None = None) -> bool:
    """Whether loaders check checksums: `verify` if given, else unless `HF_VQ_VERIFY` is 0 / false / no / off."""
    if verify is not None:
        return bool(verify)
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
