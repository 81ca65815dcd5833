"""Loading compressed checkpoints into models: the one path that reads, validates and assigns tensors.

[`read_checkpoint`] reads a folder's weights (every shard) after validating their headers against the layout;
[`assign_tensors_`] puts tensors into a (meta) skeleton; [`load_compressed_`] does both for any `nn.Module`.
The transformers and timm integrations call the same pieces with their own key renaming.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..config import VQConfig
from ..nn import VQModuleMixin, build_skeleton_
from .format import SAFETENSORS_DTYPES, CheckpointError
from .pin import PinnedFolder, shown
from .read import check_same_save, load_weights, read_header, read_quantization_config, weight_files
from .state_dict import storage_groups
from .validate import check_codes, check_entries, check_unlisted

__all__ = ["read_checkpoint", "read_files", "assign_tensors_", "load_compressed_"]


def read_checkpoint(folder: str | os.PathLike, config: VQConfig, *, verify: bool | None = None
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a folder's weights (all shards), after checking headers, checksums and codes against `config`.

    Returns:
        `(tensors, where)`: the tensors by stored key, and the file (or "the checkpoint shards") for messages.

    Raises:
        [`CheckpointError`]: a missing, truncated or corrupt file, a missing or misshapen tensor, a tensor that
            fails its checksum, codes >= k, shards of different saves.
    """
    paths = weight_files(folder)
    where = shown(paths[0]) if len(paths) == 1 else f"the checkpoint shards of {shown(folder)}"
    return read_files(paths, config, where=where, verify=verify), where


def read_files(paths: list[Path], config: VQConfig, *, where: str, verify: bool | None = None
               ) -> dict[str, torch.Tensor]:
    """The tensors of safetensors `paths`, after checking their headers, checksums (see
    [`hf_vq.serialization.checksum`]; `verify` overrides `HF_VQ_VERIFY`) and codes against `config` (named `where`).

    Raises:
        [`CheckpointError`]: a missing, truncated or corrupt file, a missing or misshapen tensor, a tensor that
            fails its checksum, codes >= k, shards of different saves.
    """
    headers = [read_header(path) for path in paths]
    check_same_save(headers, where)
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    for header in headers:
        entries.update(header)
    check_entries(entries, config, where=where, label=lambda name: str(SAFETENSORS_DTYPES.get(name, name)))
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        tensors.update(load_weights(path, verify=verify))
    check_codes(tensors, config, where=where)
    return tensors


def assign_tensors_(model: nn.Module, tensors: dict[str, torch.Tensor], *, device: torch.device | None = None,
                    mark_initialized: bool = False) -> None:
    """Put `tensors` (model key -> tensor) into `model`'s parameters and buffers, replacing what is there (meta or not).

    Float tensors take the dtype (and parameters their `requires_grad`) of the tensor they replace; others (codes,
    integer buffers) keep their stored dtype. Tied modules and shared sets are re-tied by the caller.

    Args:
        device (`torch.device`, *optional*): where the tensors go (default: stay where they are).
        mark_initialized (`bool`): flag each as `_is_hf_initialized` (transformers then leaves it alone).
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    for key, tensor in tensors.items():
        module_name, _, attr = key.rpartition(".")
        module = modules[module_name]
        if device is not None and tensor.device != device:
            tensor = tensor.to(device)
        is_buffer = attr in module._buffers  # codes uint8 [rows, packed_bytes], running statistics, ...
        empty = module._buffers[attr] if is_buffer else module._parameters[attr]
        if empty.is_floating_point() and tensor.dtype != empty.dtype:
            tensor = tensor.to(empty.dtype)
        if is_buffer:
            module._buffers[attr] = tensor
        else:  # codebooks [M, k, d] (shared sets on their holder), scales [rows], biases, norms, embeddings, ...
            tensor = module._parameters[attr] = nn.Parameter(tensor, requires_grad=empty.requires_grad)
        if mark_initialized:
            tensor._is_hf_initialized = True


def load_compressed_(model: nn.Module, folder: str | os.PathLike, *, strict: bool = True,
                     verify: bool | None = None) -> nn.Module:
    """Rebuild the VQ modules of a dense-architecture `model` from `folder` and load its weights (in place).

    This is the library-agnostic loader (plain `nn.Module`s); transformers models load through `from_pretrained`
    and timm models through `timm.create_model`, both on the same pieces. Nothing is recomputed and nothing is
    unpickled. The config's record is restored from the weights' metadata. The folder is read at one version even
    while another process saves into it ([`hf_vq.serialization.pin.PinnedFolder`]).

    Args:
        strict (`bool`, defaults to `True`): refuse a checkpoint whose tensors do not match the model's exactly.
        verify (`bool`, *optional*): check every tensor against the checksums recorded when it was saved; default:
            unless the environment variable `HF_VQ_VERIFY` is 0.

    Raises:
        `CheckpointError`: for a missing, truncated or corrupt file, a missing tensor, a wrong shape, a failed
            checksum, codes >= k, or stored codes of a module config.json does not list.
        `ValueError`: if the config names modules the model lacks.
    """
    with PinnedFolder(folder) as pin:
        return _load_pinned(model, pin.root, strict=strict, verify=verify)


def _load_pinned(model: nn.Module, folder: Path, *, strict: bool, verify: bool | None) -> nn.Module:
    config = read_quantization_config(folder)
    build_skeleton_(model, config)  # validates the layout against the model before changing anything
    state_dict, where = read_checkpoint(folder, config, verify=verify)
    dense = {name for name, m in model.named_modules() if not isinstance(m, VQModuleMixin)}
    check_unlisted(state_dict, config, dense, where=where)
    own = model.state_dict()
    missing = [key for keys in storage_groups(own) if not any(k in state_dict for k in keys) for key in keys]
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{where} does not match the model: missing tensors {missing[:5]}, unexpected "
            f"tensors {unexpected[:5]}. Was it saved from another architecture or config?"
        )
    for key, tensor in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {list(tensor.shape)}, the model expects "
                f"{list(own[key].shape)}. The checkpoint was saved from a different model configuration."
            )
    model.load_state_dict(state_dict, strict=False)
    return model
