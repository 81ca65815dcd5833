#!/usr/bin/env python
"""Block-wise tuning in `hf-vq compress`: the same allocation with and without `--tune-steps`, one run.

Every row is `hf-vq compress` on all-MiniLM-L6-v2 as a user runs it (in process, `hf_vq.cli.main`), no fine-tuning:
the engine at `--ratio R` with block-wise tuning off (the default) and with `--tune-steps N` (each transformer block's
codebooks, scales, norms and biases trained toward the dense model's own block outputs on the calibration sentences,
padding excluded, stopping on a held-out fifth of the calibration batches). Fidelity: mean (min) cosine of mean-pooled
sentence embeddings against the dense model on 256 held-out Lee news sentences (calibration: 1,024 Wikipedia
sentences). The weights-file ratio is measured on the files.

    .venv/bin/python benchmarks/experiment_block_tuning.py                 # -> results/experiment_block_tuning.{json,md}
    .venv/bin/python benchmarks/experiment_block_tuning.py --ratios 16 --steps 200
"""

from __future__ import annotations

import argparse
import sys

from bench_engine import _row  # importing it sets 2 torch threads and offline mode
from _common import RESULTS, machine, minilm_path, write

OUT = RESULTS / "experiment_block_tuning"
KEY = "sentence embedding cosine (mean)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[16.0, 10.0])
    parser.add_argument("--steps", type=int, default=200, help="--tune-steps of the tuned rows")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    path = minilm_path()
    dense_bytes = (path / "model.safetensors").stat().st_size
    rows = []
    for ratio in args.ratios:
        for steps in (0, args.steps):
            flags = ["--ratio", f"{ratio:g}"] + (["--tune-steps", str(steps)] if steps else [])
            row = _row("minilm", f"R={ratio:g}, tune steps {steps}", [str(path), *flags], dense_bytes, KEY)
            row.update(ratio=ratio, tune_steps=steps)
            rows.append(row)
    info = machine()
    command = "python benchmarks/experiment_block_tuning.py " + " ".join(sys.argv[1:])
    lines = ["# Block-wise tuning in `hf-vq compress` (MiniLM)\n",
             f"`{command.strip()}` on {info['device']}, {info['torch_threads']} torch threads, {info['date']}. "
             "Each row is `hf-vq compress --ratio R [--tune-steps N]`; tuning trains each block's codebooks, scales, "
             "norms and biases toward the dense model's own block outputs (padding excluded), stopping on a held-out "
             "fifth of the 1,024 calibration sentences. Fidelity on 256 held-out Lee news sentences; no fine-tuning.\n",
             "| --ratio | --tune-steps | weights file ratio | mean cosine | min cosine | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['tune_steps']} | {r['file_ratio']:.2f}× | **{r['fidelity']:.4f}** | "
                     f"{r['fidelity_all'].get('sentence embedding cosine (min)')} | {r['seconds']:.0f} |")
    write(args.out, {"machine": info, "command": command.strip(), "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
