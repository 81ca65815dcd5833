"""`hf_vq::vq_linear`: the VQ matmul as a PyTorch custom op, so `torch.compile` keeps it as one opaque call.

    torch.ops.hf_vq.vq_linear(x, codes, codebooks, bias=None, scales=None)   # [..., rows]

* **implementation**: `dispatch.linear_impl`, i.e. the fast kernel of the device when one pays (CPU LUT kernels,
  the CUDA kernels chosen per shape by `hf_vq.kernels.cuda`), else decode + `F.linear`. Inside a CUDA-graph
  capture (`torch.compile(mode="reduce-overhead")`, transformers' static cache) it launches the kernel chosen
  during warm-up: no timing, no host synchronisation;
* **fake implementation** for tracing: an empty `[..., rows]` tensor of the input's dtype;
* **autograd**: gradients for `x`, `codebooks`, `bias` and `scales` from the decoded weight (codes are integers).
  The modules themselves use the differentiable reference (decode + `F.linear`) whenever a gradient is needed,
  so fine-tuning never goes through the fast kernels; the backward makes the op usable on its own.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch

__all__ = ["vq_linear_op"]


@torch.library.custom_op("hf_vq::vq_linear", mutates_args=())
def vq_linear_op(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`(x @ W.T) * scales + bias` with `W` decoded from `codes [rows, n_blocks, M]` and `codebooks [M, k, d]`."""
    return dispatch.linear_impl(x, codes, codebooks, bias, scales)


@vq_linear_op.register_fake
def _vq_linear_fake(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    torch._check(codes.dim() == 3, lambda: f"codes must be [rows, n_blocks, M], got {codes.dim()} dims")
    torch._check(codebooks.dim() == 3, lambda: f"codebooks must be [M, k, d], got {codebooks.dim()} dims")
    torch._check(x.shape[-1] == codes.shape[1] * codebooks.shape[2],
                 lambda: f"input has {x.shape[-1]} features, the codes describe {codes.shape[1] * codebooks.shape[2]}")
    if scales is not None:
        torch._check(scales.dim() == 1 and scales.shape[0] == codes.shape[0],
                     lambda: f"scales must have shape ({codes.shape[0]},), got {tuple(scales.shape)}")
    return x.new_empty((*x.shape[:-1], codes.shape[0]))  # [..., rows]


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, codes, codebooks, bias, scales = inputs
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.has_bias = bias is not None


def _codebook_grad(grad_weight: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Scatter `dL/dW [rows, n_blocks*d]` onto the codewords each block used: `[M, k, d]`."""
    n_books, k, d = codebooks.shape
    blocks = grad_weight.reshape(-1, d)  # [rows*n_blocks, d]
    index = codes.reshape(-1, n_books).long()  # [rows*n_blocks, M]
    return torch.stack([blocks.new_zeros(k, d).index_add(0, index[:, m], blocks) for m in range(n_books)])


def _backward(ctx, grad: torch.Tensor) -> tuple:
    from ..codec.pq import decode

    x, codes, codebooks, scales = ctx.saved_tensors
    rows = codes.shape[0]
    g = grad.reshape(-1, rows)  # [B, rows]
    x2d = x.reshape(-1, x.shape[-1])  # [B, cols]
    weight = decode(codes, codebooks)  # [rows, cols]
    gs = g if scales is None else g * scales.to(g.dtype)  # [B, rows]
    grad_x = grad_books = grad_bias = grad_scales = None
    if ctx.needs_input_grad[0]:
        grad_x = (gs @ weight.to(gs.dtype)).reshape(x.shape).to(x.dtype)
    if ctx.needs_input_grad[2]:
        grad_books = _codebook_grad((gs.t() @ x2d.to(gs.dtype)).to(codebooks.dtype), codes, codebooks)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = g.sum(0)
    if scales is not None and ctx.needs_input_grad[4]:
        grad_scales = (g * (x2d.to(weight.dtype) @ weight.t()).to(g.dtype)).sum(0).to(scales.dtype)
    return grad_x, None, grad_books, grad_bias, grad_scales


vq_linear_op.register_autograd(_backward, setup_context=_setup_context)
