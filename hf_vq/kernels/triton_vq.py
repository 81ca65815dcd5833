"""GPU kernel (Triton): VQ GEMV / small-batch GEMM straight from the unpacked codes.

One program computes a tile `out[BLOCK_B, BLOCK_R]`. For each chunk of `BLOCK_J` input blocks it

1. loads the codes of its rows `[BLOCK_R, BLOCK_J]` (uint8 or int32) for each of the M codebooks,
2. gathers the codewords `[BLOCK_R, BLOCK_J, D_PAD]` from the codebook (a few KB: it stays in L1 /
   shared cache after the first touch; never a dense weight in global memory) and sums the M of them,
3. loads the matching input tile `[BLOCK_B, BLOCK_J, D_PAD]`, flattens both to `[.., BLOCK_J*D_PAD]`
   and accumulates `x @ w.T` with `tl.dot` in float32.

`d` need not be a power of two: blocks are padded to `D_PAD` with masked (zero) lanes on both sides
of the dot product, so padding adds nothing. Inference only (no backward).

Not run in the session that wrote it (no GPU); checked on CPU with Triton's interpreter
(`TRITON_INTERPRET=1`, see tests/nn/test_kernels.py).
"""

from __future__ import annotations

import torch

__all__ = ["HAS_TRITON", "triton_vq_matmul"]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch only
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _vq_matmul_kernel(
        x_ptr, codes_ptr, books_ptr, out_ptr,
        n_batch, n_rows, n_blocks,
        stride_xb, stride_codes_r, stride_ob,
        M: tl.constexpr, K: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):  # pragma: no cover - compiled by triton
        pid_r = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
        offs_t = tl.arange(0, D_PAD)  # [D_PAD]
        row_ok = offs_r < n_rows  # [BLOCK_R]
        batch_ok = offs_b < n_batch  # [BLOCK_B]
        lane_ok = offs_t < D  # [D_PAD]
        acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
        for j0 in range(0, n_blocks, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
            block_ok = offs_j < n_blocks  # [BLOCK_J]
            # input tile [BLOCK_B, BLOCK_J, D_PAD]
            x_cols = offs_j[None, :, None] * D + offs_t[None, None, :]
            x_mask = batch_ok[:, None, None] & block_ok[None, :, None] & lane_ok[None, None, :]
            x_tile = tl.load(x_ptr + offs_b[:, None, None] * stride_xb + x_cols, mask=x_mask, other=0.0)
            # weight tile [BLOCK_R, BLOCK_J, D_PAD]: sum of the M codewords of each block
            code_mask = row_ok[:, None] & block_ok[None, :]  # [BLOCK_R, BLOCK_J]
            w_mask = code_mask[:, :, None] & lane_ok[None, None, :]
            w_tile = tl.zeros((BLOCK_R, BLOCK_J, D_PAD), dtype=tl.float32)
            for m in tl.static_range(M):
                code_ptrs = codes_ptr + offs_r[:, None] * stride_codes_r + offs_j[None, :] * M + m
                code = tl.load(code_ptrs, mask=code_mask, other=0).to(tl.int32)  # [BLOCK_R, BLOCK_J]
                word_ptrs = books_ptr + (m * K + code)[:, :, None] * D + offs_t[None, None, :]
                w_tile += tl.load(word_ptrs, mask=w_mask, other=0.0).to(tl.float32)
            x_flat = tl.reshape(x_tile, (BLOCK_B, BLOCK_J * D_PAD))  # [BLOCK_B, BLOCK_J*D_PAD]
            w_flat = tl.reshape(w_tile.to(x_tile.dtype), (BLOCK_R, BLOCK_J * D_PAD))  # [BLOCK_R, BLOCK_J*D_PAD]
            acc = tl.dot(x_flat, tl.trans(w_flat), acc, input_precision=INPUT_PRECISION)  # [BLOCK_B, BLOCK_R]
        out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_r[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=batch_ok[:, None] & row_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_vq_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, *,
                     block_r: int = 64, block_b: int = 16) -> torch.Tensor:
    """`x @ W.T` for the VQ weight given by `codes` and `codebooks`, with the Triton kernel.

    Args:
        x (`torch.Tensor`): inputs `[B, n_blocks * d]`, float16 / bfloat16 / float32.
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8 or int32), same device as `x`.
        codebooks (`torch.Tensor`): `[M, k, d]` (cast to the dtype of `x`).
        block_r (`int`, defaults to 64): output rows per program.
        block_b (`int`, defaults to 16): input rows per program (`tl.dot` needs at least 16).

    Returns:
        `torch.Tensor`: `[B, rows]` in the dtype of `x`.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; install a CUDA build of torch (it ships triton).")
    rows, n_blocks, n_books = codes.shape
    _, k, d = codebooks.shape
    x = x.contiguous()  # [B, n_blocks*d]
    codes = codes.contiguous()  # [rows, n_blocks, M]
    books = codebooks.to(x.dtype).contiguous()  # [M, k, d]
    batch = x.shape[0]
    out = torch.empty(batch, rows, dtype=x.dtype, device=x.device)  # [B, rows]
    d_pad = max(2, _next_pow2(d))
    block_j = max(1, 64 // d_pad)  # the dot's reduction dim BLOCK_J*D_PAD >= 16, usually 64
    grid = (triton.cdiv(rows, block_r), triton.cdiv(batch, block_b))
    _vq_matmul_kernel[grid](
        x, codes, books, out,
        batch, rows, n_blocks,
        x.stride(0), codes.stride(0), out.stride(0),
        M=n_books, K=k, D=d, D_PAD=d_pad,
        BLOCK_B=block_b, BLOCK_R=block_r, BLOCK_J=block_j,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # exact fp32 products, no TF32
    )
    return out
