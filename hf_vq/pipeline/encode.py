"""Encoding: learn codebooks and codes for the subvectors of one module or one shared codebook set.

The data-free and diagonal-weighted paths live here (annealed k-means for PQ, residual k-means + beam search for
AQ, see `hf_vq.codec`); the driver ([`hf_vq.pipeline.quantize_`]) calls [`encode_unit`] once per unit of
[`encoding_units`].
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibrate import entry_moments
from ..codec.aq import aq_quantize
from ..codec.kmeans import assign, kmeans
from ..codec.pq import decode, split_blocks
from ..codec.refit import fit_scales
from ..config import LayerLayout, VQConfig
from ..nn import VQModuleMixin

__all__ = ["encoding_units", "entry_weights", "encode_unit", "fit_scales", "unit_rows", "use_weights",
           "assign_rows"]


def encoding_units(layouts: dict[str, LayerLayout]) -> list[tuple[int, str | None, list[str]]]:
    """What is encoded together: `(index of the first module in the plan, codebook set or None, module names)`.

    One unit per module without a shared set, one per shared set (all its modules' subvectors together);
    tied modules are left out (they reuse their owner's codes)."""
    units: list[tuple[int, str | None, list[str]]] = []
    by_set: dict[str, list[str]] = {}
    for i, (name, layout) in enumerate(layouts.items()):
        if layout.tied_to is not None:
            continue
        if layout.codebook_set is None:
            units.append((i, None, [name]))
        elif layout.codebook_set in by_set:
            by_set[layout.codebook_set].append(name)
        else:
            by_set[layout.codebook_set] = [name]
            units.append((i, layout.codebook_set, by_set[layout.codebook_set]))
    return units


def entry_weights(module: nn.Module, cls: type[VQModuleMixin], kind: str,
                   second: torch.Tensor | None) -> torch.Tensor | None:
    """Weight of every entry of `module`'s matrix view for weighted k-means: the second moment `second`
    (`[in_channels]`) of the input channel the entry multiplies, normalised to mean 1 over the matrix and
    floored at 1e-3 (so dead channels still get a nearest codeword). -> `[rows, cols]` float32, or None
    without moments (embeddings, modules the calibration data did not reach)."""
    full = entry_moments(module._parameters["weight"], kind, second)  # like the weight
    if full is None:
        return None
    matrix = cls._weight_to_matrix(full).float()  # [rows, cols]
    mean = matrix.mean()
    return (matrix / mean).clamp_min(1e-3) if mean > 0 else None


def encode_unit(matrices: list[torch.Tensor], layout: LayerLayout, config: VQConfig, *, seed: int,
                weights: list[torch.Tensor | None] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """Learn one codebook set for the subvectors of `matrices` (`[rows_j, cols_j]` each) and encode them.

    `weights` (per matrix `[rows_j, cols_j]` or None for uniform) makes product quantization run weighted
    k-means (see [`entry_weights`]). With `layout.scales`, each row is first divided by its RMS and, once encoded,
    gets the least-squares scale of its decoded row (weighted like k-means).

    Returns:
        codebooks `[M, k, d]` (float32, rounded to fp16 values), per matrix its codes `[rows_j, cols_j / d, M]`
        (int64) and its scales `[rows_j]` (fp16 values) or None.
    """
    d, k = layout.d, layout.k
    scaled, norms = zip(*(unit_rows(m, layout.scales) for m in matrices))  # [rows_j, cols_j], [rows_j] or None
    blocks = [split_blocks(m, d) for m in scaled]  # views
    x = blocks[0] if len(blocks) == 1 else torch.cat(blocks)  # [n, d], every module's subvectors (one: no copy)
    if layout.method == "pq":
        w = None if weights is None else torch.cat([  # [n, d] like x
            split_blocks(torch.ones_like(m) if wj is None else wj.to(m.device), d) for m, wj in zip(matrices, weights)])
        codebook, flat = kmeans(x, k, n_iter=config.n_iter, anneal=config.anneal, seed=seed, weights=w)  # [k, d], [n]
        codebooks, flat = codebook[None], flat[:, None]  # [1, k, d], [n, 1]
    else:
        codebooks, flat = aq_quantize(x, layout.num_codebooks, k, n_iter=config.n_iter, aq_iters=config.aq_iters,
                                      beam_size=config.beam_size, anneal=config.anneal, seed=seed)  # [M,k,d], [n,M]
    codebooks = codebooks.half().float()  # fp16 on disk: the saved model is exactly this one
    codes, scales, start = [], [], 0
    for j, m in enumerate(matrices):
        rows, cols = m.shape
        n = rows * (cols // d)
        codes.append(flat[start:start + n].reshape(rows, cols // d, -1))
        start += n
        scales.append(None if norms[j] is None else fit_scales(m, decode(codes[-1], codebooks),
                                                               None if weights is None else weights[j]))
    return codebooks, codes, scales


def unit_rows(matrix: torch.Tensor, scales: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With per-row scales, `matrix [rows, cols]` with each row divided by its RMS, and the RMS `[rows]` (what
    k-means codes and the scales restore); without, `(matrix, None)`."""
    if not scales:
        return matrix, None
    norms = matrix.pow(2).mean(1).sqrt().clamp_min(1e-12)  # [rows]
    return matrix / norms[:, None], norms


def use_weights(counts: torch.Tensor) -> torch.Tensor:
    """How much each row of an embedding table counts, from how often calibration read it (`counts [rows]`):
    `1 + count / mean(count)` — every row keeps a share, frequent tokens weigh more. Returns `[rows]` float32."""
    counts = counts.float()
    return 1 + counts / counts.mean().clamp_min(1e-12)


def assign_rows(matrix: torch.Tensor, codebook: torch.Tensor, scales: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode each row of `matrix [rows, cols]` with the codebook `[k, d]` it was fitted for: the nearest codeword
    of every block (of the RMS-normalised rows with `scales`), then each row's least-squares scale.

    Returns:
        codes `[rows, cols / d, 1]` and scales `[rows]` (fp16 values) or None.
    """
    rows, cols = matrix.shape
    unit, _ = unit_rows(matrix, scales)
    codes = assign(split_blocks(unit, codebook.shape[1]), codebook).reshape(rows, cols // codebook.shape[1], 1)
    return codes, fit_scales(matrix, decode(codes, codebook[None])) if scales else None
