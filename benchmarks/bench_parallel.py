#!/usr/bin/env python
"""Compression spread over processes with `accelerate launch`: wall time and phases, 1 vs 2 CPU processes.

Two models, each compressed three ways in fresh processes on the same machine, one after the other:

* **1 process x 1 thread** and **2 processes x 1 thread** (`accelerate launch --multi_gpu --num_processes 2`, gloo):
  the checkpoints are compared (tensor bytes and parsed header; they must be identical);
* **1 process x 2 threads**: what a user of a 2-core machine gets without the launcher (also compared: PyTorch's CPU
  reductions may round differently with another thread count).

Models:

* **all-MiniLM-L6-v2**, `hf-vq compress` default (256 gensim calibration texts, bit allocation to 10x, permutation,
  output-aware engine; fidelity on the 256 held-out Lee sentences);
* **EfficientNet-Lite0** (timm), `hf-vq compress --ratio 6` (photo crops; grouped and depthwise convolutions);
* **a Llama-shaped 1.1 B model** (TinyLlama's shape, random weights, sharded fp32 safetensors written by
  `bench_streaming.py`'s writer), streamed block by block (`compress_streaming`), data-free k-means, 2 bits/weight.

Phases (calibration, permutation, allocation, encoding, tuning, exchange, loading, saving) are the main process's
wall time in each (`model.vq_timings`); "exchange" is time spent in collectives, including waiting for the other
process to finish its share.

    .venv/bin/python benchmarks/bench_parallel.py                # -> benchmarks/results/parallel.{json,md}
    .venv/bin/python benchmarks/bench_parallel.py --layers 4     # a smaller Llama (quick run)
    .venv/bin/python benchmarks/bench_parallel.py --skip minilm --skip llama   # re-run Lite0, keep the other rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, loadavg, machine, write
from hf_vq.evaluate import AGREEMENT, COSINE_MEAN

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS / "parallel"
ACCELERATE = Path(sys.executable).parent / "accelerate"
RUNS = [(1, 1), (2, 1), (1, 2)]  # (processes, threads per process)


def _launch(args: list[str], processes: int, threads: int, module: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "1"}
    target = ["-m", *args] if module else args
    if processes == 1:
        cmd = [sys.executable, *target]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--num_cpu_threads_per_process", str(threads), "--mixed_precision", "no", "--dynamo_backend", "no",
               *target]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc


def _checkpoint(folder: Path) -> tuple[dict, bytes]:
    """(parsed header, tensor bytes) of every safetensors file: the metadata map is written in hash order."""
    headers, data = {}, b""
    for path in sorted(folder.glob("*.safetensors")):
        raw = path.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        headers[path.name] = json.loads(raw[8: 8 + size])
        data += raw[8 + size:]
    return headers, data


def _cli(tmp: Path, name: str, model: str, args: list[str], metric: str) -> list[dict]:
    """`hf-vq compress` (fresh processes) for each (processes, threads) of RUNS."""
    rows = []
    for processes, threads in RUNS:
        out = tmp / f"{name}-{processes}x{threads}"
        report = tmp / f"{name}-{processes}x{threads}.json"
        start = time.perf_counter()
        _launch(["hf_vq.cli", "compress", *args, "--out", str(out), "--json", str(report), "--quiet"], processes,
                threads, module=True)
        wall = time.perf_counter() - start
        r = json.loads(report.read_text())
        rows.append({"group": name, "model": model, "processes": processes, "threads": threads, "wall_s": wall,
                     "compress_s": r["seconds"], "phases": r["phases"], "ratio": r["ratio"],
                     "fidelity": r["fidelity"][metric], "metric": metric, "out": out})
        print({k: v for k, v in rows[-1].items() if k != "out"}, flush=True)
    return rows


def _minilm(tmp: Path) -> list[dict]:
    return _cli(tmp, "minilm", "all-MiniLM-L6-v2 (hf-vq compress default)", [], COSINE_MEAN)


def _lite0(tmp: Path) -> list[dict]:
    folder = tmp / "lite0"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_efficientnet_lite0.py"), "--out", str(folder)],
                   check=True, capture_output=True)
    return _cli(tmp, "lite0", "EfficientNet-Lite0 (hf-vq compress --ratio 6)", [str(folder), "--ratio", "6"],
                AGREEMENT)


def _llama_child(folder: str, out: str, n_iter: str) -> None:
    """One process of the 1.1 B run (launched): stream, save on the main process, print a RESULT line."""
    import torch

    import hf_vq
    from hf_vq.integrations.accelerate import launched_workers
    from hf_vq.integrations.transformers.streaming import compress_streaming

    workers, device = launched_workers()
    config = hf_vq.VQConfig(k=256, n_iter=int(n_iter), permute=False, quantize_embeddings=True)
    start = time.perf_counter()
    model = compress_streaming(folder, config, progress=False, accelerator=workers, device=device)
    seconds = time.perf_counter() - start
    phases = dict(model.vq_timings)
    if workers.is_main:
        saving = time.perf_counter()
        model.save_pretrained(out)
        phases["saving"] = time.perf_counter() - saving
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps({"rank": workers.index, "seconds": seconds, "phases": phases, "peak_rss_gb": rss,
                                  "threads": torch.get_num_threads()}), flush=True)
    workers.close()


def _llama(tmp: Path, layers: int, n_iter: int) -> list[dict]:
    folder = tmp / "llama"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_streaming.py"), "--_child", "write", str(folder),
                    "-", str(layers)], check=True)
    fp32_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
    rows = []
    for processes, threads in RUNS:
        out = tmp / f"llama-{processes}x{threads}"
        start = time.perf_counter()
        proc = _launch([__file__, "--_child", str(folder), str(out), str(n_iter)], processes, threads, module=False)
        wall = time.perf_counter() - start
        results = sorted((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                         key=lambda r: r["rank"])
        main = results[0]
        rows.append({"group": "llama", "model": f"Llama-shaped {fp32_gb * 2**30 / 4 / 1e9:.2f} B (streamed, data-free 2 bits)",
                     "processes": processes, "threads": threads, "wall_s": wall, "compress_s": main["seconds"],
                     "phases": main["phases"], "peak_rss_gb_per_process": [r["peak_rss_gb"] for r in results],
                     "fp32_gb": fp32_gb,
                     "ratio": fp32_gb * 2**30 / sum(p.stat().st_size for p in out.glob("*.safetensors")), "out": out})
        print({k: v for k, v in rows[-1].items() if k != "out"}, flush=True)
    return rows


def _table(rows: list[dict]) -> list[str]:
    phases = sorted({p for r in rows for p in r["phases"]})
    head = ["model", "processes x threads", "wall s", "compress s", *phases, "file ratio", "fidelity / peak RSS GB",
            "same checkpoint as 1x1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        extra = (f"{'cosine' if 'cosine' in r.get('metric', 'cosine') else 'top-1 agreement'} {r['fidelity']:.4f}"
                 if "fidelity" in r else " + ".join(f"{g:.2f}" for g in r["peak_rss_gb_per_process"]))
        lines.append("| " + " | ".join([r["model"], f"{r['processes']} x {r['threads']}", f"{r['wall_s']:.0f}",
                                        f"{r['compress_s']:.0f}", *(f"{r['phases'].get(p, 0):.1f}" for p in phases),
                                        f"{r['ratio']:.2f}", extra, str(r["identical"])]) + " |")
    return lines


GROUPS = ["minilm", "lite0", "llama"]


def _group(model: str) -> str:
    return "minilm" if "MiniLM" in model else "lite0" if "Lite0" in model else "llama"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="layers of the Llama-shaped model")
    parser.add_argument("--n-iter", type=int, default=25, help="k-means iterations of the Llama run")
    parser.add_argument("--skip", choices=GROUPS, action="append", default=[],
                        help="leave a model out (its rows already in --out's JSON are kept)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        _llama_child(*args._child)
        return
    previous = Path(args.out).with_suffix(".json")
    kept = json.loads(previous.read_text())["rows"] if args.skip and previous.exists() else []
    rows = [{**r, "group": r.get("group", _group(r["model"]))} for r in kept]
    rows = [r for r in rows if r["group"] in args.skip]
    kept_from = json.loads(previous.read_text())["machine"]["date"] if rows else None
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("minilm", lambda: _minilm(Path(tmp))), ("lite0", lambda: _lite0(Path(tmp))),
                          ("llama", lambda: _llama(Path(tmp), args.layers, args.n_iter))):
            if name in args.skip:
                continue
            group = run()
            reference = _checkpoint(group[0]["out"])
            for r in group:
                r["identical"] = _checkpoint(r["out"]) == reference
                r["out"] = str(r["out"].name)
            rows += group
    rows.sort(key=lambda r: GROUPS.index(r["group"]))
    info = {**machine(), "loadavg_after": loadavg()}
    command = "python benchmarks/bench_parallel.py " + " ".join(sys.argv[1:])
    kept = f" (the {', '.join(args.skip)} rows kept from the run of {kept_from})" if kept_from else ""
    md = ["# Compression under `accelerate launch`: 1 vs 2 CPU processes\n",
          f"`{command}`{kept} on {info['device']}, {info['cores_visible']} cores, {info['date']}. Processes x threads per "
          "process; phases are the main process's seconds (`exchange`: in collectives, waiting included). "
          "'same checkpoint' compares tensor bytes and parsed headers with the 1 x 1 run.\n", *_table(rows), ""]
    write(args.out, {"machine": info, "command": command, "kept_from": kept_from, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
