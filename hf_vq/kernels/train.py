"""The decode used under autograd (fine-tuning): the fast inference decode forward, a scatter-add backward.

`decode(codes, codebooks)` written with `F.embedding` is differentiable but slow to train through: its forward is
a gather per codebook and its backward is the embedding backward (a sort of every code on CUDA). Here the forward is
the device's decode kernel (numba on CPU, Triton on CUDA; the reference elsewhere) and the backward adds each
block's gradient onto the codeword it used (`index_add_`, one per codebook), with the per-output-channel scales'
gradient from the unscaled decoded weight kept by the forward.
"""

from __future__ import annotations

import torch

__all__ = ["train_decode"]


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
            index = codes.reshape(-1, n_books).long()  # [rows * n_blocks, M]
            grad_books = torch.stack([blocks.new_zeros(k, d).index_add_(0, index[:, m], blocks)
                                      for m in range(n_books)])  # [M, k, d]
        if scales is not None and ctx.needs_input_grad[2]:
            grad_scales = (grad * weight).sum(1).to(scales.dtype)  # [rows]
        return None, grad_books, grad_scales, None


def train_decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None, decode_fn) -> torch.Tensor:
    """`diag(scales) · decode(codes, codebooks)` `[rows, n_blocks * d]`, differentiable in `codebooks` and `scales`.

    Args:
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
        scales (`torch.Tensor`, *optional*): `[rows]`.
        decode_fn: the no-grad decode `(codes, codebooks) -> [rows, n_blocks * d]` of the device.
    """
    return _TrainDecode.apply(codes, codebooks, scales, decode_fn)
