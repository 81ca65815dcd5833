"""Per-output-channel scales in every kernel entry point: `W = diag(scales) · decode(codes)`, i.e.
`y = (x @ Ŵᵀ) · scales + b`. Reference: float64 decode times scales, then `F.linear`.

(The Triton kernels' scales are checked in tests/nn/test_triton_kernels.py, in the interpreter and on CUDA.)
"""

import pytest
import torch
import torch.nn.functional as F

from hf_vq import kernels
from hf_vq.codec import decode
from hf_vq.kernels import cpu, kernel_mode

NUMBA = pytest.mark.skipif(not kernels.HAS_NUMBA, reason="numba is not installed (pip install hf_vq[kernels])")


def _layer(rows: int = 40, n_blocks: int = 24, m: int = 1, k: int = 256, d: int = 4, seed: int = 0,
           dtype: torch.dtype = torch.float32):
    """codes `[rows, n_blocks, m]`, codebooks `[m, k, d]`, bias and scales `[rows]` (some negative, one zero)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, k, (rows, n_blocks, m), generator=gen).to(torch.uint8 if k <= 256 else torch.int32)
    books = torch.randn(m, k, d, generator=gen).to(dtype)
    scales = (torch.randn(rows, generator=gen) * 2).to(dtype)
    scales[3] = 0
    return codes, books, torch.randn(rows, generator=gen).to(dtype), scales


def _reference(x, codes, books, bias, scales) -> torch.Tensor:
    weight = decode(codes, books.double()) * scales.double()[:, None]  # [rows, cols]
    return F.linear(x.double(), weight, None if bias is None else bias.double())


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0))
    assert err < rtol, f"max error {err:.3g} >= {rtol}"


@pytest.mark.parametrize("m,d,k", [(1, 4, 256), (2, 8, 256), (1, 9, 300), (1, 2, 16)], ids=["d4", "M2d8", "d9-k300", "d2-k16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_decode_matrix_with_scales(m, d, k, dtype):
    """The numba decode (word copies for M = 1, sums for M > 1) and the reference agree, scaled rows included."""
    codes, books, _, scales = _layer(m=m, d=d, k=k, dtype=dtype)
    with torch.no_grad():
        fast = kernels.decode_matrix(codes, books, scales=scales)
    exact = decode(codes, books.double()) * scales.double()[:, None]
    assert fast.dtype == dtype and fast.shape == exact.shape
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    tol = exact.abs() * ulp * (2 if m > 1 and dtype == torch.float32 else 1) + 1e-30
    assert ((fast.double() - exact).abs() <= tol).all()  # one rounding (float32 sums: two)
    assert torch.equal(kernels.decode_matrix(codes, books), decode(codes, books))  # no scales: bit-identical


@NUMBA
@pytest.mark.parametrize("m,d", [(1, 4), (1, 8), (1, 3), (2, 4)])
def test_word_copy_decode_is_bit_identical(m, d):
    codes, books, _, _ = _layer(m=m, d=d, k=100)
    assert torch.equal(cpu.fast_decode(codes, books), decode(codes, books))


@pytest.mark.parametrize("mode", ["lut", "decode", "auto"])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 3, 96)], ids=["B1", "B7", "BxT"])
def test_vq_matmul_and_vq_linear_with_scales(mode, shape):
    """`vq_matmul` (None = decode with the same scales) and `vq_linear` (always a result) on every path."""
    codes, books, bias, scales = _layer()
    x = torch.randn(*shape)
    ref = _reference(x, codes, books, bias, scales)
    with torch.no_grad(), kernel_mode(mode):
        out = kernels.vq_matmul(x, codes, books, bias, scales=scales)
        if out is None:
            out = F.linear(x, kernels.decode_matrix(codes, books, scales=scales), bias)
        _close(out, ref, 1e-5)
        _close(kernels.vq_linear(x, codes, books, bias, scales=scales), ref, 1e-5)
        _close(torch.ops.hf_vq.vq_linear(x, codes, books, bias, scales), ref, 1e-5)


def test_lut_kernels_with_scales_and_no_numba(monkeypatch):
    codes, books, _, scales = _layer(m=2, d=8)
    x = torch.randn(3, 192)
    ref = _reference(x, codes, books, None, scales)
    _close(cpu.lut_matmul(x, codes, books, scales=scales), ref, 1e-5)
    monkeypatch.setattr(cpu, "HAS_NUMBA", False)
    _close(cpu.lut_matmul(x, codes, books, scales=scales), ref, 1e-5)
    _close(cpu.fast_decode(codes, books, scales=scales), decode(codes, books.double()) * scales.double()[:, None], 1e-6)


def test_scales_gradients_through_vq_linear():
    """With gradients `vq_linear` is the differentiable reference: scales, codebooks, bias and input get gradients."""
    codes, books, bias, scales = _layer(rows=12, n_blocks=4)
    leaves = [t.clone().requires_grad_() for t in (torch.randn(2, 16), books, bias, scales)]
    x, books_, bias_, scales_ = leaves
    out = kernels.vq_linear(x, codes, books_, bias_, scales=scales_)
    grads = torch.autograd.grad(out.pow(2).sum(), leaves)
    want = torch.autograd.grad(F.linear(x, decode(codes, books_) * scales_[:, None], bias_).pow(2).sum(), leaves)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected)


def test_scales_shape_is_checked():
    codes, books, _, _ = _layer()
    with pytest.raises(ValueError, match="scales must have shape"):
        from hf_vq.kernels.triton_vq import check_scales

        check_scales(torch.ones(5), 40, torch.device("cpu"))
    x = torch.randn(2, 96)
    for call in (lambda: kernels.decode_matrix(codes, books, scales=torch.ones(5)),
                 lambda: kernels.vq_matmul(x, codes, books, scales=torch.ones(40, 1)),
                 lambda: kernels.vq_linear(x, codes, books, scales=torch.ones(41))):
        with torch.no_grad(), pytest.raises(ValueError, match="scales must have shape"):
            call()
