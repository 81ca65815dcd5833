#!/usr/bin/env python
"""GPU inference from codes, per layer: hf_vq's kernels against fp16 cuBLAS (and AQLM's CUDA kernels when installed).

Per layer (`nn.Linear` in×out 4096×4096 and 4096×11008; batch 1, 4, 16, 64, 512; fp16), for three schemes on the
same random codes for every method: 2 bits/weight as one 256-word codebook of 4-vectors (M=1 k=256 d=4, the
default format), 2 bits/weight as two codebooks of 8-vectors (M=2 k=256 d=8, AQLM's 2x8g8) and 1 bit/weight
(M=1 k=256 d=8, AQLM's 1x8g8):

* **dense fp16**: `F.linear` on the decoded weight (cuBLAS);
* **hf_vq**: `VQLinear.forward` under `torch.inference_mode()`: the kernel its dispatcher picked for the shape
  and batch (`hf_vq.kernels.cuda`: first call checks and times every candidate, later calls reuse the winner);
* **hf_vq, each kernel family**: the best configuration of the LUT GEMV, the CUDA-core GEMV, the tensor-core
  dequantize-GEMM and decode + cuBLAS, as the dispatcher timed them (the "path" column is the winner);
* **AQLM**: `aqlm.QuantizedLinear` (its CUDA kernels) when the package is installed.

Timings: **GPU µs, cold L2** (the headline): CUDA graphs of 20 calls, each preceded by a 256 MB write that evicts
the L2 cache, minus the same graph with the writes alone; median of 7 replays. **Eager µs/call**: wall time of
200 back-to-back calls from Python (launch and dispatch overhead included). A method that fails is recorded as
an error and the run goes on.

    python benchmarks/bench_gpu.py --out $OUT/gpu_kernels       # json + md + png
    python benchmarks/bench_gpu.py --quick                       # 4096x11008, batch 1 and 16, 2-bit schemes
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import RESULTS, layer_plot, machine, random_vq_linear, write

from hf_vq import kernels
from hf_vq.kernels import cuda as cuda_dispatch
from hf_vq.nn import VQLinear

SHAPES = [(4096, 11008), (4096, 4096)]  # nn.Linear(in_features, out_features)
BATCHES = [1, 4, 16, 64, 512]
SCHEMES = {  # name: (num_codebooks, k, d, AQLM scheme)
    "2 bits/weight, d=4": (1, 256, 4, None),
    "2 bits/weight, 2x8": (2, 256, 8, "2x8g8"),
    "1 bit/weight": (1, 256, 8, "1x8g8"),
}
BAR_SHAPE = (4096, 11008)
FAMILIES = ("lut", "gemv", "mma", "decode")


def _random_vq(in_features: int, out_features: int, m: int, k: int, d: int, seed: int) -> VQLinear:
    return random_vq_linear(in_features, out_features, m, k, d, seed).to(device="cuda", dtype=torch.float16)


def _aqlm_layer(vq: VQLinear, scheme: str | None):
    """AQLM's `QuantizedLinear` on the codes and codebooks of `vq` (fp16, CUDA), or an error string."""
    if scheme is None:
        return "no AQLM equivalent"
    try:
        from aqlm import QuantizedLinear
    except Exception as err:  # noqa: BLE001 - recorded in the results
        return f"{type(err).__name__}: {err}"
    codes = vq.unpacked_codes()  # [out, n_blocks, M] uint8
    out_f, n_blocks, m = codes.shape
    k, d = vq.codebooks.shape[1], vq.codebooks.shape[2]
    layer = QuantizedLinear(n_blocks * d, out_f, in_group_size=d, out_group_size=1, num_codebooks=m,
                            nbits_per_codebook=8, bias=False).to(device="cuda", dtype=torch.float16)
    layer.codes.data = codes.view(torch.int8).clone()  # [out, n_blocks, M], int8 as AQLM stores it
    layer.codebooks.data = vq.codebooks.detach().reshape(m, k, 1, d).clone()  # [M, k, out_group=1, in_group=d]
    layer.scales.data = torch.ones(out_f, 1, 1, 1, device="cuda", dtype=torch.float16)
    return layer.requires_grad_(False)


@functools.cache
def _flush_buffer() -> torch.Tensor:
    """256 MB on the GPU: writing it evicts the L2 cache (60 MB on an H200)."""
    return torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")


def graph_us(fn, calls: int = 20, replays: int = 7) -> float:
    """GPU µs per call with a cold L2: graph(flush + fn) minus graph(flush), see the module doc."""
    flush = _flush_buffer()
    graphs = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm (nothing may compile or tune inside the capture)
        for with_fn in (False, True):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                for _ in range(calls):
                    flush.zero_()
                    if with_fn:
                        fn()
            graphs[with_fn] = g
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    diffs = []
    for _ in range(replays):
        times = {}
        for with_fn, g in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times[with_fn] = start.elapsed_time(end)
        diffs.append((times[True] - times[False]) / calls * 1e3)
    diffs.sort()
    return round(diffs[len(diffs) // 2], 2)


def eager_us(fn, calls: int = 200) -> float:
    """Wall time per call (µs) of `calls` back-to-back calls, launch overhead included."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / calls * 1e6, 2)


def _key(vq: VQLinear, x: torch.Tensor) -> tuple:
    codes = vq.unpacked_codes()
    return (tuple(codes.shape), codes.dtype, tuple(vq.codebooks.shape), x.dtype, x.device,
            kernels.triton_vq.next_pow2(x.shape[0]))


def _best_per_family(vq: VQLinear, x: torch.Tensor) -> dict[str, cuda_dispatch.Kernel]:
    """The fastest timed configuration of each kernel family for this layer and batch (dispatcher's timings)."""
    timings = kernels.cuda_timings().get(_key(vq, x), {})
    best: dict[str, tuple[float, cuda_dispatch.Kernel]] = {}
    for kernel in cuda_dispatch.candidates(x.shape[0], vq.d, x.dtype):
        ms = timings.get(str(kernel), {}).get("gpu_ms")
        if ms is not None and (kernel.name not in best or ms < best[kernel.name][0]):
            best[kernel.name] = (ms, kernel)
    return {name: kernel for name, (_, kernel) in best.items()}


def _measure(entry: dict, name: str, fn, ref: torch.Tensor, *, eager: bool) -> None:
    try:
        out = fn()
        torch.cuda.synchronize()
        entry["max_rel_error"][name] = float((out.float() - ref).abs().max() / ref.abs().max())
        entry["graph_us"][name] = graph_us(fn)
        if eager:
            entry["eager_us"][name] = eager_us(fn)
    except Exception as err:  # noqa: BLE001 - one failing method must not lose the others
        entry["errors"][name] = f"{type(err).__name__}: {str(err)[:300]}"


def bench_row(scheme: str, vq: VQLinear, aqlm, weight: torch.Tensor, batch: int) -> dict:
    m, k, d, aqlm_scheme = SCHEMES[scheme]
    in_f, out_f = weight.shape[1], weight.shape[0]
    x = torch.randn(batch, in_f, device="cuda", generator=torch.Generator("cuda").manual_seed(batch)).half()
    ref = x.float() @ weight.float().t()  # [B, out] fp32
    entry = {"scheme": scheme, "aqlm_scheme": aqlm_scheme or "-", "in_features": in_f, "out_features": out_f,
             "M": m, "k": k, "d": d, "bits_per_weight": m * 8 / d, "batch": batch,
             "graph_us": {}, "eager_us": {}, "max_rel_error": {}, "errors": {}}
    if isinstance(aqlm, str):
        entry["aqlm_error"] = aqlm
    with torch.inference_mode():
        _measure(entry, "dense_fp16", lambda: F.linear(x, weight), ref, eager=True)
        _measure(entry, "hf_vq", lambda: vq(x), ref, eager=True)  # first call: the dispatcher's choice
        chosen = kernels.cuda_kernels().get(_key(vq, x), "decode (no candidate)")  # inside CUDA graphs
        entry["hf_vq_kernel"] = chosen
        entry["hf_vq_path"] = chosen.split("(")[0]
        entry["hf_vq_eager_kernel"] = kernels.cuda_kernels(eager=True).get(_key(vq, x), chosen)
        entry["candidate_timings_warm_l2"] = kernels.cuda_timings().get(_key(vq, x), {})
        codes, books = vq.unpacked_codes(), vq.codebooks
        for family, kernel in _best_per_family(vq, x).items():
            entry.setdefault("family_kernels", {})[family] = str(kernel)
            _measure(entry, family, lambda kernel=kernel: kernel(x, codes, books, None, None), ref, eager=False)
        if not isinstance(aqlm, str):
            _measure(entry, "aqlm", lambda: aqlm(x), ref, eager=True)
    g = entry["graph_us"]
    print(f"[gpu] {scheme} {in_f}x{out_f} B={batch}: dense {g.get('dense_fp16')} µs, hf_vq {g.get('hf_vq')} µs "
          f"({entry['hf_vq_kernel']}), " + ", ".join(f"{f} {g.get(f)}" for f in FAMILIES if f in g)
          + (f"; errors {entry['errors']}" if entry["errors"] else ""), flush=True)
    return entry


def bench_layers(schemes: list[str], shapes, batches, on_row=lambda rows: None) -> list[dict]:
    """All rows; `on_row(rows)` is called after each one (the caller writes partial results)."""
    rows = []
    for scheme in schemes:
        m, k, d, aqlm_scheme = SCHEMES[scheme]
        for in_f, out_f in shapes:
            vq = _random_vq(in_f, out_f, m, k, d, seed=in_f + out_f)
            weight = vq.weight.detach().clone()  # [out, in] fp16, the decoded weight cuBLAS reads
            aqlm = _aqlm_layer(vq, aqlm_scheme)
            for batch in batches:
                try:
                    rows.append(bench_row(scheme, vq, aqlm, weight, batch))
                except Exception as err:  # noqa: BLE001 - keep the rest of the table
                    print(f"[gpu] {scheme} {in_f}x{out_f} B={batch} failed: {type(err).__name__}: {err}", flush=True)
                    rows.append({"scheme": scheme, "in_features": in_f, "out_features": out_f, "batch": batch,
                                 "error": f"{type(err).__name__}: {str(err)[:300]}"})
                on_row(rows)
            del vq, weight, aqlm
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- report
def _ratio(g: dict, a: str = "dense_fp16", b: str = "hf_vq") -> float | None:
    return round(g[a] / g[b], 2) if a in g and b in g and g[b] > 0 else None


def bars(layers: list[dict]) -> list[dict]:
    """The issue's targets, read off the rows (a missing row or timing is reported as not measured)."""
    out = []
    for scheme in ("2 bits/weight, d=4", "2 bits/weight, 2x8"):
        row = next((r for r in layers if r.get("scheme") == scheme and (r["in_features"], r["out_features"]) == BAR_SHAPE
                    and r["batch"] == 1 and "graph_us" in r), None)
        ratio = _ratio(row["graph_us"]) if row else None
        out.append({"bar": f"4096x11008, batch 1, {scheme}: GEMV >= 1.5x faster than fp16 cuBLAS (GPU time, cold L2)",
                    "met": ratio is not None and ratio >= 1.5,
                    "detail": "not measured" if ratio is None else
                    f"{row['graph_us']['hf_vq']} µs vs {row['graph_us']['dense_fp16']} µs: {ratio}x ({row['hf_vq_kernel']})"})
        big = next((r for r in layers if r.get("scheme") == scheme and (r["in_features"], r["out_features"]) == BAR_SHAPE
                    and r["batch"] == 512 and "graph_us" in r), None)
        slow = None if big is None or _ratio(big["graph_us"]) is None else round(1 / _ratio(big["graph_us"]), 2)
        out.append({"bar": f"4096x11008, 512 rows (prefill), {scheme}: <= 1.2x dense", "met": slow is not None and slow <= 1.2,
                    "detail": "not measured" if slow is None else
                    f"{big['graph_us']['hf_vq']} µs vs {big['graph_us']['dense_fp16']} µs: {slow}x dense ({big['hf_vq_kernel']})"})
    row = next((r for r in layers if (r.get("in_features"), r.get("out_features")) == BAR_SHAPE and r["batch"] == 1
                and "hf_vq" in r.get("eager_us", {})), None)
    if row:
        e = row["eager_us"]
        out.append({"bar": "one eager VQLinear call (4096x11008, batch 1) vs F.linear", "met": e["hf_vq"] <= 2 * e["dense_fp16"],
                    "detail": f"{e['hf_vq']} µs vs {e['dense_fp16']} µs wall per call (met = within 2x)"})
    return out


def _cell(r: dict, name: str) -> str:
    if name in r.get("graph_us", {}):
        return str(r["graph_us"][name])
    return "error" if name in r.get("errors", {}) else "–"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = ["# GPU inference from codes: hf_vq kernels vs fp16 cuBLAS\n",
             f"Device: **{m['device']}**, torch {m['torch']}, triton {data['triton']}, aqlm {data['aqlm_version']}, "
             f"{m['date']}. fp16 inputs and weights, random codes and codebooks (the same for every method). "
             "µs per call. **GPU time, cold L2**: CUDA graphs, L2 flushed before every call, launch overhead excluded. "
             "hf_vq = `VQLinear` forward with the kernel its dispatcher chose for CUDA graphs (\"kernel\", least GPU time; "
             "eager calls use the least wall time per call, \"eager kernel\"); lut / gemv / mma / decode = the best "
             "configuration of each family. Eager: wall µs per call of 200 back-to-back calls from Python.\n",
             "| scheme | in×out | batch | dense fp16 | hf_vq | hf_vq vs dense | kernel | lut | gemv | mma | decode + cuBLAS "
             "| AQLM | eager dense / hf_vq | eager kernel | max rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["layers"]:
        if "error" in r:
            lines.append(f"| {r['scheme']} | {r['in_features']}x{r['out_features']} | {r['batch']} | error: {r['error']} "
                         "| | | | | | | | | | | |")
            continue
        g, e = r["graph_us"], r["eager_us"]
        ratio = _ratio(g)
        lines.append(
            f"| {r['scheme']} | {r['in_features']}x{r['out_features']} | {r['batch']} | {_cell(r, 'dense_fp16')} "
            f"| {_cell(r, 'hf_vq')} | {f'**{ratio}×**' if ratio else 'n/a'} | {r['hf_vq_kernel']} | "
            + " | ".join(_cell(r, f) for f in FAMILIES)
            + f" | {_cell(r, 'aqlm')} | {e.get('dense_fp16', '–')} / {e.get('hf_vq', '–')} "
            f"| {r.get('hf_vq_eager_kernel', '').split('(')[0]} | {r['max_rel_error'].get('hf_vq', float('nan')):.1e} |")
    errors = sorted({f"{name}: {err}" for r in data["layers"] for name, err in r.get("errors", {}).items()})
    if errors or data["dispatch_errors"]:
        lines += ["\n## Errors (recorded, run continued)\n"] + [f"- {e}" for e in errors]
        lines += [f"- candidate {k}: {v}" for k, v in data["dispatch_errors"].items()]
    lines += ["\n## Bars\n", "| bar | met | measured |", "|---|---|---|"]
    lines += [f"| {b['bar']} | {'yes' if b['met'] else 'NO'} | {b['detail']} |" for b in data["bars"]]
    lines.append("\n```bash\npython benchmarks/bench_gpu.py --out benchmarks/results/gpu_kernels\n```\n")
    return "\n".join(lines)


def _plot(layers: list[dict], path: Path) -> None:
    rows = [r for r in layers if "graph_us" in r]
    series = {label: (lambda r, key=key: r["graph_us"].get(key, float("nan")))
              for label, key in (("dense fp16 (cuBLAS)", "dense_fp16"), ("hf_vq", "hf_vq"), ("AQLM", "aqlm"))}
    layer_plot(rows, series, path, ylabel="µs per call (GPU time, cold L2)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096x11008 only, batch 1 and 16, 2-bit schemes")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--out", default=str(RESULTS / "gpu_kernels"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not kernels.HAS_TRITON:
        print("bench_gpu needs a CUDA GPU and triton; nothing measured.", file=sys.stderr)
        return 1
    from importlib.metadata import PackageNotFoundError, version

    import triton

    try:
        aqlm_version = version("aqlm")
    except PackageNotFoundError:
        aqlm_version = "not installed"
    schemes = list(SCHEMES)[:2] if args.quick else list(SCHEMES)
    shapes = [BAR_SHAPE] if args.quick else SHAPES
    batches = args.batches or ([1, 16] if args.quick else BATCHES)
    data = {"machine": machine(), "triton": triton.__version__, "aqlm_version": aqlm_version}

    def update(rows: list[dict], quiet: bool = True) -> None:  # after every row: a time limit keeps what was measured
        data["layers"] = rows
        data["bars"] = bars(rows)
        data["cuda_kernels"] = {str(key): kernel for key, kernel in kernels.cuda_kernels().items()}
        data["dispatch_errors"] = {str(key): err for key, err in kernels.cuda_errors().items()}
        write(args.out, data, markdown(data), quiet=quiet)

    update(bench_layers(schemes, shapes, batches, on_row=update), quiet=False)
    try:
        _plot(data["layers"], Path(args.out).with_suffix(".png"))
    except Exception as err:  # noqa: BLE001 - the numbers are written already
        print(f"no plot ({type(err).__name__}: {err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
