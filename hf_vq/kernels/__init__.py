"""Fast inference from codes: which kernel a VQ matmul runs.

A compressed linear computes `y = x @ W.T + b` with `W` given by codes `[rows, n_blocks, M]` and
codebooks `[M, k, d]`. Three ways, chosen per call by [`vq_matmul`]:

* **decode**: decode `W` (numba kernel on CPU, see `cpu.fast_decode`) then `F.linear`: best for large
  batches, and the only path under autograd, `torch.compile`, autocast or unusual devices;
* **lut** (CPU): the lookup-table matmul of `cpu.lut_matmul`: dot products of each input block with the
  k codewords, then a gather-and-sum by codes; never materialises `W`. Chosen by a cost model measured
  on 2 cores (`cpu.lut_is_faster`): at 4096×4096, k = 256, d = 8 up to 52 input rows;
* **triton** (CUDA): the Triton GEMV kernel of `triton_vq.triton_vq_matmul` (one program per input row)
  for up to `TRITON_MAX_BATCH` input rows. Whether it beats decode (Triton) + cuBLAS depends on the GPU,
  the layer shape and the batch, so the first call of each (layer shape, dtype, batch rounded up to a power
  of two) times both once, GPU time only, and keeps the faster (`cuda_choices()` lists the choices); under
  CUDA-graph capture an unmeasured shape takes the GEMV kernel for one input row, else decode.

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
from .triton_vq import HAS_TRITON, next_pow2, triton_decode, triton_vq_matmul

__all__ = ["HAS_NUMBA", "HAS_TRITON", "TRITON_MAX_BATCH", "cuda_choices", "kernel_mode", "needs_grad", "select_path",
           "vq_matmul", "decode_matrix", "fast_decode", "lut_codes", "lut_matmul", "triton_decode",
           "triton_vq_matmul"]

#: Largest number of input rows for which the GEMV kernel is a candidate (beyond it, decode + cuBLAS; on an
#: H200 the kernel won up to 4 rows and lost from 8 on, benchmarks/results/gpu_kernels.md "path" column).
TRITON_MAX_BATCH = 16

# (codes shape, codes dtype, codebooks shape, input dtype, device, batch bucket) -> "gemv" | "decode"
_CUDA_CHOICE: dict[tuple, str] = {}

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
        if mode == "lut":
            return "triton"
        if batch <= TRITON_MAX_BATCH and not weight_is_cached:  # a cached weight makes decode + cuBLAS dense
            return "decode" if _cuda_choice(x.reshape(-1, x.shape[-1]), codes, codebooks) == "decode" else "triton"
    return "decode"


def _gpu_ms(fn: Callable[[], torch.Tensor], calls: int = 10) -> float:
    """GPU milliseconds per call of `fn`: the calls are queued behind a ~2 ms GPU sleep, so the CUDA events
    around them time the GPU's work only, not Python's launch overhead."""
    fn()  # compile / autotune
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(4_000_000)  # cycles
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _cuda_choice(x2d: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> str:
    """The faster CUDA path for this layer shape and batch bucket, timed on first use (see module doc)."""
    key = (tuple(codes.shape), codes.dtype, tuple(codebooks.shape), x2d.dtype, x2d.device, next_pow2(x2d.shape[0]))
    choice = _CUDA_CHOICE.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_current_stream_capturing():
        return "gemv" if x2d.shape[0] == 1 else "decode"  # no timing inside a graph capture
    books = codebooks.detach()
    with torch.no_grad(), torch.cuda.device(x2d.device):
        gemv = min(_gpu_ms(lambda: triton_vq_matmul(x2d, codes, books)) for _ in range(2))
        decode = min(_gpu_ms(lambda: torch.nn.functional.linear(x2d, triton_decode(codes, books))) for _ in range(2))
    choice = _CUDA_CHOICE[key] = "gemv" if gemv <= decode else "decode"
    return choice


def cuda_choices() -> dict[tuple, str]:
    """The CUDA paths chosen so far: (codes shape, codes dtype, codebooks shape, input dtype, device, batch
    bucket) -> `"gemv"` or `"decode"`."""
    return dict(_CUDA_CHOICE)


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
    if codes.device.type == "cuda" and HAS_TRITON and codebooks.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return triton_decode(codes, codebooks)
    return fast_decode(codes, codebooks)
