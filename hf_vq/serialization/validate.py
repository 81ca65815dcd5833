"""The one validator of compressed checkpoints: every compressed module's tensors present, with the right dtypes,
shapes and code values. Loaders (plain `nn.Module`, timm, transformers) all call it — on file headers before
reading anything, and on the codes once read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterable

import torch

from ..codec.packing import bits_for, unpack_codes
from ..config import LayerLayout, VQConfig
from .format import (CODEBOOKS, CODES, SAFETENSORS_DTYPES, SCALES, CheckpointError, as_entries, expected_tensors,
                     is_shared_codebooks_key)

__all__ = ["check_entries", "check_stored_tensors", "check_codes", "check_unlisted", "check_state_dict"]


def _check_entry(entry: tuple[str, tuple[int, ...]], key: str, name: str, layout: LayerLayout, dtypes: set[str],
                 shape: tuple[int, ...], source: str, label: Callable[[str], str]) -> None:
    """Raise unless a stored tensor `(dtype, shape)` is what `layout` needs under `key`."""
    dtype, got = entry
    if tuple(got) != shape or dtype not in dtypes:
        raise CheckpointError(
            f"{source}: tensor {key!r} is {label(dtype)} {list(got)}, expected {'/'.join(sorted(dtypes))} "
            f"{list(shape)} for module {name!r} (k={layout.k}, d={layout.d}, weight {list(layout.shape)}). "
            "The checkpoint does not match its config.json; re-save the model."
        )


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
            _check_entry(entries[key], key, name, layout, dtypes, shape, (files or {}).get(key, where), label)
            found.add(key)
    return found


def _kind(key: str) -> str | None:
    """Which compressed-module tensor a stored key is, by its name: codes, codebooks (own or shared) or scales."""
    if key.endswith(f".{CODES}"):
        return CODES
    if key.endswith(f".{CODEBOOKS}") or is_shared_codebooks_key(key):
        return CODEBOOKS
    return SCALES if key.endswith(f".{SCALES}") else None


def check_stored_tensors(entries: dict[str, tuple[str, tuple[int, ...]]], config: VQConfig, *, where: str) -> None:
    """[`check_entries`] for files whose tensors may be stored under other names than the layout's (transformers
    saves some architectures, e.g. ViT, under their legacy key names): a tensor not found under its module's name
    must be matched by a stored tensor of the same kind (codes / codebooks / scales) and shape under another name.

    Raises:
        [`CheckpointError`]: naming a misshapen tensor, or one no stored tensor accounts for, its module and the fix.
    """
    missing: dict[str, tuple[str, tuple[str | None, tuple[int, ...]]]] = {}  # key -> (module, (kind, shape))
    claimed: set[str] = set()
    label = lambda dtype: str(SAFETENSORS_DTYPES.get(dtype, dtype))  # noqa: E731
    for name, layout in config.layouts.items():
        if layout.tied_to is not None:
            continue
        for key, (dtypes, shape) in expected_tensors(name, layout, entries).items():
            if key in entries:
                _check_entry(entries[key], key, name, layout, dtypes, shape, where, label)
                claimed.add(key)
            else:
                missing.setdefault(key, (name, (_kind(key), shape)))
    spare = Counter((_kind(key), tuple(shape)) for key, (_, shape) in entries.items()
                    if _kind(key) and key not in claimed)
    for key, (name, wanted) in missing.items():
        if spare[wanted] == 0:
            raise CheckpointError(
                f"{where} lacks the tensor {key!r} of compressed module {name!r} (nor is a {wanted[0]} tensor of shape "
                f"{list(wanted[1])} stored under another name). The file is incomplete or belongs to another config; "
                "re-download or re-save the model."
            )
        spare[wanted] -= 1


def check_unlisted(keys: Iterable[str], config: VQConfig, dense_modules: Container[str], *, where: str) -> None:
    """Check that no stored codes belong to a module the layout does not list but the model has as a dense layer:
    a config.json that lost an entry of `quantization_config.modules` would otherwise load that layer randomly
    initialised (its dense weight is not in the file), with only a warning.

    Args:
        keys (`Iterable[str]`): stored tensor names, as the model names them.
        dense_modules (`Container[str]`): names of the model's modules that are not compressed.

    Raises:
        [`CheckpointError`]: naming the module, the file and the fix.
    """
    suffix = f".{CODES}"
    for key in keys:
        name = key[: -len(suffix)]
        if key.endswith(suffix) and name not in config.modules and name in dense_modules:
            raise CheckpointError(
                f"{where} stores the codes of compressed module {name!r}, but config.json's "
                "quantization_config.modules has no entry for it, so it would load as a randomly initialised dense "
                "layer. The config.json is incomplete (edited or truncated): restore it (re-download it, or save the "
                "model again)."
            )


def check_codes(tensors: dict[str, torch.Tensor], config: VQConfig, *, where: str) -> None:
    """Check that the codes read for every compressed module are < k (free when k is a power of two) and that its
    codebooks and scales are finite (NaN or infinite values are never written by hf_vq: the bytes were damaged).

    Raises:
        [`CheckpointError`]: naming the tensor and the fix.
    """
    for name, layout in config.layouts.items():
        if layout.tied_to is not None:
            continue
        for key in expected_tensors(name, layout, tensors):  # codebooks (own or the shared set's), scales
            tensor = tensors.get(key)
            if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"{where}: tensor {key!r} of compressed module {name!r} holds NaN or infinite values; the file "
                    "is corrupted. Re-download it or compress the model again."
                )
        key = f"{name}.{CODES}"
        if key not in tensors or layout.k == 2 ** bits_for(layout.k):
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
