#!/usr/bin/env python
"""Exploratory experiment: output-aware vector quantization of all-MiniLM-L6-v2's linears (hf_vq.codec.output_aware).

Every encoder linear (36) and the pooler is replaced by its decoded approximation in a dense copy (a simulation of
the compressed model: same codes and codebooks, no packing). The word embeddings are either left dense or
compressed with plain annealed k-means at the same d, k (`--embeddings`), identically for every variant, so only
the linears differ. H = XᵀX of each linear's inputs (padding excluded) comes from the dense model on the first
`--calibration` sentences of gensim's `lee_background.cor`. Fidelity = cosine of mean-pooled `last_hidden_state`
against the dense model, on text the Hessians never saw: the last 256 sentences of `lee_background.cor` and 256
chunks of 48 words of gensim's Wikipedia extract.

Variants (codes of every linear, d and k per setting):
  kmeans     plain annealed k-means (100 iterations), the data-free path
  wkmeans    k-means weighted by diag(H) of each entry's column (100 iterations)
  oa         encode_output_aware: weighted init, GPTQ pass with error feedback, refit/re-assign alternations
  oa+scales  the same with per-output-channel fp16 scales
  oa-aq      the same with additive codebooks, layout from --aq (MxBxd: M codebooks of 2**B codewords,
             subvectors of d; the default 2x8x8 is 2 bits/weight, whatever the setting's d, k)

    nice .venv/bin/python benchmarks/experiment_output_aware.py --settings 4x256,3x512 \
        --variants kmeans,wkmeans,oa,oa+scales --embeddings kmeans

Writes benchmarks/results/experiment_output_aware.{json,md}.
"""
from __future__ import annotations

import argparse
import bz2
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, machine, minilm_path, write  # noqa: E402

from hf_vq.codec.allocate import Option, allocate_bits, option_bits  # noqa: E402
from hf_vq.codec.hessian import output_error  # noqa: E402
from hf_vq.codec.kmeans import kmeans  # noqa: E402
from hf_vq.codec.output_aware import encode_output_aware, hessian_entry_weights  # noqa: E402
from hf_vq.codec.pq import clamp_k, decode, split_blocks  # noqa: E402

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def lee_sentences() -> list[str]:
    """Every sentence of >= 6 words of gensim's lee_background.cor, in file order."""
    from gensim.test.utils import datapath

    out = []
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for doc in f:
            for s in doc.replace("?", ".").replace("!", ".").split(". "):
                s = s.strip()
                if len(s.split()) >= 6:
                    out.append(s if s.endswith(".") else s + ".")
    return out


def wiki_chunks(n: int, words: int = 48) -> list[str]:
    """`n` chunks of `words` words of gensim's Wikipedia extract, one page after another."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath

    out = []
    for _, text, _ in extract_pages(bz2.open(datapath(WIKI))):
        toks = re.sub(r"\s+", " ", re.sub(r"[=*|{}\[\]']+", " ", filter_wiki(text))).split()
        out += [" ".join(toks[i:i + words]) for i in range(0, len(toks) - words + 1, words)][:4]  # <= 4 per page
        if len(out) >= n:
            return out[:n]
    return out


def batches(tok, sentences: list[str], size: int = 32):
    for i in range(0, len(sentences), size):
        yield tok(sentences[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")


@torch.no_grad()
def capture_hessians(model, tok, sentences: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    """XᵀX `[cols, cols]` (float64) of the inputs of each named linear, over real (non-padding) tokens."""
    modules = dict(model.named_modules())
    hess: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, inputs, _output):
            x = inputs[0]
            x = x[mask["m"]] if x.ndim == 3 else x  # [tokens, cols] (the pooler sees one token per sentence)
            x = x.double()
            hess[name] = hess.get(name, 0) + x.T @ x
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        for batch in batches(tok, sentences):
            mask["m"] = batch["attention_mask"].bool()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return hess


@torch.no_grad()
def embeddings(model, tok, sentences: list[str]) -> torch.Tensor:
    out = []
    for batch in batches(tok, sentences):
        hidden = model(**batch).last_hidden_state  # [B, T, hidden]
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        out.append((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9))
    return torch.cat(out)  # [n, hidden]


def cosine(ref: torch.Tensor, model, tok, sentences: list[str]) -> dict:
    cos = F.cosine_similarity(ref, embeddings(model, tok, sentences), dim=-1)  # [n]
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def compress(variant: str, w: torch.Tensor, h: torch.Tensor, k: int, d: int, seed: int, aq: str) -> tuple[torch.Tensor, int]:
    """Decoded approximation `[rows, cols]` of `w` by one variant, and its size in bits (codes, fp16 codebooks, scales)."""
    rows, cols = w.shape
    k = clamp_k(k, w.numel() // d)
    if variant in ("kmeans", "wkmeans"):
        weights = hessian_entry_weights(h, w.shape[0], d) if variant == "wkmeans" else None
        book, codes = kmeans(split_blocks(w, d), k, seed=seed, weights=weights)  # [k, d], [n]
        return book[codes].reshape(w.shape), option_bits(rows, cols, d=d, k=k)
    if variant == "oa-aq":
        m, bits, dd = (int(v) for v in aq.split("x"))  # "MxBxd", e.g. 2x8x8
        r = encode_output_aware(w, h, k=2 ** bits, d=dd, num_codebooks=m, seed=seed)
        size = option_bits(rows, cols, d=dd, k=2 ** bits, num_codebooks=m)
    else:
        r = encode_output_aware(w, h, k=k, d=d, scales=variant == "oa+scales", seed=seed)
        size = option_bits(rows, cols, d=d, k=k, scales=variant == "oa+scales")
    out = decode(r.codes, r.codebooks)
    return (out if r.scales is None else out * r.scales[:, None]), size


@torch.no_grad()
def sensitivities(dense, tok, sentences: list[str], hess: dict, eps: float = 0.01, seed: int = 0) -> dict[str, float]:
    """HIGGS-style layer sensitivity: (1 − mean cosine) per unit of relative output error, measured by adding Gaussian
    noise of relative output error `eps` to one layer's weight at a time (calibration sentences)."""
    ref = embeddings(dense, tok, sentences)
    modules = dict(dense.named_modules())
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, h in hess.items():
        w = modules[name].weight
        original = w.detach().clone()
        noise = torch.randn(w.shape, generator=gen)  # [rows, cols]
        noise *= (eps / output_error(original, original + noise, h)) ** 0.5  # now exactly eps relative output error
        w.add_(noise)
        out[name] = float(1 - F.cosine_similarity(ref, embeddings(dense, tok, sentences), dim=-1).mean()) / eps
        w.copy_(original)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="4x256,3x512", help="comma-separated dxk")
    ap.add_argument("--variants", default="kmeans,wkmeans,oa,oa+scales")
    ap.add_argument("--embeddings", choices=("dense", "kmeans"), default="kmeans")
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--aq", default="2x8x8", help="oa-aq layout MxBITSxd (bits/weight = M*BITS/d)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allocate", type=float, default=None,
                    help="also allocate, per linear, among the settings' oa/oa+scales results to this many bits/weight")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "experiment_output_aware"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    dense = AutoModel.from_pretrained(minilm_path()).eval()
    lee = lee_sentences()
    calib, held_lee, wiki = lee[:args.calibration], lee[-256:], wiki_chunks(256)
    assert len(lee) - 256 >= args.calibration, "calibration and held-out sentences overlap"
    names = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)]
    t0 = time.perf_counter()
    hess = capture_hessians(dense, tok, calib, names)
    t_hess = time.perf_counter() - t0
    ref = {"lee": embeddings(dense, tok, held_lee), "wiki": embeddings(dense, tok, wiki)}
    rows, decoded, embedding_weights = [], {}, {}
    for setting in args.settings.split(","):
        d, k = (int(v) for v in setting.split("x"))
        model = AutoModel.from_pretrained(minilm_path()).eval()
        emb = model.embeddings.word_embeddings.weight
        if args.embeddings == "kmeans":
            t0 = time.perf_counter()
            book, codes = kmeans(split_blocks(emb.detach(), d), clamp_k(k, emb.numel() // d), seed=args.seed)
            with torch.no_grad():
                emb.copy_(book[codes].reshape(emb.shape))
            embedding_weights[setting] = emb.detach().clone()
            print(f"d={d} k={k}: embeddings k-means {time.perf_counter() - t0:.1f}s", flush=True)
        originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in hess}
        for variant in args.variants.split(","):
            modules = dict(model.named_modules())
            t0, c0 = time.perf_counter(), time.process_time()
            errors, sizes, decoded[setting, variant] = {}, {}, {}
            for name in names:
                w = originals[name]
                approx, sizes[name] = compress(variant, w, hess[name], k, d, args.seed, args.aq)
                errors[name] = output_error(w, approx, hess[name])
                decoded[setting, variant][name] = approx
                with torch.no_grad():
                    modules[name].weight.copy_(approx)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            row = {"d": d, "k": k, "variant": variant, "seconds": seconds, "cpu_seconds": cpu_seconds,
                   "bits_per_weight": sum(sizes.values()) / sum(originals[n].numel() for n in names),
                   "lee": cosine(ref["lee"], model, tok, held_lee),
                   "wiki": cosine(ref["wiki"], model, tok, wiki), "mean_output_error": sum(errors.values()) / len(errors),
                   "output_errors": errors}
            if variant == "oa-aq":
                row["aq"] = args.aq
            rows.append(row)
            print(f"d={d} k={k} {variant}: lee {row['lee']['mean']:.4f} wiki {row['wiki']['mean']:.4f} "
                  f"mean output error {row['mean_output_error']:.4f} {seconds:.1f}s", flush=True)
    data = {"machine": machine(), "calibration_sentences": len(calib), "embeddings": args.embeddings,
            "hessian_seconds": t_hess, "argv": sys.argv[1:], "rows": rows}
    if args.allocate:
        data["sensitivity"] = sensitivities(dense, tok, calib[:64], hess)
        data["allocated"] = allocated(args, data, decoded, embedding_weights, names, tok, ref, held_lee, wiki)
    write(args.out, data, markdown(data))


def allocated(args, data: dict, decoded: dict, embedding_weights: dict, names: list[str], tok, ref: dict,
              held_lee: list[str], wiki: list[str]) -> list[dict]:
    """Per linear, the setting chosen by `allocate_bits` (distortion = sensitivity x calibration output error) at
    `--allocate` bits/weight of the linears; embeddings as compressed at the first setting."""
    from transformers import AutoModel

    settings = args.settings.split(",")
    out = []
    for variant in ("oa", "oa+scales"):
        if not all((s, variant) in decoded for s in settings):
            continue
        by_setting = {s: next(r for r in data["rows"] if r["variant"] == variant and f"{r['d']}x{r['k']}" == s)
                      for s in settings}
        model = AutoModel.from_pretrained(minilm_path()).eval()
        modules = dict(model.named_modules())
        options, numel = [], 0
        for name in names:
            rows_, cols = modules[name].weight.shape
            numel += rows_ * cols
            options.append([Option(option_bits(rows_, cols, d=int(s.split("x")[0]), k=clamp_k(int(s.split("x")[1]),
                                               rows_ * cols // int(s.split("x")[0])), scales=variant == "oa+scales"),
                                   data["sensitivity"][name] * by_setting[s]["output_errors"][name], s)
                            for s in settings])
        alloc = allocate_bits(options, args.allocate * numel)
        with torch.no_grad():
            if settings[0] in embedding_weights:
                model.embeddings.word_embeddings.weight.copy_(embedding_weights[settings[0]])
            for name, label in zip(names, alloc.labels):
                modules[name].weight.copy_(decoded[label, variant][name])
        row = {"variant": f"{variant} allocated", "bits_per_weight": alloc.bits / numel, "labels": alloc.labels,
               "lee": cosine(ref["lee"], model, tok, held_lee), "wiki": cosine(ref["wiki"], model, tok, wiki),
               "count": {s: alloc.labels.count(s) for s in settings}}
        print(f"{row['variant']}: {row['bits_per_weight']:.3f} bits/weight {row['count']} lee {row['lee']['mean']:.4f} "
              f"wiki {row['wiki']['mean']:.4f}", flush=True)
        out.append(row)
    return out


def markdown(data: dict) -> str:
    lines = ["# Output-aware VQ of all-MiniLM-L6-v2's linears (exploratory simulation)\n",
             f"Machine: {data['machine']['device']}, torch threads {data['machine']['torch_threads']}, "
             f"{data['machine']['date']}. H from {data['calibration_sentences']} sentences of lee_background.cor "
             f"({data['hessian_seconds']:.1f} s). Word embeddings: "
             f"{'dense' if data['embeddings'] == 'dense' else 'plain k-means at the same d, k'} in every row. "
             "Fidelity: mean (min) cosine of mean-pooled sentence embeddings vs dense on 256 held-out "
             "lee_background sentences and 256 Wikipedia chunks. Bits/weight of the 37 linears: codes + fp16 "
             "codebooks (+ fp16 scales). Time: compressing the 37 linears, wall and process CPU seconds (the "
             "machine is shared: CPU seconds are the steadier figure). "
             "See the docstring of benchmarks/experiment_output_aware.py.\n",
             "| d, k (bits of codes) | variant | bits/weight | cosine lee | cosine wiki | mean layer output error | "
             "wall s | CPU s |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        label = r["variant"]
        bits = f"{r['d']}, {r['k']} ({(r['k'] - 1).bit_length() / r['d']:.2f})"
        if "aq" in r:  # M codebooks of 2**B codewords on subvectors of d
            m, b, dd = (int(v) for v in r["aq"].split("x"))
            label, bits = f"{label} (M={m})", f"{dd}, {m}x{2 ** b} ({m * b / dd:.2f})"
        lines.append(f"| {bits} | {label} | {r['bits_per_weight']:.3f} | {r['lee']['mean']:.4f} ({r['lee']['min']:.3f}) "
                     f"| {r['wiki']['mean']:.4f} ({r['wiki']['min']:.3f}) | {r['mean_output_error']:.4f} "
                     f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    for r in data.get("allocated", []):
        mix = ", ".join(f"{n} x {s}" for s, n in r["count"].items())
        lines.append(f"| mixed ({mix}) | {r['variant']} | {r['bits_per_weight']:.3f} | {r['lee']['mean']:.4f} "
                     f"({r['lee']['min']:.3f}) | {r['wiki']['mean']:.4f} ({r['wiki']['min']:.3f}) | | | |")
    if data.get("allocated"):
        lines.append("\nAllocated rows: per linear, the setting chosen by `hf_vq.codec.allocate.allocate_bits` at the "
                     "given budget, distortion = layer sensitivity (1 − cosine per unit relative output error, measured "
                     "by injecting noise into one layer at a time on 64 calibration sentences) × the layer's calibration "
                     "output error; no re-encoding (the settings' results are reused); embeddings as in the first setting.")
    lines.append(f"\n```bash\nnice .venv/bin/python benchmarks/experiment_output_aware.py {' '.join(data['argv'])}\n```\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
