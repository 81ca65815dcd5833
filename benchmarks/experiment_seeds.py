#!/usr/bin/env python
"""How much `hf-vq compress --ratio R` moves with its seed, and whether a change to the engine beats that spread.

Every row is `hf-vq compress --ratio R --seed S` as a user runs it (in process, `hf_vq.cli.main`, no fine-tuning):
the seed feeds every random step (k-means initialisations, the rows the allocation samples), so the rows of one
variant are equally good runs of the same engine. A change is only measured when its mean over seeds moves by more
than the seeds' spread. Variants: `engine` (what `hf-vq compress` runs) and, with `--variants`, `no norm weights`:
the same engine without weighting each output channel's error by its gain through the BatchNorm that reads it
(`hf_vq.pipeline.calibrated.norm_row_weights` returns nothing; models without BatchNorm run the same code either way).
Fidelity as in `experiment_block_tuning.py`: MiniLM, mean (min) sentence-embedding cosine on 256 held-out Lee news
sentences; Lite0, top-1 agreement (and KL) on 128 crops of 8 held-out photos.

    .venv/bin/python benchmarks/experiment_seeds.py --model lite0 --ratio 6 --seeds 0 1 2 --variants engine "no norm weights"
    .venv/bin/python benchmarks/experiment_seeds.py --model minilm --ratio 16 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench_engine import FIDELITY, _row, dense_folder  # importing it sets 2 torch threads and offline mode
from experiment_block_tuning import MODELS
from _common import RESULTS, machine, write

OUT = RESULTS / "experiment_seeds"
VARIANTS = ("engine", "no norm weights")


def _run(model: str, variant: str, path: str, ratio: float, seed: int, dense_bytes: int) -> dict:
    import hf_vq.pipeline.calibrated as calibrated

    original = calibrated.norm_row_weights
    if variant == "no norm weights":
        calibrated.norm_row_weights = lambda *args, **kwargs: {}
    try:
        return _row(model, f"{variant}, seed {seed}", [path, "--ratio", f"{ratio:g}", "--seed", str(seed)],
                    dense_bytes, FIDELITY[model])
    finally:
        calibrated.norm_row_weights = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="lite0")
    parser.add_argument("--ratio", type=float, default=6.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["engine"])
    parser.add_argument("--out", help=f"default: {OUT.relative_to(RESULTS.parent)}_<model>")
    args = parser.parse_args()
    second, second_name, held_out = MODELS[args.model]
    path, dense_bytes = dense_folder(args.model)
    rows = []
    for seed in args.seeds:  # seeds outside, variants inside: a slow spell of the machine hits both alike
        for variant in args.variants:
            row = _run(args.model, variant, str(path), args.ratio, seed, dense_bytes)
            row.update(variant=variant, seed=seed, second=row["fidelity_all"].get(second))
            rows.append(row)
    summary = {}
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        fid, sec = [r["fidelity"] for r in mine], [r["second"] for r in mine]
        summary[variant] = {"mean": statistics.fmean(fid), "min": min(fid), "max": max(fid),
                            "second_mean": statistics.fmean(sec), "second_min": min(sec), "second_max": max(sec)}
    info = machine()
    command = "python benchmarks/experiment_seeds.py " + " ".join(f'"{a}"' if " " in a else a for a in sys.argv[1:])
    title = "MiniLM" if args.model == "minilm" else "EfficientNet-Lite0"
    lines = [f"# `hf-vq compress --ratio {args.ratio:g}` across seeds ({title})\n",
             f"`{command.strip()}` on {info['device']}, {info['torch_threads']} torch threads, {info['date']}. "
             f"Each row is `hf-vq compress --ratio {args.ratio:g} --seed S`, no fine-tuning; fidelity on {held_out}.\n",
             f"| variant | seed | weights file ratio | {FIDELITY[args.model]} | {second_name} | seconds | allocation |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        alloc = ", ".join(f"{k}×{v}" for k, v in (r["allocation"] or {}).items())
        lines.append(f"| {r['variant']} | {r['seed']} | {r['file_ratio']:.2f}× | {r['fidelity']:.4f} | "
                     f"{r['second']:.4g} | {r['seconds']:.0f} | {alloc} |")
    lines += ["", f"| variant | mean | range | {second_name} mean | {second_name} range |", "|---|---|---|---|---|"]
    for variant, s in summary.items():
        lines.append(f"| {variant} | **{s['mean']:.4f}** | {s['min']:.4f} to {s['max']:.4f} | {s['second_mean']:.4g} | "
                     f"{s['second_min']:.4g} to {s['second_max']:.4g} |")
    write(args.out or f"{OUT}_{args.model}", {"machine": info, "ratio": args.ratio, "rows": rows, "summary": summary},
          "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
