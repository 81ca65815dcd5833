"""The calibrated engine: block-sequential, output-aware encoding, with block-wise tuning.

Stage by stage ([`hf_vq.pipeline.stages`]) — the layers before the blocks, each block, the layers after — the
calibration batches run through the *already-compressed* stages before this one; each layer of the stage gets the
second moment `H = XᵀX` of the inputs it really sees ([`hf_vq.calibrate.HessianCollector`]), and is encoded to
minimise its output error `tr(ΔW H ΔWᵀ)` ([`hf_vq.codec.encode_output_aware`]: Hessian-weighted k-means init,
GPTQ-style assignment with error feedback, least-squares refits of codebooks and scales). Embeddings are encoded
with k-means weighted by how often each row was read. Then the block is tuned: its codebooks, scales, norms and
biases (codes fixed) are trained so that, fed the compressed prefix's outputs, it reproduces what the dense model
computes there (its hidden state carried through the dense blocks, [`_DenseTrajectory`]: the block also undoes
what the prefix got wrong), on the positions that are not padding, stopping on a held-out share of the batches. The
compressed stage then feeds the next.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import HessianCollector, LayerStatistics, merge_statistics, token_mask
from ..codec.kmeans import kmeans
from ..codec.output_aware import encode_output_aware
from ..codec.pq import relative_error, split_blocks
from ..config import LayerLayout, Recipe, VQConfig
from ..nn import VQModuleMixin, vq_class_for
from ..nn.model import vq_from_layout
from ..nn.storage import DENSE_STORAGE, round_to_storage_
from .allocation import cross_validated_floor, fixed_floor
from .encode import assign_rows, encode_unit, unit_rows, use_weights
from .parallel import Workers, layer_cost
from .stages import Stage, StageDone, forward_batches, half_of, plan_stages

__all__ = ["chosen_floors", "encode_calibrated", "encode_layers", "fit_layer", "install_layer", "tune_block_"]

logger = logging.getLogger(__name__)


def encode_calibrated(model: nn.Module, layouts: dict[str, LayerLayout], config: VQConfig,
                      batches: list[tuple[tuple, dict]], device: torch.device, progress: bool,
                      workers: Workers | None = None) -> tuple[dict[str, LayerLayout], dict[str, Any]]:
    """Compress `model`'s planned layers stage by stage, in place (VQ modules swapped in as each stage is done).

    With several `workers` (processes of one `accelerate launch`), the calibration batches and the layers of each
    stage are split between them and the results exchanged ([`hf_vq.pipeline.parallel`]); the outcome is the same.

    Returns:
        `(layouts, report)`: the layouts with their weight errors, and per stage what was measured (layers, output
        errors, tuning).

    Raises:
        `ValueError`: for shared codebook sets (the output-aware encoder fits one matrix at a time).
    """
    if any(lay.codebook_set is not None for lay in layouts.values()):
        raise ValueError("VQConfig(encoder='output-aware') encodes each layer for its own outputs; it does not take "
                         "codebooks shared across layers (share='pool'/'global'). Use share='layer', or "
                         "encoder='kmeans' for shared codebook sets.")
    workers = workers or Workers()
    layouts = dict(layouts)
    owners = [n for n, lay in layouts.items() if lay.tied_to is None]
    stages = plan_stages(model, owners, batches[0])
    report: dict[str, Any] = {"stages": [], "encoder": "output-aware"}
    tuned = [s.block for s in stages if s.block is not None] if config.recipe.tune_steps > 0 else []
    with workers.phase("calibration"):
        trajectory = _DenseTrajectory.start(model, tuned, batches, workers) if tuned else None
    bar = tqdm(total=len(owners), desc="hf_vq quantize (calibrated)", unit="layer", disable=not progress)
    for stage in stages:
        with workers.phase("calibration"):
            stats, pairs, halves = _measure(model, stage, batches, config, workers)
            dense_target = trajectory is not None and trajectory.covers(stage.block)
            if pairs and dense_target:  # the block is still dense
                pairs = trajectory.retarget(model.get_submodule(stage.block), pairs)
        entry = {"stage": stage.name, "layers": {}}
        with workers.phase("encoding"):
            fitted = encode_layers(model, stage.layers, layouts, stats, config, device, workers, halves)
        for name in stage.layers:
            layouts[name], entry["layers"][name] = install_layer(model, name, layouts[name], *fitted[name], device)
            bar.update(1)
            bar.set_postfix_str(f"{name} out={entry['layers'][name].get('output_error', float('nan')):.4f}")
        if pairs:
            with workers.phase("tuning"):
                entry["tuning"] = _tune_on_main(model.get_submodule(stage.block), pairs, config, workers)
            entry["tuning"]["target"] = ("dense model" if dense_target
                                         else "dense block on the compressed prefix's outputs")
            if trajectory is not None:
                trajectory.advance(stage.block, [target for _, target, _ in pairs])
        report["stages"].append(entry)
    bar.close()
    _tie_modules(model, layouts)
    return layouts, report


Pair = tuple[tuple[tuple, dict], torch.Tensor, "torch.Tensor | None"]  # (block inputs, target, token mask or None)


def _measure(model: nn.Module, stage: Stage, batches: list[tuple[tuple, dict]], config: VQConfig, workers: Workers
             ) -> tuple[dict[str, LayerStatistics], list[Pair], dict[str, tuple[LayerStatistics, LayerStatistics]]]:
    """Run the batches through the compressed prefix up to the end of `stage` (each process its share): the
    statistics of its layers; for a block to tune, per batch in batch order: its inputs, the dense block's
    output on them and which positions count (a text batch's attention mask `[batch, seq]`; padding never does);
    and, with `hessian_floor="auto"`, each layer's statistics of the first and of the second half of the batches
    (else empty)."""
    modules = dict(model.named_modules())
    collector = HessianCollector({n: modules[n] for n in stage.layers}, max_rows=config.recipe.max_rows)
    seen: dict[str, Any] = {}
    handles = []
    if stage.block is not None and config.recipe.tune_steps > 0:
        block = modules[stage.block]
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("in", (_detach(a), _detach(k))), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", _first_tensor(out).detach())))
    total: dict[str, LayerStatistics] = {}
    halves: tuple[dict[str, LayerStatistics], dict[str, LayerStatistics]] | None = \
        ({}, {}) if config.recipe.hessian_floor == "auto" else None
    pairs: list[Pair] = []

    def set_mask(kwargs: dict) -> None:
        collector.token_mask = token_mask(kwargs)

    def measure(i: int) -> tuple[int, dict[str, LayerStatistics], Any]:
        seen.clear()
        forward_batches(model, [batches[i]], last=stage.last, on_batch=set_mask)
        if "out" not in seen:
            return i, collector.take(), None
        mask = collector.token_mask  # this batch's [batch, seq], set by set_mask, or None
        fits = mask is not None and tuple(mask.shape) == tuple(seen["out"].shape[:2])
        return i, collector.take(), (seen["in"], seen["out"], mask.to(seen["out"].device) if fits else None)

    def merge(part: tuple[int, dict[str, LayerStatistics], Any]) -> None:
        merge_statistics(total, part[1])
        if halves is not None:
            merge_statistics(halves[half_of(part[0], len(batches))], part[1])
        if part[2] is not None:
            pairs.append(part[2])

    try:
        with collector.collecting():
            workers.reduce_batches(len(batches), measure, merge)
    finally:
        for handle in handles:
            handle.remove()
    split = {}
    if halves is not None:
        first, second = collector.result(halves[0]), collector.result(halves[1])
        split = {n: (first[n], second[n]) for n in first if n in second}
    return collector.result(total), pairs, split


Fitted = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", dict[str, float]]


def chosen_floors(layer_errors: Iterable[dict[str, float]]) -> str | None:
    """What the compression record says of the floors `hessian_floor="auto"` chose (from the layers' errors, as
    [`fit_layer`] records them), e.g. `"per layer, on a held-out half of the calibration: 0.0001 ×30, 1 ×2"`; None
    when no layer chose one."""
    floors = [errors["hessian_floor"] for errors in layer_errors if "hessian_floor" in errors]
    if not floors:
        return None
    return "per layer, on a held-out half of the calibration: " + ", ".join(
        f"{f:g} ×{floors.count(f)}" for f in sorted(set(floors)))


def encode_layers(model: nn.Module, names: list[str], layouts: dict[str, LayerLayout],
                  stats: dict[str, LayerStatistics], config: VQConfig, device: torch.device,
                  workers: Workers, halves: dict[str, tuple[LayerStatistics, LayerStatistics]] | None = None
                  ) -> dict[str, Fitted]:
    """Fit the named layers (this process its share by cost, see [`Workers.share`]); every process gets them all:
    name -> (codebooks `[M, k, d]`, codes `[rows, cols / d, M]`, scales `[rows]` or None, errors). `halves`: each
    layer's statistics of the two halves of the calibration (for `hessian_floor="auto"`)."""
    halves = halves or {}
    costs = [layer_cost(*layouts[n].matrix_shape, layouts[n].k, output_aware=stats.get(n) is not None
                        and stats[n].hessian is not None) for n in names]
    mine = {names[j]: fit_layer(model, names[j], layouts[names[j]], stats.get(names[j]), config, device,
                                halves.get(names[j])) for j in workers.share(costs)}
    return workers.exchange(mine)


def fit_layer(model: nn.Module, name: str, layout: LayerLayout, stat: LayerStatistics | None, config: VQConfig,
              device: torch.device, halves: tuple[LayerStatistics, LayerStatistics] | None = None) -> Fitted:
    """Encode one layer for its outputs (an embedding: its rows by how often they are read; a layer the data never
    reached: its weights). With `hessian_floor="auto"` and the statistics of the calibration's two `halves`, the
    objective's weight-space term is chosen for the layer first ([`cross_validated_floor`]; recorded in its errors
    as `"hessian_floor"`). The model is not changed (see [`install_layer`])."""
    module = model.get_submodule(name)
    matrix = vq_class_for(type(module))._weight_to_matrix(module._parameters["weight"].detach()).to(device, torch.float32)
    seed = config.seed + _stable_index(name)
    errors: dict[str, float] = {}
    if stat is not None and stat.hessian is not None:
        floor = fixed_floor(config)
        if config.recipe.hessian_floor == "auto" and halves is not None \
                and all(half.hessian is not None and half.count > 0 for half in halves):
            floor, _ = cross_validated_floor(matrix, layout.d, layout.k, layout.scales, halves, config)
            errors["hessian_floor"] = floor
        h = stat.objective_hessian().to(device)  # [cols, cols] or [G, cols, cols]
        result = encode_output_aware(matrix, h, k=layout.k, d=layout.d, num_codebooks=layout.num_codebooks,
                                     scales=layout.scales, seed=seed, n_iter=config.recipe.refit_rounds,
                                     kmeans_iters=min(config.n_iter, 20),  # an init: the GPTQ pass re-encodes
                                     floor=floor)
        codebooks, codes, scales = result.codebooks, result.codes, result.scales
        errors.update(output_error=float(result.stats["output_error"]),
                      output_error_init=float(result.stats["output_error_init"]))
    elif stat is not None and stat.row_counts is not None:  # an embedding: rows weighted by how often they are read
        codebooks, codes, scales = _encode_rows_by_use(matrix, stat.row_counts.to(device), layout, config, seed)
    else:  # a layer the calibration data never reached: weights only
        codebooks, codes_list, scales_list = encode_unit([matrix], layout, config, seed=seed)
        codes, scales = codes_list[0], scales_list[0]
    return codebooks.half().float(), codes, scales, errors


def install_layer(model: nn.Module, name: str, layout: LayerLayout, codebooks: torch.Tensor, codes: torch.Tensor,
                  scales: torch.Tensor | None, errors: dict[str, float], device: torch.device
                  ) -> tuple[LayerLayout, dict[str, float]]:
    """Swap in the VQ module of a fitted layer; returns its layout with the weight error, and its errors."""
    module = model.get_submodule(name)
    cls = vq_class_for(type(module))
    matrix = cls._weight_to_matrix(module._parameters["weight"].detach()).to(device, torch.float32)  # [rows, cols]
    vq = vq_from_layout(module, layout)
    vq.set_codes_(codes, codebooks, scales)
    with torch.no_grad():
        decoded = cls._weight_to_matrix(vq.decode_weight().float()).to(device)  # [rows, cols]
    errors = {**errors, "weight_error": relative_error(matrix, decoded)}
    model.set_submodule(name, vq)
    return dataclasses.replace(layout, rel_error=errors["weight_error"]), errors


def _tune_on_main(block: nn.Module, pairs: list, config: VQConfig, workers: Workers) -> dict[str, Any]:
    """Block-wise tuning on the main process (sequential optimizer steps); the others receive its parameters."""
    history = tune_block_(block, [p[0] for p in pairs], [p[1] for p in pairs], steps=config.recipe.tune_steps,
                          lr=config.recipe.tune_lr, masks=[p[2] for p in pairs],
                          dense_dtype=DENSE_STORAGE.get(config.dense_dtype)) if workers.is_main else None
    if workers.count > 1:
        params = _block_parameters(block)
        tuned = workers.broadcast([p.detach() for p in params] if workers.is_main else None)
        with torch.no_grad():
            for p, value in zip(params, tuned):
                p.copy_(value)
        history = workers.broadcast(history)
    return history


def _encode_rows_by_use(matrix: torch.Tensor, counts: torch.Tensor, layout: LayerLayout, config: VQConfig,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Encode an embedding table `[rows, cols]` for how its rows are used: k-means fitted on rows drawn with
    probability [`use_weights`]`(counts)` (every row keeps a share; frequent tokens weigh more), then every row
    assigned to its nearest codewords ([`assign_rows`]; per-row scales fitted after, with layout.scales).

    Returns:
        codebooks `[1, k, d]`, codes `[rows, cols / d, 1]`, scales `[rows]` or None.
    """
    sample = rows_by_use(matrix, counts, layout, seed)  # [n_draw, cols]
    codebook, _ = kmeans(split_blocks(sample, layout.d), layout.k, n_iter=config.n_iter, anneal=config.anneal,
                         seed=seed)  # [k, d]
    codebook = codebook.half().float()
    codes, scales = assign_rows(matrix, codebook, layout.scales)  # [rows, cols/d, 1], [rows] or None
    return codebook[None], codes, scales


def rows_by_use(matrix: torch.Tensor, counts: torch.Tensor, layout: LayerLayout, seed: int) -> torch.Tensor:
    """The rows of an embedding table `[rows, cols]` a codebook is fitted on: drawn with replacement with probability
    [`use_weights`]`(counts)`, enough for ~64 subvectors per codeword (between 1 and 4 times the table's rows),
    RMS-normalised with `layout.scales`. Returns `[n_draw, cols]`."""
    rows, cols = matrix.shape
    n_draw = min(4 * rows, max(rows, 64 * layout.k * layout.d // cols))
    drawn = torch.multinomial(use_weights(counts), n_draw, replacement=True,
                              generator=torch.Generator().manual_seed(seed))
    return unit_rows(matrix[drawn.to(matrix.device)], layout.scales)[0]


def _stable_index(name: str) -> int:
    """A small integer derived from a module name (a per-layer seed offset independent of the plan's order)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 10_007


def _tie_modules(model: nn.Module, layouts: dict[str, LayerLayout]) -> None:
    for name, layout in layouts.items():
        if layout.tied_to is not None:
            vq = vq_from_layout(model.get_submodule(name), layout)
            vq.tie_to_(model.get_submodule(layout.tied_to))
            layouts[name] = dataclasses.replace(layout, rel_error=layouts[layout.tied_to].rel_error)
            model.set_submodule(name, vq)


class _DenseTrajectory:
    """The dense model's hidden state entering the next block to tune, per calibration batch, so that each block is
    tuned to the dense model's own output (what the model should compute) rather than to the dense block's output on
    the compressed prefix's outputs (which keeps the prefix's errors). Started on the dense model (the first block's
    input); each block's dense output becomes the next block's input where the blocks chain (checked once on the
    dense model: a block's input is the previous block's output); past a block that does not chain, targets are
    local again."""

    def __init__(self, blocks: list[str], hidden: list[torch.Tensor], chained: set[str]) -> None:
        self.blocks = blocks  # the blocks to tune, in execution order
        self.block: str | None = blocks[0]  # the block `hidden` enters, or None once the chain is broken
        self.hidden = hidden  # per batch: the dense model's hidden state entering `block`
        self.chained = chained  # blocks whose input is the previous block's output, in the dense model

    @classmethod
    def start(cls, model: nn.Module, blocks: list[str], batches: list[tuple[tuple, dict]], workers: Workers
              ) -> "_DenseTrajectory":
        """Capture, on the still-dense `model`, the first block's input per batch and which of `blocks` chain."""
        modules = dict(model.named_modules())
        seen: dict[str, Any] = {}

        def first_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["hidden"] = _hidden_of(args, kwargs).detach()
            raise StageDone

        def measure(i: int) -> torch.Tensor:
            forward_batches(model, [batches[i]])
            return seen.pop("hidden")

        hidden: list[torch.Tensor] = []
        handle = modules[blocks[0]].register_forward_pre_hook(first_input, with_kwargs=True)
        try:
            workers.reduce_batches(len(batches), measure, hidden.append)
        finally:
            handle.remove()
        return cls(blocks, hidden, _chained_blocks(model, blocks, batches[0]))

    def covers(self, block: str | None) -> bool:
        return block is not None and block == self.block

    def retarget(self, block: nn.Module, pairs: list[Pair]) -> list[Pair]:
        """`pairs` (per batch: compressed-prefix inputs, target, mask) with the dense model's own output of the
        still-dense `block` as target: the block run on the batch's inputs with the dense model's hidden state in
        place of the prefix's (no hooks may be active: nothing is measured here)."""
        out = []
        with torch.no_grad():
            for (inputs, _, mask), hidden in zip(pairs, self.hidden, strict=True):
                args, kwargs = _with_hidden(*inputs, hidden)
                out.append((inputs, _first_tensor(block(*args, **kwargs)).detach(), mask))
        return out

    def advance(self, block: str, outputs: list[torch.Tensor]) -> None:
        """`block` is done; its dense `outputs` (per batch) enter the next block if that one chains to it."""
        nxt = self.blocks.index(block) + 1
        if self.covers(block) and nxt < len(self.blocks) and self.blocks[nxt] in self.chained:
            self.block, self.hidden = self.blocks[nxt], outputs
        else:
            self.block, self.hidden = None, []


def _chained_blocks(model: nn.Module, blocks: list[str], batch: tuple[tuple, dict]) -> set[str]:
    """The blocks (after the first) whose input, on `batch` through the dense `model`, is exactly the previous
    block's output — nothing runs between them."""
    modules = dict(model.named_modules())
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name in blocks:
        handles.append(modules[name].register_forward_pre_hook(
            lambda m, a, k, n=name: ins.__setitem__(n, _hidden_of(a, k)), with_kwargs=True))
        handles.append(modules[name].register_forward_hook(
            lambda m, a, out, n=name: outs.__setitem__(n, _first_tensor(out))))
    try:
        forward_batches(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    return {b for a, b in zip(blocks, blocks[1:]) if a in outs and b in ins and outs[a].shape == ins[b].shape
            and torch.equal(outs[a], ins[b])}


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's hidden-state input: its first tensor argument (positional first, then keyword)."""
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """`(args, kwargs)` with their first tensor argument (see [`_hidden_of`]) replaced by `hidden`."""
    for j, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return (*args[:j], hidden, *args[j + 1:]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: hidden}


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        return next(o for o in out if isinstance(o, torch.Tensor))
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    raise TypeError(f"the block returned {type(out).__name__}, not a tensor or a tuple starting with one")


def _block_parameters(block: nn.Module) -> list[nn.Parameter]:
    """What block-wise tuning trains: codebooks and scales of the block's VQ modules, its norms and biases."""
    params, seen = [], set()
    for module in block.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
            "norm" in type(module).__name__.lower()
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            vq_owned = isinstance(module, VQModuleMixin) and pname in ("codebooks", "scales")
            if vq_owned or is_norm or pname.endswith("bias"):
                seen.add(id(param))
                params.append(param)
    return params


@torch.enable_grad()  # quantize_ runs under no_grad
def tune_block_(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor], *, steps: int,
                lr: float = Recipe.tune_lr, held_out: float = 0.2, masks: list[torch.Tensor | None] | None = None,
                dense_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Train `block`'s codebooks, scales, norms and biases (codes fixed) so that its outputs on `inputs` match the
    dense `targets`; stop on the held-out share of the batches. In place; returns the losses.

    The loss is the output's squared error relative to the target's energy, over the positions `masks` keeps (per
    batch a boolean `[batch, seq]` over the output's leading dimensions, or None for all): a padded position's
    output is read by nothing, so fitting it only takes freedom from the real tokens. The best state on the held-out
    batches is kept (so tuning never makes the held-out error worse), and codebooks and scales are rounded to fp16,
    norms and biases to `dense_dtype` (`Recipe.dense_dtype`), as stored.
    """
    n_val = max(1, round(len(inputs) * held_out)) if len(inputs) > 1 else 0
    train, val = list(range(len(inputs) - n_val)), list(range(len(inputs) - n_val, len(inputs)))
    params = _block_parameters(block)
    if not params or not train:
        return {"steps": 0}
    states = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    was_training = block.training
    block.eval()  # dropout off; BatchNorm statistics stay as they are
    optimizer = torch.optim.Adam(params, lr=lr)

    def loss_of(i: int) -> torch.Tensor:
        args, kwargs = inputs[i]
        out = _first_tensor(block(*args, **kwargs)).float()  # like the target
        target = targets[i].float()
        mask = None if masks is None else masks[i]  # [batch, seq] bool or None
        if mask is not None:
            out, target = out[mask], target[mask]  # [kept positions, ...]
        return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in (val or train)) / len(val or train)

    best = held_out_loss()
    history = {"held_out_before": best, "held_out": []}
    best_state = [p.detach().clone() for p in params]
    step, stale = 0, 0
    try:
        while step < steps and stale < 2:
            for i in train:
                optimizer.zero_grad()
                loss_of(i).backward()
                optimizer.step()
                step += 1
                if step >= steps:
                    break
            current = held_out_loss()
            history["held_out"].append(current)
            if current < best:
                best, stale = current, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
    finally:
        with torch.no_grad():
            for p, kept in zip(params, best_state):
                p.copy_(kept)
        round_to_storage_(block, dense_dtype)
        for p in block.parameters():
            p.requires_grad_(states.get(id(p), True))
        block.train(was_training)
    history.update(steps=step, held_out_after=held_out_loss())
    return history
