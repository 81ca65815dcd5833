"""Which kernel a VQ matmul runs on a CUDA GPU: chosen once per layer shape and batch bucket, then cached.

Candidates (each with a few tile configurations):

* `lut`: the lookup-table GEMV (`triton_lut.py`), one gather per code and input row: batch 1-2;
* `gemv`: the decoding GEMV on the CUDA cores (`triton_vq.py`), one program per input row: batch <= `TRITON_MAX_BATCH`;
* `mma`: the fused dequantize-GEMM on the tensor cores (`triton_mma.py`): float16 / bfloat16, power-of-two d, any batch;
* `decode`: Triton decode of the whole weight, then cuBLAS (`F.linear`).

The first call for a key (codes shape and dtype, codebooks shape, input dtype, device, batch rounded up to a power
of two) runs every candidate once on the real inputs, checks its output against the float32 reference (decode +
`F.linear`), times the ones that agree and keeps two winners: the least GPU time (CUDA events, launch overhead
hidden behind a GPU sleep) for calls inside a CUDA-graph capture, and the least wall time per call (back-to-back
eager calls: a kernel that needs three launches loses there when Python is slower than the GPU) for eager calls.
A candidate that raises or disagrees is recorded (`cuda_errors()`) and skipped. Later calls are a
dictionary look-up and the kernel launch: no timing, no host synchronisation, and nothing that breaks a CUDA-graph
capture. A key first met *inside* a capture (nothing can be timed there) takes a fixed default, not cached. With
`HF_VQ_TRITON_AUTOTUNE=0` nothing is timed: each key takes its first candidate (the order above).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .triton_lut import LUT_DEFAULT, triton_lut_matmul
from .triton_mma import mma_supported, triton_mma_matmul
from .triton_vq import GEMV_DEFAULT, _fixed_configs, next_pow2, triton_decode, triton_vq_matmul

__all__ = ["Kernel", "TRITON_MAX_BATCH", "candidates", "choose", "cuda_choices", "cuda_errors", "cuda_kernels",
           "cuda_timings", "reset"]

#: Largest number of input rows for which the CUDA-core GEMV kernel (one program per input row) is a candidate.
TRITON_MAX_BATCH = 16
#: Largest number of input rows for which the lookup-table GEMV (one gather per code and input row) is a candidate.
LUT_MAX_BATCH = 2
#: Largest codebook for the lookup-table GEMV (its tables hold k entries per code column).
LUT_MAX_K = 1024

_LUT_CONFIGS = [{"BLOCK_R": 256, "BLOCK_C": 16, "num_warps": 4}, {"BLOCK_R": 512, "BLOCK_C": 16, "num_warps": 4},
                {"BLOCK_R": 1024, "BLOCK_C": 16, "num_warps": 8}]
_GEMV_CONFIGS = [GEMV_DEFAULT, {"BLOCK_R": 4, "BLOCK_JD": 1024, "num_warps": 2},
                 {"BLOCK_R": 16, "BLOCK_JD": 1024, "num_warps": 4}]
# (largest batch bucket, configurations): BLOCK_B is lowered to the batch by the kernel (at least 16)
_MMA_CONFIGS = [
    (16, [{"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_KD": 128, "num_warps": 4, "num_stages": 2},
          {"BLOCK_B": 16, "BLOCK_N": 128, "BLOCK_KD": 64, "num_warps": 4, "num_stages": 2}]),
    (64, [{"BLOCK_B": 64, "BLOCK_N": 64, "BLOCK_KD": 128, "num_warps": 4, "num_stages": 2},
          {"BLOCK_B": 64, "BLOCK_N": 128, "BLOCK_KD": 64, "num_warps": 4, "num_stages": 3}]),
    (1 << 62, [{"BLOCK_B": 64, "BLOCK_N": 128, "BLOCK_KD": 64, "num_warps": 4, "num_stages": 3},
               {"BLOCK_B": 128, "BLOCK_N": 128, "BLOCK_KD": 64, "num_warps": 8, "num_stages": 3},
               {"BLOCK_B": 256, "BLOCK_N": 64, "BLOCK_KD": 64, "num_warps": 8, "num_stages": 3}]),  # decode shared by 256 rows
]
# max |out - ref| / max |ref| a candidate may show against the float32 reference (float32: room for a TF32 cuBLAS)
_TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}

Key = tuple  # (codes shape, codes dtype, codebooks shape, input dtype, device, batch bucket)


def _decode_linear(x: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, bias: torch.Tensor | None,
                   scales: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, triton_decode(codes, books, scales=scales), bias)  # [B, rows]


_RUNNERS: dict[str, Callable[..., torch.Tensor]] = {
    "lut": triton_lut_matmul, "gemv": triton_vq_matmul, "mma": triton_mma_matmul}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One CUDA kernel with one tile configuration, callable as `kernel(x2d, codes, codebooks, bias, scales)`."""

    name: str  # "lut" | "gemv" | "mma" | "decode"
    config: tuple[tuple[str, Any], ...] = ()

    @property
    def family(self) -> str:
        """`"gemv"` for the kernels straight from the codes, `"decode"` for decode + cuBLAS."""
        return "decode" if self.name == "decode" else "gemv"

    def __call__(self, x: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, bias: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "decode":
            return _decode_linear(x, codes, books, bias, scales)
        return _RUNNERS[self.name](x, codes, books, bias=bias, scales=scales, config=dict(self.config))

    def __str__(self) -> str:
        return self.name + ("(" + ", ".join(f"{k}={v}" for k, v in self.config) + ")" if self.config else "")


def _kernel(name: str, config: dict | None = None) -> Kernel:
    return Kernel(name, tuple(sorted((config or {}).items())))


def candidates(batch: int, d: int, dtype: torch.dtype, *, k: int = 256, fast_only: bool = False) -> list[Kernel]:
    """The kernels tried for `batch` input rows of `dtype` and blocks of length `d` (see the module doc), the one
    expected fastest first (the choice when nothing is timed)."""
    found = []
    if batch <= LUT_MAX_BATCH and k <= LUT_MAX_K:
        found += [_kernel("lut", c) for c in _LUT_CONFIGS]
    if batch <= TRITON_MAX_BATCH:
        found += [_kernel("gemv", c) for c in (_GEMV_CONFIGS if batch <= 4 else _GEMV_CONFIGS[:1])]
    if mma_supported(dtype, d):
        bucket = next_pow2(batch)
        found += [_kernel("mma", c) for c in next(cfgs for top, cfgs in _MMA_CONFIGS if bucket <= top)]
    if not fast_only:
        found.append(_kernel("decode"))
    elif not found:  # forced fast path beyond every kernel's range: the GEMV runs any batch, one program per row
        found.append(_kernel("gemv", GEMV_DEFAULT))
    return found


def _default(batch: int, fast_only: bool) -> Kernel:
    """The kernel for a key first met inside a CUDA-graph capture (nothing can be timed there)."""
    if batch == 1 or fast_only:
        return _kernel("gemv", GEMV_DEFAULT)
    return _kernel("decode")


# (key, fast_only) -> (kernel for eager calls, kernel inside CUDA-graph captures)
_CHOICE: dict[tuple[Key, bool], tuple[Kernel, Kernel]] = {}
_TIMINGS: dict[tuple[Key, bool], dict[str, dict[str, float]]] = {}  # (key, fast_only) -> {kernel: {"gpu_ms", "wall_ms"}}
_ERRORS: dict[tuple[Key, str], str] = {}  # (key, kernel) -> why it was skipped


def _gpu_ms(fn: Callable[[], torch.Tensor], calls: int = 5) -> float:
    """GPU milliseconds per call of `fn`, queued behind a GPU sleep so that launch overhead is hidden."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)  # cycles, ~1 ms
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _wall_ms(fn: Callable[[], torch.Tensor], calls: int = 20) -> float:
    """Wall milliseconds per call of `calls` back-to-back eager calls: launch overhead included (what an eager
    loop waits for when the GPU is faster than Python)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def _reference(x: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, bias: torch.Tensor | None,
               scales: torch.Tensor | None) -> torch.Tensor:
    """float32 `(x @ decode(codes)ᵀ) * scales + bias` with the reference decode (torch ops only)."""
    from ..codec.pq import decode

    weight = decode(codes, books.float())  # [rows, cols]
    if scales is not None:
        weight = weight * scales.float()[:, None]
    return F.linear(x.float(), weight, None if bias is None else bias.float())  # [B, rows]


def _measure(key: Key, kernels: list[Kernel], args: tuple) -> dict[Kernel, dict[str, float]]:
    """GPU and wall ms per call of each kernel whose output agrees with the reference; failures go to `_ERRORS`."""
    ref = _reference(*args)
    scale = ref.abs().max().clamp_min(1e-6)
    timings = {}
    for kernel in kernels:
        try:
            out = kernel(*args)  # compiles on first use
            err = float((out.float() - ref).abs().max() / scale)
            if not err <= _TOLERANCE.get(args[0].dtype, 3e-2):
                _ERRORS[(key, str(kernel))] = f"max relative error {err:.3g} against the reference"
                continue
            run = lambda: kernel(*args)  # noqa: E731
            timings[kernel] = {"gpu_ms": min(_gpu_ms(run) for _ in range(2)), "wall_ms": _wall_ms(run)}
        except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or run is skipped, not fatal
            _ERRORS[(key, str(kernel))] = f"{type(err).__name__}: {str(err)[:300]}"
    return timings


def _pick(key: Key, batch: int, d: int, k: int, x: torch.Tensor, args: tuple, fast_only: bool) -> tuple[Kernel, Kernel]:
    """(eager kernel, graph kernel) for a key met for the first time outside a capture."""
    found = candidates(batch, d, x.dtype, k=k, fast_only=fast_only)
    if len(found) == 1 or _fixed_configs():  # HF_VQ_TRITON_AUTOTUNE=0: the first candidate, untimed
        return found[0], found[0]
    with torch.no_grad(), torch.cuda.device(x.device):
        timings = _measure(key, found, args)
    _TIMINGS[(key, fast_only)] = {str(kn): {n: round(v, 5) for n, v in t.items()} for kn, t in timings.items()}
    if not timings:
        return _kernel("decode"), _kernel("decode")
    return (min(timings, key=lambda kn: timings[kn]["wall_ms"]), min(timings, key=lambda kn: timings[kn]["gpu_ms"]))


def choose(x: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, bias: torch.Tensor | None = None,
           scales: torch.Tensor | None = None, *, fast_only: bool = False) -> Kernel:
    """The kernel for this layer shape and batch (timed on first use, see the module doc): inside a CUDA-graph
    capture the one with the least GPU time, in eager calls the one with the least wall time per call.

    Args:
        x (`torch.Tensor`): inputs `[B, cols]` on a CUDA device.
        codes, books, bias, scales: as for the kernels (used for the first-use timing only).
        fast_only (`bool`): never decode + cuBLAS (`kernel_mode("lut")`).
    """
    batch = x.shape[0]
    key = (tuple(codes.shape), codes.dtype, tuple(books.shape), x.dtype, x.device, next_pow2(batch))
    pair = _CHOICE.get((key, fast_only))
    capturing = torch.cuda.is_current_stream_capturing()
    if pair is None:
        if capturing:  # nothing can be timed inside a capture
            return _default(batch, fast_only)
        pair = _CHOICE[(key, fast_only)] = _pick(key, batch, books.shape[-1], books.shape[1], x,
                                                (x, codes, books, bias, scales), fast_only)
    return pair[1] if capturing else pair[0]


def cuda_choices() -> dict[Key, str]:
    """The CUDA paths chosen so far for CUDA graphs (automatic mode): key -> `"gemv"` (a kernel straight from the
    codes) or `"decode"` (decode + cuBLAS). The key is (codes shape, codes dtype, codebooks shape, input dtype,
    device, batch bucket)."""
    return {key: pair[1].family for (key, fast_only), pair in _CHOICE.items() if not fast_only}


def cuda_kernels(*, eager: bool = False) -> dict[Key, str]:
    """The kernels (with their tile configurations) chosen so far in automatic mode for CUDA graphs (least GPU
    time), or for eager calls (least wall time per call) with `eager=True`; key as in [`cuda_choices`]."""
    return {key: str(pair[0] if eager else pair[1]) for (key, fast_only), pair in _CHOICE.items() if not fast_only}


def cuda_timings() -> dict[Key, dict[str, dict[str, float]]]:
    """GPU ms (`"gpu_ms"`, launch overhead hidden) and wall ms (`"wall_ms"`, eager calls back to back) per call of
    every candidate timed so far (automatic mode), key as in [`cuda_choices`]."""
    return {key: dict(t) for (key, fast_only), t in _TIMINGS.items() if not fast_only}


def cuda_errors() -> dict[tuple[Key, str], str]:
    """Candidates skipped because they raised or disagreed with the reference: (key, kernel) -> reason."""
    return dict(_ERRORS)


def reset() -> None:
    """Forget every choice, timing and error (the next call of each key times the candidates again)."""
    _CHOICE.clear()
    _TIMINGS.clear()
    _ERRORS.clear()
