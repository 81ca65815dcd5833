"""all-MiniLM-L6-v2: sentence-embedding fidelity to the dense model before vs after fine-tuning the codebooks.

The embedded default of `hf-vq compress` (k = 256, d = 4 for every linear layer and the token embedding, ~15x) is
made with `hf_vq.quantize_`, saved as a transformers folder, and fine-tuned with the library loop
(`hf_vq.finetune.finetune`, the code behind `scripts/finetune.py`): hidden-state distillation from the dense model
(cosine distance of every token's last hidden state), codebooks + LayerNorms + biases trainable, codes frozen, on
Wikipedia text (gensim's bundled enwiki extract, 206 pages). Fidelity = cosine of mean-pooled sentence embeddings,
compressed vs dense, on held-out text: the 256 sentences of gensim's `lee_background.cor` used by
benchmarks/bench_transformers.py and the last 10% of the Wikipedia pages (never trained on).

    nice .venv/bin/python benchmarks/bench_finetune_minilm.py     # -> benchmarks/results/finetune_minilm.{json,md}
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # thread counts must be fixed before torch / numba start their pools
    _threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else str(min(2, os.cpu_count() or 1))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)

import argparse
import bz2
import re
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, machine, minilm_path, write  # noqa: E402

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wiki_chunks(words_per_chunk: int = 48, held_out: float = 0.1) -> tuple[list[str], list[str]]:
    """Wikipedia text as `(train, held_out)` chunks of ~`words_per_chunk` words; held-out chunks come from other pages."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    pages = []
    for _, text, _ in extract_pages(bz2.open(datapath(WIKI))):
        words = re.sub(r"\s+", " ", re.sub(r"[=*|{}\[\]']+", " ", filter_wiki(text))).split()
        pages.append([" ".join(words[i:i + words_per_chunk]) for i in range(0, len(words) - words_per_chunk + 1,
                                                                           words_per_chunk)])
    cut = int(len(pages) * (1 - held_out))
    return [c for p in pages[:cut] for c in p], [c for p in pages[cut:] for c in p]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--n_iter", type=int, default=100)
    parser.add_argument("--n_wiki_eval", type=int, default=256)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=str(RESULTS / "finetune_minilm"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import hf_vq
    from hf_vq.evaluate import embedding_cosine, real_sentences
    from hf_vq.finetune import FinetuneArguments, finetune
    from hf_vq.integrations.transformers import load_dense, save_compressed
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = load_dense(source).eval()
    train_text, wiki_eval = wiki_chunks()
    wiki_eval = wiki_eval[: args.n_wiki_eval]
    lee = real_sentences(256)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.txt").write_text("\n".join(train_text) + "\n")
        (tmp / "lee.txt").write_text("\n".join(lee) + "\n")
        model = load_dense(source).eval()
        start = time.perf_counter()
        config = hf_vq.quantize_(model, hf_vq.VQConfig(n_iter=args.n_iter), progress=False)
        quantize_s = time.perf_counter() - start
        save_compressed(model, tmp / "vq", source_dir=source, base_model="sentence-transformers/all-MiniLM-L6-v2")
        before_wiki = embedding_cosine(dense, model, tokenizer, wiki_eval)
        size = hf_vq.checkpoint_size_report(tmp / "vq")

        ft_args = FinetuneArguments(
            model_name_or_path=str(tmp / "vq"), teacher_name_or_path=str(source), train_file=str(tmp / "train.txt"),
            validation_file=str(tmp / "lee.txt"), output_dir=str(tmp / "ft"), max_train_steps=args.steps,
            per_device_train_batch_size=args.batch, per_device_eval_batch_size=64, learning_rate=args.lr,
            lr_scheduler_type="cosine", max_seq_length=args.max_seq_length, loss="hidden", hidden_target="last",
            hidden_loss="cosine", eval_every_epoch=False, seed=0, progress=args.progress)
        start = time.perf_counter()
        result = finetune(ft_args)
        finetune_s = time.perf_counter() - start
        tuned = AutoModel.from_pretrained(tmp / "ft").eval()  # the saved, Hub-ready folder
        after_lee = embedding_cosine(dense, tuned, tokenizer, lee)
        after_wiki = embedding_cosine(dense, tuned, tokenizer, wiki_eval)
        size_after = hf_vq.checkpoint_size_report(tmp / "ft")
        card = (tmp / "ft" / "README.md").read_text()

    r4 = lambda x: round(float(x), 4)  # noqa: E731
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2", "spec": config.spec, "n_iter": args.n_iter,
        "permute": config.permute, "dense_mb": r4(size.dense_mb), "compressed_mb": r4(size.compressed_mb),
        "ratio": round(size.ratio, 2), "compressed_mb_after_ft": r4(size_after.compressed_mb),
        "train_data": f"gensim {WIKI}: {len(train_text)} chunks of 48 words (first 90% of the pages)",
        "finetune": {"steps": result.completed_steps, "batch": args.batch, "lr": args.lr, "schedule": "cosine",
                     "loss": "1 - cosine of every token's last hidden state to the dense model",
                     "trainable": result.trainable, "max_seq_length": args.max_seq_length},
        "lee_256": {"before": {"mean": r4(result.metrics_before["eval_cosine"]),
                               "min": r4(result.metrics_before["eval_cosine_min"])},
                    "after": {"mean": r4(after_lee["mean_cosine"]), "min": r4(after_lee["min_cosine"])}},
        "wiki_held_out": {"n": len(wiki_eval),
                          "before": {"mean": r4(before_wiki["mean_cosine"]), "min": r4(before_wiki["min_cosine"])},
                          "after": {"mean": r4(after_wiki["mean_cosine"]), "min": r4(after_wiki["min_cosine"])}},
        "card_has_metrics": "before fine-tuning" in card,
        "quantize_s": round(quantize_s, 1), "finetune_s": round(finetune_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "command": "nice .venv/bin/python benchmarks/bench_finetune_minilm.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
    }
    lee_r, wiki_r = data["lee_256"], data["wiki_held_out"]
    md = f"""# all-MiniLM-L6-v2: embedding fidelity before vs after fine-tuning the codebooks

Scheme `{config.spec}` (k = 256, d = 4 for every linear and the token embedding, {args.n_iter} k-means iterations,
permutation {config.permute}): {size.dense_mb:.2f} MB → {size.compressed_mb:.2f} MB accounted ({size.ratio:.1f}×).
Fine-tuned with `hf_vq.finetune` for {result.completed_steps} steps (batch {args.batch}, Adam lr {args.lr:g}, cosine,
max {args.max_seq_length} tokens) on Wikipedia text (gensim's enwiki extract, {len(train_text)} chunks of 48 words
from the first 90% of the pages): loss = 1 − cosine of every token's last hidden state to the dense model; codebooks,
LayerNorms and biases train, codes stay frozen (size unchanged: {size_after.compressed_mb:.2f} MB).

Cosine of mean-pooled sentence embeddings, compressed vs dense, on held-out text:

| held-out text | before fine-tuning (mean / min) | after fine-tuning (mean / min) |
|---|---|---|
| 256 sentences of `lee_background.cor` (news) | {lee_r['before']['mean']:.4f} / {lee_r['before']['min']:.4f} | **{lee_r['after']['mean']:.4f}** / {lee_r['after']['min']:.4f} |
| {wiki_r['n']} Wikipedia chunks from unseen pages | {wiki_r['before']['mean']:.4f} / {wiki_r['before']['min']:.4f} | **{wiki_r['after']['mean']:.4f}** / {wiki_r['after']['min']:.4f} |

Compression {quantize_s:.0f} s, fine-tuning {finetune_s / 60:.1f} min (evaluation included), whole benchmark
{data['total_s'] / 60:.1f} min on {data['machine']['device']}, {args.threads} torch thread(s).
Reproduce: `{data['command']}`.
"""
    write(args.out, data, md)


if __name__ == "__main__":
    main()
