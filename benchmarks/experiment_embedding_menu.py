#!/usr/bin/env python
"""How MiniLM's word-embedding table codes at equal bits: longer blocks with larger codebooks against the menu's.

The table (30,522 x 384, half of all-MiniLM-L6-v2's weights) is coded alone with the encoder `hf-vq compress` uses
for embeddings (`hf_vq.pipeline.calibrated._encode_rows_by_use`: k-means on rows drawn by use, per-row scales), its
rows' use counted on the calibration sentences `hf-vq compress` reads (the first 1,024 of gensim's shuffled
Wikipedia sentences), and put into the otherwise dense model. Fidelity: mean (min) cosine of mean-pooled sentence
embeddings against the dense model on the 256 held-out Lee news sentences `hf-vq compress` reports on. Bits per
weight count the codes and the fp16 scales (and codebooks, amortised over the table).

    .venv/bin/python benchmarks/experiment_embedding_menu.py   # -> results/experiment_embedding_menu.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

torch.set_num_threads(2)

from _common import RESULTS, machine, minilm_path, write  # noqa: E402

OUT = RESULTS / "experiment_embedding_menu"
#: (d, k): the shared menu's options for 1-2 bits, and embedding-only ones with larger codebooks
OPTIONS = ((8, 256), (6, 256), (8, 2048), (8, 4096), (6, 2048), (4, 256), (6, 4096), (4, 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    from hf_vq.calibrate.sources import calibration_texts
    from hf_vq.codec.allocate import option_bits
    from hf_vq.config import LayerLayout, VQConfig
    from hf_vq.evaluate import EVAL_SENTENCES, embedding_cosine, real_sentences
    from hf_vq.integrations.transformers import load_dense
    from hf_vq.integrations.transformers.tools import load_tokenizer
    from hf_vq.codec.pq import decode
    from hf_vq.pipeline.calibrated import _encode_rows_by_use

    source = minilm_path()
    tokenizer, dense = load_tokenizer(source), load_dense(source).eval()
    calibration = calibration_texts(1024)
    ids = tokenizer(calibration, truncation=True, max_length=128)["input_ids"]
    table = dense.embeddings.word_embeddings.weight.detach().float()  # [30522, 384]
    counts = torch.bincount(torch.tensor([i for s in ids for i in s]), minlength=table.shape[0]).double()  # [rows]
    sentences = real_sentences(EVAL_SENTENCES)
    assert not set(sentences) & set(calibration), "calibration and fidelity sentences overlap"
    config = VQConfig()
    rows = []
    for d, k in OPTIONS:
        layout = LayerLayout(kind="embedding", shape=tuple(table.shape), k=k, d=d, scales=True)
        start = time.perf_counter()
        codebooks, codes, scales = _encode_rows_by_use(table, counts, layout, config, seed=0)
        seconds = time.perf_counter() - start
        decoded = decode(codes, codebooks) * scales[:, None]  # [rows, cols]
        model = copy.deepcopy(dense)
        with torch.no_grad():
            model.embeddings.word_embeddings.weight.copy_(decoded)
        fidelity = embedding_cosine(dense, model, tokenizer, sentences)
        bits = option_bits(*table.shape, d=d, k=k, num_codebooks=1, scales=True) / table.numel()
        rows.append({"d": d, "k": k, "bits_per_weight": round(bits, 4), "seconds": round(seconds, 1),
                     "weight_error": round(float((decoded - table).pow(2).sum() / table.pow(2).sum()), 4),
                     "mean_cosine": round(fidelity["mean_cosine"], 4), "min_cosine": round(fidelity["min_cosine"], 4)})
        print(rows[-1], flush=True)
    info = machine()
    lines = ["# MiniLM's word-embedding table at equal bits: block length and codebook size\n",
             f"`python benchmarks/experiment_embedding_menu.py` on {info['device']}, {info['date']}, 2 torch threads. "
             "Only the table is coded (hf-vq compress's embedding encoder, rows weighted by their use in the 1,024 "
             "calibration sentences); the rest of the model is dense. Cosine of mean-pooled sentence embeddings to the "
             "dense model on 256 held-out Lee news sentences.\n",
             "| d | k | bits / weight | weight error | mean cosine | min cosine | encode s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        lines.append(f"| {r['d']} | {r['k']} | {r['bits_per_weight']:.3f} | {r['weight_error']:.4f} | "
                     f"**{r['mean_cosine']:.4f}** | {r['min_cosine']:.4f} | {r['seconds']:.0f} |")
    write(args.out, {"machine": info, "calibration_sentences": len(calibration), "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
