"""Fast kernels (hf_vq.kernels): same results as the reference decode + F.linear, the dispatch rule, grads.

The reference everywhere is `F.linear(x, hf_vq.codec.decode(codes, codebooks), bias)` in float64.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_vq import kernels
from hf_vq.codec import decode
from hf_vq.kernels import cpu, kernel_mode, select_path
from hf_vq import VQConv1D
from hf_vq.nn import VQEmbedding, VQLinear, vq_class_for

ROOT = Path(__file__).resolve().parents[2]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NUMBA = pytest.mark.skipif(not kernels.HAS_NUMBA, reason="numba is not installed (pip install hf_vq[kernels])")


def _vq_linear(rows: int, cols: int, *, k: int, d: int, m: int = 1, bias: bool = True, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str = "cpu") -> VQLinear:
    """A VQLinear `[rows, cols]` with random codes `[rows, cols/d, m]` and codebooks `[m, k, d]`."""
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(cols, rows, bias=bias, device="meta")
    vq = VQLinear.from_float(dense, kind="linear", k=k, d=d, num_codebooks=m, device="cpu", dtype=torch.float32)
    vq.set_codes_(torch.randint(0, k, (rows, cols // d, m), generator=gen), torch.randn(m, k, d, generator=gen))
    if bias:
        vq.bias = nn.Parameter(torch.randn(rows, generator=gen))
    return vq.to(device=device, dtype=dtype)


def _reference(vq: VQLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 `x @ W.T + b` with `W` from the reference decode."""
    weight = decode(vq.unpacked_codes(), vq.codebooks.double())  # [rows, cols]
    bias = None if vq.bias is None else vq.bias.double()
    return F.linear(x.double(), weight, bias)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    scale = ref.abs().max().clamp_min(1.0)
    err = (out.double() - ref).abs().max() / scale
    assert err < rtol, f"max error {float(err):.3g} (relative to {float(scale):.3g}) >= {rtol}"


# ---------------------------------------------------------------------------------------------- CPU LUT kernel
@pytest.mark.parametrize("m", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("k,d", [(256, 8), (100, 4), (2, 3), (300, 12), (16, 1)],
                         ids=["k256d8", "k100d4-7bit", "k2d3-1bit", "k300d12-9bit", "k16d1"])
@pytest.mark.parametrize("shape", [(5,), (1, 96), (7, 96), (2, 3, 96)], ids=["1d", "B1", "B7", "BxT"])
def test_lut_matches_decode(m, k, d, shape):
    vq = _vq_linear(40, 96, k=k, d=d, m=m)
    x = torch.randn(*shape[:-1], 96) if len(shape) > 1 else torch.randn(96)
    with torch.no_grad(), kernel_mode("lut"):
        assert select_path(x, vq.unpacked_codes(), vq.codebooks, vq.bias) == "lut"
        out = vq(x)
    assert out.shape == (*x.shape[:-1], 40) and out.dtype == torch.float32
    _assert_close(out, _reference(vq, x), 1e-5)


@pytest.mark.parametrize("rows", [1, 17, 600, 1031])
def test_lut_row_tiles_cover_every_row(rows):
    """The kernel splits output rows into per-thread tiles; partial last tiles included."""
    vq = _vq_linear(rows, 64, k=256, d=8, bias=False)
    x = torch.randn(3, 64)
    with torch.no_grad(), kernel_mode("lut"):
        _assert_close(vq(x), _reference(vq, x), 1e-5)


def test_lut_codes_cache_follows_new_codes():
    vq = _vq_linear(48, 64, k=16, d=4, bias=False)
    x = torch.randn(2, 64)
    with torch.no_grad(), kernel_mode("lut"):
        vq(x)
        assert torch.equal(vq.lut_codes(), vq.unpacked_codes().reshape(48, -1).t())
        vq.set_codes_(torch.randint(0, 16, (48, 16, 1), generator=torch.Generator().manual_seed(5)), vq.codebooks.detach())
        _assert_close(vq(x), _reference(vq, x), 1e-5)


@NUMBA
def test_prepared_decode_follows_codebook_and_code_changes():
    """A module prepares its CPU decode once; in-place codebook updates and new codes are both seen."""
    vq = _vq_linear(48, 64, k=16, d=4)
    x = torch.randn(5, 64)
    with torch.no_grad(), kernel_mode("decode"):
        _assert_close(vq(x), _reference(vq, x), 1e-5)
        plan = vq._decode_plan[1]
        assert isinstance(plan, cpu.PreparedDecode)
        vq(x)
        assert vq._decode_plan[1] is plan  # reused while nothing changed
        vq.codebooks.mul_(-2.0)  # an in-place update (a fine-tuning step)
        _assert_close(vq(x), _reference(vq, x), 1e-5)
        vq.set_codes_(torch.randint(0, 16, (48, 16, 1), generator=torch.Generator().manual_seed(7)), vq.codebooks.detach())
        _assert_close(vq(x), _reference(vq, x), 1e-5)
        assert torch.equal(vq.decode_weight(), decode(vq.unpacked_codes(), vq.codebooks))


def test_lut_without_bias_and_empty_batch():
    vq = _vq_linear(24, 32, k=64, d=4, bias=False)
    x = torch.randn(3, 32)
    with torch.no_grad(), kernel_mode("lut"):
        _assert_close(vq(x), _reference(vq, x), 1e-5)
        assert vq(torch.randn(0, 32)).shape == (0, 24)


def test_torch_fallback_without_numba(monkeypatch):
    """Without numba the same kernels run as torch ops (index_select + sum, F.embedding)."""
    vq = _vq_linear(40, 96, k=100, d=4, m=2)
    x = torch.randn(3, 96)
    monkeypatch.setattr(cpu, "HAS_NUMBA", False)
    with torch.no_grad(), kernel_mode("lut"):
        _assert_close(vq(x), _reference(vq, x), 1e-5)
    with torch.no_grad():
        assert torch.equal(cpu.fast_decode(vq.unpacked_codes(), vq.codebooks), decode(vq.unpacked_codes(), vq.codebooks))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    """Half-precision modules: the tables and sums are float32, the output is rounded once."""
    vq = _vq_linear(40, 96, k=256, d=8, m=2, dtype=dtype)
    x = torch.randn(4, 96, dtype=dtype)
    with torch.no_grad(), kernel_mode("lut"):
        out = vq(x)
    with torch.no_grad(), kernel_mode("decode"):
        dense = vq(x)
    assert out.dtype == dtype
    ref = _reference(vq, x)
    _assert_close(out, ref, 1e-2)
    assert (out.double() - ref).abs().mean() <= (dense.double() - ref).abs().mean()  # float32 sums: not worse than decode


def test_dtype_mismatch_keeps_reference_behaviour():
    vq = _vq_linear(16, 32, k=16, d=4, dtype=torch.bfloat16)
    x = torch.randn(2, 32)  # float32 input, bfloat16 codebooks
    assert select_path(x, vq.unpacked_codes(), vq.codebooks, vq.bias) == "decode"
    with torch.no_grad(), pytest.raises(RuntimeError):
        vq(x)  # exactly what nn.Linear does with a bf16 weight and a float32 input


# ---------------------------------------------------------------------------------------------- numba decode
@NUMBA
@pytest.mark.parametrize("m", [1, 3], ids=["M1", "M3"])
@pytest.mark.parametrize("k", [256, 100, 1000], ids=["k256", "k100", "k1000-int32"])
def test_fast_decode_bit_identical(m, k):
    vq = _vq_linear(24, 48, k=k, d=6, m=m)
    codes = vq.unpacked_codes()  # [24, 8, m]
    assert codes.dtype == (torch.uint8 if k <= 256 else torch.int32)
    with torch.no_grad():
        assert torch.equal(cpu.fast_decode(codes, vq.codebooks), decode(codes, vq.codebooks))
        assert torch.equal(vq.weight, decode(codes, vq.codebooks).reshape(24, 48))


@NUMBA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_fast_decode_other_dtypes(dtype):
    vq = _vq_linear(24, 48, k=64, d=4, m=2, dtype=dtype)
    codes = vq.unpacked_codes()
    with torch.no_grad():
        fast = cpu.fast_decode(codes, vq.codebooks)
    assert fast.dtype == dtype
    exact = decode(codes, vq.codebooks.double())
    ref_err = (decode(codes, vq.codebooks).double() - exact).abs().max()
    assert (fast.double() - exact).abs().max() <= ref_err + 1e-12  # summed in float32: never worse


@NUMBA
def test_serial_twins_match_the_parallel_kernels(monkeypatch):
    """Work on one thread runs each kernel's serial twin (numba's thread pool stays unstarted); both give the same
    bits, and the parallel one runs when threads and work allow."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (300, 40, 2), generator=gen, dtype=torch.int64).to(torch.uint8)  # [rows, blocks, M]
    books = torch.randn(2, 256, 4, generator=gen)  # [M, k, d]
    x = torch.randn(3, 160, generator=gen)
    ref_w, ref_y = decode(codes, books), x @ decode(codes, books).t()
    for parallel in (cpu._decode_rows, cpu._lut_gather_sum, cpu._transpose_codes, cpu._copy_words1, cpu._copy_words):
        assert cpu._kernel(parallel, 1) is cpu._SERIAL[parallel] and cpu._kernel(parallel, 2) is parallel
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for min_work in (1 << 40, 0):  # below / above the parallel threshold
                monkeypatch.setattr(cpu, "PARALLEL_MIN_WORK", min_work)
                assert torch.equal(cpu.fast_decode(codes, books), ref_w)
                assert torch.equal(cpu.fast_decode(codes[:, :, :1], books[:1]), decode(codes[:, :, :1], books[:1]))
                torch.testing.assert_close(cpu.lut_matmul(x, codes, books), ref_y, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- dispatch rule
def test_dispatch_rule_both_sides():
    """Small batches take the LUT, large ones decode + F.linear; the module really runs the chosen path."""
    assert cpu.lut_is_faster(1, 4096, 512, 1, 256, 8)  # the 1 bit/weight GEMV bar
    assert not cpu.lut_is_faster(64, 4096, 512, 1, 256, 8)
    assert cpu.lut_is_faster(1, 384, 96, 1, 256, 4)  # MiniLM, one token
    assert not cpu.lut_is_faster(1, 4096, 512, 1, 65536, 8)  # tables larger than the weight
    vq = _vq_linear(512, 512, k=256, d=8)
    small, large = torch.randn(1, 512), torch.randn(256, 512)
    with torch.no_grad():
        assert select_path(small, vq.unpacked_codes(), vq.codebooks, vq.bias) == "lut"
        assert select_path(large, vq.unpacked_codes(), vq.codebooks, vq.bias) == "decode"
        with kernel_mode("lut"):
            lut_small = vq(small)
        with kernel_mode("decode"):
            dec_large = vq(large)
        assert torch.equal(vq(small), lut_small)
        assert torch.equal(vq(large), dec_large)
        with kernel_mode("decode"):
            assert select_path(small, vq.unpacked_codes(), vq.codebooks, vq.bias) == "decode"


def test_kernel_mode_validates_and_restores():
    with pytest.raises(ValueError, match="kernel mode"):
        with kernel_mode("fast"):
            pass
    with kernel_mode("decode"):
        with kernel_mode("lut"):
            assert kernels._mode() == "lut"
        assert kernels._mode() == "decode"
    assert kernels._mode() == "auto"


# ---------------------------------------------------------------------------------------------- autograd
def test_grad_uses_reference_path_exactly():
    """Fine-tuning: with codebooks requiring grad the differentiable reference runs, bit for bit."""
    vq = _vq_linear(32, 64, k=64, d=8, m=2)
    x = torch.randn(1, 64)
    with kernel_mode("lut"):  # even when forced: the kernels have no backward
        assert select_path(x, vq.unpacked_codes(), vq.codebooks, vq.bias) == "decode"
        out = vq(x)
    weight = decode(vq.unpacked_codes(), vq.codebooks)
    assert torch.equal(out, F.linear(x, weight, vq.bias))
    out.pow(2).sum().backward()
    grad = vq.codebooks.grad.clone()
    vq.codebooks.grad = None
    F.linear(x, decode(vq.unpacked_codes(), vq.codebooks), vq.bias).pow(2).sum().backward()
    assert torch.equal(grad, vq.codebooks.grad) and grad.abs().sum() > 0


def test_grad_of_input_only_uses_reference_path():
    vq = _vq_linear(32, 64, k=64, d=8).requires_grad_(False)
    x = torch.randn(1, 64, requires_grad=True)
    assert select_path(x, vq.unpacked_codes(), vq.codebooks, vq.bias) == "decode"
    vq(x).sum().backward()
    _assert_close(x.grad, decode(vq.unpacked_codes(), vq.codebooks.double()).sum(0, keepdim=True), 1e-6)


def test_frozen_module_takes_fast_path_without_no_grad():
    vq = _vq_linear(512, 512, k=256, d=8).requires_grad_(False)
    x = torch.randn(1, 512)
    assert torch.is_grad_enabled()
    assert select_path(x, vq.unpacked_codes(), vq.codebooks, vq.bias) == "lut"
    _assert_close(vq(x), _reference(vq, x), 1e-5)


# ---------------------------------------------------------------------------------------------- other layers
def test_conv1d_gpt2_dispatches():
    torch.manual_seed(0)
    dense = Conv1D(40, 96)  # weight [in=96, out=40]
    vq = VQConv1D.from_float(dense, kind="conv1d", k=100, d=4, num_codebooks=2)
    vq.set_codes_(torch.randint(0, 100, (40, 24, 2)), torch.randn(2, 100, 4))
    x = torch.randn(2, 3, 96)
    ref = torch.addmm(vq.bias.double(), x.reshape(-1, 96).double(), vq.weight.double()).reshape(2, 3, 40)
    with torch.no_grad(), kernel_mode("lut"):
        _assert_close(vq(x), ref, 1e-5)


def test_subclass_with_own_forward_keeps_it():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    cls = vq_class_for(ScaledLinear)
    vq = cls.from_float(ScaledLinear(32, 16), kind="linear", k=16, d=4)
    vq.set_codes_(torch.randint(0, 16, (16, 8, 1)), torch.randn(1, 16, 4))
    x = torch.randn(1, 32)
    with torch.no_grad():
        assert torch.equal(vq(x), 2 * F.linear(x, vq.weight, vq.bias))
    plain = vq_class_for(type("PlainLinear", (nn.Linear,), {}))
    assert plain.forward is VQLinear.forward


def test_embedding_forward_unchanged():
    assert VQEmbedding.forward is not VQLinear.forward
    assert vq_class_for(nn.Embedding) is VQEmbedding


# ---------------------------------------------------------------------------------------------- GPU (Triton)
@CUDA
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m,k,d", [(1, 256, 8), (2, 256, 8), (1, 100, 4), (2, 300, 9)],
                         ids=["M1k256d8", "M2k256d8", "M1k100d4", "M2k300d9"])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_triton_matches_decode(dtype, rtol, m, k, d, batch, monkeypatch):
    monkeypatch.setenv("HF_VQ_TRITON_AUTOTUNE", "0")  # fixed tiles: one compile per case, not the whole list
    vq = _vq_linear(200, 36 * d, k=k, d=d, m=m, dtype=dtype, device="cuda")
    x = torch.randn(batch, 36 * d, dtype=dtype, device="cuda")
    with torch.no_grad():
        chosen = vq(x)  # the measured CUDA choice (any of the three paths)
        with kernel_mode("lut"):
            assert select_path(x, vq.unpacked_codes(), vq.codebooks, vq.bias) == "triton"
            out = vq(x)
        with kernel_mode("decode"):
            decoded = vq(x)  # Triton decode + cuBLAS
    assert out.dtype == dtype and out.device.type == "cuda"
    for got in (out, chosen, decoded):
        _assert_close(got.cpu(), _reference(vq, x).cpu(), rtol)
    assert any(key[0] == (200, 36, m) for key in kernels.cuda_choices())


@CUDA
def test_cuda_large_batch_decodes():
    vq = _vq_linear(64, 64, k=16, d=4, device="cuda")
    x = torch.randn(kernels.TRITON_MAX_BATCH + 1, 64, device="cuda")
    with torch.no_grad():
        assert select_path(x, vq.unpacked_codes(), vq.codebooks, vq.bias) == "decode"
        _assert_close(vq(x).cpu(), _reference(vq, x).cpu(), 1e-5)


@CUDA
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("config", [None, {"BLOCK_R": 4, "BLOCK_JD": 1024, "num_warps": 1},
                                    {"BLOCK_R": 32, "BLOCK_JD": 64, "num_warps": 4}], ids=["default", "long", "tall"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 5e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,cols,m,k,d", [(256, 1024, 2, 256, 8), (1000, 520, 1, 100, 8), (96, 63, 2, 300, 9)],
                         ids=["tiles-divide", "ragged-rows-k100", "d9-int32-codes"])
@pytest.mark.parametrize("batch", [1, 40])
def test_gemv_kernel_and_decode_match_reference(config, dtype, rtol, rows, cols, m, k, d, batch, monkeypatch):
    """The GEMV kernel with several tilings at any batch, with tiles that divide the shape (unmasked loads) and
    ragged ones; the GPU decode bit-identical to the reference summed in float32."""
    from hf_vq.kernels.triton_vq import triton_decode, triton_vq_matmul

    monkeypatch.setenv("HF_VQ_TRITON_AUTOTUNE", "0")  # fixed tiles: one compile per case, not the whole list
    vq = _vq_linear(rows, cols, k=k, d=d, m=m, bias=False, dtype=dtype, device="cuda")
    x = torch.randn(batch, cols, dtype=dtype, device="cuda")
    out = triton_vq_matmul(x, vq.unpacked_codes(), vq.codebooks, config=config)
    assert out.shape == (batch, rows) and out.dtype == dtype
    _assert_close(out.cpu(), _reference(vq, x).cpu(), rtol)
    weight = triton_decode(vq.unpacked_codes(), vq.codebooks)  # [rows, cols], summed in fp32, rounded once
    expected = decode(vq.unpacked_codes().cpu(), vq.codebooks.detach().cpu().float()).to(dtype)
    assert torch.equal(weight.cpu(), expected)


@CUDA
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_autotuned_kernel_matches_decode(monkeypatch):
    """The autotuned GEMV kernel on one real-sized layer, and the measured choice it makes."""
    from hf_vq.kernels import triton_vq
    from hf_vq.kernels.triton_vq import triton_vq_matmul

    monkeypatch.setenv("HF_VQ_TRITON_AUTOTUNE", "1")
    vq = _vq_linear(1024, 1024, k=256, d=8, m=2, bias=False, dtype=torch.float16, device="cuda")
    for batch in (1, 3):
        x = torch.randn(batch, 1024, dtype=torch.float16, device="cuda")
        _assert_close(triton_vq_matmul(x, vq.unpacked_codes(), vq.codebooks).cpu(), _reference(vq, x).cpu(), 5e-3)
        with torch.no_grad():
            _assert_close(vq(x).cpu(), _reference(vq, x).cpu(), 5e-3)
    choices = {key[-1]: path for key, path in kernels.cuda_choices().items() if key[0] == (1024, 128, 2)}
    assert {1, 4} <= set(choices) and set(choices.values()) <= {"gemv", "decode"}  # one measured choice per bucket
    assert any(key[:2] == (1024, 128) for key in triton_vq._gemv_tuned.cache)  # autotuned, not the fixed tiles


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels themselves are tested (CUDA tests)")
def test_triton_kernel_in_interpreter():
    """The Triton kernels (GEMV, decode) run by Triton's CPU interpreter (no GPU needed)."""
    script = textwrap.dedent("""
        import torch
        from hf_vq.codec import decode
        from hf_vq.kernels.triton_vq import triton_decode, triton_vq_matmul
        torch.manual_seed(0)
        cases = [(70, 5, 1, 100, 8, 3, torch.float32, 1e-5),    # ragged rows, int8 codes, k < 256
                 (33, 7, 2, 300, 3, 17, torch.float32, 1e-5),   # int32 codes, d padded to 4
                 (64, 32, 2, 256, 8, 2, torch.float32, 1e-5),   # tiles divide the shape: unmasked loads
                 (40, 3, 2, 256, 9, 2, torch.float16, 5e-3)]
        for kw in ({}, {"config": {"BLOCK_R": 4, "BLOCK_JD": 32}}, {"config": {"BLOCK_R": 64, "BLOCK_JD": 256}}):
            for rows, nb, m, k, d, batch, dtype, rtol in cases:
                codes = torch.randint(0, k, (rows, nb, m)).to(torch.uint8 if k <= 256 else torch.int32)
                books = torch.randn(m, k, d).to(dtype)
                x = torch.randn(batch, nb * d).to(dtype)
                out = triton_vq_matmul(x, codes, books, **kw)
                ref = x.double() @ decode(codes, books.double()).t()
                err = float((out.double() - ref).abs().max() / ref.abs().max())
                assert out.shape == (batch, rows) and out.dtype == dtype and err < rtol, (kw, rows, m, k, d, err)
                weight = triton_decode(codes, books)
                assert torch.equal(weight, decode(codes, books.float()).to(dtype)), (rows, m, k, d)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
