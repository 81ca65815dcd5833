#!/usr/bin/env python
"""How MiniLM's word-embedding table codes at equal bits: longer blocks with larger codebooks against the menu's.

The table (30,522 x 384, half of all-MiniLM-L6-v2's weights) is coded alone with the encoder `hf-vq compress` uses
for embeddings (`hf_vq.pipeline.calibrated._encode_rows_by_use`: k-means on rows drawn by use, per-row scales), its
rows' use counted on the calibration sentences `hf-vq compress` reads (the first 1,024 of gensim's shuffled
Wikipedia sentences), and put into the otherwise dense model. Fidelity: mean (min) cosine of mean-pooled sentence
embeddings against the dense model on the 256 held-out Lee news sentences `hf-vq compress` reports on. Bits per
weight count the codes and the fp16 scales (and codebooks, amortised over the table).

`--aq` adds additive quantization (Sun et al.'s codes, `hf_vq.codec.aq`: M codewords of d values summed per block,
which the format already stores and `VQEmbedding` decodes) at the same bits, coded the same way: codebooks fitted
(residual k-means, then beam search and least squares) on the rows drawn by use, every row encoded by beam search,
per-row scales fitted after. The menu does not offer these options; this measures whether it should.

    .venv/bin/python benchmarks/experiment_embedding_menu.py   # -> results/experiment_embedding_menu.{json,md}
    .venv/bin/python benchmarks/experiment_embedding_menu.py --aq --out benchmarks/results/experiment_embedding_menu_aq
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
#: (M, d, k) of `--aq`: two codebooks at 1.4, 1.5, 1.9 and 2 bits per weight (codes only)
AQ_OPTIONS = ((2, 16, 2048), (2, 16, 4096), (2, 12, 2048), (2, 8, 256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--aq", action="store_true", help="also code the table with two additive codebooks")
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
    for m, d, k in [(1, d, k) for d, k in OPTIONS] + (list(AQ_OPTIONS) if args.aq else []):
        layout = LayerLayout(kind="embedding", shape=tuple(table.shape), k=k, d=d, scales=True)
        start = time.perf_counter()
        if m == 1:
            codebooks, codes, scales = _encode_rows_by_use(table, counts, layout, config, seed=0)
        else:
            codebooks, codes, scales = _additive_by_use(table, counts, layout, m, config, seed=0)
        seconds = time.perf_counter() - start
        decoded = decode(codes, codebooks) * scales[:, None]  # [rows, cols]
        model = copy.deepcopy(dense)
        with torch.no_grad():
            model.embeddings.word_embeddings.weight.copy_(decoded)
        fidelity = embedding_cosine(dense, model, tokenizer, sentences)
        bits = option_bits(*table.shape, d=d, k=k, num_codebooks=m, scales=True) / table.numel()
        rows.append({"method": "aq" if m > 1 else "pq", "num_codebooks": m, "d": d, "k": k,
                     "bits_per_weight": round(bits, 4), "seconds": round(seconds, 1),
                     "weight_error": round(float((decoded - table).pow(2).sum() / table.pow(2).sum()), 4),
                     "mean_cosine": round(fidelity["mean_cosine"], 4), "min_cosine": round(fidelity["min_cosine"], 4)})
        print(rows[-1], flush=True)
    info = machine()
    command = "python benchmarks/experiment_embedding_menu.py" + (" --aq" if args.aq else "")
    lines = ["# MiniLM's word-embedding table at equal bits: block length and codebook size\n",
             f"`{command}` on {info['device']}, {info['date']}, 2 torch threads. "
             "Only the table is coded (hf-vq compress's embedding encoder, rows weighted by their use in the 1,024 "
             "calibration sentences); the rest of the model is dense. Cosine of mean-pooled sentence embeddings to the "
             "dense model on 256 held-out Lee news sentences.\n",
             "| method | M | d | k | bits / weight | weight error | mean cosine | min cosine | encode s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        lines.append(f"| {r.get('method', 'pq')} | {r.get('num_codebooks', 1)} | {r['d']} | {r['k']} | "
                     f"{r['bits_per_weight']:.3f} | {r['weight_error']:.4f} | **{r['mean_cosine']:.4f}** | "
                     f"{r['min_cosine']:.4f} | {r['seconds']:.0f} |")
    write(args.out, {"machine": info, "command": command, "calibration_sentences": len(calibration), "rows": rows},
          "\n".join(lines) + "\n")


def _additive_by_use(matrix: torch.Tensor, counts: torch.Tensor, layout, num_codebooks: int, config, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_encode_rows_by_use` with M additive codebooks: fitted on rows drawn by use, every row beam-searched.

    Returns:
        codebooks `[M, k, d]` (fp16 values), codes `[rows, cols / d, M]`, scales `[rows]`.
    """
    from hf_vq.codec.aq import aq_encode, aq_quantize
    from hf_vq.codec.pq import decode, split_blocks
    from hf_vq.codec.refit import fit_scales
    from hf_vq.pipeline.calibrated import rows_by_use
    from hf_vq.pipeline.encode import unit_rows

    rows, cols = matrix.shape
    sample = rows_by_use(matrix, counts, layout, seed)  # [n_draw, cols]: the rows the PQ encoder fits on
    codebooks, _ = aq_quantize(split_blocks(sample, layout.d), num_codebooks, layout.k, n_iter=config.n_iter,
                               aq_iters=config.aq_iters, beam_size=config.beam_size, anneal=config.anneal, seed=seed)
    codebooks = codebooks.half().float()  # [M, k, d], as stored
    unit, _ = unit_rows(matrix, True)  # [rows, cols]
    codes = aq_encode(split_blocks(unit, layout.d), codebooks, beam_size=config.beam_size)  # [rows * cols / d, M]
    codes = codes.reshape(rows, cols // layout.d, num_codebooks)
    return codebooks, codes, fit_scales(matrix, decode(codes, codebooks))


if __name__ == "__main__":
    main()
