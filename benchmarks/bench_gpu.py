#!/usr/bin/env python
"""GPU inference from codes: hf_vq's Triton kernel against fp16 cuBLAS and AQLM's CUDA kernels, same run.

Per layer (`nn.Linear` shapes in×out 768×3072, 4096×4096, 4096×11008; batch 1, 4, 8, 16, 64; fp16 inputs and
weights), at 1 bit/weight (hf_vq k=256 d=8 / AQLM 1x8g8) and 2 bits/weight (hf_vq M=2 k=256 d=8 / AQLM 2x8g8),
all on the same random codes and codebooks:

* **dense fp16**: `F.linear` on the decoded weight (cuBLAS);
* **hf_vq**: `VQLinear.forward` under `torch.inference_mode()` (its own dispatch), plus each path forced:
  the GEMV kernel (`hf_vq.kernels.triton_vq`) and Triton decode + cuBLAS;
* **AQLM**: the `aqlm` package's `QuantizedLinear` (its CUDA kernels, compiled on first use; AQLM itself
  switches to dequantize + matmul above 6 input rows).

Three timings per method:

* **GPU time, cold L2** (the headline): CUDA graphs of 20 calls each preceded by a 256 MB write that flushes
  the L2 cache, minus the same graph with the flushes alone; median of 7 replays, per call. No launch
  overhead, no cache reuse between calls (a model's next layer has evicted this one's weights);
* **do_bench**: `triton.testing.do_bench` (L2 flushed before every call, CUDA events around each eager
  call): includes whatever CPU dispatch time the flush does not hide;
* **eager µs/call**: wall time of 200 back-to-back eager calls from Python (launch and dispatch overhead
  included), what an unbatched eager loop without CUDA graphs sees.

    python benchmarks/bench_gpu.py                 # writes benchmarks/results/gpu_kernels.{json,md,png}
    python benchmarks/bench_gpu.py --quick         # 4096x11008 only, batch 1 and 16

Needs a CUDA GPU (and `aqlm` for its rows: `pip install aqlm`; its CUDA extension builds with nvcc on first use).
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
from hf_vq.kernels import triton_vq
from hf_vq.nn import VQLinear

SHAPES = [(768, 3072), (4096, 4096), (4096, 11008)]  # nn.Linear(in_features, out_features)
BATCHES = [1, 4, 8, 16, 64]
SCHEMES = {  # name: (num_codebooks, k, d, AQLM scheme)
    "1 bit/weight": (1, 256, 8, "1x8g8"),
    "2 bits/weight": (2, 256, 8, "2x8g8"),
}
BAR_SHAPE = (4096, 11008)


def _random_vq(in_features: int, out_features: int, m: int, k: int, d: int, seed: int) -> VQLinear:
    return random_vq_linear(in_features, out_features, m, k, d, seed).to(device="cuda", dtype=torch.float16)


def _aqlm_layer(vq: VQLinear):
    """AQLM's `QuantizedLinear` holding the codes and codebooks of `vq` (fp16, CUDA), or an error string."""
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


def _gpu_time(fn) -> dict:
    """Median and 20/80 % quantiles (ms) of `fn` with the L2 cache flushed before every call."""
    from triton.testing import do_bench

    med, lo, hi = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": round(med, 5), "q20_ms": round(lo, 5), "q80_ms": round(hi, 5)}


@functools.cache
def _flush_buffer() -> torch.Tensor:
    """256 MB on the GPU: writing it evicts the L2 cache (60 MB on an H200)."""
    return torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")


def _graph_us(fn, calls: int = 20, replays: int = 7) -> float:
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


def _eager_us(fn, calls: int = 200) -> float:
    """Wall time per call (µs) of `calls` back-to-back calls, launch overhead included."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / calls * 1e6, 2)


def bench_layers(shapes, batches) -> list[dict]:
    rows = []
    for scheme, (m, k, d, aqlm_scheme) in SCHEMES.items():
        for in_f, out_f in shapes:
            vq = _random_vq(in_f, out_f, m, k, d, seed=in_f + out_f)
            codes, books = vq.unpacked_codes(), vq.codebooks
            weight = vq.weight.detach().clone()  # [out, in] fp16, the decoded weight cuBLAS reads
            aqlm = _aqlm_layer(vq)
            for b in batches:
                x = torch.randn(b, in_f, device="cuda", generator=torch.Generator("cuda").manual_seed(b)).half()
                ref = x.float() @ weight.float().t()  # [B, out] fp32

                def decode_path(x=x):
                    with kernels.kernel_mode("decode"):
                        return vq(x)

                fns = {"dense_fp16": lambda x=x: F.linear(x, weight), "hf_vq": lambda x=x: vq(x),
                       "hf_vq_gemv": lambda x=x: triton_vq.triton_vq_matmul(x, codes, books),
                       "hf_vq_decode": decode_path}
                if not isinstance(aqlm, str):
                    fns["aqlm"] = lambda x=x: aqlm(x)
                entry = {"scheme": scheme, "aqlm_scheme": aqlm_scheme, "in_features": in_f, "out_features": out_f,
                         "M": m, "k": k, "d": d, "bits_per_weight": m * 8 / d, "batch": b,
                         "timings": {}, "eager_us": {}, "graph_us": {}, "max_rel_error": {}}
                if isinstance(aqlm, str):
                    entry["aqlm_error"] = aqlm
                with torch.inference_mode():
                    for name, fn in fns.items():
                        try:
                            out = fn()  # compiles / autotunes on the first call
                            torch.cuda.synchronize()
                            entry["max_rel_error"][name] = float((out.float() - ref).abs().max() / ref.abs().max())
                            entry["timings"][name] = _gpu_time(fn)
                            entry["eager_us"][name] = _eager_us(fn)
                            entry["graph_us"][name] = _graph_us(fn)
                        except Exception as err:  # noqa: BLE001 - one failing peer must not lose the others
                            entry["timings"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                # the path VQLinear took (measured on its first call, now cached)
                entry["hf_vq_path"] = {"triton": "gemv"}.get(kernels.select_path(x, codes, books), "decode")
                rows.append(entry)
                print(f"[gpu] {scheme} {in_f}x{out_f} B={b}: " + ", ".join(
                    f"{n} {entry['graph_us'].get(n, t.get('error'))}" for n, t in entry["timings"].items())
                    + f" µs graph (path {entry['hf_vq_path']})", flush=True)
    return rows


def _tuned_configs() -> dict:
    """The tile configuration `triton.autotune` chose for each shape key of the GEMV kernel."""
    return {f"gemv_tuned {key}": str(config) for key, config in triton_vq._gemv_tuned.cache.items()}


# ---------------------------------------------------------------------------------------------- report
def _ms(t: dict) -> str:
    return f"{t['median_ms'] * 1e3:.1f}" if "median_ms" in t else "error"


def bars(layers: list[dict]) -> list[dict]:
    out = []
    for r in layers:
        if (r["in_features"], r["out_features"]) == BAR_SHAPE and r["batch"] == 1 and r["bits_per_weight"] <= 2:
            g = r["graph_us"]
            if "dense_fp16" in g and "hf_vq" in g:
                ratio = g["dense_fp16"] / g["hf_vq"]
                t = r["timings"]
                eager = (f"; do_bench {t['hf_vq']['median_ms'] * 1e3:.1f} vs {t['dense_fp16']['median_ms'] * 1e3:.1f} µs"
                         if "median_ms" in t["hf_vq"] and "median_ms" in t["dense_fp16"] else "")
                out.append({"bar": f"GPU batch 1, 4096x11008, {r['scheme']}: >= 2x faster than fp16 cuBLAS",
                            "met": ratio >= 2.0,
                            "detail": f"GPU time (cold L2) {g['hf_vq']:.1f} µs vs {g['dense_fp16']:.1f} µs, {ratio:.2f}x{eager}"})
    return out


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# GPU inference from codes: hf_vq Triton kernel vs fp16 cuBLAS vs AQLM\n",
             f"Device: **{m['device']}**, torch {m['torch']}, triton {data['triton']}, aqlm {data['aqlm_version']}, "
             f"{m['date']}. fp16 inputs and weights, random codes and codebooks (the same for every method). "
             "µs per call. **GPU time**: CUDA graphs, L2 flushed before every call, launch overhead excluded (module "
             "doc of bench_gpu.py). hf_vq = `VQLinear` forward: up to "
             f"{data['triton_max_batch']} input rows it takes the path its first call measured faster for the shape and "
             "batch (\"path\": the GEMV kernel, or Triton decode + cuBLAS), beyond it decode + cuBLAS. "
             "do_bench: `triton.testing.do_bench` median (eager calls, L2 flushed). Eager: wall time per call of 200 "
             "back-to-back calls from Python.\n",
             "| scheme | shape (in×out) | batch | dense fp16 | hf_vq | path | GEMV kernel "
             "| decode + cuBLAS | AQLM | hf_vq vs dense | do_bench dense / hf_vq / AQLM | eager dense / hf_vq / AQLM "
             "| max rel. error hf_vq / AQLM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["layers"]:
        t, e, g, err = r["timings"], r["eager_us"], r["graph_us"], r["max_rel_error"]
        speed = f"**{g['dense_fp16'] / g['hf_vq']:.2f}×**" if "dense_fp16" in g and "hf_vq" in g else "n/a"
        lines.append(
            f"| {r['scheme']} ({r['M']}x{r['k']} d={r['d']} / {r['aqlm_scheme']}) | {r['in_features']}x{r['out_features']} "
            f"| {r['batch']} | {g.get('dense_fp16', 'error')} | {g.get('hf_vq', 'error')} | {r['hf_vq_path']} "
            f"| {g.get('hf_vq_gemv', 'error')} | {g.get('hf_vq_decode', 'error')} "
            f"| {g.get('aqlm', 'n/a')} | {speed} "
            f"| {_ms(t['dense_fp16'])} / {_ms(t['hf_vq'])} / {_ms(t['aqlm']) if 'aqlm' in t else 'n/a'} "
            f"| {e.get('dense_fp16', 'n/a')} / {e.get('hf_vq', 'n/a')} / {e.get('aqlm', 'n/a')} "
            f"| {err.get('hf_vq', float('nan')):.1e} / {err.get('aqlm', float('nan')):.1e} |")
    errors = {r.get("aqlm_error") for r in data["layers"] if r.get("aqlm_error")}
    if errors:
        lines.append(f"\nAQLM not run: {'; '.join(sorted(errors))}\n")
    lines += ["\n## Bars\n", "| bar | met | measured |", "|---|---|---|"]
    lines += [f"| {b['bar']} | {'yes' if b['met'] else 'NO'} | {b['detail']} |" for b in data["bars"]]
    lines += ["\n## Tile configurations chosen by `triton.autotune`\n"]
    lines += [f"- {key}: {cfg}" for key, cfg in data["tuned_configs"].items()]
    lines.append("\n```bash\npython benchmarks/bench_gpu.py\n```\n")
    return "\n".join(lines)


def _plot(layers: list[dict], path: Path) -> None:
    series = {label: (lambda r, key=key: r["graph_us"].get(key, float("nan")))
              for label, key in (("dense fp16 (cuBLAS)", "dense_fp16"), ("hf_vq", "hf_vq"), ("AQLM", "aqlm"))}
    layer_plot(layers, series, path, ylabel="µs per call (GPU time, cold L2)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
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
    shapes = [BAR_SHAPE] if args.quick else SHAPES
    batches = [1, 16] if args.quick else BATCHES
    data = {"machine": machine(), "triton": triton.__version__, "aqlm_version": aqlm_version,
            "triton_max_batch": kernels.TRITON_MAX_BATCH}
    data["layers"] = bench_layers(shapes, batches)
    data["bars"] = bars(data["layers"])
    data["tuned_configs"] = _tuned_configs()
    data["cuda_choices"] = {str(key): path for key, path in kernels.cuda_choices().items()}
    write(args.out, data, markdown(data))
    try:
        _plot(data["layers"], Path(args.out).with_suffix(".png"))
    except ImportError as err:
        print(f"no plot ({err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
