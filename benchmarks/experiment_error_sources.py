#!/usr/bin/env python
"""Where the default MiniLM checkpoint loses its fidelity: the word-embedding table against everything else.

`hf-vq compress` with no flags (all-MiniLM-L6-v2, bits allocated to a 10x smaller file) is scored, as the CLI
reports it, by the mean cosine of mean-pooled sentence embeddings against the dense model on 256 held-out Lee news
sentences (calibration: Wikipedia sentences). Then parts are swapped between the two models:

* **compressed, word embeddings dense**: the compressed model with the dense word-embedding table put back — what
  everything else costs;
* **dense, word embeddings compressed**: the dense model with the decoded compressed table — what the table alone
  costs.

The word-embedding table is never permuted (the permutation search reorders channels inside attention and MLP
blocks), so the swap is exact. The other layers are not swapped one by one: a permuted layer is only equivalent to
the dense one together with its coupled partners.

    .venv/bin/python benchmarks/experiment_error_sources.py                  # compresses (~2.5 min on 2 cores)
    .venv/bin/python benchmarks/experiment_error_sources.py --checkpoint DIR # scores an existing compressed MiniLM
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(2)

from _common import RESULTS, machine, minilm_path, write  # noqa: E402

OUT = RESULTS / "experiment_error_sources"


def table_swaps(dense: torch.nn.Module, compressed: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The compressed MiniLM as it is, with the dense word-embedding table put back (what everything else costs),
    and the dense model with the compressed table decoded into it (what the table alone costs): `(variant, model)`.
    """
    with torch.no_grad():
        table_only = copy.deepcopy(dense)
        table_only.embeddings.word_embeddings.weight.copy_(compressed.embeddings.word_embeddings.decode_weight())  # [30522, 384]
    rest_only = copy.deepcopy(compressed)
    rest_only.embeddings.word_embeddings = copy.deepcopy(dense.embeddings.word_embeddings)
    return [("compressed (as hf-vq compress writes it)", compressed), ("compressed, word embeddings dense", rest_only),
            ("dense, word embeddings compressed", table_only)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a compressed MiniLM folder (default: compress one with hf-vq compress)")
    parser.add_argument("--about", default="", help="where --checkpoint came from (printed in the report)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer

    from hf_vq.cli import main as cli
    from hf_vq.evaluate import EVAL_SENTENCES, embedding_cosine, real_sentences

    source = minilm_path()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint
        if folder is None:
            folder = str(Path(tmp) / "vq")
            if cli(["compress", str(source), "--out", folder, "--quiet", "--no-eval"]) != 0:
                raise RuntimeError("hf-vq compress failed")
        tokenizer = AutoTokenizer.from_pretrained(source)
        dense = AutoModel.from_pretrained(source).eval()
        compressed = AutoModel.from_pretrained(folder).eval()
    sentences = real_sentences(EVAL_SENTENCES)
    table = compressed.embeddings.word_embeddings
    rows = []
    for variant, model in table_swaps(dense, compressed):
        result = embedding_cosine(dense, model, tokenizer, sentences)
        rows.append({"variant": variant, **result})
        print(rows[-1], flush=True)
    weights = sum(p.numel() for p in dense.parameters())
    share = dense.embeddings.word_embeddings.weight.numel() / weights
    loss = {r["variant"]: 1 - r["mean_cosine"] for r in rows}
    info = machine()
    lines = ["# Where the default MiniLM checkpoint loses fidelity\n",
             f"`python benchmarks/experiment_error_sources.py{' --checkpoint ' + args.checkpoint if args.checkpoint else ''}` "
             f"on {info['device']}, {info['date']}. Mean (min) cosine of mean-pooled sentence embeddings against "
             "the dense model on 256 held-out Lee news sentences; see the script's docstring. The word-embedding "
             f"table holds {share:.0%} of the weights; compressed by `{table.extra_repr().split('vq=')[-1]}` "
             f"({table.compressed_bits() / table.weight_shape[0] / table.weight_shape[1]:.2f} bits per weight)."
             + (f" Checkpoint: {args.about}" if args.about else "") + "\n",
             "| variant | mean cosine | min cosine | 1 − mean |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {1 - r['mean_cosine']:.4f} |"
              for r in rows]
    lines.append(f"\nThe table alone costs {loss['dense, word embeddings compressed']:.4f} of cosine, everything else "
                 f"{loss['compressed, word embeddings dense']:.4f}; together "
                 f"{loss['compressed (as hf-vq compress writes it)']:.4f}.")
    write(args.out, {"machine": info, "checkpoint": args.checkpoint, "about": args.about, "word_embedding_share": share, "rows": rows},
          "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
