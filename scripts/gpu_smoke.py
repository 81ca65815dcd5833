#!/usr/bin/env python
"""Seconds-long GPU correctness checks, run first by scripts/gpu_checks.sh: a broken kernel shows here, not after
minutes of benchmarks. Prints one `SMOKE <check> PASS|FAIL <detail>` line per check; exit status 1 if any failed.

Checks (bias and per-row scales on): every kernel family (LUT GEMV, CUDA-core GEMV, tensor-core dequantize-GEMM,
decode + cuBLAS; first configuration) on the 4096x11008 layer at 2 bits/weight (d=4 and 2x8, float16; d=4 in
bfloat16) for 1 to 512 input rows, against a float64 reference; the dispatcher's timed choice on 4096x4096 (no
candidate may be skipped) and a CUDA-graph replay of it; `torch.compile(mode="reduce-overhead")` of a VQ stack
against eager. The kernels compiled here are the ones the benchmarks reuse (Triton's disk cache).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    """Run the decorated check now; record PASS / FAIL (an exception is a FAIL with its message)."""
    def run(fn):
        start = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as err:  # noqa: BLE001 - a failing check is reported, the others still run
            ok, detail = False, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            traceback.print_exc()
        detail = f"{detail} ({time.perf_counter() - start:.1f} s)"
        RESULTS.append((name, ok, detail))
        print(f"SMOKE {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)
        return fn
    return run


def problem(rows: int, cols: int, m: int, d: int, batch: int, dtype=torch.float16, seed: int = 0):
    """Random codes, codebooks, inputs, bias and scales on the GPU, and the float64 reference `[B, rows]`."""
    from hf_vq.codec import decode

    gen = torch.Generator("cuda").manual_seed(seed)
    codes = torch.randint(0, 256, (rows, cols // d, m), generator=gen, device="cuda").to(torch.uint8)
    books = (torch.randn(m, 256, d, generator=gen, device="cuda") / (d * m) ** 0.5).to(dtype)
    x = torch.randn(batch, cols, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(rows, generator=gen, device="cuda").to(dtype)
    scales = (torch.rand(rows, generator=gen, device="cuda") + 0.5).to(dtype)
    weight = decode(codes, books.double()) * scales.double()[:, None]  # [rows, cols]
    ref = x.double() @ weight.t() + bias.double()  # [B, rows]
    return (codes, books, x, bias, scales), ref


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def main() -> int:
    import triton

    import hf_vq
    from hf_vq import kernels
    from hf_vq.kernels import cuda as dispatch

    print(f"SMOKE env {torch.cuda.get_device_name(0)} torch {torch.__version__} triton {triton.__version__} "
          f"hf_vq {hf_vq.__version__} numba {kernels.HAS_NUMBA}", flush=True)
    cases = [(1, 4, b, torch.float16) for b in (1, 16, 512)] + [(2, 8, b, torch.float16) for b in (1, 512)]
    cases += [(1, 4, b, torch.bfloat16) for b in (1, 512)]
    for m, d, batch, dtype in cases:
        @check(f"kernels-M{m}d{d}-B{batch}-{str(dtype)[6:]}")
        def _(m=m, d=d, batch=batch, dtype=dtype):
            (codes, books, x, bias, scales), ref = problem(11008, 4096, m, d, batch, dtype)
            first = {}
            for kernel in dispatch.candidates(batch, d, dtype):
                first.setdefault(kernel.name, kernel)
            errors = {str(k).split("(")[0]: rel_error(k(x, codes, books, bias, scales), ref) for k in first.values()}
            tol = 5e-3 if dtype == torch.float16 else 2e-2
            return all(e < tol for e in errors.values()), " ".join(f"{k}={v:.1e}" for k, v in errors.items())

    @check("dispatch-timed-graph-replay")
    def _():
        (codes, books, x, bias, scales), ref = problem(4096, 4096, 1, 4, 1, seed=3)
        want = kernels.vq_linear(x, codes, books, bias, scales=scales)  # first call: every candidate checked and timed
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = kernels.vq_linear(x, codes, books, bias, scales=scales)
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        key = next(k for k in kernels.cuda_kernels() if k[0] == (4096, 1024, 1))
        skipped = {k[1]: v for k, v in kernels.cuda_errors().items() if k[0] == key}
        errors = (rel_error(want, ref), rel_error(out, ref))  # eager kernel, graph kernel (may differ)
        ok = max(errors) < 5e-3 and not skipped
        return ok, f"errors eager/graph {errors[0]:.1e}/{errors[1]:.1e}, graph kernel {kernels.cuda_kernels()[key]}, " \
                   f"eager kernel {kernels.cuda_kernels(eager=True)[key]}, timings {kernels.cuda_timings().get(key)}, " \
                   f"skipped {skipped}"

    @check("compile-reduce-overhead")
    def _():
        from hf_vq.nn import VQLinear

        layers = []
        for rows, cols in ((1024, 512), (512, 1024)):
            vq = VQLinear.from_float(torch.nn.Linear(cols, rows, bias=False, device="meta"), kind="linear", k=256, d=4,
                                     device="cpu", dtype=torch.float32)
            vq.set_codes_(torch.randint(0, 256, (rows, cols // 4, 1)), torch.randn(1, 256, 4) / 2)
            layers += [vq, torch.nn.GELU()]
        model = torch.nn.Sequential(*layers).cuda().half().eval().requires_grad_(False)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            want = model(x)
            for _ in range(3):
                got = compiled(x)
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        return err < 5e-3, f"error vs eager {err:.1e}"

    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"SMOKE summary {len(RESULTS) - len(failed)}/{len(RESULTS)} passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
