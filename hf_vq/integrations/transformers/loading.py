"""Loading compressed checkpoints through `from_pretrained`: layout names as the model has them, headers checked
with hf_vq's one validator, and on one device the tensors read by hf_vq itself.

transformers' loader costs about as much per tensor however small the tensor, and a compressed checkpoint is
mostly small tensors: on one device hf_vq maps each safetensors file once ([`hf_vq.serialization.load_weights`])
and puts codes, codebooks and every other tensor stored under the model's own name and shape into the skeleton,
hiding them from transformers' per-key loader. Tied weights, tensors stored under another shape or dtype, and
everything with a multi-device or offloading `device_map`, under tensor parallelism, or with fp32 modules kept in a
half-precision model load through transformers as usual.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Container, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer

from ...codec.packing import bits_for
from ...config import CompressionRecord, VQConfig
from ...nn import CodesError
from ...serialization import (CODEBOOKS, CODES, SCALES, CheckpointError, PinnedFolder, assign_tensors_,
                              check_entries, check_same_save, check_unlisted, is_shared_codebooks_key, load_weights,
                              read_config_json, read_header, weight_files)
from ...serialization.format import DTYPE_NAMES, FLOAT_DTYPE_NAMES, RECORD_KEY
from .tying import pretrained_models

__all__ = ["GUARD_NOTE_KEY", "GUARD_SUFFIX", "fit_layout", "checkpoint_key_renamer", "names_pattern",
           "pin_checkpoint_files", "pinned_config", "check_checkpoint_files", "readable_tensors", "compressed_biases",
           "single_device", "without_torch_function", "drop_keys", "load_tensors_", "check_loaded"]

logger = logging.getLogger(__name__)

#: Name of a one-element guard tensor in every hf_vq transformers checkpoint. Loaded without hf_vq,
#: transformers lists it in its load report (next to the failing guard `<module>.weight`), so the fix is on screen.
#: (Plain words only: transformers' per-architecture key renamings rewrite words such as "layer" or "model".)
GUARD_NOTE_KEY = ("HF_VQ REQUIRED - pip install hf_vq - then import hf_vq before from_pretrained - otherwise this "
                  "checkpoint loads as random values")
GUARD_SUFFIX = ".weight"


def fit_layout(model: nn.Module, config: VQConfig) -> VQConfig:
    """The layout with module names as `model` has them (transformers' `base_model_prefix` rule).

    A checkpoint of `BertForMaskedLM` names `bert.encoder...`; loaded as `BertModel` the modules are
    `encoder...` (and the other way round). Head modules of the checkpoint that a base model lacks are
    dropped, as transformers drops their weights. Other unknown names are kept: `build_skeleton_` refuses them.
    """
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or all(name in names for name in config.modules):
        return config
    is_base = getattr(model, "base_model", model) is model
    renamed: dict[str, str | None] = {}
    for name in config.modules:
        if name in names:
            renamed[name] = name
        elif name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
            renamed[name] = name[len(prefix) + 1:]
        elif f"{prefix}.{name}" in names:
            renamed[name] = f"{prefix}.{name}"
        else:
            renamed[name] = None if is_base and not name.startswith(prefix + ".") else name
    modules = {}
    for name, data in config.modules.items():
        if renamed[name] is None:
            continue
        data = dict(data)
        if data.get("tied_to") is not None:
            data["tied_to"] = renamed.get(data["tied_to"], data["tied_to"])
            if data["tied_to"] is None:  # the owner was a dropped head: this module owns the tensors now
                raise CheckpointError(f"quantization_config.modules[{name!r}] is tied to a head module that "
                                      f"{type(model).__name__} does not have; load it with the checkpoint's own class.")
        modules[renamed[name]] = data
    dropped = sorted(n for n, new in renamed.items() if new is None)
    if dropped:
        logger.warning("hf_vq: %s has no module %s of the checkpoint (a head); its tensors are not loaded.",
                       type(model).__name__, dropped)
    return config.replace(modules=modules)


def checkpoint_key_renamer(model: nn.Module, quantizer: HfQuantizer, state: Mapping[str, Any]):
    """Map a checkpoint key to the model's name for it, as transformers' loader does (renamings, prefix).

    Keys that already name a tensor of the model (a key of its `state`, `model.state_dict(keep_vars=True)` on
    meta) are returned as they are; transformers' conversion mapping (which costs a few ms to build) is only
    built for the first key that does not.
    """

    @functools.cache
    def transformers_rename():
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            mapping = get_model_conversion_mapping(model, None, quantizer)
        except (ImportError, AttributeError, TypeError):  # internals moved: compare names as they are
            return lambda key: key
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)

        return lambda key: rename_source_key(key, renamings, converters, prefix, state)[0]

    return lambda key: key if key in state else transformers_rename()(key)


def names_pattern(names: Any) -> str:
    """A regex alternation matching every module name in `names` (layer indices generalised to `\\d+`, so a
    deep model gives a short pattern: transformers compiles the ignore patterns on every load)."""
    generic = dict.fromkeys(re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(name)) for name in names)
    return "|".join(generic)


def pin_checkpoint_files(checkpoint_files: list[str]) -> PinnedFolder | None:
    """Hold the checkpoint's folder at one version for the rest of the load (a concurrent `save_pretrained` into it
    then cannot hand this load files of two saves), and point `checkpoint_files` (the list transformers reads the
    weights from afterwards, changed in place) at that version's own files. None where folders cannot be pinned."""
    if not checkpoint_files:
        return None
    folder = Path(checkpoint_files[0]).parent
    pin = PinnedFolder(folder)
    names = [Path(file).name for file in checkpoint_files if Path(file).parent == folder]
    if not all(pin.file(name).is_file() for name in names):  # a save changed the sharding meanwhile
        try:
            names = [path.name for path in weight_files(pin.root)]  # the pinned version's files (its own index)
        except CheckpointError:
            names = None  # unreadable: transformers' own paths give the error
    if not pin.pinned or names is None:
        pin.close()
        return None
    extras = [file for file in checkpoint_files if Path(file).parent != folder]
    checkpoint_files[:] = [str(pin.file(name)) for name in names] + extras
    return pin


def pinned_config(pin: PinnedFolder, config: VQConfig) -> VQConfig:
    """The quantization config of the pinned version: transformers read config.json before the folder was pinned,
    and a save in between may have changed it (the weights read next are the pinned version's)."""
    try:
        data = read_config_json(pin.root).get("quantization_config")
        pinned = type(config).from_dict(data) if isinstance(data, dict) else None
    except (CheckpointError, ValueError):
        return config
    return pinned if pinned is not None and pinned.to_dict() != config.to_dict() else config


def _header_entries(files: list[str], config: VQConfig, rename: Callable[[str], str] | None
                    ) -> tuple[dict[str, tuple[str, tuple[int, ...], str, str]], CompressionRecord | None]:
    """model key -> (dtype, shape, file, stored key) over every file, without hf_vq's guard tensors; and the record
    of the first file's metadata. Shards of different saves are refused."""
    raw: list[tuple[str, str, tuple[int, ...], str]] = []  # (stored key, dtype, shape, file)
    headers = [read_header(file) for file in files]  # safetensors only; truncated / corrupt files named
    check_same_save(headers, "the checkpoint shards" if len(files) > 1 else os.path.basename(str(files[0])))
    record = CompressionRecord.from_json(headers[0].metadata.get(RECORD_KEY)) if headers else None
    for file, header in zip(files, headers):
        raw += [(stored, dtype, shape, str(file)) for stored, (dtype, shape) in header.items()]
    header: dict[str, tuple[str, tuple[int, ...], str, str]] = {}
    renamed = False  # whether the checkpoint names VQ tensors differently from the model (prefix, legacy names)
    plain = []  # entries of tensors other than codes / codebooks / scales
    for stored, dtype, shape, file in raw:
        if stored.endswith((f".{CODES}", f".{CODEBOOKS}", f".{SCALES}")) or is_shared_codebooks_key(stored):
            key = stored if rename is None else rename(stored)
            renamed |= key != stored
            header[key] = (dtype, shape, file, stored)
        else:
            plain.append((stored, dtype, shape, file))
    guards = {GUARD_NOTE_KEY} | {name + GUARD_SUFFIX for name in config.modules}
    for stored, dtype, shape, file in plain:
        if stored not in guards:  # renamed VQ keys mean the other tensors are named differently too
            header[rename(stored) if renamed else stored] = (dtype, shape, file, stored)
    return header, record


def check_checkpoint_files(files: list[str], config: VQConfig, *, rename: Callable[[str], str] | None = None,
                           others: dict[str, torch.Tensor] | None = None,
                           biases: dict[str, torch.Tensor] | None = None, dense_modules: Container[str] = ()
                           ) -> tuple[dict[str, tuple[str, str]], set[str], CompressionRecord | None]:
    """Check, from the safetensors headers only, that every compressed module has its tensors (hf_vq's validator).

    Args:
        files (`list[str]`): the checkpoint's safetensors files (all shards).
        config ([`VQConfig`]): the quantization config with the per-module layout.
        rename (`Callable[[str], str]`, *optional*): maps a key as stored to the model's name for it
            (transformers renames legacy keys, e.g. ViT's, and adds or strips `base_model_prefix`).
        others (`dict[str, torch.Tensor]`, *optional*): the model's other tensors to locate too, model key ->
            its empty (meta) tensor. One stored with that shape and a matching dtype (float for float, the same
            otherwise) is located; any other is left out (transformers loads it, or reports the mismatch).
        biases (`dict[str, torch.Tensor]`, *optional*): the dense tensors of compressed modules ([`compressed_biases`]),
            which must be stored with their shape: transformers would leave a missing one uninitialised.
        dense_modules (`Container[str]`): the model's modules that are not compressed: stored codes of one of them
            mean config.json lost its entry.

    Returns:
        `(sources, foreign, record)`: for every stored VQ tensor and every located tensor of `others`, the model's
        key -> (file, key as stored); the stored keys (as the model would name them) that are neither, nor hf_vq's
        guard tensors; and the compression record of the weights' metadata (None if absent).

    Raises:
        [`CheckpointError`]: naming the missing or misshapen tensor, its module and the fix.
    """
    header, record = _header_entries(files, config, rename)
    where = os.path.basename(str(files[0])) if len(files) == 1 else "the checkpoint shards"
    found = check_entries({key: (dtype, shape) for key, (dtype, shape, _, _) in header.items()}, config, where=where,
                          files={key: os.path.basename(file) for key, (_, _, file, _) in header.items()})
    check_unlisted(header, config, dense_modules, where=where)
    for key, empty in (biases or {}).items():
        dtype, got, file, _ = header.get(key, (None, None, None, None))
        if got != tuple(empty.shape) or dtype not in FLOAT_DTYPE_NAMES:
            stored = "missing" if got is None else f"{dtype} {list(got)}"
            raise CheckpointError(
                f"{os.path.basename(file or where)}: tensor {key!r} is {stored}, expected a float tensor "
                f"{list(empty.shape)} (of compressed module {key.rpartition('.')[0]!r}). The checkpoint is incomplete "
                "or does not match its config.json; re-download it or save the model again."
            )
    sources = {key: (header[key][2], header[key][3]) for key in found}
    for key, empty in (others or {}).items():
        if key not in header:
            continue
        dtype, got, file, stored = header[key]
        dtypes = FLOAT_DTYPE_NAMES if empty.is_floating_point() else {DTYPE_NAMES.get(empty.dtype)}
        if got == tuple(empty.shape) and dtype in dtypes:
            sources[key] = (file, stored)
    return sources, set(header) - set(sources), record


def compressed_biases(config: VQConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The biases of compressed modules (model key -> empty tensor, from the skeleton's `state`)."""
    return {f"{name}.bias": state[f"{name}.bias"] for name, layout in config.layouts.items()
            if layout.tied_to is None and f"{name}.bias" in state}


def readable_tensors(model: nn.Module, config: VQConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `model` hf_vq can read itself besides codes and codebooks, model key -> empty tensor, from
    its `state` (`state_dict(keep_vars=True)`): all but tied weights (transformers ties them after loading)."""
    tied = set()
    for prefix, sub in pretrained_models(model):
        for target, source in (getattr(sub, "all_tied_weights_keys", None) or {}).items():
            tied |= {f"{prefix}.{target}" if prefix else target, f"{prefix}.{source}" if prefix else source}
    vq = {f"{name}.{attr}" for name in config.layouts for attr in (CODES, CODEBOOKS)}
    return {key: t for key, t in state.items() if key not in tied and key not in vq and not is_shared_codebooks_key(key)}


def single_device(device_map: Any) -> torch.device | None:
    """The one device a (normalised) `device_map` loads everything on, or None (several, offloading, or "auto")."""
    if device_map is None:
        return torch.device("cpu")  # transformers' default
    if isinstance(device_map, (torch.device, int, str)):
        device_map = {"": device_map}
    if not isinstance(device_map, dict):
        return None
    devices = {str(torch.device(d) if isinstance(d, int) and not isinstance(d, bool) else d) for d in device_map.values()}
    if len(devices) != 1 or devices & {"disk", "auto", "balanced", "balanced_low_0", "sequential"}:
        return None
    return torch.device(devices.pop())


def without_torch_function():
    """A context without `__torch_function__` handling: transformers builds the model under a meta-device mode that
    intercepts every torch call (a Python round trip each); the skeleton names its devices itself."""
    disable = getattr(torch._C, "DisableTorchFunction", None)  # private, stable since torch 1.x; optional
    return disable() if disable is not None else contextlib.nullcontext()


def drop_keys(keys: set[str]):
    """A state-dict post hook leaving `keys` out of the model's own (top-level) `state_dict()`."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not prefix:
            for key in keys & state_dict.keys():
                del state_dict[key]

    return hook


def load_tensors_(model: nn.Module, sources: dict[str, tuple[str, str]], device: torch.device) -> None:
    """Read tensors straight from the safetensors files into the (meta) skeleton of `model`, marked as initialised
    (hf_vq's one assignment path, [`hf_vq.serialization.assign_tensors_`]).

    Args:
        sources (`dict[str, tuple[str, str]]`): model key -> (file, key as stored), from [`check_checkpoint_files`].
        device (`torch.device`): where the tensors go (the one device the model is loaded on).

    Raises:
        [`CheckpointError`]: if a file cannot be read.
    """
    by_file: dict[str, list[tuple[str, str]]] = {}
    for key, (file, stored) in sources.items():
        by_file.setdefault(file, []).append((key, stored))
    for file, items in by_file.items():
        tensors = load_weights(file, keys={stored for _, stored in items})  # CPU, one read per file
        assign_tensors_(model, {key: tensors[stored] for key, stored in items},
                        device=None if device.type == "cpu" else device, mark_initialized=True)


def check_loaded(model: nn.Module, config: VQConfig) -> None:
    """After loading: every VQ module is filled (not meta), its codebooks and scales are finite, its codes < k."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, layout in config.layouts.items():
        module = modules[name]
        tensors = [(CODES, module.codes), (CODEBOOKS, module.codebooks)]
        if module.scales is not None:
            tensors.append((SCALES, module.scales))
        for key, tensor in tensors:
            if layout.tied_to is None and not getattr(tensor, "_is_hf_initialized", False):
                raise CheckpointError(
                    f"The checkpoint did not provide '{name}.{key}' of compressed module {name!r} (the loader left "
                    "it uninitialised). The file is incomplete or belongs to another config; re-save the model."
                )
            if layout.tied_to is None and key != CODES and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"Tensor '{name}.{key}' of compressed module {name!r} holds NaN or infinite values: the checkpoint "
                    "is corrupted. Re-download it or compress the model again."
                )
        if layout.tied_to is None and layout.k != 2 ** bits_for(layout.k):  # with k = 2**bits every code is valid
            try:
                module.unpacked_codes()
            except CodesError as err:
                raise CheckpointError(
                    f"Tensor '{name}.{CODES}' of compressed module {name!r} is corrupted: {err} Re-download the "
                    "checkpoint or compress the model again."
                ) from None
