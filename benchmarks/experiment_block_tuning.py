#!/usr/bin/env python
"""Block-wise tuning in `hf-vq compress`: the same allocation with and without `--tune-steps`, one run.

Every row is `hf-vq compress` on all-MiniLM-L6-v2 (or, with `--model lite0`, EfficientNet-Lite0) as a user runs it
(in process, `hf_vq.cli.main`), no fine-tuning: the engine at `--ratio R` with block-wise tuning off (`--tune-steps
0`; the default below 12.8x, `hf_vq.config.AUTO_TUNE_BITS`) and with `--tune-steps N --tune-lr LR` (each block's
codebooks, scales, norms and biases trained toward the dense model's own block outputs on the calibration inputs,
padding excluded, stopping on a held-out fifth of the calibration batches). Fidelity: MiniLM, mean (min) cosine of mean-pooled sentence embeddings against the dense model on 256
held-out Lee news sentences (calibration: 1,024 Wikipedia sentences); Lite0, top-1 agreement (and KL) with the dense
model on 128 crops of 8 held-out photos (calibration: 256 crops of the calibration photos). The weights-file ratio is measured
on the files. Each tuned setting is `STEPS:LR`.

    .venv/bin/python benchmarks/experiment_block_tuning.py                 # -> results/experiment_block_tuning.{json,md}
    .venv/bin/python benchmarks/experiment_block_tuning.py --ratios 16 --settings 200:1e-4 400:3e-4
    .venv/bin/python benchmarks/experiment_block_tuning.py --model lite0 --ratios 6 --settings 100:1e-4
    .venv/bin/python benchmarks/experiment_block_tuning.py --model lite0 --ratios 6 --settings 400:3e-4 \
        --out benchmarks/results/experiment_block_tuning_lite0_400   # the setting the default uses at 16x
    .venv/bin/python benchmarks/experiment_block_tuning.py --ratios 12 --settings 400:3e-4 \
        --out benchmarks/results/experiment_block_tuning_12x   # just below the default's 12.8x cut
"""

from __future__ import annotations

import argparse
import sys

from bench_engine import REPORTED, _row, dense_folder  # importing it sets 2 torch threads and offline mode
from _common import RESULTS, machine, write

OUT = RESULTS / "experiment_block_tuning"

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REPORTED), default="minilm")
    parser.add_argument("--ratios", type=float, nargs="+", default=[16.0, 10.0])
    parser.add_argument("--settings", nargs="+", default=["200:1e-4"],
                        help="tuned rows as STEPS:LR (--tune-steps, --tune-lr); an untuned row always runs first")
    parser.add_argument("--out", help=f"default: {OUT.relative_to(RESULTS.parent)}[_lite0]")
    args = parser.parse_args()
    report = REPORTED[args.model]
    path, dense_bytes = dense_folder(args.model)
    settings = [(0, None)] + [(int(s.split(":")[0]), float(s.split(":")[1])) for s in args.settings]
    rows = []
    for ratio in args.ratios:
        for steps, lr in settings:
            flags = ["--ratio", f"{ratio:g}", "--tune-steps", str(steps)] + (["--tune-lr", f"{lr:g}"] if steps else [])
            row = _row(args.model, f"R={ratio:g}, tune steps {steps}, lr {lr}", [str(path), *flags], dense_bytes,
                       report.fidelity)
            row.update(ratio=ratio, tune_steps=steps, tune_lr=lr)
            rows.append(row)
    info = machine()
    command = "python benchmarks/experiment_block_tuning.py " + " ".join(sys.argv[1:])
    lines = [f"# Block-wise tuning in `hf-vq compress` ({report.title})\n",
             f"`{command.strip()}` on {info['device']}, {info['torch_threads']} torch threads, {info['date']}. "
             "Each row is `hf-vq compress --ratio R [--tune-steps N --tune-lr LR]`; tuning trains each block's "
             "codebooks, scales, norms and biases toward the dense model's own block outputs (padding excluded), "
             f"stopping on a held-out fifth of the calibration batches. Fidelity ({report.fidelity}) on "
             f"{report.held_out}; no fine-tuning.\n",
             f"| --ratio | --tune-steps | --tune-lr | weights file ratio | fidelity | {report.second_name} | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "-" if not r["tune_steps"] else f"{r['tune_lr']:g}"
        lines.append(f"| {r['ratio']:g} | {r['tune_steps']} | {lr} | {r['file_ratio']:.2f}× | "
                     f"**{r['fidelity']:.4f}** | {r['fidelity_all'].get(report.second)} | {r['seconds']:.0f} |")
    out = args.out or str(OUT) + ("" if args.model == "minilm" else f"_{args.model}")
    write(out, {"machine": info, "command": command.strip(), "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
