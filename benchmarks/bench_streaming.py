#!/usr/bin/env python
"""Streaming compression of a model larger than what it should take in memory: peak RSS and time.

A Llama-shaped model of ~1.1 B parameters (TinyLlama's shape: hidden 2048, 22 layers, intermediate 5632, vocab
32,000; random weights, so speed and memory only) is written as a sharded fp32 safetensors folder (4.4 GB) by a
separate process. Then, each in a fresh process with nothing else loaded, it is compressed:

* **streaming** — `hf_vq.integrations.transformers.streaming.compress_streaming`: the architecture on the meta
  device, one block's dense weights read at a time, data-free k-means (2 bits per weight), the result saved;
* **in memory** (`--in-memory`, optional: it needs the whole fp32 model in RAM) — `from_pretrained` + `quantize_`.

Peak RSS is the process's `ru_maxrss`; the fp32 size is the sum of the shards.

    .venv/bin/python benchmarks/bench_streaming.py                  # -> benchmarks/results/streaming.{json,md}
    .venv/bin/python benchmarks/bench_streaming.py --layers 4       # a smaller model (quick run)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine, write

OUT = RESULTS / "streaming"


def _write_model(folder: Path, layers: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="500MB")


def _compress(folder: Path, out: Path, mode: str, n_iter: int) -> dict:
    import torch

    torch.set_num_threads(2)
    import hf_vq

    config = hf_vq.VQConfig(k=256, n_iter=n_iter, permute=False, quantize_embeddings=True)
    start = time.perf_counter()
    if mode == "streaming":
        from hf_vq.integrations.transformers.streaming import compress_streaming

        model = compress_streaming(folder, config, progress=False)
    else:
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(folder)
        hf_vq.quantize_(model, config, progress=False)
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    return {"mode": mode, "seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "compressed_gb": sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--n-iter", type=int, default=25, help="k-means iterations")
    parser.add_argument("--in-memory", action="store_true", help="also compress in memory (needs the fp32 model in RAM)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        what, folder, out, n_iter = args._child
        if what == "write":
            _write_model(Path(folder), int(n_iter))
            return
        print("RESULT " + json.dumps(_compress(Path(folder), Path(out), what, int(n_iter))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dense"
        subprocess.run([sys.executable, __file__, "--_child", "write", str(folder), "-", str(args.layers)], check=True)
        fp32_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
        params = fp32_gb * 2**30 / 4
        for mode in ["streaming"] + (["in-memory"] if args.in_memory else []):
            proc = subprocess.run([sys.executable, __file__, "--_child", mode, str(folder), str(Path(tmp) / mode),
                                   str(args.n_iter)], capture_output=True, text=True, check=True)
            row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
            row["peak_over_fp32"] = row["peak_rss_gb"] / fp32_gb
            rows.append(row)
            print(row, flush=True)
    info = machine()
    command = "python benchmarks/bench_streaming.py " + " ".join(sys.argv[1:])
    lines = [f"# Streaming compression: peak memory and time\n\n`{command}` on {info['device']}, {info['torch_threads']} "
             f"torch threads, {info['date']}. Llama-shaped model, {args.layers} layers, {params / 1e9:.2f} B parameters, "
             f"random weights, sharded fp32 safetensors of {fp32_gb:.2f} GB; data-free k-means, k = 256, d = 4 "
             f"(2 bits/weight), {args.n_iter} iterations.\n",
             "| mode | seconds | peak RSS GB | peak / fp32 size | compressed GB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['seconds']:.0f} | {r['peak_rss_gb']:.2f} | {r['peak_over_fp32']:.2f} | "
                     f"{r['compressed_gb']:.3f} |")
    write(args.out, {"machine": info, "command": command, "parameters": params, "fp32_gb": fp32_gb, "rows": rows},
          "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
