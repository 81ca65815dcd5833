"""The Triton kernels added for fast inference (lookup-table GEMV, tensor-core dequantize-GEMM) and the CUDA
dispatcher that picks among them. Reference: `(x @ decode(codes)ᵀ) * scales + bias` in float64.

Without a GPU the kernels run in Triton's CPU interpreter (a subprocess with `TRITON_INTERPRET=1`, small
shapes); with one, every kernel is checked at real sizes in every dtype, and the dispatcher's choices.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_vq import kernels
from hf_vq.codec import decode
from hf_vq.kernels import cuda as cuda_dispatch

ROOT = Path(__file__).resolve().parents[2]
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.HAS_TRITON, reason="needs a CUDA GPU and triton")


def _problem(rows: int, n_blocks: int, m: int, k: int, d: int, batch: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random codes `[rows, n_blocks, m]`, codebooks `[m, k, d]`, inputs `[batch, n_blocks*d]`, bias, scales and the
    float64 reference output `[batch, rows]`."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, k, (rows, n_blocks, m), generator=gen).to(torch.uint8 if k <= 256 else torch.int32)
    books = torch.randn(m, k, d, generator=gen) / (d * m) ** 0.5
    x = torch.randn(batch, n_blocks * d, generator=gen)
    bias, scales = torch.randn(rows, generator=gen), torch.rand(rows, generator=gen) + 0.5
    ref = x.double() @ (decode(codes, books.double()) * scales.double()[:, None]).t() + bias.double()
    tensors = [t.to(device) for t in (codes, books.to(dtype), x.to(dtype), bias.to(dtype), scales.to(dtype))]
    return (*tensors, ref)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).abs().max() / ref.abs().max())


_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------------------------------------- interpreter
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels themselves are tested (CUDA tests)")
def test_new_kernels_in_interpreter():
    """LUT GEMV (float32 and scaled float16 tables, split-K or not), tensor-core kernel (float16: the interpreter's
    bfloat16 `tl.dot` is broken), GEMV and decode with bias and scales; ragged shapes, int32 codes."""
    script = textwrap.dedent("""
        import torch
        from tests.nn.test_triton_kernels import _problem, _rel_error
        from hf_vq.codec import decode
        from hf_vq.kernels.triton_lut import triton_lut_matmul
        from hf_vq.kernels.triton_mma import triton_mma_matmul
        from hf_vq.kernels.triton_vq import triton_decode, triton_vq_matmul
        cases = [(70, 5, 1, 100, 8, 3, torch.float32, 1e-5),   # ragged rows, k < 256
                 (64, 32, 2, 256, 4, 1, torch.float16, 5e-3),  # tiles divide the shape: unmasked loads
                 (33, 7, 2, 300, 4, 2, torch.float32, 1e-5),   # int32 codes
                 (48, 16, 1, 256, 4, 2, torch.bfloat16, 2e-2)]
        for rows, nb, m, k, d, batch, dtype, tol in cases:
            codes, books, x, bias, scales, ref = _problem(rows, nb, m, k, d, batch, dtype, "cpu")
            runs = {"gemv": triton_vq_matmul(x, codes, books, bias=bias, scales=scales)}
            for i, cfg in enumerate(({}, {"BLOCK_R": 16, "BLOCK_C": 16, "num_warps": 1, "SPLIT": 3},
                                     {"BLOCK_R": 32, "BLOCK_C": 4, "SPLIT": 1, "LUT_F16": dtype != torch.float32})):
                runs[f"lut{i}"] = triton_lut_matmul(x, codes, books, bias=bias, scales=scales, config=cfg)
            if dtype == torch.float16:
                for i, cfg in enumerate(({}, {"BLOCK_N": 16, "BLOCK_KD": 32, "SPLIT": 2},
                                         {"BLOCK_N": 32, "BLOCK_KD": 16, "SPLIT": 1})):
                    runs[f"mma{i}"] = triton_mma_matmul(x, codes, books, bias=bias, scales=scales, config=cfg)
            for name, out in runs.items():
                assert out.shape == (batch, rows) and out.dtype == dtype, (name, out.shape, out.dtype)
                assert _rel_error(out, ref) < tol, (name, rows, m, k, dtype, _rel_error(out, ref))
            weight = triton_decode(codes, books, scales=scales).float()
            want = decode(codes, books.float()) * scales.float()[:, None]
            ulp = 2.0 ** {torch.float32: -23, torch.float16: -10, torch.bfloat16: -7}[dtype]
            assert ((weight - want).abs() <= want.abs() * ulp + 1e-30).all(), (rows, dtype)  # one rounding
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_candidates_per_batch():
    """Which kernels the CUDA dispatcher tries (no GPU needed: the list itself)."""
    names = lambda batch, dtype=torch.float16, d=4, **kw: {k.name for k in cuda_dispatch.candidates(batch, d, dtype, **kw)}
    assert names(1) == {"lut", "gemv", "mma", "decode"}
    assert names(8) == {"gemv", "mma", "decode"}
    assert names(512) == {"mma", "decode"}
    assert names(512, torch.float32) == {"decode"}  # no tf32 tensor cores for float32 inputs
    assert names(1, d=9) == {"lut", "gemv", "decode"}  # the tensor-core kernel needs a power-of-two d
    assert names(512, torch.float32, fast_only=True) == {"gemv"}  # kernel_mode("lut") beyond every range
    assert names(1, k=65536) == {"gemv", "mma", "decode"}  # no lookup tables of 65536 entries per code
    assert all(k.family == ("decode" if k.name == "decode" else "gemv") for k in cuda_dispatch.candidates(1, 4, torch.float16))


# ---------------------------------------------------------------------------------------------- CUDA
def _check_kernels(kernels_to_run, dtype, rows, n_blocks, m, k, d, batch) -> None:
    codes, books, x, bias, scales, ref = _problem(rows, n_blocks, m, k, d, batch, dtype, "cuda", seed=batch)
    for kernel in kernels_to_run:
        out = kernel(x, codes, books, bias, scales)
        assert out.shape == (batch, rows) and out.dtype == dtype, str(kernel)
        tol = 3e-3 if kernel.name == "decode" and dtype == torch.float32 else _TOL[dtype]  # cuBLAS may use TF32
        assert _rel_error(out, ref) < tol, (str(kernel), batch, _rel_error(out, ref))


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("rows,n_blocks,m,k,d", [(2048, 512, 1, 256, 4), (1000, 130, 2, 300, 8)],
                         ids=["2bit-d4", "M2d8-k300-ragged"])
def test_cuda_kernels_match_reference(dtype, rows, n_blocks, m, k, d):
    """Each kernel family (first configuration) at batch 1, 16 and 130, with bias and scales, against float64."""
    for batch in (1, 16, 130):
        first = {}
        for kernel in cuda_dispatch.candidates(batch, d, dtype):
            first.setdefault(kernel.name, kernel)
        _check_kernels(first.values(), dtype, rows, n_blocks, m, k, d, batch)


@CUDA
@pytest.mark.parametrize("batch", [1, 2, 16, 64, 130])
def test_cuda_every_configuration(batch):
    """Every configuration the dispatcher may pick (float16, the default 2-bit layout)."""
    _check_kernels(cuda_dispatch.candidates(batch, 4, torch.float16), torch.float16, 2048, 512, 1, 256, 4, batch)


@CUDA
def test_cuda_dispatch_times_once_and_records(monkeypatch):
    """The first call per (shape, batch bucket) picks a kernel (timed), later calls reuse it; nothing failed."""
    from hf_vq.nn import VQLinear

    monkeypatch.setenv("HF_VQ_TRITON_AUTOTUNE", "1")
    vq = VQLinear.from_float(torch.nn.Linear(1024, 2048, bias=False, device="meta"), kind="linear", k=256, d=4,
                             device="cpu", dtype=torch.float32)
    vq.set_codes_(torch.randint(0, 256, (2048, 256, 1)), torch.randn(1, 256, 4) / 2)
    vq = vq.to("cuda", torch.float16).requires_grad_(False)
    for batch in (1, 3, 64):
        x = torch.randn(batch, 1024, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            out = vq(x)
        ref = x.double() @ vq.weight.double().t()
        assert float((out.double() - ref).abs().max() / ref.abs().max()) < 5e-3
    keys = [key for key in kernels.cuda_kernels() if key[0] == (2048, 256, 1)]
    assert {key[-1] for key in keys} >= {1, 4, 64}
    assert all(kernels.cuda_timings()[key] for key in keys)
    assert not [err for (key, _), err in kernels.cuda_errors().items() if key[0] == (2048, 256, 1)]


@CUDA
def test_cuda_choice_inside_capture_is_not_timed():
    """A shape first met inside a CUDA-graph capture takes the fixed default and is not cached."""
    codes, books, x, bias, scales, ref = _problem(512, 64, 1, 256, 4, 1, torch.float16, "cuda", seed=7)
    x = x[:, : 64 * 4].contiguous()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    triton_warm = cuda_dispatch._default(1, False)(x, codes, books, bias, scales)  # compile outside the capture
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        kernel = cuda_dispatch.choose(x, codes, books, bias, scales)
        out = kernel(x, codes, books, bias, scales)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert kernel == cuda_dispatch._default(1, False)
    assert not any(key[0] == (512, 64, 1) for key in kernels.cuda_kernels())
    torch.testing.assert_close(out, triton_warm)
