"""GPU fused dequantize-GEMM (Triton, tensor cores): `(x @ W.T) * scales + bias` with `W` decoded tile by tile.

A program owns an output tile `[BLOCK_B input rows, BLOCK_N output rows]` and one split of the reduction. For
each chunk of `BLOCK_J` input blocks (`BLOCK_J · d` input columns) it

1. gathers the codewords of its weight tile `[BLOCK_N, BLOCK_J, d]` from the codebooks (L1-resident), sums the
   M of them in float32 and rounds once to the input dtype (exactly what the decode path's weight holds);
2. loads the input tile `[BLOCK_B, BLOCK_J · d]`;
3. accumulates `x_tile @ w_tileᵀ` on the tensor cores (`tl.dot`, float32 accumulator).

The weight is decoded once per `BLOCK_B` input rows and never written to memory: at batch 1-16 the decode is
the cost (one tile of 16 rows covers the batch), at prefill sizes the decode is shared by 64-128 rows. Split-K
(float32 partials + `splitk_reduce`) fills the GPU when output tiles are few. Half-precision inputs
(float16 / bfloat16) and power-of-two `d` only: float32 would run the tensor cores in tf32, and `tl.dot` needs
power-of-two tiles; other cases take the other kernels.
"""

from __future__ import annotations

import torch

from .triton_lut import split_count
from .triton_vq import HAS_TRITON, _require_triton, check_scales, next_pow2, optional_args, splitk_reduce

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_vq import _decode_tile, _epilogue

__all__ = ["MMA_DEFAULT", "mma_supported", "triton_mma_matmul"]

#: Configuration without tuning: batch tile (raised to cover small batches), row tile, input columns per step.
MMA_DEFAULT = {"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_KD": 128, "num_warps": 4, "num_stages": 2}

if HAS_TRITON:

    @triton.jit
    def _vq_mma_kernel(x_ptr, codes_ptr, books_ptr, out_ptr, bias_ptr, scales_ptr,
                       n_batch, n_rows, n_blocks, blocks_per_split,
                       stride_xb, stride_codes_r, stride_os, stride_ob,
                       M: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
                       FINAL: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_SCALES: tl.constexpr):  # pragma: no cover - compiled by triton
        pid_n = tl.program_id(0)
        pid_b = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_t = tl.arange(0, D)  # [D]
        offs_kd = tl.arange(0, BLOCK_J * D)  # [BJ*D]
        b_ok = offs_b < n_batch
        n_ok = offs_n < n_rows
        x_rows = x_ptr + offs_b[:, None] * stride_xb  # [BB, 1]
        j_begin = pid_s * blocks_per_split
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for j0 in range(j_begin, j_begin + blocks_per_split, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)  # [BJ]
            code_mask = n_ok[:, None] & (offs_j < n_blocks)[None, :]  # [BN, BJ]
            w_mask = code_mask[:, :, None] & (offs_t < D)[None, None, :]  # [BN, BJ, D]
            w = _decode_tile(codes_ptr, books_ptr, offs_n, offs_j, offs_t, stride_codes_r, code_mask, w_mask,
                             M, K, D, not EVEN)  # [BN, BJ, D] float32
            w = tl.reshape(w.to(x_ptr.dtype.element_ty), (BLOCK_N, BLOCK_J * D))  # [BN, BJ*D]
            cols = j0 * D + offs_kd  # [BJ*D]
            if EVEN:
                xt = tl.load(x_rows + cols[None, :], mask=b_ok[:, None], other=0.0)  # [BB, BJ*D]
            else:
                xt = tl.load(x_rows + cols[None, :], mask=b_ok[:, None] & (cols < n_blocks * D)[None, :], other=0.0)
            acc = tl.dot(xt, tl.trans(w), acc)  # [BB, BN]
        mask = b_ok[:, None] & n_ok[None, :]
        if FINAL:
            y = _epilogue(acc, offs_n, n_ok, bias_ptr, scales_ptr, HAS_BIAS, HAS_SCALES)
            tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + pid_s * stride_os + offs_b[:, None] * stride_ob + offs_n[None, :], acc, mask=mask)


def mma_supported(x_dtype: torch.dtype, d: int) -> bool:
    """Whether the tensor-core kernel handles inputs of `x_dtype` and blocks of length `d`."""
    return x_dtype in (torch.float16, torch.bfloat16) and 2 <= d <= 64 and d & (d - 1) == 0


def triton_mma_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, *,
                      bias: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """`(x @ W.T) * scales + bias` with the fused dequantize-GEMM (see the module doc).

    Args:
        x (`torch.Tensor`): inputs `[B, n_blocks * d]`, float16 or bfloat16.
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8 or int32), same device as `x`.
        codebooks (`torch.Tensor`): `[M, k, d]`, `d` a power of two.
        bias, scales (`torch.Tensor`, *optional*): `[rows]` (see `triton_vq.triton_vq_matmul`).
        config (`dict`, *optional*): `BLOCK_B` (raised to at least 16 and lowered to cover the batch), `BLOCK_N`,
            `BLOCK_KD` (input columns per step), `num_warps`, `num_stages` (default `MMA_DEFAULT`), `SPLIT`
            (split-K parts; default: about two programs per multiprocessor).

    Returns:
        `torch.Tensor`: `[B, rows]` in the dtype of `x`.

    Raises:
        `ValueError`: for inputs or block lengths the kernel does not handle ([`mma_supported`]).
    """
    _require_triton()
    rows, n_blocks, n_books = codes.shape
    _, k, d = codebooks.shape
    if not mma_supported(x.dtype, d):
        raise ValueError(f"the tensor-core kernel needs float16/bfloat16 inputs and a power-of-two d, got {x.dtype}, d={d}.")
    meta = {**MMA_DEFAULT, **(config or {})}
    x = x.contiguous()  # [B, n_blocks*d]
    codes = codes.contiguous()  # [rows, n_blocks, M]
    books = codebooks.to(x.dtype).contiguous()  # [M, k, d]
    scales = check_scales(scales, rows, x.device)
    batch = x.shape[0]
    out = torch.empty(batch, rows, dtype=x.dtype, device=x.device)  # [B, rows]
    if batch == 0 or rows == 0:
        return out
    block_b = max(16, min(meta["BLOCK_B"], next_pow2(batch)))
    block_n, block_j = meta["BLOCK_N"], max(1, meta["BLOCK_KD"] // d)
    n_tiles = triton.cdiv(rows, block_n) * triton.cdiv(batch, block_b)
    split = meta.get("SPLIT") or split_count(n_tiles, triton.cdiv(n_blocks, block_j), x.device)
    per_split = triton.cdiv(triton.cdiv(n_blocks, split), block_j) * block_j
    split = triton.cdiv(n_blocks, per_split)
    target = out if split == 1 else torch.empty(split, batch, rows, dtype=torch.float32, device=x.device)
    even = rows % block_n == 0 and n_blocks % per_split == 0
    bias_ptr, scales_ptr, has_bias, has_scales = optional_args(out, bias, scales)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(batch, block_b), split)
    _vq_mma_kernel[grid](
        x, codes, books, target, bias_ptr, scales_ptr, batch, rows, n_blocks, per_split,
        x.stride(0), codes.stride(0), 0 if split == 1 else target.stride(0), target.stride(-2),
        M=n_books, K=k, D=d, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_J=block_j, FINAL=split == 1, EVEN=even,
        HAS_BIAS=has_bias, HAS_SCALES=has_scales, num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    if split > 1:
        splitk_reduce(target, out, bias, scales)
    return out
