"""Fast inference from codes: which kernel a VQ matmul runs.

A compressed linear computes `y = x @ W.T + b` with `W` given by codes `[rows, n_blocks, M]` and
codebooks `[M, k, d]`. Three ways, chosen per call by [`vq_matmul`]:

* **decode**: decode `W` (numba kernel on CPU, see `cpu.fast_decode`) then `F.linear`: best for large
  batches, and the only path under autograd, `torch.compile`, autocast or unusual devices;
* **lut** (CPU): the lookup-table matmul of `cpu.lut_matmul`: dot products of each input block with the
  k codewords, then a gather-and-sum by codes; never materialises `W`. Chosen by a cost model measured
  on 2 cores (`cpu.lut_is_faster`): at 4096×4096, k = 256, d = 8 up to 52 input rows;
* **triton** (CUDA): the Triton kernel of `triton_vq.triton_vq_matmul` for up to `TRITON_MAX_BATCH`
  input rows.

The fast kernels are inference only: they run when no gradient is needed (under `torch.no_grad()` /
`torch.inference_mode()`, or when neither the input nor the codebooks require grad). Fine-tuning the
codebooks therefore always goes through the differentiable reference path.

[`kernel_mode`] forces a path (tests, benchmarks): `"auto"` (default), `"decode"` or `"lut"`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

from . import cpu
from .cpu import HAS_NUMBA, fast_decode, lut_codes, lut_is_faster, lut_matmul
from .triton_vq import HAS_TRITON, triton_vq_matmul

__all__ = ["HAS_NUMBA", "HAS_TRITON", "TRITON_MAX_BATCH", "kernel_mode", "needs_grad", "select_path", "vq_matmul",
           "decode_matrix", "fast_decode", "lut_codes", "lut_matmul", "triton_vq_matmul"]

#: Largest number of input rows sent to the Triton kernel (beyond it, decode + cuBLAS). Not measured
#: (no GPU in the session that wrote it): a GEMV-oriented kernel's usual range.
TRITON_MAX_BATCH = 16

_MODES = ("auto", "decode", "lut")
_state = threading.local()


def _mode() -> str:
    return getattr(_state, "mode", "auto")


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Force the matmul path of VQ linears inside the block (this thread only).

    Args:
        mode (`str`): `"auto"` (the dispatch rule), `"decode"` (always decode + `F.linear`) or `"lut"`
            (the fast kernel of the device whenever it can run: LUT on CPU, Triton on CUDA).

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


def select_path(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, bias: torch.Tensor | None = None, *,
                weight_is_cached: bool = False) -> str:
    """The path [`vq_matmul`] takes: `"decode"`, `"lut"` or `"triton"`.

    Args:
        x (`torch.Tensor`): input `[..., n_blocks * d]`.
        codes (`torch.Tensor`): unpacked codes `[rows, n_blocks, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
        bias (`torch.Tensor`, *optional*): `[rows]`.
        weight_is_cached (`bool`): the module keeps its decoded weight (`cache_decoded`), so decoding is free.
    """
    mode = _mode()
    if mode == "decode" or not _plain_eager(x) or needs_grad(x, codebooks, bias):
        return "decode"
    if x.dtype != codebooks.dtype or not x.dtype.is_floating_point or x.device != codes.device:
        return "decode"  # the reference raises or promotes exactly as F.linear does
    rows, n_blocks, n_books = codes.shape
    _, k, d = codebooks.shape
    batch = x.numel() // max(1, x.shape[-1])
    if batch == 0:
        return "decode"
    if x.device.type == "cpu":
        if mode == "lut":
            return "lut"
        return "lut" if lut_is_faster(batch, rows, n_blocks, n_books, k, d, weight_is_decoded=weight_is_cached) else "decode"
    if x.device.type == "cuda" and HAS_TRITON and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        if mode == "lut" or batch <= TRITON_MAX_BATCH:
            return "triton"
    return "decode"


def vq_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, bias: torch.Tensor | None = None, *,
              weight_is_cached: bool = False, codes_t: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
    """`x @ W.T + bias` with a fast kernel, or `None` when the decode path is the better (or only) choice.

    Args:
        x (`torch.Tensor`): input `[..., n_blocks * d]`.
        codes (`torch.Tensor`): unpacked codes `[rows, n_blocks, M]` (uint8 or int32).
        codebooks (`torch.Tensor`): `[M, k, d]`.
        bias (`torch.Tensor`, *optional*): `[rows]`.
        weight_is_cached (`bool`): see [`select_path`].
        codes_t (`Callable`, *optional*): returns the codes in the LUT kernel's layout (`cpu.lut_codes`), for
            callers that cache it; called only when the LUT path runs.

    Returns:
        `torch.Tensor` or `None`: `[..., rows]` in the dtype of `x`; `None` means "decode and call the float
        module's own forward".
    """
    path = select_path(x, codes, codebooks, bias, weight_is_cached=weight_is_cached)
    if path == "decode":
        return None
    rows = codes.shape[0]
    x2d = x.reshape(-1, x.shape[-1])  # [B, n_blocks*d]
    if path == "lut":
        cached = codes_t() if codes_t is not None and cpu.HAS_NUMBA else None  # only the numba kernel reads it
        out = lut_matmul(x2d, codes, codebooks, codes_t=cached)  # float32 [B, rows]
    else:
        out = triton_vq_matmul(x2d, codes, codebooks)  # [B, rows], dtype of x
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)


def decode_matrix(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The weight matrix `[rows, n_blocks * d]`: the numba decode when no gradient is needed, else the reference.

    Args:
        codes (`torch.Tensor`): unpacked codes `[rows, n_blocks, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
    """
    from ..codec.pq import decode

    if needs_grad(codebooks) or type(codebooks) is not torch.nn.Parameter and type(codebooks) is not torch.Tensor:
        return decode(codes, codebooks)
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return decode(codes, codebooks)
    return fast_decode(codes, codebooks)
