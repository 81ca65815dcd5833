"""GPU lookup-table GEMV (Triton) for one to a few input rows.

With the codes of a row flattened to `[n_codes = n_blocks * M]` (column `c = j*M + m` is block `j`, codebook
`m`), the product of a weight row with an input row `x` is

    y[r] = sum_c lut[c, codes[r, c]],        lut[c, k] = x[block j] · codebooks[m, k]

Two kernels:

1. `_lut_build_kernel` computes the table `lut [B, n_codes, k]` (n_codes·k·d multiply-adds per input row,
   independent of the number of output rows). For half-precision inputs each table row is stored in float16
   divided by its largest magnitude (kept in float32 beside it, `lut_scale [B, n_codes]`): every entry keeps
   11 significant bits relative to its row's maximum and nothing can overflow;
2. `_lut_gemv_kernel` sums one table entry per code. A program owns `BLOCK_R` output rows and one split of the
   code columns; its code tile `[BLOCK_R, BLOCK_C]` is read with one 16-byte load per thread (row-major codes,
   lanes along rows), so the 32 gathers of a warp instruction all fall in the same table row (1 KB in float32,
   512 B in float16): 8 or 4 L1 lines, where the decoding GEMV's gathers spread over the whole 2-4 KB codebook.
   Split-K programs write float32 partial sums that `splitk_reduce` adds up (with the epilogue).

Each input row costs one gather per code, so the kernel is for batch 1 (and a few rows); `hf_vq.kernels.cuda`
times it against the other kernels per layer shape and batch.
"""

from __future__ import annotations

import functools

import torch

from .triton_vq import HAS_TRITON, _require_triton, check_scales, next_pow2, optional_args, splitk_reduce

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_vq import _epilogue

__all__ = ["LUT_DEFAULT", "triton_lut_matmul"]

#: Configuration without tuning: row tile, code columns per load, warps (split-K is sized to fill the GPU).
LUT_DEFAULT = {"BLOCK_R": 256, "BLOCK_C": 16, "num_warps": 4}

if HAS_TRITON:

    @triton.jit
    def _lut_build_kernel(x_ptr, books_ptr, lut_ptr, lut_scale_ptr, n_codes, stride_xb, stride_lb, stride_sb,
                          M: tl.constexpr, K: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                          K_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                          LUT_F16: tl.constexpr):  # pragma: no cover - compiled by triton
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] code columns c = j*M + m
        b = tl.program_id(1)
        offs_k = tl.arange(0, K_PAD)  # [KP]
        offs_t = tl.arange(0, D_PAD)  # [DP]
        c_ok = offs_c < n_codes
        k_ok = offs_k < K
        t_ok = offs_t < D
        block = offs_c // M  # [BC]
        book = offs_c % M  # [BC]
        xv = tl.load(x_ptr + b * stride_xb + block[:, None] * D + offs_t[None, :],
                     mask=c_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)  # [BC, DP]
        words = (book[:, None] * K + offs_k[None, :]) * D  # [BC, KP]
        mask = c_ok[:, None] & k_ok[None, :]  # [BC, KP]
        bk = tl.load(books_ptr + words[:, :, None] + offs_t[None, None, :], mask=mask[:, :, None] & t_ok[None, None, :],
                     other=0.0).to(tl.float32)  # [BC, KP, DP]
        lut = tl.sum(bk * xv[:, None, :], axis=2)  # [BC, KP]
        out_ptrs = lut_ptr + b * stride_lb + offs_c[:, None] * K + offs_k[None, :]
        if LUT_F16:
            scale = tl.max(tl.abs(lut), axis=1)  # [BC]
            inv = tl.where(scale > 0, 1.0 / scale, 0.0)
            tl.store(out_ptrs, (lut * inv[:, None]).to(tl.float16), mask=mask)
            tl.store(lut_scale_ptr + b * stride_sb + offs_c, scale, mask=c_ok)
        else:
            tl.store(out_ptrs, lut, mask=mask)

    @triton.jit
    def _lut_gemv_kernel(codes_ptr, lut_ptr, lut_scale_ptr, out_ptr, bias_ptr, scales_ptr,
                         n_rows, n_codes, codes_per_split,
                         stride_codes_r, stride_lb, stride_sb, stride_os, stride_ob,
                         K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LUT_F16: tl.constexpr,
                         FINAL: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_SCALES: tl.constexpr):  # pragma: no cover - compiled by triton
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = tl.program_id(2)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        r_ok = offs_r < n_rows
        c_begin = pid_s * codes_per_split
        code_rows = codes_ptr + offs_r[:, None] * stride_codes_r  # [BR, 1]
        lut_b = lut_ptr + b * stride_lb
        scale_b = lut_scale_ptr + b * stride_sb
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(c_begin, c_begin + codes_per_split, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)  # [BC]
            if EVEN:
                code = tl.load(code_rows + offs_c[None, :]).to(tl.int32)  # [BR, BC]
                val = tl.load(lut_b + offs_c[None, :] * K + code).to(tl.float32)  # [BR, BC], one gather per code
                if LUT_F16:
                    val = val * tl.load(scale_b + offs_c)[None, :]
            else:
                c_ok = offs_c < n_codes
                mask = r_ok[:, None] & c_ok[None, :]
                code = tl.load(code_rows + offs_c[None, :], mask=mask, other=0).to(tl.int32)
                val = tl.load(lut_b + offs_c[None, :] * K + code, mask=mask, other=0.0).to(tl.float32)
                if LUT_F16:
                    val = val * tl.load(scale_b + offs_c, mask=c_ok, other=0.0)[None, :]
            acc += tl.sum(val, axis=1)
        if FINAL:
            y = _epilogue(acc, offs_r, r_ok, bias_ptr, scales_ptr, HAS_BIAS, HAS_SCALES)
            tl.store(out_ptr + b * stride_ob + offs_r, y.to(out_ptr.dtype.element_ty), mask=r_ok)
        else:
            tl.store(out_ptr + pid_s * stride_os + b * stride_ob + offs_r, acc, mask=r_ok)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: Triton's CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(n_tiles: int, n_chunks: int, device: torch.device, *, waves: int = 2) -> int:
    """How many split-K parts give about `waves` programs per multiprocessor: `n_tiles` output tiles, the reduced
    dimension in `n_chunks` chunks (each part gets at least two)."""
    wanted = -(-waves * sm_count(device) // max(1, n_tiles))
    return max(1, min(wanted, n_chunks // 2))


def _build_lut(x: torch.Tensor, books: torch.Tensor, n_codes: int, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables `[B, n_codes, k]` (float16 scaled per row, or float32) and their row scales `[B, n_codes]`."""
    batch = x.shape[0]
    n_books, k, d = books.shape
    lut = torch.empty(batch, n_codes, k, dtype=torch.float16 if half else torch.float32, device=x.device)
    lut_scale = torch.empty(batch, n_codes if half else 1, dtype=torch.float32, device=x.device)
    block_c = 4 if k <= 256 else 1
    _lut_build_kernel[(triton.cdiv(n_codes, block_c), batch)](
        x, books, lut, lut_scale, n_codes, x.stride(0), lut.stride(0), lut_scale.stride(0),
        M=n_books, K=k, D=d, D_PAD=max(2, next_pow2(d)), K_PAD=max(2, next_pow2(k)), BLOCK_C=block_c, LUT_F16=half,
        num_warps=4)
    return lut, lut_scale


def triton_lut_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, *,
                      bias: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """`(x @ W.T) * scales + bias` by table look-ups (see the module doc): for one to a few input rows.

    Args:
        x (`torch.Tensor`): inputs `[B, n_blocks * d]`, float16 / bfloat16 / float32.
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8 or int32), same device as `x`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
        bias, scales (`torch.Tensor`, *optional*): `[rows]` (see `triton_vq.triton_vq_matmul`).
        config (`dict`, *optional*): `BLOCK_R`, `BLOCK_C`, `num_warps` (default `LUT_DEFAULT`), `SPLIT` (split-K
            parts; default: enough programs for two per multiprocessor), `LUT_F16` (default: for half inputs).

    Returns:
        `torch.Tensor`: `[B, rows]` in the dtype of `x`.
    """
    _require_triton()
    meta = {**LUT_DEFAULT, **(config or {})}
    rows, n_blocks, n_books = codes.shape
    k = codebooks.shape[1]
    n_codes = n_blocks * n_books
    x = x.contiguous()  # [B, n_blocks*d]
    codes = codes.contiguous()  # [rows, n_blocks, M]
    books = codebooks.to(x.dtype).contiguous()  # [M, k, d]
    scales = check_scales(scales, rows, x.device)
    batch = x.shape[0]
    out = torch.empty(batch, rows, dtype=x.dtype, device=x.device)  # [B, rows]
    if batch == 0 or rows == 0:
        return out
    half = meta.get("LUT_F16", x.dtype != torch.float32)
    lut, lut_scale = _build_lut(x, books, n_codes, half)  # [B, n_codes, k], [B, n_codes or 1]
    block_r, block_c = meta["BLOCK_R"], meta["BLOCK_C"]
    n_tiles = triton.cdiv(rows, block_r)
    split = meta.get("SPLIT") or split_count(n_tiles * batch, triton.cdiv(n_codes, block_c), x.device)
    per_split = triton.cdiv(triton.cdiv(n_codes, split), block_c) * block_c
    split = triton.cdiv(n_codes, per_split)
    target = out if split == 1 else torch.empty(split, batch, rows, dtype=torch.float32, device=x.device)
    even = rows % block_r == 0 and n_codes % per_split == 0
    bias_ptr, scales_ptr, has_bias, has_scales = optional_args(out, bias, scales)
    stride_os = 0 if split == 1 else target.stride(0)
    _lut_gemv_kernel[(n_tiles, split, batch)](
        codes, lut, lut_scale, target, bias_ptr, scales_ptr, rows, n_codes, per_split,
        codes.stride(0), lut.stride(0), lut_scale.stride(0), stride_os, target.stride(-2),
        K=k, BLOCK_R=block_r, BLOCK_C=block_c, LUT_F16=half, FINAL=split == 1, EVEN=even,
        HAS_BIAS=has_bias, HAS_SCALES=has_scales, num_warps=meta["num_warps"])
    if split > 1:
        splitk_reduce(target, out, bias, scales)
    return out
