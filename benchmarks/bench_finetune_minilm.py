"""all-MiniLM-L6-v2 at 16x: what fine-tuning after `hf-vq compress` recovers, by what it trains.

The model is compressed exactly as users do it (`hf-vq compress --ratio 16`: calibrated engine, bit allocation,
per-output-channel scales; calibration on the first of gensim's shuffled Wikipedia sentences, as many as its
default takes), then each variant
fine-tunes a fresh copy of that checkpoint with the library call behind `hf-vq compress --finetune-steps`
(`hf_vq.finetune.recipe.finetune_compressed`): distillation from the dense model (1 − cosine of the mean-pooled
sentence embeddings), on the Wikipedia sentences after the calibration ones, with 128 further sentences held out for early
stopping. Fidelity is the cosine of mean-pooled sentence embeddings to the dense model on text never trained on:
the 256 news sentences of gensim's `lee_background.cor` (what `hf-vq compress` reports) and 256 Wikipedia sentences
beyond the training ones. Same steps for every variant; wall-clock on the benchmark's CPU threads.

Variants: `codebooks` (codebooks only), `all` (codebooks, scales, LayerNorms, biases — the default), `all + codes`
(also re-assigning codes: `code_update_fraction`, `code_optimizer`); learning rates: `one-lr-2e-4` (one rate for
every tensor, the recipe before `scale_parameter`), `rms-1e-3` and `rms-1e-2` (other multiples of each tensor's RMS
than the default 3e-3). Also one training step (forward + backward, batch 16) of the compressed vs the dense model,
in the same process, in float32 and under bfloat16 autocast (what the recipe uses where the CPU has native bf16).
Before and after each variant the news cosine is split (`experiment_error_sources.table_swaps`): the model with the
dense word-embedding table put back, and the dense model with only the compressed table. `--tune-steps N` (and
`--tune-lr`) go to `hf-vq compress`: at 16x it block-tunes by default (400 steps at 3e-4, what
`finetune_minilm_tuned` gives explicitly); `--tune-steps 0` starts from the untuned checkpoint, as `finetune_minilm`
(run before tuning was the default) did.

    .venv/bin/python benchmarks/bench_finetune_minilm.py --tune-steps 0   # -> results/finetune_minilm.{json,md,png}
    .venv/bin/python benchmarks/bench_finetune_minilm.py --tune-steps 400 --tune-lr 3e-4 --default-steps 0 \
        --out benchmarks/results/finetune_minilm_tuned   # the block-tuned start (~50 min)
    .venv/bin/python benchmarks/bench_finetune_minilm.py --variants all,one-lr-2e-4,rms-1e-3,rms-1e-2 --steps 600 \
        --default-steps 0 --tune-steps 0 --out benchmarks/results/experiment_finetune_lr   # (run at 5f1d9b9: float32, dropout on)
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    import _threads  # noqa: F401 - thread counts fixed before torch / numba start their pools

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, machine, minilm_path, write  # noqa: E402

VARIANTS = {
    "codebooks": dict(train_scales=False, train_norms=False, train_biases=False),
    "all": {},
    "all + codes": dict(code_update_fraction=0.002, code_update_every=20),
    # the learning rate: one rate for every tensor (the recipe before scale_parameter) or other multiples of the RMS
    "one-lr-2e-4": dict(scale_parameter=False, learning_rate=2e-4),
    "rms-1e-3": dict(learning_rate=1e-3),
    "rms-1e-2": dict(learning_rate=1e-2),
}


def step_times(dense, model, tokenizer, texts: list[str], repeats: int = 10) -> dict[str, float]:
    """Median seconds of one training step (forward, 1 − cosine loss, backward) for the dense and compressed model,
    in float32 and under bfloat16 autocast (`dense`, `compressed`, `dense bf16`, `compressed bf16`)."""
    from hf_vq.finetune import mark_trainable_

    batch = dict(tokenizer(texts[:16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    mark_trainable_(model)
    dense.requires_grad_(True)
    out = {}
    for suffix, bf16 in (("", False), (" bf16", True)):
        for name, net in (("dense", dense), ("compressed", model)):
            net.train()
            times = []
            for _ in range(repeats + 2):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    hidden = net(**batch).last_hidden_state.float()
                (1 - torch.nn.functional.cosine_similarity(hidden, hidden.detach() + 1, dim=-1)).mean().backward()
                times.append(time.perf_counter() - start)
                net.zero_grad(set_to_none=True)
            out[name + suffix] = sorted(times[2:])[len(times[2:]) // 2]
            net.eval()
    dense.requires_grad_(False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tune-steps", type=int, default=None,
                        help="hf-vq compress --tune-steps (block-wise tuning; default: hf-vq compress's)")
    parser.add_argument("--tune-lr", type=float, default=None, help="hf-vq compress --tune-lr")
    parser.add_argument("--variants", default="codebooks,all,all + codes")
    parser.add_argument("--default-steps", type=int, default=300,
                        help="also run `hf-vq compress --finetune-steps N` on the embedded default (0: skip)")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--out", default=str(RESULTS / "finetune_minilm"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md/.png from the existing .json")
    args = parser.parse_args()
    from experiment_error_sources import table_swaps

    torch.set_num_threads(args.threads)
    if args.render_only:
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        write(args.out, data, _markdown(data))
        _plot(data["curves"], Path(args.out).with_suffix(".png"))
        return

    from hf_vq.cli import main as cli
    from hf_vq.data import real_sentences, wikipedia_sentences
    from hf_vq.evaluate import embedding_cosine
    from hf_vq.finetune.recipe import DEFAULT_FINETUNE, finetune_compressed
    from hf_vq.integrations.transformers import load_dense
    from hf_vq.integrations.transformers.tools import load_tokenizer
    from transformers import AutoModel

    source = minilm_path()
    tokenizer = load_tokenizer(source)
    dense = load_dense(source).eval()
    lee = real_sentences(256)
    wiki = wikipedia_sentences()
    wiki_eval = wiki[-256:]  # the tail of the shuffled sentences: beyond every training sentence below
    rows, curves = [], {}

    def split(model) -> dict[str, float]:
        """Lee cosine of the model with the dense word-embedding table put back, and of the dense model with only the
        compressed table (experiment_error_sources.py): what everything else, and what the table, costs."""
        _, (_, rest), (_, table) = table_swaps(dense, model)
        return {"lee_table_dense": round(embedding_cosine(dense, rest, tokenizer, lee)["mean_cosine"], 4),
                "lee_only_table": round(embedding_cosine(dense, table, tokenizer, lee)["mean_cosine"], 4)}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tuning = ["--tune-steps", str(args.tune_steps)] if args.tune_steps is not None else []
        tuning += ["--tune-lr", f"{args.tune_lr:g}"] if args.tune_steps != 0 and args.tune_lr else []
        cli(["compress", "--ratio", f"{args.ratio:g}", "--out", f"{tmp}/vq", "--quiet", "--json", f"{tmp}/report.json",
             *tuning])
        compress_s = time.perf_counter() - start
        report = json.loads(Path(f"{tmp}/report.json").read_text())
        calibration = int(report["record"]["calibration"]["samples"])  # the first Wikipedia sentences, as compress used
        needed = calibration + args.steps * DEFAULT_FINETUNE["batch_size"] + DEFAULT_FINETUNE["held_out"]
        assert needed <= len(wiki) - 256, f"{needed} training sentences overlap the held-out Wikipedia tail"
        model = AutoModel.from_pretrained(f"{tmp}/vq").eval()
        before = {"lee": embedding_cosine(dense, model, tokenizer, lee),
                  "wiki": embedding_cosine(dense, model, tokenizer, wiki_eval), "split": split(model)}
        steps = step_times(dense, AutoModel.from_pretrained(f"{tmp}/vq"), tokenizer, lee)
        for name in args.variants.split(","):
            model = AutoModel.from_pretrained(f"{tmp}/vq").eval()
            start = time.perf_counter()
            result = finetune_compressed(model, dense, steps=args.steps, tokenizer=tokenizer, skip=calibration,
                                         progress=False, **VARIANTS[name])
            seconds = time.perf_counter() - start
            after = {"lee": embedding_cosine(dense, model, tokenizer, lee),
                     "wiki": embedding_cosine(dense, model, tokenizer, wiki_eval), "split": split(model)}
            changed = [h["codes_changed"] for h in result.history if "codes_changed" in h]
            rows.append({"variant": name, "settings": VARIANTS[name], "trainable": result.trainable,
                         "mixed_precision": result.arguments.mixed_precision,
                         "steps": result.completed_steps, "best_step": result.best_step, "seconds": round(seconds, 1),
                         "lee_mean": round(after["lee"]["mean_cosine"], 4), "lee_min": round(after["lee"]["min_cosine"], 4),
                         "wiki_mean": round(after["wiki"]["mean_cosine"], 4), **after["split"],
                         "codes_changed_total": round(sum(changed), 4) if changed else None})
            curves[name] = {"loss": [(h["step"], h["loss"]) for h in result.history],
                            "held_out": [(e["step"], e["eval_loss"]) for e in result.evaluations]}
            print(rows[-1], flush=True)
        default = _default_cli(cli, tmp, args.default_steps) if args.default_steps else None
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    data = {"model": "sentence-transformers/all-MiniLM-L6-v2", "ratio": report["ratio"], "compress_s": round(compress_s, 1),
            "calibration_sentences": calibration, "tune_steps": args.tune_steps, "tune_lr": args.tune_lr,
            "compressed_mb": report.get("compressed_mb"),
            "before": {"lee_mean": r4(before["lee"]["mean_cosine"]), "lee_min": r4(before["lee"]["min_cosine"]),
                       "wiki_mean": r4(before["wiki"]["mean_cosine"]), **before["split"]},
            "recipe": {**DEFAULT_FINETUNE, "steps": args.steps, "schedule": "cosine", "optimizer": "AdamW"},
            "train_step_s": {k: round(v, 4) for k, v in steps.items()},
            "variants": rows, "curves": curves, "default_cli": default,
            "command": "python benchmarks/bench_finetune_minilm.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "out": Path(args.out).name,
            "threads": args.threads}
    write(args.out, data, _markdown(data))
    _plot(curves, Path(args.out).with_suffix(".png"))


def _default_cli(cli, tmp: str, steps: int) -> dict:
    """`hf-vq compress` (the embedded default) with `--finetune-steps steps`: its report's fidelity before / after."""
    from bench_finetune_compress import compress_with_finetuning

    row = compress_with_finetuning(cli, ["--out", f"{tmp}/default", "--finetune-steps", str(steps)], f"{tmp}/d.json")
    return {**row, "command": row["command"].replace(f"{tmp}/", "")}


def _markdown(data: dict) -> str:
    b = data["before"]
    tuned = (f" --tune-steps {data['tune_steps']}" + (f" --tune-lr {data['tune_lr']:g}" if data.get("tune_lr") else "")
             if data.get("tune_steps") else "")
    swaps = "lee_table_dense" in b  # the table / the rest split was measured (runs after 2026-12-06)
    split = (lambda r: f" | {r['lee_table_dense']:.4f} | {r['lee_only_table']:.4f}") if swaps else (lambda r: "")
    lines = [f"# all-MiniLM-L6-v2 at {data['ratio']:.1f}×: fine-tuning after `hf-vq compress --ratio {data['ratio']:.0f}{tuned}`", "",
             f"`{data['command']}` on {data['machine']['device']}, {data['threads']} torch threads. Compression "
             f"{data['compress_s']:.0f} s. Fine-tuning: `finetune_compressed` (what `hf-vq compress --finetune-steps` "
             f"runs): batch {data['recipe']['batch_size']}, AdamW lr {data['recipe']['learning_rate']:g}"
             + (" × each tensor's RMS" if data["recipe"].get("scale_parameter") else "")
             + (", no dropout" if data["recipe"].get("dropout") is False else "")
             + "".join(sorted({f", {r['mixed_precision']} autocast" for r in data["variants"] if r.get("mixed_precision")}))
             + ", cosine "
             f"schedule, at most {data['recipe']['steps']} steps, early stopping on {data['recipe']['held_out']} held-out "
             "Wikipedia sentences (every 50 steps, patience 3). Trained on gensim's Wikipedia sentences after the "
             f"{data.get('calibration_sentences', 256)} calibration used; fidelity on 256 Lee news sentences and 256 other Wikipedia sentences, never trained on."
             + (" Two more Lee cosines split the loss (`experiment_error_sources.table_swaps`): the model with the "
                "dense word-embedding table put back (what everything else costs) and the dense model with only the "
                "compressed table (what the table costs)." if swaps else ""),
             "", "| variant | settings | trains | steps (best) | best held-out loss | minutes | Lee cosine mean / min | "
             "Wikipedia cosine | codes moved" + (" | Lee, table dense | Lee, only the table compressed" if swaps else "")
             + " |", "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if swaps else ""),
             f"| before fine-tuning | - | - | - | - | - | {b['lee_mean']:.4f} / {b['lee_min']:.4f} | {b['wiki_mean']:.4f} | -"
             + split(b) + " |"]
    for r in data["variants"]:
        trains = ", ".join(f"{k} {v:,}" for k, v in r["trainable"].items() if k not in ("frozen", "unused_frozen") and v)
        moved = "-" if r["codes_changed_total"] is None else f"{100 * r['codes_changed_total']:.2f}% (sum)"
        settings = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "the recipe's"
        held = data["curves"].get(r["variant"], {}).get("held_out") or [(None, float("nan"))]
        lines.append(f"| {r['variant']} | {settings} | {trains} | {r['steps']} ({r['best_step']}) | "
                     + ("none below the start | " if r["best_step"] == 0 else f"{min(v for _, v in held):.5f} | ")
                     + f"{r['seconds'] / 60:.1f} | "
                     f"**{r['lee_mean']:.4f}** / {r['lee_min']:.4f} | {r['wiki_mean']:.4f} | {moved}{split(r)} |")
    by = {r["variant"]: r for r in data["variants"]}
    if {"all", "all + codes"} <= by.keys():
        a, c = by["all"], by["all + codes"]
        held = {name: min(v for _, v in data["curves"][name]["held_out"]) for name in ("all", "all + codes")}
        lines += ["", f"Reading: code updates lower the held-out Wikipedia loss (best {held['all']:.4f} → "
                      f"{held['all + codes']:.4f}, {100 * (1 - held['all + codes'] / held['all']):.0f}% lower), the "
                      f"Wikipedia cosine moves {a['wiki_mean']:.4f} → {c['wiki_mean']:.4f} and the news cosine "
                      f"{a['lee_mean']:.4f} → {c['lee_mean']:.4f}, in {c['seconds'] / a['seconds']:.2f}× the time. "
                      f"Fine-tuning raises the in-domain (Wikipedia) cosine by "
                      f"{a['wiki_mean'] - data['before']['wiki_mean']:.4f} and the news cosine by "
                      f"{a['lee_mean'] - data['before']['lee_mean']:.4f}: what distillation on one domain recovers "
                      "transfers only partly to another."]
    if swaps:
        best = max(data["variants"], key=lambda r: r["lee_mean"])
        lines += ["", f"Where the loss is: before fine-tuning the table alone costs {1 - b['lee_only_table']:.4f} of Lee "
                      f"cosine and everything else {1 - b['lee_table_dense']:.4f}; after `{best['variant']}` the table "
                      f"costs {1 - best['lee_only_table']:.4f} and everything else {1 - best['lee_table_dense']:.4f}."]
    t = data["train_step_s"]
    lines += ["", f"One training step (batch 16 Lee sentences, forward + backward): dense {1000 * t['dense']:.0f} ms, "
                  f"compressed {1000 * t['compressed']:.0f} ms ({t['compressed'] / t['dense']:.2f}×), same process"
                  + (f"; under bfloat16 autocast dense {1000 * t['dense bf16']:.0f} ms, compressed "
                     f"{1000 * t['compressed bf16']:.0f} ms ({t['compressed bf16'] / t['dense bf16']:.2f}×)"
                     if "dense bf16" in t else "") + ".",
              "", f"![loss curves]({Path(data.get('out', 'finetune_minilm')).with_suffix('.png').name})", ""]
    d = data.get("default_cli")
    if d:
        f = d["fidelity"]
        lines += ["## The embedded default with fine-tuning", "",
                  f"`{d['command']}` ({d['ratio']:.2f}×, {d['seconds'] / 60:.1f} min in all, fine-tuning "
                  f"{d['phases'].get('finetuning', float('nan')) / 60:.1f} min): sentence-embedding cosine on the 256 "
                  f"held-out Lee sentences {f['sentence embedding cosine (mean) before fine-tuning']:.4f} → "
                  f"**{f['sentence embedding cosine (mean)']:.4f}** (min {f['sentence embedding cosine (min) before fine-tuning']:.4f}"
                  f" → {f['sentence embedding cosine (min)']:.4f}); {d['finetuning']['steps']}.", ""]
    return "\n".join(lines)


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        steps, loss = zip(*c["loss"]) if c["loss"] else ((), ())
        window = 20
        smooth = [sum(loss[max(0, i - window + 1): i + 1]) / len(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]
        a.plot(steps, smooth, label=name)
        if c["held_out"]:
            b.plot(*zip(*c["held_out"]), marker="o", label=name)
    a.set(xlabel="step", ylabel="training loss (20-step mean)", title="training loss")
    b.set(xlabel="step", ylabel="held-out loss", title="held-out Wikipedia loss (early stopping)")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
