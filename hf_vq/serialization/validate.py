"""The one validator of compressed checkpoints: every compressed module's tensors present, with the right dtypes,
shapes and code values. Loaders (plain `nn.Module`, timm, transformers) all call it — on file headers before
reading anything, and on the codes once read."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..codec.packing import bits_for, unpack_codes
from ..config import VQConfig
from .format import CODES, SAFETENSORS_DTYPES, CheckpointError, as_entries, expected_tensors

__all__ = ["check_entries", "check_codes", "check_state_dict"]


def check_entries(entries: dict[str, tuple[str, tuple[int, ...]]], config: VQConfig, *, where: str,
                  files: dict[str, str] | None = None, label: Callable[[str], str] = str) -> set[str]:
    """Check that every compressed module of `config` has its tensors in `entries`, with the right dtype and shape.

    Args:
        entries (`dict`): key as the model names it -> (safetensors dtype name, shape), from file headers or a
            state dict ([`hf_vq.serialization.format.as_entries`]).
        config ([`VQConfig`]): the quantization config with the per-module layout.
        where (`str`): what the entries come from, for messages (a file name, "the checkpoint shards").
        files (`dict`, *optional*): key -> the file holding it, to name the file in messages.
        label (`Callable`, *optional*): how a dtype name is shown in messages (torch's names for in-memory tensors).

    Returns:
        `set[str]`: the keys of compressed modules' tensors (codes, own codebooks, shared sets, scales).

    Raises:
        [`CheckpointError`]: naming the missing or misshapen tensor, its module and the fix.
    """
    found: set[str] = set()
    for name, layout in config.layouts.items():
        if layout.tied_to is not None:
            continue
        for key, (dtypes, shape) in expected_tensors(name, layout, entries).items():
            if key not in entries:
                raise CheckpointError(
                    f"{where} lacks the tensor {key!r} of compressed module {name!r} (config.json lists it in "
                    "quantization_config.modules). The file is incomplete or belongs to another config; re-download "
                    "or re-save the model."
                )
            dtype, got = entries[key]
            if tuple(got) != shape or dtype not in dtypes:
                source = (files or {}).get(key, where)
                raise CheckpointError(
                    f"{source}: tensor {key!r} is {label(dtype)} {list(got)}, expected {'/'.join(sorted(dtypes))} "
                    f"{list(shape)} for module {name!r} (k={layout.k}, d={layout.d}, weight {list(layout.shape)}). "
                    "The checkpoint does not match its config.json; re-save the model."
                )
            found.add(key)
    return found


def check_codes(tensors: dict[str, torch.Tensor], config: VQConfig, *, where: str) -> None:
    """Check that the codes read for every compressed module are < k (free when k is a power of two).

    Raises:
        [`CheckpointError`]: naming the tensor and the fix.
    """
    for name, layout in config.layouts.items():
        key = f"{name}.{CODES}"
        if layout.tied_to is not None or key not in tensors or layout.k == 2 ** bits_for(layout.k):
            continue
        n_codes = (layout.matrix_shape[1] // layout.d) * layout.num_codebooks
        codes = unpack_codes(tensors[key], bits_for(layout.k), n_codes)
        if codes.numel() and int(codes.max()) >= layout.k:
            raise CheckpointError(
                f"{where}: tensor {key!r} holds code {int(codes.max())} >= k={layout.k}; the file is corrupted. "
                "Re-download it or compress the model again."
            )


def check_state_dict(state_dict: dict[str, torch.Tensor], config: VQConfig, *, source: str = "model.safetensors") -> None:
    """[`check_entries`] and [`check_codes`] on an in-memory state dict.

    Raises:
        [`CheckpointError`]: naming the tensor, what was expected, and the fix.
    """
    check_entries(as_entries(state_dict), config, where=source, label=lambda name: str(SAFETENSORS_DTYPES.get(name, name)))
    check_codes(state_dict, config, where=source)
