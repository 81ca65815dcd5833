"""GPU kernels (Triton): the CUDA-core GEMV straight from the unpacked codes, decoding on the GPU, and the pieces
the other Triton kernels share (epilogue, split-K reduction).

**GEMV** (`_vq_gemv_kernel`, `triton_vq_matmul`): one program per (tile of `BLOCK_R` output rows, input row).
It decodes the weight tile by tile in registers, from the codes `[rows, n_blocks, M]` and the codebooks
`[M, k, d]` (a few KB: they stay in L1 after the first touch); the dense weight never exists in global
memory. For each chunk of `BLOCK_J` input blocks a program

1. loads the codes `[BLOCK_R, BLOCK_J]` (uint8 or int32) of each of the M codebooks,
2. gathers the codewords `[BLOCK_R, BLOCK_J, D_PAD]` and sums the M of them (float32),
3. multiplies them with the input chunk `[BLOCK_J, D_PAD]` and accumulates on the CUDA cores (float32).

Its cost is the codeword gathers: a warp's 32 gathers from a 2-4 KB codebook touch ~14-20 distinct L1 lines,
one L1 wavefront each. `triton_lut.py` (batch 1) and `triton_mma.py` (tensor cores, any batch) are the other
fast kernels; `hf_vq.kernels.cuda` picks among them per layer shape and batch.

**Decode** (`_vq_decode_kernel`, `triton_decode`): the same tile decode, written out as the weight matrix, for
the decode + cuBLAS path.

**Epilogue.** Every kernel ends with `y = acc * scales[r] + bias[r]` (each optional, float32) rounded once to
the output dtype: `scales` are per-output-channel factors, `W = diag(scales) · decode(codes)`.

`d` need not be a power of two: blocks are padded to `D_PAD` with masked (zero) lanes. `triton_vq_matmul`
without a `config` is tuned by `triton.autotune` per layer shape (`_gemv_tuned`); the dispatcher
(`hf_vq.kernels.cuda`) instead passes explicit configurations it timed itself. Under Triton's CPU interpreter
(`TRITON_INTERPRET=1`, used by the tests) or with `HF_VQ_TRITON_AUTOTUNE=0` the fixed `GEMV_DEFAULT` runs.
Inference only (no backward).
"""

from __future__ import annotations

import os

import torch

__all__ = ["GEMV_DEFAULT", "HAS_TRITON", "next_pow2", "splitk_reduce", "triton_decode", "triton_vq_matmul"]

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch only
    triton = None
    tl = None
    HAS_TRITON = False


def next_pow2(n: int) -> int:
    """The smallest power of two >= `n` (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def _lanes(d: int) -> int:
    """Lanes per block in the kernels: `d` padded to a power of two, at least 2."""
    return max(2, next_pow2(d))


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; install a CUDA build of torch (it ships triton).")


def _block_j(args: dict) -> int:
    """Input blocks per chunk: `BLOCK_JD` input columns, at least one block."""
    return max(1, args["BLOCK_JD"] // args["D_PAD"])


def optional_args(out: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None) -> tuple:
    """`(bias_ptr, scales_ptr, HAS_BIAS, HAS_SCALES)` for a kernel; a missing tensor is replaced by `out` (never
    read: its flag is False)."""
    return (out if bias is None else bias, out if scales is None else scales, bias is not None, scales is not None)


def check_scales(scales: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor | None:
    """`scales` as a contiguous `[rows]` tensor on `device`, or None.

    Raises:
        `ValueError`: if `scales` is not one value per output row.
    """
    if scales is None:
        return None
    if scales.shape != (rows,):
        raise ValueError(f"scales must have shape ({rows},) (one per output row), got {tuple(scales.shape)}.")
    return scales.to(device).contiguous()


if HAS_TRITON:

    @triton.jit
    def _epilogue(y, offs_r, r_ok, bias_ptr, scales_ptr, HAS_BIAS: tl.constexpr,
                  HAS_SCALES: tl.constexpr):  # pragma: no cover - compiled by triton
        """`y * scales[r] + bias[r]` in float32; `y` is `[..., R]` with `offs_r`, `r_ok` `[R]` along its last axis."""
        if HAS_SCALES:
            y = y * tl.load(scales_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        return y

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, out_ptr, bias_ptr, scales_ptr, n_rows, n_split, stride_ps, stride_pb,
                              stride_ob, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                              HAS_SCALES: tl.constexpr):  # pragma: no cover - compiled by triton
        """out[b, r] = epilogue(sum_s part[s, b, r]) — part float32 `[S, B, rows]`, out `[B, rows]`."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        b = tl.program_id(1)
        ok = offs < n_rows
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(n_split):
            acc += tl.load(part_ptr + s * stride_ps + b * stride_pb + offs, mask=ok, other=0.0)
        acc = _epilogue(acc, offs, ok, bias_ptr, scales_ptr, HAS_BIAS, HAS_SCALES)
        tl.store(out_ptr + b * stride_ob + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _decode_tile(codes_ptr, books_ptr, offs_r, offs_j, offs_t, stride_codes_r, code_mask, w_mask,
                     M: tl.constexpr, K: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):  # pragma: no cover
        """The weight tile `[BLOCK_R, BLOCK_J, D_PAD]` (float32): the sum of the M codewords of each block."""
        code_ptrs = codes_ptr + offs_r[:, None] * stride_codes_r + offs_j[None, :] * M  # [BLOCK_R, BLOCK_J]
        if MASKED:
            code = tl.load(code_ptrs, mask=code_mask, other=0).to(tl.int32)
            w = tl.load(books_ptr + code[:, :, None] * D + offs_t[None, None, :], mask=w_mask, other=0.0).to(tl.float32)
        else:
            code = tl.load(code_ptrs).to(tl.int32)
            w = tl.load(books_ptr + code[:, :, None] * D + offs_t[None, None, :]).to(tl.float32)
        for m in tl.static_range(1, M):
            if MASKED:
                code = tl.load(code_ptrs + m, mask=code_mask, other=0).to(tl.int32)
                w += tl.load(books_ptr + (m * K + code)[:, :, None] * D + offs_t[None, None, :], mask=w_mask,
                             other=0.0).to(tl.float32)
            else:
                code = tl.load(code_ptrs + m).to(tl.int32)
                w += tl.load(books_ptr + (m * K + code)[:, :, None] * D + offs_t[None, None, :]).to(tl.float32)
        return w

    @triton.jit
    def _vq_gemv_kernel(
        x_ptr, codes_ptr, books_ptr, out_ptr, bias_ptr, scales_ptr,
        n_rows, n_blocks,
        stride_xb, stride_codes_r, stride_ob,
        M: tl.constexpr, K: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_JD: tl.constexpr, BLOCK_J: tl.constexpr, MASKED: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr,
    ):  # pragma: no cover - compiled by triton
        pid_r = tl.program_id(0)
        b = tl.program_id(1)  # one input row per program
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        offs_t = tl.arange(0, D_PAD)  # [D_PAD]
        row_ok = offs_r < n_rows  # [BLOCK_R]
        lane_ok = offs_t < D  # [D_PAD]
        x_row = x_ptr + b * stride_xb
        acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
        for j0 in range(0, n_blocks, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
            block_ok = offs_j < n_blocks  # [BLOCK_J]
            code_mask = row_ok[:, None] & block_ok[None, :]  # [BLOCK_R, BLOCK_J]
            w_mask = code_mask[:, :, None] & lane_ok[None, None, :]  # [BLOCK_R, BLOCK_J, D_PAD]
            x_ptrs = x_row + offs_j[:, None] * D + offs_t[None, :]  # [BLOCK_J, D_PAD]
            if MASKED:
                x_tile = tl.load(x_ptrs, mask=block_ok[:, None] & lane_ok[None, :], other=0.0).to(tl.float32)
            else:
                x_tile = tl.load(x_ptrs).to(tl.float32)
            w = _decode_tile(codes_ptr, books_ptr, offs_r, offs_j, offs_t, stride_codes_r, code_mask, w_mask,
                             M, K, D, MASKED)  # [BLOCK_R, BLOCK_J, D_PAD]
            acc += tl.sum(w * x_tile[None, :, :], axis=2)  # [BLOCK_R, BLOCK_J]
        out = _epilogue(tl.sum(acc, axis=1), offs_r, row_ok, bias_ptr, scales_ptr, HAS_BIAS, HAS_SCALES)  # [BLOCK_R]
        tl.store(out_ptr + b * stride_ob + offs_r, out.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _vq_decode_kernel(
        codes_ptr, books_ptr, out_ptr, scales_ptr, n_rows, n_blocks, stride_codes_r, stride_or,
        M: tl.constexpr, K: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, HAS_SCALES: tl.constexpr,
    ):  # pragma: no cover - compiled by triton
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        offs_t = tl.arange(0, D_PAD)  # [D_PAD]
        row_ok = offs_r < n_rows  # [BLOCK_R]
        code_mask = row_ok[:, None] & (offs_j < n_blocks)[None, :]  # [BLOCK_R, BLOCK_J]
        w_mask = code_mask[:, :, None] & (offs_t < D)[None, None, :]  # [BLOCK_R, BLOCK_J, D_PAD]
        w = _decode_tile(codes_ptr, books_ptr, offs_r, offs_j, offs_t, stride_codes_r, code_mask, w_mask,
                         M, K, D, True)  # [BLOCK_R, BLOCK_J, D_PAD]
        if HAS_SCALES:
            w = w * tl.load(scales_ptr + offs_r, mask=row_ok, other=0.0).to(tl.float32)[:, None, None]
        out_ptrs = out_ptr + offs_r[:, None, None] * stride_or + offs_j[None, :, None] * D + offs_t[None, None, :]
        tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=w_mask)

    def _masked(args: dict) -> bool:
        """Masks are needed unless the row tiles, block chunks and lanes divide the shapes exactly."""
        return not (args["n_rows"] % args["BLOCK_R"] == 0 and args["n_blocks"] % _block_j(args) == 0
                    and args["D"] == args["D_PAD"])

    _HEURISTICS = {"BLOCK_J": _block_j, "MASKED": _masked}

    # (BLOCK_R, BLOCK_JD, num_warps): row tile, input columns per chunk, warps per program. Around the
    # winners on an H200 (small row tiles, long chunks, few warps: many programs, many loads in flight).
    _GEMV_CONFIGS = [(2, 512, 1), (4, 512, 1), (4, 1024, 2), (8, 512, 2), (8, 2048, 4), (16, 1024, 4)]

    _gemv_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_R": r, "BLOCK_JD": jd}, num_warps=w) for r, jd, w in _GEMV_CONFIGS],
        key=["n_rows", "n_blocks"],
    )(triton.heuristics(_HEURISTICS)(_vq_gemv_kernel))
    _gemv_fixed = triton.heuristics(_HEURISTICS)(_vq_gemv_kernel)


#: Tile configuration used without autotuning (`HF_VQ_TRITON_AUTOTUNE=0`, or Triton's CPU interpreter):
#: the autotuner's choice for 4096x11008 on an H200 (benchmarks/results/gpu_kernels.md).
GEMV_DEFAULT = {"BLOCK_R": 8, "BLOCK_JD": 512, "num_warps": 2}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fixed_configs() -> bool:
    """No autotuning: under the interpreter, or when `HF_VQ_TRITON_AUTOTUNE=0` (fast, deterministic first calls)."""
    return _interpreting() or os.environ.get("HF_VQ_TRITON_AUTOTUNE", "1") == "0"


def triton_vq_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, *,
                     bias: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """`(x @ W.T) * scales + bias` for the VQ weight given by `codes` and `codebooks`, with the Triton GEMV kernel.

    Args:
        x (`torch.Tensor`): inputs `[B, n_blocks * d]`, float16 / bfloat16 / float32 (one program per row:
            meant for a few rows; `hf_vq.kernels` sends larger batches elsewhere).
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8 or int32), same device as `x`.
        codebooks (`torch.Tensor`): `[M, k, d]` (cast to the dtype of `x`).
        bias (`torch.Tensor`, *optional*): `[rows]`, added in float32 before the output is rounded.
        scales (`torch.Tensor`, *optional*): `[rows]` per-output-channel factors (`W = diag(scales) · decode`).
        config (`dict`, *optional*): a fixed tile configuration instead of autotuning, e.g.
            `{"BLOCK_R": 8, "BLOCK_JD": 512, "num_warps": 2}`.

    Returns:
        `torch.Tensor`: `[B, rows]` in the dtype of `x`.
    """
    _require_triton()
    rows, n_blocks, n_books = codes.shape
    _, k, d = codebooks.shape
    x = x.contiguous()  # [B, n_blocks*d]
    codes = codes.contiguous()  # [rows, n_blocks, M]
    books = codebooks.to(x.dtype).contiguous()  # [M, k, d]
    scales = check_scales(scales, rows, x.device)
    batch = x.shape[0]
    out = torch.empty(batch, rows, dtype=x.dtype, device=x.device)  # [B, rows]
    if batch == 0 or rows == 0:
        return out
    bias_ptr, scales_ptr, has_bias, has_scales = optional_args(out, bias, scales)
    shape = {"M": n_books, "K": k, "D": d, "D_PAD": _lanes(d), "HAS_BIAS": has_bias, "HAS_SCALES": has_scales}
    args = (x, codes, books, out, bias_ptr, scales_ptr, rows, n_blocks, x.stride(0), codes.stride(0), out.stride(0))
    if config is not None or _fixed_configs():
        meta = dict(config or GEMV_DEFAULT)
        _gemv_fixed[(triton.cdiv(rows, meta["BLOCK_R"]), batch)](*args, **shape, **meta)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), batch)](*args, **shape)
    return out


def triton_decode(codes: torch.Tensor, codebooks: torch.Tensor, *, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The weight matrix `[rows, n_blocks * d]` decoded on the GPU (dtype of `codebooks`, summed in float32).

    Args:
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8 or int32), on the GPU.
        codebooks (`torch.Tensor`): `[M, k, d]`, same device.
        scales (`torch.Tensor`, *optional*): `[rows]`; row `r` of the result is multiplied by `scales[r]` (in
            float32, before rounding).
    """
    _require_triton()
    rows, n_blocks, n_books = codes.shape
    _, k, d = codebooks.shape
    codes = codes.contiguous()  # [rows, n_blocks, M]
    books = codebooks.contiguous()  # [M, k, d]
    scales = check_scales(scales, rows, books.device)
    out = torch.empty(rows, n_blocks * d, dtype=books.dtype, device=books.device)  # [rows, n_blocks*d]
    if out.numel() == 0:
        return out
    d_pad = _lanes(d)
    block_j = max(1, 128 // d_pad)
    grid = (triton.cdiv(rows, 16), triton.cdiv(n_blocks, block_j))
    _vq_decode_kernel[grid](codes, books, out, out if scales is None else scales, rows, n_blocks, codes.stride(0),
                            out.stride(0), M=n_books, K=k, D=d, D_PAD=d_pad, BLOCK_R=16, BLOCK_J=block_j,
                            HAS_SCALES=scales is not None)
    return out


def splitk_reduce(part: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
                  scales: torch.Tensor | None) -> torch.Tensor:
    """Sum split-K partial results and apply the epilogue: `out[b, r] = sum_s part[s, b, r] * scales[r] + bias[r]`.

    Args:
        part (`torch.Tensor`): float32 `[S, B, rows]`, contiguous.
        out (`torch.Tensor`): `[B, rows]` (written; its dtype is the result's).
        bias, scales (`torch.Tensor`, *optional*): `[rows]`.
    """
    n_split, batch, rows = part.shape
    bias_ptr, scales_ptr, has_bias, has_scales = optional_args(out, bias, scales)
    block = min(1024, max(32, next_pow2(rows)))
    _splitk_reduce_kernel[(triton.cdiv(rows, block), batch)](
        part, out, bias_ptr, scales_ptr, rows, n_split, part.stride(0), part.stride(1), out.stride(0),
        BLOCK=block, HAS_BIAS=has_bias, HAS_SCALES=has_scales)
    return out
