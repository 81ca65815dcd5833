#!/usr/bin/env python
"""Loading compressed vs dense all-MiniLM-L6-v2 with `from_pretrained`: wall time, phase by phase, and peak memory.

Each load runs in a fresh child process (as a user's first load would), dense and compressed alternating
so that both see the same machine load; the modeling code (`transformers.models.bert`) is imported before
the clock starts, so the figures are the load itself. Phases are timed by wrapping transformers' and
hf_vq's functions: hf_vq's hooks before / after the weights load (before: skeleton, header check and, on one
device, mapping the checkpoint's tensors), transformers' per-key loader (`convert_and_load_state_dict_in_model`),
the whole `from_pretrained`. The memory the load adds is the peak RSS (VmHWM, reset just before the call)
over the RSS at its start, and the same after one forward pass: both loaders memory-map the file, so a weight
counts in RSS once it is read. Twice: with transformers' default thread-pool loading and with
`HF_DEACTIVATE_ASYNC_LOAD=1` (one thread). The checkpoints are in the page cache (warm).

    .venv/bin/python benchmarks/bench_load.py [--pairs 15]   # writes benchmarks/results/load.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import RESULTS, machine, minilm_path, write

_CHILD = textwrap.dedent("""
    import collections, functools, json, sys, time
    import torch
    torch.set_num_threads(2)
    import hf_vq
    import hf_vq.integrations.transformers.quantizer as tq
    import transformers.modeling_utils as mu
    import transformers.models.bert.modeling_bert  # noqa: F401 - imported before the clock, for both
    from transformers import AutoModel

    spent = collections.defaultdict(float)

    def timed(owner, name, label):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    timed(tq.HfVQQuantizer, "_process_model_before_weight_loading", "hf_vq before loading")
    timed(tq.HfVQQuantizer, "_process_model_after_weight_loading", "hf_vq after loading")
    timed(mu, "convert_and_load_state_dict_in_model", "transformers per-key loader")

    def status(key):  # kB, from /proc/self/status
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    # the CPU kernels' runtime (numba, LLVM), loaded by a compressed model's first forward, is loaded here in both
    # processes, outside the figures: a one-time cost per process, whatever the model (recorded on its own)
    before = status("VmRSS")
    from hf_vq.kernels import cpu
    with torch.no_grad():
        codes, books = torch.zeros(8, 2, 1, dtype=torch.uint8), torch.zeros(1, 4, 2)
        cpu.lut_matmul(torch.zeros(1, 4), codes, books)
        cpu.fast_decode(codes, books)
    kernels = (status("VmRSS") - before) / 1024
    rss_start = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
    start = time.perf_counter()
    model = AutoModel.from_pretrained(sys.argv[1])
    seconds, loaded = time.perf_counter() - start, (status("VmHWM") - rss_start) / 1024
    with torch.no_grad():  # one sentence of 16 tokens: every weight is read once
        model(input_ids=torch.arange(1000, 1016)[None], attention_mask=torch.ones(1, 16, dtype=torch.long))
    print(json.dumps({"from_pretrained": seconds, **spent, "peak RSS over start (MB)": loaded,
                      "peak RSS with a forward (MB)": (status("VmHWM") - rss_start) / 1024, "kernel runtime (MB)": kernels}))
""")


MODES = (("thread pool (default)", {}), ("one thread", {"HF_DEACTIVATE_ASYNC_LOAD": "1"}))


def run(pairs: int) -> dict:
    from transformers import AutoModel

    import hf_vq

    source = minilm_path()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "minilm-vq"
        model = AutoModel.from_pretrained(source, quantization_config=hf_vq.VQConfig(k=256, n_iter=20, permute=False))
        model.save_pretrained(folder)
        del model
        from safetensors import safe_open

        for name, path in (("dense", source), ("compressed", folder)):
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                out.setdefault("tensors", {})[name] = len(list(f.keys()))
            out.setdefault("file_mb", {})[name] = round((path / "model.safetensors").stat().st_size / 2**20, 2)
        for mode, env in MODES:
            samples: dict[str, list[dict]] = {"dense": [], "compressed": []}
            for _ in range(pairs):
                for name, path in (("dense", source), ("compressed", folder)):
                    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                                          timeout=600, env={**os.environ, **env})
                    if proc.returncode != 0:
                        raise RuntimeError(proc.stderr[-2000:])
                    samples[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            phases = sorted({k for s in samples["compressed"] + samples["dense"] for k in s})
            out[mode] = {name: {p: round((1 if p.endswith("(MB)") else 1e3) * statistics.median(s.get(p, 0.0) for s in runs), 2)
                                for p in phases}
                         for name, runs in samples.items()}
            diffs = [c["from_pretrained"] - d["from_pretrained"] for d, c in zip(samples["dense"], samples["compressed"])]
            out[mode]["paired_difference_ms"] = round(1e3 * statistics.median(diffs), 2)
            q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else (diffs[0],) * 3
            out[mode]["paired_difference_iqr_ms"] = [round(1e3 * q1, 2), round(1e3 * q3, 2)]
            out[mode]["paired_differences_ms"] = [round(1e3 * x, 2) for x in diffs]
            print(f"[{mode}] {out[mode]}", flush=True)
    return out


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = ["# Loading all-MiniLM-L6-v2: dense vs compressed, phase by phase\n",
             f"Machine: {m['device']}, torch {m['torch']}, {m['date']}. Fresh child process per load, "
             f"{data['pairs']} alternating dense/compressed pairs per mode, medians in ms; the modeling code is "
             "imported before the clock starts. Compressed: k=256, d=4 (`VQConfig(k=256, permute=False)`), "
             f"{data['tensors']['compressed']} tensors in model.safetensors vs {data['tensors']['dense']} dense "
             f"({data['file_mb']['compressed']} MB vs {data['file_mb']['dense']} MB). Memory: the peak RSS during `from_pretrained` over the "
             "RSS at its start, in MB; both checkpoints are memory-mapped, so a weight counts once it is read: the last "
             "column adds one forward pass (16 tokens), which reads every weight. Before the clock both processes load the "
             f"CPU kernels' runtime (numba; {data['thread pool (default)']['compressed']['kernel runtime (MB)']} MB, "
             "once per process whatever the model), which a compressed model's first forward would load.\n", *table(data),
             "\n```bash\n.venv/bin/python benchmarks/bench_load.py\n```\n"]
    return "\n".join(lines)


def table(data: dict) -> list[str]:
    """The Markdown table of a `run` result (also part of bench_inference's report)."""
    lines = ["| mode | checkpoint | from_pretrained | transformers per-key loader | hf_vq before loading | "
             "hf_vq after loading | peak RSS over start | … with a forward |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, _ in MODES:
        for name in ("dense", "compressed"):
            r = data[mode][name]
            lines.append(f"| {mode} | {name} | {r['from_pretrained']} | {r['transformers per-key loader']} "
                         f"| {r.get('hf_vq before loading', '')} | {r.get('hf_vq after loading', '')} "
                         f"| {r['peak RSS over start (MB)']} | {r.get('peak RSS with a forward (MB)', '')} |")
        q1, q3 = data[mode]["paired_difference_iqr_ms"]
        lines.append(f"| {mode} | **compressed − dense (paired median; quartiles)** | **{data[mode]['paired_difference_ms']}** "
                     f"({q1} to {q3}) | | | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--out", default=str(RESULTS / "load"))
    args = parser.parse_args(argv)
    data = {"machine": machine(), "pairs": args.pairs, **run(args.pairs)}
    write(args.out, data, markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
