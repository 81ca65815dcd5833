"""Compressing models larger than memory: one block's dense weights at a time.

[`quantize_streaming_`] takes a model built on the meta device and a `load` function that reads the dense tensors of
one submodule from disk (the transformers integration reads them from the safetensors shards of a model folder).
For each block it reads the block's weights, measures what its layers see (with calibration data: the block's
inputs, propagated from the already compressed blocks before it), encodes its layers, and swaps the VQ modules in —
the dense block is dropped before the next is read. The compressed layers around the blocks (embeddings, head) are
read only while needed: with calibration data at the start, for the first block's inputs, then dropped; and at the
end one at a time (with the layers tied to it), encoded and dropped. Peak memory is the compressed model plus the
largest of one dense block or one outside layer with its encoding's working memory (about 1.5 times the layer: its
int64 codes and, for its error, its decoded weight; k-means's own is small, see [`hf_vq.codec.kmeans`]), plus the
activations of the calibration batches at one block boundary.

Not available here: PQF's permutation (it traces the whole dense model) and bit allocation (it measures every layer
of the dense model); the recipe records that they were off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import HessianCollector, LayerStatistics, calibration_batches, merge_statistics, to_device
from ..config import CompressionRecord, LayerLayout, VQConfig
from ..nn import register_shared_, vq_class_for
from ..nn.model import vq_from_layout
from ..nn.storage import DENSE_STORAGE, round_to_storage_
from . import hooks
from .calibrated import _first_tensor, chosen_floors, fit_layer, install_layer
from .encode import encode_unit
from .parallel import Workers, layer_cost
from .select import plan
from .stages import StageDone, find_blocks, half_of

__all__ = ["quantize_streaming_"]

logger = logging.getLogger(__name__)

Loader = Callable[[list[str]], dict[str, torch.Tensor]]


def _materialize_(model: nn.Module, keys: list[str], load: Loader, device: torch.device) -> None:
    """Read the dense tensors `keys` (model state-dict keys) into `model`, replacing their meta placeholders."""
    from accelerate.utils import set_module_tensor_to_device  # accelerate's big-model placement

    for key, value in load(keys).items():
        set_module_tensor_to_device(model, key, device, value=value)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`; a no-op elsewhere). A dense block's
    tensors below glibc's mmap threshold (up to 32 MB) are freed into the heap, which keeps its pages: without this
    they count in the process's memory while the next block, and the embedding and head at the end, are encoded."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _tie_weights(model: nn.Module) -> None:
    """transformers' weight tying, where the model has it (a head left out of the files shares its embedding)."""
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()


def _release_(model: nn.Module, keys: list[str]) -> None:
    """Put the tensors `keys` back on the meta device (their memory is freed once nothing else holds them)."""
    from accelerate.utils import set_module_tensor_to_device

    for key in keys:
        set_module_tensor_to_device(model, key, "meta")


def _keys_under(model: nn.Module, blocks: list[str], block: str | None) -> list[str]:
    """State-dict keys of `block`, or (None) of everything outside every block."""
    keys = list(model.state_dict(keep_vars=True))
    if block is not None:
        return [k for k in keys if k.startswith(block + ".")]
    return [k for k in keys if not any(k.startswith(b + ".") for b in blocks)]


def _block_inputs(model: nn.Module, block: nn.Module, batches: list[tuple[tuple, dict]], device: torch.device,
                  indices: list[int]) -> dict[int, tuple[tuple, dict]]:
    """The (args, kwargs) calibration batch `i` gives the first block (the model stopped right there), for `indices`."""
    captured: dict[int, tuple[tuple, dict]] = {}
    current = [0]

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured[current[0]] = (args, kwargs)
        raise StageDone

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in indices:
                current[0] = i
                args, kwargs = batches[i]
                kwargs = {k: to_device(v, device) for k, v in kwargs.items()}
                if "use_cache" in inspect.signature(model.forward).parameters:
                    kwargs.setdefault("use_cache", False)
                try:
                    model(*[to_device(a, device) for a in args], **kwargs)
                except StageDone:
                    pass
    finally:
        handle.remove()
    return captured


def _with_hidden(inputs: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return args, {**kwargs, key: hidden}


def _encode_block(model: nn.Module, block_name: str, layouts: dict[str, LayerLayout], config: VQConfig,
                  inputs: dict[int, tuple[tuple, dict]] | None, n_batches: int, device: torch.device,
                  workers: Workers) -> tuple[dict[str, dict], dict[int, torch.Tensor]]:
    """Encode the layers of one (materialised) block; returns their errors and the block's outputs on this
    process's `inputs` (batch index -> inputs)."""
    block = model.get_submodule(block_name)
    names = [n for n, lay in layouts.items() if n.startswith(block_name + ".") and lay.tied_to is None]
    stats: dict[str, LayerStatistics] = {}
    split: dict[str, tuple[LayerStatistics, LayerStatistics]] = {}
    if inputs is not None and config.encoder == "output-aware":
        collector = HessianCollector({n: model.get_submodule(n) for n in names}, max_rows=config.recipe.max_rows)
        halves: tuple[dict, dict] = ({}, {})  # the first and second half of the batches (hessian_floor="auto")

        def measure(i: int) -> tuple[int, dict[str, LayerStatistics]]:
            block(*inputs[i][0], **inputs[i][1])
            return i, collector.take()

        def merge(part: tuple[int, dict[str, LayerStatistics]]) -> None:
            merge_statistics(stats, part[1])
            if config.recipe.hessian_floor == "auto":
                merge_statistics(halves[half_of(part[0], n_batches)], part[1])

        with workers.phase("calibration"), collector.collecting(), torch.no_grad():
            workers.reduce_batches(n_batches, measure, merge)
        stats = collector.result(stats)
        first, second = collector.result(halves[0]), collector.result(halves[1])
        split = {n: (first[n], second[n]) for n in first if n in second}
    with workers.phase("encoding"):
        costs = [layer_cost(*layouts[n].matrix_shape, layouts[n].k, output_aware=n in stats) for n in names]
        fitted = workers.exchange({names[j]: _fit(model, names[j], layouts, stats.get(names[j]), config, device,
                                                  split.get(names[j])) for j in workers.share(costs)})
    errors = {}
    for name in names:
        layouts[name], errors[name] = install_layer(model, name, layouts[name], *fitted[name], device)
    outputs = {}
    if inputs is not None:
        with torch.no_grad(), workers.phase("calibration"):
            outputs = {i: _first_tensor(block(*args, **kwargs)) for i, (args, kwargs) in inputs.items()}
    return errors, outputs


def _fit(model: nn.Module, name: str, layouts: dict[str, LayerLayout], stat: LayerStatistics | None,
         config: VQConfig, device: torch.device, halves: tuple[LayerStatistics, LayerStatistics] | None = None
         ) -> tuple:
    """One layer fitted for its outputs when its statistics were measured, else on its weights alone, seeded as
    `quantize_` seeds it (its index in the plan): the data-free streaming path gives the same codes as compressing
    in memory."""
    if stat is not None:
        return fit_layer(model, name, layouts[name], stat, config, device, halves)
    module = model.get_submodule(name)
    matrix = vq_class_for(type(module))._weight_to_matrix(module._parameters["weight"].detach()).to(device, torch.float32)
    codebooks, codes, scales = encode_unit([matrix], layouts[name], config, seed=config.seed + list(layouts).index(name))
    return codebooks, codes[0], scales[0], {}


@torch.no_grad()
def quantize_streaming_(model: nn.Module, config: VQConfig, load: Loader, *, calibration: Any = None,
                        device: torch.device | str | None = None, progress: bool = True,
                        base_model: str | None = None, accelerator: Any = None) -> VQConfig:
    """Compress a model whose weights are on disk, one block at a time (see the module docstring), in place.

    Args:
        model (`nn.Module`): the architecture built on the meta device (e.g. under `accelerate.init_empty_weights`).
        config ([`VQConfig`]): the scheme; `permute` and bit allocation are not available here (turned off).
        load (`Callable[[list[str]], dict]`): `load(keys)` reads the model's dense tensors `keys` (state-dict keys of
            the model) from disk, as CPU tensors; keys the files do not hold (tied weights) may be left out.
        calibration (*optional*): batches of model inputs; with `config.encoder="output-aware"` each block's layers
            are encoded for the inputs it receives from the compressed blocks before it.
        device (`torch.device` or `str`, *optional*): where blocks are materialised and encoded (CPU by default).
        base_model (`str`, *optional*): recorded as the compression's provenance.
        accelerator (*optional*): an `accelerate.PartialState` / `Accelerator` (or [`Workers`]) of the processes
            compressing together: each block's layers and the calibration batches are split between them, the
            result is the same (see [`hf_vq.pipeline.parallel`]). `model.vq_timings` holds this process's seconds
            per phase.

    Returns:
        [`VQConfig`]: the filled config (layouts and record), also `model.vq_config`.

    Raises:
        `ValueError`: if the model has no repeated blocks to stream, or asks for allocation / the output-aware
            encoder without calibration data.
    """
    device = torch.device(device or "cpu")
    workers = Workers.of(accelerator)
    if config.target_ratio is not None or config.bits_per_weight is not None:
        raise ValueError("Bit allocation measures every layer of the dense model at once; it is not available when "
                         "streaming. Give a fixed scheme (block sizes / spec), or compress in memory.")
    if config.encoder == "output-aware" and calibration is None:
        raise ValueError("VQConfig(encoder='output-aware') needs calibration batches (calibration=...).")
    config = config.replace(permute=False)
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError("Streaming compresses one repeated block at a time, but this model has none (no ModuleList "
                         "of layers); compress it in memory with hf_vq.quantize_.")
    layouts = plan(model, config)
    outside = [n for n, lay in layouts.items()
               if lay.tied_to is None and not any(n.startswith(b + ".") for b in blocks)]
    # the tensors of each compressed layer outside the blocks (embeddings, head), with those of the layers tied to it
    around = _keys_under(model, blocks, None)
    group_keys = {n: [k for k in around if any(k.startswith(m + ".") for m, lay in layouts.items()
                                                 if m == n or lay.tied_to == n)] for n in outside}
    deferred = {k for keys in group_keys.values() for k in keys}
    batches = calibration_batches(calibration) if calibration is not None else None
    # The dense layers outside the blocks are read only while they are needed: with calibration data, for the
    # inputs of the first block (then dropped); then one group at a time at the end, encoded and dropped.
    _materialize_(model, [k for k in around if batches or k not in deferred], load, device)
    _tie_weights(model)  # a tied head left out of the files shares the loaded embedding
    inputs = None
    if batches:
        with workers.phase("calibration"):
            inputs = _block_inputs(model, model.get_submodule(blocks[0]), batches, device,
                                   workers.batch_indices(len(batches)))
        _release_(model, sorted(deferred))
    report = {}
    for block_name in tqdm(blocks, desc="hf_vq stream", unit="block", disable=not (progress and workers.is_main)):
        with workers.phase("loading"):
            _materialize_(model, _keys_under(model, blocks, block_name), load, device)
        report[block_name], outputs = _encode_block(model, block_name, layouts, config, inputs,
                                                    len(batches or []), device, workers)
        if inputs is not None:
            inputs = {i: _with_hidden(x, outputs[i]) for i, x in inputs.items()}
        _return_freed_memory()
    # embeddings, head: weights only (their inputs are tokens, or the last state), as many groups at a time as there
    # are processes (each process fits one)
    for start in range(0, len(outside), workers.count):
        names = outside[start : start + workers.count]
        with workers.phase("loading"):
            _materialize_(model, [k for n in names for k in group_keys[n]], load, device)
            _tie_weights(model)
        mine = names[workers.index:workers.index + 1]  # this process fits at most one
        with workers.phase("encoding"):
            fitted = workers.exchange({n: _fit(model, n, layouts, None, config, device) for n in mine})
        _return_freed_memory()  # the fit's temporaries, before the decoded weights of the errors
        for name in names:
            layouts[name], report[name] = install_layer(model, name, layouts[name], *fitted[name], device)
        del fitted
        _return_freed_memory()
    for name, layout in layouts.items():
        if layout.tied_to is not None:
            vq = vq_from_layout(model.get_submodule(name), layout)
            vq.tie_to_(model.get_submodule(layout.tied_to))
            model.set_submodule(name, vq)
    register_shared_(model, {})
    round_to_storage_(model, DENSE_STORAGE.get(config.dense_dtype))  # what stays dense, as the file will store it
    filled = config.replace(modules={n: lay.to_dict(config.method) for n, lay in layouts.items()})
    filled.record = CompressionRecord(
        base_model=base_model, recipe={**config.recipe.to_dict(), "streaming": True},
        calibration=None if batches is None else {"batches": len(batches), "statistics": "XᵀX per layer, block by "
                                                  "block on inputs propagated through the compressed blocks"})
    floors = chosen_floors(errors for block in blocks for errors in report[block].values())
    if floors:  # hessian_floor="auto"
        filled.record.calibration["hessian floor"] = floors
    model.vq_config = filled
    model.vq_timings = dict(workers.seconds)
    hooks.compressed(model, filled)
    return filled
