"""Fast inference from codes: which kernel a VQ matmul runs.

A compressed linear computes `y = (x @ W.T) * scales + b` with `W` given by codes `[rows, n_blocks, M]` and
codebooks `[M, k, d]` (`scales`, optional, one factor per output row: `W = diag(scales) · decode(codes)`).
[`vq_matmul`] (eager, returns `None` for "decode") and [`vq_linear`] (always returns; a custom op under
`torch.compile`) choose among:

* **decode**: decode `W` (numba on CPU, Triton on CUDA) then `F.linear`; under autograd the differentiable
  reference (`hf_vq.codec.decode` + `F.linear`) is the only path. A CPU module keeps its decode prepared
  ([`PreparedDecode`]: array views and kernel choice made once per codes/codebooks version);
* **lut** (CPU, `cpu.py`): lookup tables of the input against every codeword, summed by code, `W` never
  materialised: a GEMV kernel over output-row tiles (few input rows) and a batched kernel vectorised across
  input rows (sequences). Chosen by a cost model measured on 2 cores (`cpu.lut_path_is_faster`);
* **triton** (CUDA): a lookup-table GEMV (`triton_lut.py`), a decoding GEMV on the CUDA cores (`triton_vq.py`)
  and a fused dequantize-GEMM on the tensor cores (`triton_mma.py`). The first call of each (layer shape, dtype,
  batch rounded up to a power of two) checks every candidate against the reference and times it, then keeps the
  fastest (`cuda.py`; `cuda_choices()`, `cuda_kernels()`, `cuda_timings()`). Later calls do no timing and no host
  synchronisation, so they can be captured in CUDA graphs.

`hf_vq::vq_linear` (`op.py`) is the same dispatch as a `torch.library` custom op with a fake implementation and
a registered backward: `torch.compile` (including `mode="reduce-overhead"`) and transformers' static cache keep
the fast kernel inside the graph. The VQ modules call it when they are being compiled.

The fast kernels are inference only: they run when no gradient is needed (under `torch.no_grad()` /
`torch.inference_mode()`, or when neither the input nor the codebooks require grad). Fine-tuning the codebooks
therefore always goes through the differentiable reference path.

[`kernel_mode`] forces a path (tests, benchmarks): `"auto"` (default), `"decode"` or `"lut"`.

Memory against speed: the modules keep only codes and codebooks and decode (or run the kernels above) on every
call. Where memory allows, `module.cache_decoded = True` keeps each decoded weight after its first use: then a
layer is a dense layer (dense speed, dense memory), on every device.
"""

from __future__ import annotations

from . import cpu, cuda, op
from .cpu import HAS_NUMBA, PreparedDecode, fast_decode, lut_codes, lut_is_faster, lut_matmul
from .cuda import TRITON_MAX_BATCH, cuda_choices, cuda_errors, cuda_kernels, cuda_timings
from .dispatch import _mode, decode_matrix, kernel_mode, linear_impl, needs_grad, select_path, vq_linear, vq_matmul
from .triton_lut import triton_lut_matmul
from .triton_mma import triton_mma_matmul
from .triton_vq import HAS_TRITON, triton_decode, triton_vq_matmul

__all__ = ["HAS_NUMBA", "HAS_TRITON", "PreparedDecode", "TRITON_MAX_BATCH", "cuda_choices", "cuda_errors", "cuda_kernels",
           "cuda_timings", "decode_matrix", "fast_decode", "kernel_mode", "linear_impl", "lut_codes", "lut_is_faster",
           "lut_matmul", "needs_grad", "op", "select_path", "triton_decode", "triton_lut_matmul", "triton_mma_matmul",
           "triton_vq_matmul", "vq_linear", "vq_matmul"]
