"""Reading checkpoint files: headers (names, dtypes, shapes, metadata) and tensors, never unpickling anything."""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from collections.abc import Container
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import CompressionRecord, VQConfig
from .checksum import CHECKSUMS_KEY, VERIFY_ENV, ChecksumError, parse_checksums, tensor_crc32, verify_enabled
from .format import INDEX_NAME, RECORD_KEY, SAFETENSORS_DTYPES, WEIGHTS_NAME, CheckpointError
from .pin import shown

__all__ = ["Header", "read_header", "load_weights", "verify_files", "check_same_save", "weight_files",
           "read_config_json", "read_quantization_config"]


class Header(dict):
    """The header of one safetensors file: `{key: (dtype name, shape)}`, with its `metadata` and `path`."""

    def __init__(self, path: Path, entries: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        super().__init__(entries)
        self.path, self.metadata = path, metadata


def _raw_header(f, path: Path) -> tuple[dict[str, Any], int, int]:
    """The parsed JSON header of an open safetensors file, its size and the file's size."""
    total, size = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
    if not 0 < size <= total - 8:
        raise ValueError(f"a header of {size} bytes does not fit a file of {total} bytes")
    header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, size, total


def read_header(path: str | os.PathLike) -> Header:
    """Names, dtypes and shapes of a safetensors file's tensors, and its metadata (reads only the header).

    Raises:
        [`CheckpointError`]: if the file is missing, not safetensors, truncated or corrupted.
    """
    path = Path(path)
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(f"{shown(path)}: hf_vq checkpoints are safetensors only (nothing pickled is loaded); "
                              "re-save the model with save_pretrained / save_compressed.")
    if not path.is_file():
        raise CheckpointError(f"{shown(path)} does not exist: the folder is not a complete hf_vq checkpoint.")
    try:
        with open(path, "rb") as f:
            header, size, total = _raw_header(f, path)
        metadata = header.pop("__metadata__", None) or {}
        entries = {}
        for key, info in header.items():
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= total - 8 - size:
                raise ValueError(f"tensor {key!r} lies outside the file")
            entries[key] = (str(info["dtype"]), tuple(int(s) for s in info["shape"]))
        return Header(path, entries, {str(k): str(v) for k, v in metadata.items()})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{shown(path)} is truncated or corrupted ({err}). Re-download it (from the Hub: "
                              "re-download with force_download=True) or save the model again.") from None


def load_weights(path: str | os.PathLike, keys: Container[str] | None = None, *,
                 verify: bool | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those in `keys`, default all) as CPU tensors, without copying them.

    A compressed checkpoint is mostly small tensors, which `safe_open` copies one call at a time: here the file is
    mapped once, privately (copy-on-write: pages are read from the page cache when first touched, writes stay in
    this process), and each tensor wraps its own slice of the map (separate storages, so savers never take them
    for tied tensors). Files this reader cannot wrap (a dtype it does not know, a big-endian machine) are read
    with `safetensors.safe_open`.

    Args:
        keys (`Container[str]`, *optional*): the tensors to return (default: all); `()` returns none (verify only).
        verify (`bool`, *optional*): check every tensor of the file against the checksums in its metadata
            ([`hf_vq.serialization.checksum`]); default: unless the environment variable `HF_VQ_VERIFY` is 0.

    Raises:
        [`CheckpointError`]: if the file is missing, truncated or corrupted, or a tensor fails its checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{shown(path)} does not exist: the folder is not a complete hf_vq checkpoint "
                              f"(expected {WEIGHTS_NAME}).")
    try:
        with open(path, "rb") as f:
            header, size, _ = _raw_header(f, path)
            metadata = header.pop("__metadata__", None) or {}
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))[8 + size:]
            if verify_enabled(verify):
                _verify(path, header, metadata, data)
            wanted = [key for key in header if keys is None or key in keys]
            if sys.byteorder != "little" or any(header[key]["dtype"] not in SAFETENSORS_DTYPES for key in wanted):
                with safe_open(str(path), framework="pt") as g:
                    return {key: g.get_tensor(key) for key in wanted}
        out = {}
        for key in wanted:
            info = header[key]
            dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            count = math.prod(info["shape"])
            if not 0 <= start <= end <= len(data) or end - start != count * dtype.itemsize:
                raise ValueError(f"tensor {key!r} lies outside the file's {len(data)} data bytes")
            flat = torch.frombuffer(data[start:end], dtype=dtype) if count else torch.empty(0, dtype=dtype)
            out[key] = flat.view(info["shape"])
        return out
    except ChecksumError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{shown(path)} is truncated or corrupted ({err}). Re-download it (from the Hub: "
                              "re-download with force_download=True) or save the model again.") from None


def _verify(path: Path, header: dict[str, Any], metadata: dict[str, str], data: memoryview) -> None:
    """Check every tensor with a recorded checksum (see [`hf_vq.serialization.checksum`])."""
    sums = parse_checksums(metadata, shown(path))
    for key, expected in (sums or {}).items():
        info = header.get(key)
        if info is None:  # recorded for a tensor stored under another name (or tied away): nothing to compare
            continue
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"tensor {key!r} lies outside the file's {len(data)} data bytes")
        got = tensor_crc32(data[start:end])
        if got != expected:
            raise ChecksumError(
                f"{shown(path)}: tensor {key!r} does not match the checksum recorded when it was saved (crc32 {got}, "
                f"expected {expected}): the file is corrupted. Re-download it (from the Hub: force_download=True) or "
                f"save the model again; to load it unchecked anyway, set {VERIFY_ENV}=0."
            )


def verify_files(paths: list[Path] | list[str], *, verify: bool | None = None) -> None:
    """Check every tensor of `paths` against their checksums (what [`load_weights`] does while reading).

    Raises:
        [`CheckpointError`]: naming the file and the tensor that fails, and the fix.
    """
    if verify_enabled(verify):
        for path in paths:
            load_weights(path, keys=(), verify=True)


def check_same_save(headers: list[Header], where: str) -> None:
    """Check that the files of one checkpoint (its shards) were written by one save: hf_vq records the checksums of
    the whole checkpoint in every shard, so shards of two saves (a folder copied or written over piecemeal) differ.

    Raises:
        [`CheckpointError`]: naming two files from different saves and the fix.
    """
    first = headers[0] if headers else None
    for header in headers[1:]:
        if header.metadata.get(CHECKSUMS_KEY) != first.metadata.get(CHECKSUMS_KEY):
            raise CheckpointError(
                f"{where}: {shown(header.path)} and {shown(first.path)} come from different saves (their recorded "
                "checksums differ): the folder mixes shards of two versions of the model. Save the model again (or "
                "re-download it)."
            )


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: `model.safetensors`, or every shard its index names.

    Raises:
        [`CheckpointError`]: if the folder has neither, or the index is malformed.
    """
    folder = Path(folder)
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{shown(index)} is not a valid safetensors index ({err}); re-save the model."
                                  ) from None
        return [folder / name for name in names]
    hint = " hf_vq loads only safetensors weights, never pickled .bin/.pth files." if (
        any(folder.glob("*.bin")) or any(folder.glob("*.pth"))) else ""
    raise CheckpointError(f"{shown(single)} does not exist: {shown(folder)} is not a complete hf_vq checkpoint.{hint}")


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    """`folder/config.json` as a dict.

    Raises:
        [`CheckpointError`]: if it is missing or not a JSON object.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{shown(path)} does not exist: {shown(folder)} is not a model folder.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{shown(path)} is not valid JSON ({err}); fix or re-download it.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown(path)} holds a JSON {type(data).__name__}, not an object; fix or re-download "
                              "it.")
    return data


def read_quantization_config(folder: str | os.PathLike, *, with_record: bool = True) -> VQConfig:
    """The [`VQConfig`] stored in `folder/config.json`, validated, with its record from the weights' metadata.

    Raises:
        [`CheckpointError`]: if config.json has no hf_vq `quantization_config`, or it is malformed (the field named).
    """
    path = Path(folder) / "config.json"
    data = read_config_json(folder).get("quantization_config")
    if not isinstance(data, dict) or data.get("quant_method") != "hf_vq":
        raise CheckpointError(f"{shown(path)} has no hf_vq quantization_config: not an hf_vq checkpoint.")
    try:
        config = VQConfig.from_dict(data)
    except ValueError as err:
        raise CheckpointError(f"{shown(path)}: {err}") from None
    if with_record:
        try:
            config.record = record_of(weight_files(folder)[0])
        except CheckpointError:
            config.record = None
    return config


def record_of(path: str | os.PathLike) -> CompressionRecord | None:
    """The [`CompressionRecord`] in a weights file's metadata, or None when it has none."""
    return CompressionRecord.from_json(read_header(path).metadata.get(RECORD_KEY))
