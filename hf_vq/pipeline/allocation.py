"""Bit allocation to a target size: each layer's (k, d) — or dense — chosen by measured sensitivity.

1. One pass of the calibration batches through the dense model gives every layer's `H = XᵀX` (embeddings: how often
   each row is read).
2. For every layer and every option of a small menu ([`MENU`]: 1 to 8 bits per weight, plus dense), the encoder
   that will run, on a sample of at most 256 of the layer's rows, measures the layer's relative output error
   `e_l(o)`: the output-aware encoder (one GPTQ pass, a codebook and scale refit) when `config.encoder` is
   `"output-aware"`, else a short Hessian-diagonal-weighted k-means; embedding tables, whose menu adds larger
   codebooks ([`EMBEDDING_MENU`]), a short k-means on rows drawn by use, measured on another draw. Other layers'
   options are fitted on the statistics of the first half of the calibration batches and their errors measured on
   those of the second half: measured on the inputs it was fitted to, an error is optimistic where the inputs span
   few directions (EfficientNet-Lite0's classifier reads one pooled vector per image, 256 vectors of 1,280 channels:
   its 2-bit error is 0.0006 in-sample, 0.008 on another half of the crops, 0.077 on the test photos;
   benchmarks/results/experiment_heldout_estimate.md). The halves are contiguous, so that what is held out is
   other photos ([`hf_vq.data.photo_batches`] batches crops photo by photo) or other texts, not other crops of the
   same photos: fitted on some calibration photos and measured on the others, Lite0's layers' errors are 0.79-1.31x
   their errors on the test photos, measured on other crops of the same photos 0.23-1.02x
   (benchmarks/results/experiment_floor_cv.md).
   (The k-means estimate is no stand-in for the output-aware encoder: on MiniLM's last MLP output layer it put
   d = 1 at 0.013, the encoder reaches 2e-5, and the allocation kept the layer dense at 32 bits per weight:
   benchmarks/results/experiment_allocation_proxy.md.) The sampled rows' error is scaled to all rows and divided by
   the whole layer's output energy: one row can carry most of it (MiniLM's FFN output layers, row 99: up to 95%).
3. The layer's effect on the model's final output, `α_l`: the error a quick 2-bit encoding ([`_REFERENCE`]) leaves
   in that layer alone goes into the model, and the relative change of the final output per unit of the layer's
   relative output error is measured (HIGGS's linear model of the loss increase): of every floating-point output,
   or of those `config.allocation_outputs` names (a sentence-embedding model's `last_hidden_state:mean`, the token
   states averaged per sentence: a layer only `pooler_output` reads then costs nothing to ruin). A quantization
   error, not Gaussian noise: the two differ in where the error lands in the layer's outputs; on MiniLM, against
   one layer's real cost on held-out text, noise overestimated the attention value layers 5-6x and the other
   matrices 1.4-3.6x, and the spread of log(truth / estimate) falls from 0.43 to 0.25 with quantization error,
   0.16 with the pooled output (benchmarks/results/experiment_sensitivity.md). An embedding table's options are
   measured end to end instead of `α·e`: each option's quickly coded table (the rows calibration read) goes into
   the model — a table is cheap to code, and its 1-bit options, at relative errors near 0.3, are far from the
   linear regime. (On one layer's cost this overestimates the table's 1-bit option 2x, against 1.4-1.8x for the
   other estimates; with it, `hf-vq compress --ratio 16 --seed 1` no longer gives the table 1 bit:
   benchmarks/results/experiment_seeds_minilm.md.)
4. A multiple-choice knapsack ([`hf_vq.codec.allocate_bits`]) picks the options minimising `Σ_l D_l(o_l)` (the
   distortion `D_l(o) = α_l e_l(o)`, or the table's measured change) under the budget: `target_ratio` of the whole
   weights file (every tensor left dense counts, at the width the file stores it — 16 bits with `Recipe.dense_dtype`,
   the default with allocation — and the safetensors header), or `bits_per_weight` over the compressible layers.

Without calibration data the allocation is data-free: `H = I` (weight error), `α_l = 1` and `D_l = e_l`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..calibrate import HessianCollector, LayerStatistics, mean_pool, merge_statistics, to_device, token_mask
from ..codec.allocate import Option, allocate_bits, option_bits
from ..codec.hessian import output_energy, output_error, row_output_errors
from ..codec.kmeans import kmeans
from ..codec.output_aware import FLOOR_CANDIDATES, encode_output_aware
from ..codec.pq import clamp_k, decode, split_blocks
from ..config import LayerLayout, VQConfig, fits_kernel
from ..nn import vq_class_for
from ..nn.storage import DENSE_STORAGE, stored_bits
from .encode import assign_rows, unit_rows, use_weights
from .parallel import Workers, layer_cost
from .stages import forward_batches, half_of

__all__ = ["MENU", "EMBEDDING_MENU", "allocate_layouts", "cross_validated_floor", "fixed_floor", "HEADER_BYTES_PER_TENSOR", "RECORD_BYTES_PER_LAYER"]

#: (d, k) options: 1, 1.33, 2, 2.5, 2.67, 3, 4, 4, 5, 6 and 8 bits per weight (d = 1 is per-layer scalar k-means:
#: 16 to 256 levels, near-lossless steps below dense for the most sensitive layers). The steps between 2 and 4 bits
#: (k = 1024 at d = 4, k = 64 at d = 2) let the knapsack give a large layer (MiniLM's word embeddings: half the
#: weights) a little more than 2 bits without taking 4 from the rest: MiniLM at 10x, 0.9766 -> 0.9781 held-out
#: cosine, 131 -> 145 s per `hf-vq compress` on 2 cores (benchmarks/results/engine.md at commits b3dd965 and 9adc2d7).
#: The 5- and 6-bit scalar codes (k = 32 / 64 at d = 1) fill the gap between 4 and 8 bits, where budgets of 4-6 bits
#: per weight (Lite0 at 6x and 8x) split layers between the two. Lite0's mean KL over seeds 0-2 at 8x: 0.172 -> 0.142
#: (bundled calibration photos), 0.133 -> 0.117 (natural photos); at 6x 0.049 -> 0.045 and 0.036 -> 0.039, not
#: resolved; the same mean top-1 agreement within the seeds' ranges; MiniLM at 10x and 16x the same mean cosine
#: (benchmarks/results/experiment_seeds_*.md, against those files at commit 93e080c). Larger codebooks (k = 4096 at
#: d = 4) cost 16x the assignment time of the output-aware encoder and are left out.
MENU: tuple[tuple[int, int], ...] = ((8, 256), (6, 256), (4, 256), (4, 1024), (3, 256), (2, 64), (2, 256), (1, 16),
                                     (1, 32), (1, 64), (1, 256))
#: Further options for embedding tables, whose rows are looked up (no matrix-product kernel, no output-aware
#: assignment: plain k-means, which affords large codebooks): 1.375, 1.5, 1.83, 2 and 3 bits per weight of codes.
#: At nearly equal bits a longer block with a larger codebook codes the table better: MiniLM's word embeddings (the
#: dense model with only the table coded; 256 held-out Lee sentences) keep cosine 0.956 at d = 6, k = 256 (1.38 bits
#: with scales) and 0.966 at d = 8, k = 2048 (1.44 bits with scales and codebook); 0.984 at d = 4, k = 256 (2.04)
#: and 0.987 at d = 6, k = 4096 (2.08) (benchmarks/results/experiment_embedding_menu.md). On a weight matrix a
#: per-layer codebook this large is itself costly (a 4096 x 6 fp16 codebook is 2.7 bits per weight of a 384 x 384
#: layer), and the output-aware encoder's assignment grows with k: the matrices keep MENU.
EMBEDDING_MENU: tuple[tuple[int, int], ...] = ((8, 2048), (8, 4096), (6, 2048), (6, 4096), (4, 4096))
#: Bytes of safetensors header per stored tensor besides twice its name (once as the tensor's key, once in the CRC32
#: checksums of the metadata): dtype, shape, offsets and the checksum. And per allocated layer besides its name: its
#: entry in the compression record (choice and sensitivity). Fitted on hf_vq's 10x MiniLM checkpoint (36,096 header
#: bytes for 183 tensors) and rounded up, so that the file lands on the safe side of the ratio.
HEADER_BYTES_PER_TENSOR = 100
RECORD_BYTES_PER_LAYER = 70
_HEADER_BYTES_FIXED = 2_000  # the format keys, the spec and the record's other fields
_SAMPLE_ROWS = 256  # rows of a layer each menu option is measured on
#: The option whose quick encoding measures each layer's sensitivity: 2 bits per weight, the middle of the menu (a
#: kernel it does not fit takes the next smaller block that does: d = 3 for a 3 x 3 depthwise conv).
_REFERENCE = (4, 256)


def allocate_layouts(model: nn.Module, layouts: dict[str, LayerLayout], config: VQConfig,
                     batches: list[tuple[tuple, dict]] | None, workers: Workers | None = None
                     ) -> tuple[dict[str, LayerLayout], dict[str, Any]]:
    """Choose each planned layer's (k, d) — or leave it dense — to meet `config.target_ratio` / `bits_per_weight`.

    With several `workers`, the calibration batches, the layers' sensitivities and their menus are split between
    the processes and exchanged (the same allocation as one process makes).

    Returns:
        `(layouts, record)`: the layouts of the layers that stay compressed (tied modules follow their owner), and
        the allocation record (target, budget, planned bits, each layer's choice and its measured sensitivity).

    Raises:
        `ValueError`: if the target cannot be met even at the smallest option of every layer (names the minimum).
    """
    owners = [n for n, lay in layouts.items() if lay.tied_to is None]
    modules = dict(model.named_modules())
    matrices = {n: vq_class_for(type(modules[n]))._weight_to_matrix(modules[n]._parameters["weight"].detach()).float()
                for n in owners}  # [rows, cols]
    workers = workers or Workers()
    halves = _dense_statistics(model, modules, owners, batches, workers) if batches else ({}, {})
    stats: dict[str, LayerStatistics] = {}
    for half in halves:
        merge_statistics(stats, half)  # all the batches
    probe = _Probe(model, batches, config.allocation_outputs) if batches else None
    alphas = _sensitivities(probe, modules, owners, matrices, stats, workers, layouts, config) if probe \
        else dict.fromkeys(owners, 1.0)
    costs = [layer_cost(min(_SAMPLE_ROWS, matrices[n].shape[0]), matrices[n].shape[1], max(k for _, k in MENU),
                        output_aware=config.encoder == "output-aware") for n in owners]
    menus = workers.exchange({owners[j]: _menu(layouts[owners[j]], matrices[owners[j]], stats.get(owners[j]), config,
                                               alphas[owners[j]], halves[0].get(owners[j]), halves[1].get(owners[j]),
                                               None if probe is None else functools.partial(probe.change,
                                                                                            modules[owners[j]]))
                              for j in workers.share(costs)})
    options = [[opt for opt, _ in menus[name]] for name in owners]
    labels = [[choice for _, choice in menus[name]] for name in owners]
    budget, fixed = _budget(model, layouts, owners, config)
    try:
        allocation = allocate_bits(options, budget, fixed_bits=fixed)
    except ValueError as err:
        raise ValueError(f"VQConfig(target_ratio={config.target_ratio}, bits_per_weight={config.bits_per_weight}) "
                         f"cannot be met: {err}") from None
    chosen = {name: labels[i][c] for i, (name, c) in enumerate(zip(owners, allocation.choices))}
    out = _apply(layouts, chosen)
    record = {"target_ratio": config.target_ratio, "bits_per_weight": config.bits_per_weight,
              "outputs": list(config.allocation_outputs) if config.allocation_outputs else "all",
              "budget_bits": budget, "planned_bits": allocation.bits, "fixed_bits": fixed,
              "data": "calibration" if batches else "data-free (weight error, equal sensitivity)",
              "layers": {name: {"choice": "dense" if c is None else f"d{c[0]}k{c[1]}", "sensitivity": alphas[name]}
                         for name, c in chosen.items()}}
    return out, record


def _apply(layouts: dict[str, LayerLayout], chosen: dict[str, tuple[int, int] | None]) -> dict[str, LayerLayout]:
    out = {}
    for name, layout in layouts.items():
        owner = layout.tied_to or name
        choice = chosen.get(owner)
        if choice is None:
            continue  # left dense (with its tied modules)
        d, k = choice
        n_sub = layouts[owner].matrix_shape[0] * (layouts[owner].matrix_shape[1] // d)
        out[name] = dataclasses.replace(layout, d=d, k=clamp_k(k, n_sub))
    return out


def _dense_statistics(model: nn.Module, modules: dict[str, nn.Module], owners: list[str],
                      batches: list[tuple[tuple, dict]], workers: Workers
                      ) -> tuple[dict[str, LayerStatistics], dict[str, LayerStatistics]]:
    """Every layer's statistics on the dense model: of the first half of the batches, and of the second (empty with
    one batch)."""
    collector = HessianCollector({n: modules[n] for n in owners}, max_rows=16_384)
    halves: tuple[dict[str, LayerStatistics], dict[str, LayerStatistics]] = ({}, {})

    def on_batch(kwargs: dict) -> None:
        collector.token_mask = token_mask(kwargs)

    def measure(i: int) -> tuple[int, dict[str, LayerStatistics]]:
        forward_batches(model, [batches[i]], on_batch=on_batch)
        return half_of(i, len(batches)), collector.take()

    with collector.collecting():
        workers.reduce_batches(len(batches), measure, lambda part: merge_statistics(halves[part[0]], part[1]))
    return collector.result(halves[0]), collector.result(halves[1])


def _hessian(stat: LayerStatistics | None, cols: int, device: torch.device) -> torch.Tensor:
    if stat is not None and stat.hessian is not None:
        return stat.objective_hessian().to(device)
    return torch.eye(cols, dtype=torch.float64, device=device)


def _row_weights(stat: LayerStatistics | None) -> torch.Tensor | None:
    if stat is None or stat.row_counts is None:
        return None
    return use_weights(stat.row_counts)  # [rows]


def _sample_rows(rows: int, groups: int, seed: int, max_rows: int) -> torch.Tensor:
    """At most `max_rows` row indices (sorted): whole groups for grouped layers."""
    gen = torch.Generator().manual_seed(seed)
    if rows <= max_rows:
        return torch.arange(rows)
    if groups > 1:
        per = rows // groups
        chosen = torch.randperm(groups, generator=gen)[:max(1, max_rows // per)].sort().values  # [g]
        return (chosen[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
    return torch.randperm(rows, generator=gen)[:max_rows].sort().values


def _quick_error(matrix: torch.Tensor, h: torch.Tensor, d: int, k: int, config: VQConfig, scales: bool,
                 max_rows: int = _SAMPLE_ROWS, h_test: torch.Tensor | None = None, energy: float | None = None,
                 floor: float | None = None) -> float:
    """Relative output error at (d, k), estimated on at most `max_rows` rows (embeddings: [`_embedding_error`]): the
    output-aware encoder (one GPTQ pass and a refit) for layers it encodes, else a short Hessian-diagonal-weighted
    k-means, fitted under `h` and measured under `h_test` (inputs the fit did not see; default `h`): the sampled rows'
    error times `rows / sampled` over the whole layer's output energy under `h_test` (`energy`,
    [`hf_vq.codec.hessian.output_energy`]; computed when not given). `floor`: the objective's weight-space term
    (default: the recipe's [`fixed_floor`]).
    An estimate to compare options, not the final error."""
    rows = matrix.shape[0]
    h_test = h if h_test is None else h_test
    pick, approx = _quick_fit(matrix, h, d, k, config, scales, max_rows, floor=floor)
    groups = h_test.shape[0] if h_test.dim() == 3 else 1
    h_pick = h_test
    if groups > 1:
        index = pick[:: rows // groups] if config.encoder == "output-aware" else pick  # [picked groups] or [picked]
        h_pick = h_test[(index // (rows // groups)).to(h_test.device)]
    # The sampled rows' error, scaled to all rows, over the whole layer's output energy — not over the sampled rows'
    # energy: one row can carry most of a layer's output (row 99 of MiniLM's first FFN output layer, its
    # massive-activation channel: ~95% of the energy), and over the rows of a sample without it the same coding
    # measured 8x too high (tests/test_engine.py; --ratio 10 --seed 1 then starved the word-embedding table).
    error = float(row_output_errors(matrix[pick.to(matrix.device)], approx, h_pick).sum()) * (rows / len(pick))
    energy = output_energy(matrix, h_test) if energy is None else energy
    return error / max(energy, 1e-300)


def _quick_fit(matrix: torch.Tensor, h: torch.Tensor, d: int, k: int, config: VQConfig, scales: bool,
               max_rows: int = _SAMPLE_ROWS, floor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(picked rows [picked], their approximation [picked, cols])` at (d, k), as [`_quick_error`] fits them."""
    rows, cols = matrix.shape
    groups = h.shape[0] if h.dim() == 3 else 1
    pick = _sample_rows(rows, groups, config.seed, max_rows)
    sub = matrix[pick.to(matrix.device)]  # [picked, cols]
    k = min(clamp_k(k, rows * cols // d), max(2, sub.numel() // d // 4))
    if config.encoder == "output-aware":
        if groups > 1:
            h = h[(pick[:: rows // groups] // (rows // groups)).to(h.device)]  # [picked groups, cols, cols]
        result = encode_output_aware(sub, h, k=k, d=d, scales=scales, seed=config.seed, n_iter=0, kmeans_iters=8,
                                     reassign="gptq", floor=fixed_floor(config) if floor is None else floor)
        approx = decode(result.codes, result.codebooks)  # [picked, cols]
        return pick, approx * result.scales[:, None] if result.scales is not None else approx
    diag = torch.diagonal(h, dim1=-2, dim2=-1).float()  # [cols] or [G, cols]
    if diag.dim() == 2:  # grouped conv: each row takes its group's diagonal
        diag = diag.repeat_interleave(rows // diag.shape[0], dim=0)[pick.to(diag.device)]  # [picked, cols]
    w = diag.expand(sub.shape).clamp_min(1e-12)
    x, wx = split_blocks(sub, d), split_blocks(w, d)  # [n, d]
    codebook, codes = kmeans(x, k, n_iter=8, seed=config.seed, weights=wx)
    return pick, decode(codes.reshape(sub.shape[0], cols // d, 1), codebook[None])  # [picked, cols]


def fixed_floor(config: VQConfig) -> float | None:
    """The recipe's `hessian_floor` where it is a number; None (the encoder's default) where it is None or `"auto"`
    (chosen per layer by [`cross_validated_floor`] when the layer is encoded; the allocation's estimates use the
    default)."""
    floor = config.recipe.hessian_floor
    return None if floor is None or floor == "auto" else float(floor)


def cross_validated_floor(matrix: torch.Tensor, d: int, k: int, scales: bool, halves: tuple[LayerStatistics, ...],
                          config: VQConfig, candidates: tuple[float, ...] = FLOOR_CANDIDATES,
                          tolerance: float = 0.01) -> tuple[float, dict[float, float]]:
    """The weight-space term of a layer's objective (`H + floor · mean(diag H) · I`) that codes it best for inputs
    the fit did not see: each candidate is fitted as the allocation estimates an option ([`_quick_error`]: at most
    256 rows, one GPTQ pass) on one half of the calibration and measured on the other, both ways round.

    Ridge regression's choice by cross-validation, for a second moment estimated from a few inputs. Where the
    halves hold different photos, EfficientNet-Lite0's `conv_head` at d = 4 codes best at floor 1 on the held-out
    half (0.077 against 0.095 at 1e-4) as on the test photos (0.080 against 0.104), its early pointwise convs at
    1e-4 to 3e-2; over 24 (layer, option) pairs the floors chosen so leave a summed test-photo error of 0.307
    against 0.336 at the default and 0.304 at the best floor per pair chosen on the test photos themselves; halves of
    other crops of the same photos choose the default every time (benchmarks/results/experiment_floor_cv.md).

    Args:
        matrix (`torch.Tensor`): the layer's weight `[rows, cols]`.
        d (`int`), k (`int`), scales (`bool`): the layer's option.
        halves (`tuple[LayerStatistics, ...]`): its statistics on the two halves of the calibration batches.
        config ([`VQConfig`]): seeds the row sample and the k-means initialisations.
        candidates (`tuple[float, ...]`): the floors tried, smallest first.
        tolerance (`float`, defaults to 0.01): the smallest floor whose held-out error is within this fraction of
            the best one's is chosen (flat curves keep the default's end).

    Returns:
        `(floor, errors)`: the chosen floor, and each candidate's relative held-out output error (mean of the two
        directions).
    """
    first, second = halves
    pairs = ((first.objective_hessian(), second.mean_hessian()), (second.objective_hessian(), first.mean_hessian()))
    pairs = tuple((fit.to(matrix.device), test.to(matrix.device)) for fit, test in pairs)
    energies = [output_energy(matrix, test) for _, test in pairs]  # the same for every candidate
    errors = {f: sum(_quick_error(matrix, fit, d, k, config, scales, h_test=test, energy=energy, floor=f)
                     for (fit, test), energy in zip(pairs, energies)) / 2 for f in candidates}
    best = min(errors.values())
    return next(f for f in candidates if errors[f] <= best * (1 + tolerance)), errors


def _embedding_error(matrix: torch.Tensor, rows_w: torch.Tensor | None, d: int, k: int, config: VQConfig,
                     scales: bool) -> float:
    """Relative error of an embedding table `[rows, cols]` at (d, k), rows weighted by use (`rows_w [rows]`; uniform
    when None): a short k-means, as the final encoder fits it ([`unit_rows`], [`assign_rows`]), fitted on rows drawn
    by use — enough for 32 subvectors per codeword — and measured on another draw."""
    n = _table_sample_size(matrix.shape, d, k)
    drawn = _draw_rows(matrix, rows_w, 2 * n, config.seed)  # [2n]
    fit, test = matrix[drawn[:n]], matrix[drawn[n:]]  # [n, cols] each
    approx = _assign_table(test, _table_codebook(fit, d, k, config, scales), scales)  # [n, cols]
    return float((test - approx).pow(2).sum() / test.pow(2).sum().clamp_min(1e-30))


def _table_delta(matrix: torch.Tensor, rows_w: torch.Tensor | None, d: int, k: int, config: VQConfig,
                 scales: bool, read: torch.Tensor | None = None) -> torch.Tensor:
    """`ΔW [rows, cols]` of an embedding table coded at (d, k) with a short k-means codebook fitted on rows drawn by
    use (as many as [`_embedding_error`] fits on): of every row, or of the rows `read [rows]` (bool) marks, the
    others left at 0 (a probe of the calibration batches reads no other row)."""
    drawn = _draw_rows(matrix, rows_w, _table_sample_size(matrix.shape, d, k), config.seed)  # [n]
    codebook = _table_codebook(matrix[drawn], d, k, config, scales)  # [k, d]
    if read is None:
        return _assign_table(matrix, codebook, scales) - matrix
    delta = torch.zeros_like(matrix)
    index = read.nonzero().squeeze(1).to(matrix.device)  # [read rows]
    delta[index] = _assign_table(matrix[index], codebook, scales) - matrix[index]
    return delta


def _table_sample_size(shape: tuple[int, int], d: int, k: int) -> int:
    """Rows to fit a table's (d, k) codebook on: enough for 32 subvectors per codeword, at least [`_SAMPLE_ROWS`]."""
    rows, cols = shape
    return min(rows, max(_SAMPLE_ROWS, -(-32 * k * d // cols)))


def _draw_rows(matrix: torch.Tensor, rows_w: torch.Tensor | None, count: int, seed: int) -> torch.Tensor:
    """`count` row indices of `matrix` drawn with replacement by use (`rows_w [rows]`; uniform when None), seeded."""
    weights = torch.ones(matrix.shape[0]) if rows_w is None else rows_w.float().cpu()
    return torch.multinomial(weights, count, replacement=True,
                             generator=torch.Generator().manual_seed(seed)).to(matrix.device)


def _table_codebook(fit: torch.Tensor, d: int, k: int, config: VQConfig, scales: bool) -> torch.Tensor:
    """A short k-means codebook `[k, d]` of the rows `fit [n, cols]` (RMS-normalised with `scales`)."""
    codebook, _ = kmeans(split_blocks(unit_rows(fit, scales)[0], d), min(k, fit.numel() // d), n_iter=8,
                         seed=config.seed)
    return codebook


def _assign_table(matrix: torch.Tensor, codebook: torch.Tensor, scales: bool) -> torch.Tensor:
    """`matrix [rows, cols]` as the final encoder codes it with `codebook [k, d]` (nearest codewords, row scales)."""
    codes, row_scales = assign_rows(matrix, codebook, scales)  # [rows, cols / d, 1], [rows] or None
    approx = decode(codes, codebook[None])  # [rows, cols]
    return approx * row_scales[:, None] if row_scales is not None else approx


def _option_d(layout: LayerLayout, d: int) -> int:
    """The block size a menu entry `d` takes for this layer: for a kernel, `d` if it tiles whole kernels, else the
    least multiple of the kernel area and `d`."""
    area = 1 if layout.kind in ("linear", "conv1d", "conv1x1", "embedding") else math.prod(layout.shape[2:])
    if layout.kind in ("conv3x3", "conv", "depthwise"):
        return d if fits_kernel(d, area) else d * area // math.gcd(d, area)
    return d


def _menu(layout: LayerLayout, matrix: torch.Tensor, stat: LayerStatistics | None, config: VQConfig,
          alpha: float, fit: LayerStatistics | None = None, test: LayerStatistics | None = None,
          change: Callable[[torch.Tensor], float] | None = None) -> list[tuple[Option, tuple[int, int] | None]]:
    """The options of one layer: (size, distortion) for each (d, k) of the menu that fits, and dense; the distortion
    is `alpha` times the option's estimated error. With the statistics of two halves of the calibration batches
    (`fit`, `test`), each option is fitted on one and measured on the other. An embedding table with `change` (the
    model outputs' relative change for a `ΔW`, [`_Probe.change`]) is measured end to end instead: each option's
    table as quickly coded ([`_table_delta`]; the rows calibration read, a superset of what the probe reads) goes
    into the model."""
    rows, cols = matrix.shape
    split = fit is not None and test is not None and fit.hessian is not None and test.hessian is not None
    h = _hessian(fit if split else stat, cols, matrix.device)
    h_test = _hessian(test, cols, matrix.device) if split else None
    rows_w = _row_weights(stat)
    dense_bits = stored_bits(matrix, DENSE_STORAGE.get(config.dense_dtype))  # 16 with Recipe.dense_dtype, else 32
    out = [(Option(float(rows * cols * dense_bits), 0.0, "dense"), None)]
    embedding = layout.kind == "embedding"
    energy = None if embedding else output_energy(matrix, h if h_test is None else h_test)  # once for every option
    read = stat.row_counts > 0 if stat is not None and stat.row_counts is not None else None  # [rows] calibration read
    for d, k in MENU + EMBEDDING_MENU if embedding else MENU:
        d = _option_d(layout, d)
        if cols % d or any(c == (d, k) for _, c in out):
            continue
        k_eff = clamp_k(k, rows * cols // d)
        bits = option_bits(rows, cols, d=d, k=k_eff, num_codebooks=1, scales=layout.scales)
        if embedding and change is not None:
            distortion = change(_table_delta(matrix, rows_w, d, k_eff, config, layout.scales, read))
        elif embedding:
            distortion = alpha * _embedding_error(matrix, rows_w, d, k_eff, config, layout.scales)
        else:
            distortion = alpha * _quick_error(matrix, h, d, k, config, layout.scales, h_test=h_test, energy=energy)
        out.append((Option(float(bits), distortion, f"d{d}k{k_eff}"), (d, k)))
    return out


def _final(out: Any, mask: torch.Tensor | None, names: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """Every floating-point tensor the model returns (`last_hidden_state` and `pooler_output`, `logits`, ...), or the
    outputs `names` (`VQConfig.allocation_outputs`), each as `[n, features]` with padding tokens dropped: a layer that
    only one output reads (a pooler) is measured on it. A name `field:mean` is that field `[batch, seq, features]`
    averaged over each sequence's tokens (`[batch, features]`, padding excluded): what a mean-pooling sentence
    embedding is made of.

    Raises:
        `ValueError`: if the output has no field of one of `names` (names the fields it has)."""
    pooled = set()
    if names is not None:
        fields = list(out.keys()) if hasattr(out, "keys") else []
        keys = [n.partition(":")[0] for n in names]
        missing = [n for n in keys if n not in fields]
        if missing:
            raise ValueError(f"VQConfig.allocation_outputs={list(names)}: the model's output has no field "
                             f"{missing[0]!r} (it has {fields or 'no named fields'}); name fields it returns, or "
                             "give None to count every output.")
        values = [out[n] for n in keys]
        pooled = {i for i, n in enumerate(names) if n.endswith(":mean")}
    elif isinstance(out, torch.Tensor):
        values = [out]
    else:
        values = list(out.values()) if hasattr(out, "values") else list(out) if isinstance(out, (list, tuple)) else []
    finals = []
    for i, value in enumerate(values):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1):
            continue
        if i in pooled and value.dim() == 3:
            value = mean_pool(value, mask)  # [batch, features]
        elif mask is not None and value.dim() == 3 and tuple(value.shape[:2]) == tuple(mask.shape):
            value = value[mask.bool()]
        finals.append(value.reshape(-1, value.shape[-1]).float())
    return finals


def _outputs(model: nn.Module, batches: list[tuple[tuple, dict]], names: tuple[str, ...] | None = None
             ) -> list[list[torch.Tensor]]:
    """`[batch][output]`: the model's floating outputs (or those named) on each probe batch (see `_final`)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs = []
    with torch.no_grad():
        for args, kwargs in batches:
            out = model(*[to_device(a, device) for a in args], **{k: to_device(v, device) for k, v in kwargs.items()})
            outs.append(_final(out, kwargs.get("attention_mask"), names))
    return outs


def _relative_change(changed: list[list[torch.Tensor]], reference: list[list[torch.Tensor]]) -> float:
    """The largest relative squared change over the model's outputs, each output's change summed over the batches
    and divided by its own energy."""
    worst = 0.0
    for j in range(len(reference[0])):
        energy = sum(float(r[j].pow(2).sum()) for r in reference)
        delta = sum(float((c[j] - r[j]).pow(2).sum()) for c, r in zip(changed, reference))
        worst = max(worst, delta / max(energy, 1e-30))
    return worst


class _Probe:
    """The model's outputs on at most two calibration batches, and how much they change when one layer's weight
    moves by `ΔW` ([`_final`], [`_relative_change`]: the most changed output counts). The model is left as it was."""

    def __init__(self, model: nn.Module, batches: list[tuple[tuple, dict]], names: tuple[str, ...] | None) -> None:
        self.model, self.batches, self.names = model, batches[:2], names
        with self._eval():
            self.reference = _outputs(model, self.batches, names)
        if not self.reference or not self.reference[0]:
            raise ValueError("bit allocation measures each layer's effect on the model's outputs, but the model "
                             "returned no floating-point tensor on the calibration batches.")

    @contextlib.contextmanager
    def _eval(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def change(self, module: nn.Module, delta: torch.Tensor) -> float:
        """Relative change of the outputs with `delta [rows, cols]` (the layer's matrix view) added to its weight."""
        weight = module._parameters["weight"]
        cls = vq_class_for(type(module))
        original = weight.detach().clone()
        delta = delta.t() if getattr(cls, "default_kind", None) == "conv1d" else delta.reshape(weight.shape)
        with torch.no_grad():
            weight.add_(delta.to(weight.device, weight.dtype))
        try:
            with self._eval():
                changed = _outputs(self.model, self.batches, self.names)
        finally:
            with torch.no_grad():
                weight.copy_(original)
        return _relative_change(changed, self.reference)


def _sensitivities(probe: _Probe, modules: dict[str, nn.Module], owners: list[str],
                   matrices: dict[str, torch.Tensor], stats: dict[str, LayerStatistics], workers: Workers,
                   layouts: dict[str, LayerLayout], config: VQConfig) -> dict[str, float]:
    """`α_l`: relative change of the final outputs (those `config.allocation_outputs` names, default all) per unit
    of layer `l`'s relative output error, the error being what a quick encoding at [`_REFERENCE`] leaves in it
    ([`_reference_error`]). Each process measures its share of the layers."""
    alphas = {}
    for i in workers.share([1.0] * len(owners)):
        name = owners[i]
        delta, ratio = _reference_error(layouts[name], matrices[name], stats.get(name), config)
        alphas[name] = probe.change(modules[name], delta) / max(ratio, 1e-30)
    return workers.exchange(alphas)


def _reference_error(layout: LayerLayout, matrix: torch.Tensor, stat: LayerStatistics | None, config: VQConfig
                     ) -> tuple[torch.Tensor, float]:
    """`(ΔW [rows, cols], its relative error)`: the error a quick encoding at the reference option leaves in the
    layer — of every row for an embedding table (relative weight error, rows weighted by use), of the rows
    [`_quick_fit`] samples otherwise (the others unchanged; relative output error under the layer's `H`)."""
    rows, cols = matrix.shape
    d_ref, k = _REFERENCE
    blocks = [_option_d(layout, size) for size in range(d_ref, 0, -1)]  # the reference, then finer blocks
    d = next(size for size in blocks if cols % size == 0)  # d = 1 always fits
    k = clamp_k(k, rows * cols // d)
    rows_w = _row_weights(stat)
    if layout.kind == "embedding":
        delta = _table_delta(matrix, rows_w, d, k, config, layout.scales)
        w = torch.ones(rows, device=matrix.device) if rows_w is None else rows_w.float().to(matrix.device)  # [rows]
        return delta, float((delta.pow(2).sum(1) * w).sum() / (matrix.pow(2).sum(1) * w).sum().clamp_min(1e-30))
    h = _hessian(stat, cols, matrix.device)
    pick, approx = _quick_fit(matrix, h, d, k, config, layout.scales)
    delta = torch.zeros_like(matrix)
    delta[pick.to(matrix.device)] = approx - matrix[pick.to(matrix.device)]
    return delta, output_error(matrix, matrix + delta, h)


def _budget(model: nn.Module, layouts: dict[str, LayerLayout], owners: list[str], config: VQConfig) -> tuple[float, float]:
    """`(budget bits, fixed bits)`: the whole file's budget and what is not allocated (tensors that stay as they are
    and the header), or for `bits_per_weight` the compressible layers' budget alone."""
    compressed_weights = sum(math.prod(layouts[n].shape) for n in owners)
    if config.bits_per_weight is not None:
        return config.bits_per_weight * compressed_weights, 0.0
    state = model.state_dict()
    compressible = {f"{n}.weight" for n in layouts}
    dense_bits = sum(t.numel() * 32 for t in state.values() if t.is_floating_point())
    dense = DENSE_STORAGE.get(config.dense_dtype)  # what stays dense is stored at 16 bits where it fits
    fixed = sum(t.numel() * stored_bits(t, dense) for key, t in state.items() if key not in compressible)
    # stored tensors: everything else plus codes and codebooks (and scales) per compressed layer
    keys = [key for key in state if key not in compressible]
    keys += [f"{n}.{part}" for n in owners for part in ("codes", "codebooks", "scales")
             if part != "scales" or layouts[n].scales]
    header = sum(2 * len(key) + HEADER_BYTES_PER_TENSOR for key in keys)
    header += sum(len(n) + RECORD_BYTES_PER_LAYER for n in owners) + _HEADER_BYTES_FIXED
    return dense_bits / config.target_ratio, float(fixed + 8 * header)
