"""The decode used under autograd (fine-tuning): the fast inference decode forward, a scatter-add backward.

`decode(codes, codebooks)` written with `F.embedding` is differentiable but slow to train through: its forward is
a gather per codebook and its backward is the embedding backward (a sort of every code on CUDA). Here the forward is
the device's decode kernel (numba on CPU, Triton on CUDA; the reference elsewhere) and the backward adds each
block's gradient onto the codeword it used, with the per-output-channel scales' gradient from the unscaled decoded
weight kept by the forward. On CPU the adding is a product with a sparse `[k, blocks]` 0/1 matrix per codebook,
built once per code assignment (the codes stay fixed between steps) instead of an `index_add_` every step; on other
devices `index_add_` (benchmarks/bench_train_step.py compares the two on CPU).
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["train_decode"]

#: The CPU backward sums block gradients with the cached sparse assignment (`False`: `index_add_`, as on other
#: devices; benchmarks compare the two).
SPARSE_BACKWARD = True


class _TrainDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None, decode_fn):
        with torch.no_grad():
            weight = decode_fn(codes, codebooks)  # [rows, n_blocks * d], unscaled
        ctx.save_for_backward(codes, weight if scales is not None else None, scales)
        ctx.book_shape = tuple(codebooks.shape)
        return weight if scales is None else weight * scales.to(weight.dtype)[:, None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: [rows, n_blocks * d]
        codes, weight, scales = ctx.saved_tensors
        n_books, k, d = ctx.book_shape
        grad_books = grad_scales = None
        if ctx.needs_input_grad[1]:
            scaled = grad if scales is None else grad * scales.to(grad.dtype)[:, None]  # [rows, cols]
            blocks = scaled.reshape(-1, d)  # [rows * n_blocks, d]
            if blocks.device.type == "cpu" and SPARSE_BACKWARD:
                grad_books = torch.stack([matrix @ blocks for matrix in _assignment(codes, k, blocks.dtype)])
            else:
                index = codes.reshape(-1, n_books).long()  # [rows * n_blocks, M]
                grad_books = torch.stack([blocks.new_zeros(k, d).index_add_(0, index[:, m], blocks)
                                          for m in range(n_books)])  # [M, k, d]
        if scales is not None and ctx.needs_input_grad[2]:
            grad_scales = (grad * weight).sum(1).to(scales.dtype)  # [rows]
        return None, grad_books, grad_scales, None


#: unpacked codes -> ((version, k, dtype), one sparse CSR `[k, rows * n_blocks]` per codebook); an entry goes with
#: its codes tensor (a layer caches its unpacked codes until they change: `VQModuleMixin.unpacked_codes`)
_ASSIGNMENTS = WeakTensorKeyDictionary()


def _assignment(codes: torch.Tensor, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """For each codebook m, the 0/1 matrix `[k, rows * n_blocks]` with a one at (code, block): `matrix @ blocks`
    sums the blocks `[rows * n_blocks, d]` per codeword. Cached for `codes` `[rows, n_blocks, M]` until it changes."""
    key = (codes._version, k, dtype)
    cached = _ASSIGNMENTS.get(codes)
    if cached is not None and cached[0] == key:
        return cached[1]
    index = codes.reshape(-1, codes.shape[-1]).long()  # [rows * n_blocks, M]
    n = index.shape[0]
    matrices = []
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense matrix is long stable
        warnings.simplefilter("ignore", UserWarning)
        for m in range(index.shape[1]):
            order = torch.argsort(index[:, m], stable=True)  # [n] block ids grouped by codeword
            row_starts = torch.cumsum(torch.bincount(index[:, m], minlength=k), 0)  # [k]: end of each codeword's run
            row_starts = torch.cat([row_starts.new_zeros(1), row_starts])  # [k + 1]
            matrices.append(torch.sparse_csr_tensor(row_starts, order, torch.ones(n, dtype=dtype), size=(k, n)))
    _ASSIGNMENTS[codes] = (key, matrices)
    return matrices


def train_decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None, decode_fn) -> torch.Tensor:
    """`diag(scales) · decode(codes, codebooks)` `[rows, n_blocks * d]`, differentiable in `codebooks` and `scales`.

    Args:
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
        scales (`torch.Tensor`, *optional*): `[rows]`.
        decode_fn: the no-grad decode `(codes, codebooks) -> [rows, n_blocks * d]` of the device.
    """
    return _TrainDecode.apply(codes, codebooks, scales, decode_fn)
