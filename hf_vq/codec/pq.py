"""Product quantization of weight matrices: cut rows into subvectors, k-means them, decode back.

A weight is viewed as a matrix `[rows, cols]` (rows = output channels). Each row is cut into
`cols / d` contiguous blocks of length `d`; each block is replaced by the index of its nearest
codeword. Codes have the general shape `[rows, n_blocks, M]` and codebooks `[M, k, d]` so that
additive quantization (M > 1 codebooks summed) shares the same decode; product quantization is M = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kmeans import kmeans

__all__ = ["clamp_k", "split_blocks", "decode", "quantize_matrix", "relative_error"]


def clamp_k(k: int, n_subvectors: int) -> int:
    """The paper's clamp: `min(k, 2**floor(log2(n_subvectors / 4)))`, at least 2.

    Fewer than ~4 subvectors per codeword makes no sense (the codebook would cost more than it saves).
    """
    if n_subvectors < 8:
        return 2
    return int(max(2, min(k, 2 ** math.floor(math.log2(n_subvectors / 4)))))


def split_blocks(matrix: torch.Tensor, d: int) -> torch.Tensor:
    """View a `[rows, cols]` matrix as subvectors `[rows * cols / d, d]` (contiguous blocks of each row)."""
    rows, cols = matrix.shape
    if cols % d:
        raise ValueError(f"block size d={d} does not divide the row length {cols}.")
    return matrix.reshape(rows * (cols // d), d)


def decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Decode codes into the weight matrix. This is where codes become weights.

    Args:
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.

    Returns:
        `torch.Tensor`: the decoded matrix `[rows, n_blocks * d]`, dtype of `codebooks`.
    """
    rows, n_blocks, m = codes.shape
    idx = codes if codes.dtype in (torch.int32, torch.int64) else codes.to(torch.int32)
    out = F.embedding(idx[..., 0], codebooks[0])  # [rows, n_blocks, d]
    for j in range(1, m):
        out = out + F.embedding(idx[..., j], codebooks[j])
    return out.reshape(rows, n_blocks * codebooks.shape[-1])


def relative_error(weight: torch.Tensor, approx: torch.Tensor, *, chunk: int = 1 << 20) -> float:
    """`‖W − Ŵ‖² / ‖W‖²`, accumulated in float64 over chunks of `chunk` entries (no float64 copy of a whole
    weight: a 65 M-weight embedding would take 2 GB of temporaries)."""
    w, a = weight.reshape(-1), approx.reshape(-1)  # [n], [n]
    num = den = 0.0
    for s in range(0, w.numel(), chunk):
        wc = w[s : s + chunk].double()  # [chunk]
        num += float((wc - a[s : s + chunk].double()).pow(2).sum())
        den += float(wc.pow(2).sum())
    return num / max(den, 1e-300)


def quantize_matrix(
    matrix: torch.Tensor, *, d: int, k: int, n_iter: int = 100, anneal: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-quantize a weight matrix with one k-means codebook.

    Args:
        matrix (`torch.Tensor`): `[rows, cols]`, `cols` divisible by `d`.
        d (`int`): subvector length.
        k (`int`): codewords (clamp it first with [`clamp_k`] if wanted).
        n_iter, anneal, seed: k-means settings.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: codebooks `[1, k, d]` (float32) and codes `[rows, n_blocks, 1]` (int64).
    """
    rows, cols = matrix.shape
    x = split_blocks(matrix.detach().float(), d)  # [rows * n_blocks, d]
    codebook, codes = kmeans(x, k, n_iter=n_iter, anneal=anneal, seed=seed)  # [k, d], [rows * n_blocks]
    return codebook.unsqueeze(0), codes.reshape(rows, cols // d, 1)
