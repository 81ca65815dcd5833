"""The dispatch rule: which kernel computes `y = (x @ W.T) * scales + b` for a VQ weight (see the package doc)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from . import cpu, cuda
from .train import train_decode
from .triton_vq import HAS_TRITON, triton_decode

__all__ = ["decode_matrix", "kernel_mode", "linear_impl", "needs_grad", "select_path", "vq_linear", "vq_matmul"]

_MODES = ("auto", "decode", "lut")
#: Decode under autograd with `train.py`'s function (device decode kernel forward, scatter-add backward); `False`
#: runs the differentiable reference (`F.embedding` gathers) instead, for benchmarks/bench_train_step.py.
TRAIN_DECODE = True
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_state = threading.local()


def _mode() -> str:
    return getattr(_state, "mode", "auto")


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Force the matmul path of VQ linears inside the block (this thread only).

    Args:
        mode (`str`): `"auto"` (the dispatch rule), `"decode"` (always decode + `F.linear`) or `"lut"`
            (the fast kernels of the device whenever they can run: LUT on CPU, the Triton kernels on CUDA).

    Example:
        ```python
        >>> with torch.no_grad(), hf_vq.kernels.kernel_mode("decode"):
        ...     reference = model(x)
        ```
    """
    if mode not in _MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {_MODES}.")
    previous = _mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on `tensors` (then only the reference path runs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plain_eager(x: torch.Tensor) -> bool:
    """Eager mode on a plain tensor: not traced, compiled, exported or under autocast."""
    if type(x) is not torch.Tensor or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return False
    return True


Runner = Callable[..., torch.Tensor]


def _check_scales(scales: torch.Tensor | None, codes: torch.Tensor) -> None:
    """Raise `ValueError` unless `scales` is None or one value per output row (`[rows]`)."""
    if scales is not None and (scales.dim() != 1 or scales.shape[0] != codes.shape[0]):
        raise ValueError(f"scales must have shape ({codes.shape[0]},) (one per output row), got {tuple(scales.shape)}.")


def _cpu_runner(x2d: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, bias: torch.Tensor | None,
                scales: torch.Tensor | None, codes_t: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    cached = codes_t() if codes_t is not None and cpu.HAS_NUMBA else None  # only the numba GEMV kernel reads it
    out = cpu.lut_matmul(x2d, codes, books, codes_t=cached, scales=scales)  # float32 [B, rows]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x2d.dtype)


def _fast_kernel(x: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, bias: torch.Tensor | None,
                 scales: torch.Tensor | None, mode: str, weight_is_cached: bool) -> Runner | None:
    """The fast kernel for these inputs, or None for decode + `F.linear`. No grad / compile checks (callers')."""
    if x.dtype != books.dtype or not x.dtype.is_floating_point or x.device != codes.device:
        return None  # the reference raises or promotes exactly as F.linear does
    cols = x.shape[-1] if x.dim() else 0
    batch = x.numel() // cols if cols else 0
    if batch == 0:
        return None
    if x.device.type == "cpu":
        if mode == "lut":
            return _cpu_runner
        rows, n_blocks, n_books = codes.shape
        _, k, d = books.shape
        faster = cpu.lut_is_faster(batch, rows, n_blocks, n_books, k, d, weight_is_decoded=weight_is_cached)
        return _cpu_runner if faster else None
    if x.device.type == "cuda" and HAS_TRITON and x.dtype in _CUDA_DTYPES:
        if weight_is_cached and mode != "lut":
            return None  # a cached weight makes decode + cuBLAS a dense layer
        kernel = cuda.choose(x.reshape(-1, cols), codes, books, bias, scales, fast_only=mode == "lut")
        return None if kernel.name == "decode" else kernel
    return None


def select_path(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, bias: torch.Tensor | None = None, *,
                scales: torch.Tensor | None = None, weight_is_cached: bool = False) -> str:
    """The path [`vq_matmul`] takes: `"decode"`, `"lut"` (CPU) or `"triton"` (CUDA).

    Args:
        x (`torch.Tensor`): input `[..., n_blocks * d]`.
        codes (`torch.Tensor`): unpacked codes `[rows, n_blocks, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
        bias, scales (`torch.Tensor`, *optional*): `[rows]`.
        weight_is_cached (`bool`): the module keeps its decoded weight (`cache_decoded`), so decoding is free.
    """
    mode = _mode()
    if mode == "decode" or not _plain_eager(x) or needs_grad(x, codebooks, bias, scales):
        return "decode"
    kernel = _fast_kernel(x, codes, codebooks, bias, scales, mode, weight_is_cached)
    if kernel is None:
        return "decode"
    return "lut" if kernel is _cpu_runner else "triton"


def vq_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, bias: torch.Tensor | None = None, *,
              scales: torch.Tensor | None = None, weight_is_cached: bool = False,
              codes_t: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
    """`(x @ W.T) * scales + bias` with a fast kernel, or `None` when the decode path is the better (or only) choice.

    Eager inference only: under autograd, tracing, `torch.compile` or autocast it returns `None` (use
    [`vq_linear`], which always returns a result and is a custom op under `torch.compile`).

    Args:
        x (`torch.Tensor`): input `[..., n_blocks * d]`.
        codes (`torch.Tensor`): unpacked codes `[rows, n_blocks, M]` (uint8 or int32).
        codebooks (`torch.Tensor`): `[M, k, d]`.
        bias (`torch.Tensor`, *optional*): `[rows]`.
        scales (`torch.Tensor`, *optional*): `[rows]` per-output-channel factors: `W = diag(scales) · decode(codes)`.
        weight_is_cached (`bool`): see [`select_path`].
        codes_t (`Callable`, *optional*): returns the codes in the CPU LUT kernel's layout (`cpu.lut_codes`), for
            callers that cache it; called only when that kernel runs.

    Returns:
        `torch.Tensor` or `None`: `[..., rows]` in the dtype of `x`; `None` means "decode and call the float
        module's own forward" (with [`decode_matrix`], passing the same `scales`).
    """
    _check_scales(scales, codes)
    mode = _mode()
    if mode == "decode" or not _plain_eager(x) or needs_grad(x, codebooks, bias, scales):
        return None
    kernel = _fast_kernel(x, codes, codebooks, bias, scales, mode, weight_is_cached)
    if kernel is None:
        return None
    x2d = x.reshape(-1, x.shape[-1])  # [B, n_blocks*d]
    if kernel is _cpu_runner:
        out = _cpu_runner(x2d, codes, codebooks, bias, scales, codes_t)
    else:
        out = kernel(x2d, codes, codebooks, bias, scales)  # [B, rows]
    return out.reshape(*x.shape[:-1], codes.shape[0])


def linear_impl(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, bias: torch.Tensor | None = None,
                scales: torch.Tensor | None = None) -> torch.Tensor:
    """The fast kernel when one pays, else decode + `F.linear`, with no autograd (the custom op's body)."""
    _check_scales(scales, codes)
    mode = _mode()
    kernel = None if mode == "decode" else _fast_kernel(x, codes, codebooks, bias, scales, mode, False)
    if kernel is None:
        return F.linear(x, decode_matrix(codes, codebooks, scales=scales), bias)
    x2d = x.reshape(-1, x.shape[-1])  # [B, n_blocks*d]
    return kernel(x2d, codes, codebooks, bias, scales).reshape(*x.shape[:-1], codes.shape[0])


def vq_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, bias: torch.Tensor | None = None, *,
              scales: torch.Tensor | None = None) -> torch.Tensor:
    """`(x @ W.T) * scales + bias` for the VQ weight `W` of `codes` and `codebooks`, always computed.

    Eager: the fast kernel when one pays (as [`vq_matmul`]), else decode + `F.linear`; with autograd the
    differentiable reference. Under `torch.compile` / `torch.export` it is the custom op `hf_vq::vq_linear`
    (fake implementation for tracing, registered backward), so compiled graphs and CUDA graphs run the fast
    kernels instead of decoding the weight in the graph.

    Args:
        x (`torch.Tensor`): input `[..., n_blocks * d]`, same dtype as `codebooks`.
        codes (`torch.Tensor`): unpacked codes `[rows, n_blocks, M]` (uint8 or int32).
        codebooks (`torch.Tensor`): `[M, k, d]`.
        bias, scales (`torch.Tensor`, *optional*): `[rows]` (see [`vq_matmul`]).

    Returns:
        `torch.Tensor`: `[..., rows]` in the dtype of `x`.
    """
    if torch.compiler.is_compiling():
        return torch.ops.hf_vq.vq_linear(x, codes, codebooks, bias, scales)
    _check_scales(scales, codes)
    if needs_grad(x, codebooks, bias, scales) or not _plain_eager(x):
        return F.linear(x, decode_matrix(codes, codebooks, scales=scales), bias)
    return linear_impl(x, codes, codebooks, bias, scales)


def decode_matrix(codes: torch.Tensor, codebooks: torch.Tensor, *, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The weight matrix `diag(scales) · decode(codes)` `[rows, n_blocks * d]`: the numba (CPU) or Triton (CUDA)
    decode when no gradient is needed; under autograd the same decode forward with a scatter-add backward
    (`train.py`); the differentiable reference when traced or compiled.

    Args:
        codes (`torch.Tensor`): unpacked codes `[rows, n_blocks, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
        scales (`torch.Tensor`, *optional*): `[rows]`, one factor per row.
    """
    from ..codec.pq import decode

    _check_scales(scales, codes)
    plain = type(codebooks) in (torch.nn.Parameter, torch.Tensor)
    if not plain or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        weight = decode(codes, codebooks)  # [rows, n_blocks*d]
        return weight if scales is None else weight * scales.to(weight.dtype)[:, None]
    if needs_grad(codebooks, scales):  # fine-tuning: the fast decode forward, a scatter-add backward
        if not TRAIN_DECODE:  # the reference (benchmarks compare the two)
            weight = decode(codes, codebooks)  # [rows, n_blocks*d]
            return weight if scales is None else weight * scales.to(weight.dtype)[:, None]
        return train_decode(codes, codebooks, scales, _fast_decode)
    return _fast_decode(codes, codebooks, scales=scales)


def _fast_decode(codes: torch.Tensor, codebooks: torch.Tensor, *, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The no-grad decode of the device: Triton on CUDA, numba on CPU (each falls back to the reference)."""
    if codes.device.type == "cuda" and HAS_TRITON and codebooks.dtype in _CUDA_DTYPES:
        return triton_decode(codes, codebooks, scales=scales)
    return cpu.fast_decode(codes, codebooks, scales=scales)
