"""The model-level verbs: `quantize_` compresses any `nn.Module` in place; `dequantize_` undoes it.

Everything else — the CLI, `from_pretrained(..., quantization_config=...)`, timm loading, the scripts — calls
these. The steps: select and plan ([`hf_vq.pipeline.select`]), measure calibration statistics
([`hf_vq.calibrate`]), permute ([`hf_vq.pipeline.permute`]), encode ([`hf_vq.pipeline.encode`]), swap the VQ
modules in, and record what happened ([`hf_vq.CompressionRecord`] on the returned config).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import calibration_batches, input_moments, permute_moments
from ..codec.pq import decode, relative_error
from ..config import SHARED_CODEBOOKS, CompressionRecord, LayerLayout, VQConfig
from ..nn import VQModuleMixin, register_shared_, shared_codebooks_owner, vq_class_for, vq_modules
from ..nn.model import vq_from_layout
from ..nn.storage import DENSE_STORAGE, round_to_storage_
from . import hooks
from .allocation import allocate_layouts
from .calibrated import chosen_floors, encode_calibrated
from .encode import encode_unit, encoding_units, entry_weights
from .parallel import Workers
from .permute import PermutationReport, permute_
from .select import plan, unmatched_patterns

__all__ = ["quantize_", "dequantize_"]

logger = logging.getLogger(__name__)


def _default_device(model: nn.Module) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def quantize_(
    model: nn.Module,
    config: VQConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    example_inputs: Any = None,
    calibration: Any = None,
    base_model: str | None = None,
    accelerator: Any = None,
) -> VQConfig:
    """Compress `model` in place with vector quantization: the one verb everything else calls.

    Every selected `nn.Linear`, `nn.Conv2d`, `nn.Embedding` and transformers `Conv1D` is replaced by
    its VQ counterpart (same class underneath, so `forward` is unchanged) holding packed codes and
    codebooks learnt on the weight's subvectors: by (annealed) k-means (`method="pq"`) or additive
    quantization (`method="aq"`). With `config.share` `"pool"`/`"global"` the subvectors of every module of
    a codebook set are quantized together and the modules hold one shared `nn.Parameter`, registered as
    `vq_shared_codebooks_<set>` (on the base model of a transformers model).

    Args:
        model (`nn.Module`): any PyTorch model; its weights must be materialised (not on meta).
        config (`VQConfig`, *optional*): the scheme; defaults to `VQConfig()` (k=256, paper block sizes).
        device (`torch.device` or `str`, *optional*): where k-means runs; CUDA when available by default.
            Compressed modules stay on the device of the weights they replace.
        progress (`bool`, defaults to `True`): show a progress bar per layer.
        example_inputs (*optional*): inputs to trace the model with for PQF's permutation step
            (`config.permute`): a tensor, a tuple, a dict of keyword inputs or `(args, kwargs)`. By default
            timm's `pretrained_cfg` input size or transformers' main input is used; when the model cannot
            be traced the permutation is skipped (the record says why, see [`hf_vq.permute_`]).
        calibration (*optional*): a few batches of real inputs (a tensor, a dict of model inputs, or a list of
            them). When given, the error is measured as the layers' outputs see it: the permutation search uses
            the activation-aware objective (each weight column scaled by the RMS of its input channel on these
            batches) and, with `method="pq"`, k-means is weighted (each weight entry by the second moment of its
            input channel, which follows the permutation by indexing; see [`hf_vq.codec.kmeans.kmeans`]). The
            checkpoint format is the same. Without it: the paper's weight-only objective and plain k-means.
        base_model (`str`, *optional*): the dense model's Hub id or folder, recorded as provenance (model card
            `base_model`). By default kept from a previous compression of this model (after `dequantize_`).
        accelerator (*optional*): an `accelerate.PartialState` / `Accelerator` (or a [`hf_vq.pipeline.parallel.Workers`])
            when several processes compress the model together (`accelerate launch`): each process runs its share of
            the calibration batches, permutation spaces and layers, and the results are exchanged so that every
            process ends with the same compressed model as one process would (see [`hf_vq.pipeline.parallel`]).
            Every process must call `quantize_` with the same model, config and calibration batches.
            `model.vq_timings` holds this process's seconds per phase (calibration, permutation, allocation,
            encoding, tuning, exchange).

    Returns:
        [`VQConfig`]: a copy of `config` whose `modules` holds the layout (k, d, shape, relative error) of every
        compressed module and whose `record` ([`CompressionRecord`]) says what was done: base model, recipe,
        permutation, calibration. It is also stored as `model.vq_config` (for transformers models, also
        `model.config.quantization_config`).

    Raises:
        `ValueError`: if the model is already compressed, on the meta device, a block size does not fit a layer, or
            the config selects no module at all (checked before any work).

    Example:
        ```python
        >>> import timm, hf_vq
        >>> model = timm.create_model("resnet18")
        >>> cfg = hf_vq.quantize_(model, hf_vq.VQConfig(k=256))
        >>> hf_vq.size_report(model).ratio  # doctest: +SKIP
        28.9
        ```
    """
    config = VQConfig() if config is None else config
    _check_model(model)
    previous = getattr(model, "vq_config", None)  # a dequantized model keeps its provenance
    batches = calibration_batches(calibration) if calibration is not None else None
    if config.encoder == "output-aware" and batches is None:
        raise ValueError("VQConfig(encoder='output-aware') measures each layer's error on real inputs: pass "
                         "calibration= (a few batches of model inputs), or use encoder='kmeans' (data-free).")
    layouts = plan(model, config)
    for pattern in unmatched_patterns(model, config):
        logger.warning("hf_vq: the pattern %r (modules_to_not_convert / overrides) matches no module of this model.",
                       pattern)
    workers = Workers.of(accelerator)
    allocation = None
    if layouts and (config.target_ratio is not None or config.bits_per_weight is not None):
        with workers.phase("allocation"):
            layouts, allocation = allocate_layouts(model, layouts, config, batches, workers)
    if not layouts:
        raise ValueError(
            f"No module of this {type(model).__name__} matches the config {config.spec!r} (modules_to_not_convert="
            f"{config.modules_to_not_convert}, overrides={sorted(config.overrides)}): nothing would be compressed, "
            "and the result could not be loaded back as an hf_vq checkpoint. Check those patterns and block_size "
            "(0 leaves a layer kind dense)."
        )
    # what stays dense holds the values the file will store (Recipe.dense_dtype), before anything is measured on it
    round_to_storage_(model, DENSE_STORAGE.get(config.dense_dtype), skip={f"{n}.weight" for n in layouts})
    run_device = torch.device(device) if device is not None else _default_device(model)
    owners = [n for n, lay in layouts.items() if lay.tied_to is None]
    with workers.phase("calibration"):
        moments = input_moments(model, owners, batches, reduce_batches=workers.reduce_batches) \
            if batches is not None and layouts else {}
    report = None
    if config.permute and layouts:  # PQF's first step: permute coupled channels (same function, easier subvectors)
        with workers.phase("permutation"):
            report = permute_(model, config, example_inputs=example_inputs, layouts=layouts, device=run_device,
                              moments=moments or None, accelerator=workers)
        moments = {n: permute_moments(m, report.input_index[n]) if n in report.input_index else m
                   for n, m in moments.items()}  # the statistics follow the permutation
    engine = None
    progress = progress and workers.is_main
    if config.encoder == "output-aware" and layouts:
        layouts, engine = encode_calibrated(model, layouts, config, batches, run_device, progress, workers)
        weighted = {}
        shared = {}
    else:
        weighted = moments if any(layouts[n].method == "pq" for n in owners) else {}
        with workers.phase("encoding"):
            layouts, done, shared = _encode_all(model, layouts, config, run_device, weighted, progress, workers)
        for name, vq in done.items():
            model.set_submodule(name, vq)
    register_shared_(model, shared)
    filled = config.replace(modules={n: lay.to_dict(config.method) for n, lay in layouts.items()})
    filled.record = _record(config, report, batches, bool(weighted), base_model, previous)
    filled.record.allocation = allocation
    if engine is not None:
        filled.record.calibration = {**(filled.record.calibration or {}), "statistics": "XᵀX per layer, block by block "
                                     "on inputs from the compressed prefix", "encoder": "output-aware",
                                     "block tuning steps": config.tune_steps}
        floors = chosen_floors(errors for stage in engine["stages"] for errors in stage["layers"].values())
        if floors:  # hessian_floor="auto"
            filled.record.calibration["hessian floor"] = floors
        if config.tune_steps:
            targets = {stage["tuning"]["target"] for stage in engine["stages"] if "tuning" in stage}
            filled.record.calibration["block tuning target"] = ", ".join(sorted(targets)) + " (padding excluded)"
    model.vq_config = filled
    model.vq_timings = dict(workers.seconds)
    _keep_report(model, report)
    hooks.compressed(model, filled)  # integrations (transformers: save_pretrained / from_pretrained round trip)
    return filled


def _check_model(model: nn.Module) -> None:
    if vq_modules(model):
        raise ValueError("The model is already compressed with hf_vq (it holds VQ modules); call dequantize_ first.")
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"quantize_ needs materialised weights, but parameter {meta!r} is on the meta device (an empty model, "
            "e.g. built with init_empty_weights or device_map='meta'). Load the weights first (from_pretrained "
            "without device_map='meta', or model.to_empty(...) + load_state_dict), or, for a model larger than "
            "memory, compress its folder one block at a time (`hf-vq compress --stream`, "
            "hf_vq.integrations.transformers.streaming.compress_streaming)."
        )


def _encode_all(model: nn.Module, layouts: dict[str, LayerLayout], config: VQConfig, device: torch.device,
                moments: dict[str, torch.Tensor], progress: bool, workers: Workers
                ) -> tuple[dict[str, LayerLayout], dict[str, nn.Module], dict[str, nn.Parameter]]:
    """Encode every unit of the plan (each process its share, see [`Workers.share`]); returns the layouts with their
    errors, the new VQ modules by name, and the shared codebook sets (set -> the one `nn.Parameter` `[M, k, d]` its
    modules hold)."""
    modules = dict(model.named_modules())
    layouts = dict(layouts)
    done: dict[str, nn.Module] = {}
    shared: dict[str, nn.Parameter] = {}
    units = encoding_units(layouts)

    def matrices_of(names: list[str]) -> list[torch.Tensor]:  # [rows_j, cols_j] each
        return [vq_class_for(type(modules[n]))._weight_to_matrix(modules[n]._parameters["weight"].detach())
                .to(device, torch.float32) for n in names]

    def fit(first: int, names: list[str]) -> tuple:
        weights = [entry_weights(modules[n], vq_class_for(type(modules[n])), layouts[n].kind, moments.get(n))
                   for n in names]
        return encode_unit(matrices_of(names), layouts[names[0]], config, seed=config.seed + first,
                           weights=weights if any(w is not None for w in weights) else None)

    costs = [sum(math.prod(layouts[n].matrix_shape) for n in names) for _, _, names in units]
    mine = workers.share(costs)
    bar = tqdm(total=len(mine), desc="hf_vq quantize", unit="layer" if config.share == "layer" else "set",
               disable=not progress)
    fitted = {}
    for j in mine:
        fitted[j] = fit(units[j][0], units[j][2])
        bar.update(1)
        bar.set_postfix_str(units[j][1] or units[j][2][0])
    bar.close()
    fitted = workers.exchange(fitted)
    for j, (first, set_name, names) in enumerate(units):
        matrices = matrices_of(names)
        codebooks, codes, scales = fitted[j]  # [M, k, d]; per module [rows, cols / d, M] and [rows] or None
        codebooks, codes = codebooks.to(device), [c.to(device) for c in codes]
        scales = [None if s is None else s.to(device) for s in scales]
        if set_name is not None:  # [M, k, d]
            shared[set_name] = nn.Parameter(codebooks.to(modules[names[0]]._parameters["weight"].device))
        for name, matrix, code, scale in zip(names, matrices, codes, scales):
            vq = vq_from_layout(modules[name], layouts[name])
            vq.set_codes_(code, codebooks, scale)
            if set_name is not None:
                vq.share_codebooks_(shared[set_name], set_name)
            decoded = decode(code, codebooks) * (1 if scale is None else scale[:, None])  # [rows, cols]
            layouts[name] = dataclasses.replace(layouts[name], rel_error=relative_error(matrix, decoded))
            done[name] = vq
    for name, layout in layouts.items():  # tied modules: the owner's codes buffer and codebooks parameter
        if layout.tied_to is not None:
            owner: VQModuleMixin = done[layout.tied_to]
            vq = vq_from_layout(modules[name], layout)
            vq.tie_to_(owner)
            layouts[name] = dataclasses.replace(layout, rel_error=layouts[layout.tied_to].rel_error)
            done[name] = vq
    return layouts, done, shared


def _record(config: VQConfig, report: PermutationReport | None, calibration: Any, weighted: bool,
            base_model: str | None, previous: VQConfig | None) -> CompressionRecord:
    """What this compression did, keeping the provenance of a previous compression of the same weights."""
    kept = previous.record if previous is not None and previous.record is not None else CompressionRecord()
    calib = None
    if calibration is not None:
        calib = {"batches": len(calibration), "statistics": "input second moments per channel"}
        if config.record is not None and config.record.calibration:  # the caller said what the data is
            calib = {**config.record.calibration, **calib}
    return CompressionRecord(
        base_model=base_model or kept.base_model, license=kept.license, library=kept.library,
        recipe=config.recipe.to_dict(), permutation=None if report is None else report.summary(),
        calibration=calib, kmeans_weighted=weighted,
    )


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every VQ module by a dense module with the decoded weight (in place; returns `model`).

    The model keeps only the provenance of its compression (`model.vq_config` becomes an empty config whose
    record holds the base model and licence), so compressing it again records the same base model.
    """
    dense: dict[int, nn.Module] = {}
    for name, module in vq_modules(model).items():
        new = module.dequantize()
        tied = dense.get(id(module.codes))  # tied modules share their codes buffer (not only a codebook set)
        if tied is not None and tied.weight.shape == new.weight.shape:
            new.weight = tied.weight  # keep tied modules tied
        dense.setdefault(id(module.codes), new)
        model.set_submodule(name, new)
    for holder in (model, shared_codebooks_owner(model)):
        for key in [k for k in holder._parameters if k.startswith(SHARED_CODEBOOKS)]:
            del holder._parameters[key]
    previous = getattr(model, "vq_config", None)
    if previous is not None:
        emptied = previous.replace(modules={})
        emptied.record = previous.record.provenance() if previous.record is not None else None
        model.vq_config = emptied
    _keep_report(model, None)
    hooks.restored(model)
    return model


def _keep_report(model: nn.Module, report: PermutationReport | None) -> None:
    """`model.vq_permutation_report`: the detailed report of the last permutation step, for inspection (cards read
    the summary in `vq_config.record`); absent when the last compression did not permute."""
    if report is not None:
        model.vq_permutation_report = report
    elif "vq_permutation_report" in model.__dict__:
        del model.vq_permutation_report
