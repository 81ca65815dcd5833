#!/usr/bin/env python
"""The output-aware objective's weight-space terms: `hf-vq compress --ratio R` under `H + floor · mean(diag H) · I`,
and the prior of isotropic pseudo-rows added to few calibration rows.

The output-aware encoder (`hf_vq.codec.output_aware`) minimises each layer's output error on the calibration inputs.
Weights whose inputs calibration never excited have zero output error whatever their codes: EfficientNet-Lite0's
dead depthwise channels and the columns of the pointwise convs that read them (BatchNorm + ReLU6 of a few texture
crops leave some channels at zero). Without a weight-space term, k-means, error feedback and re-assignment tie there
at code 0; inputs of other photos can wake those channels. `floor` (`hf_vq.codec.output_aware.FLOOR`, set here for
each row) adds `floor · mean(diag H)` to every diagonal entry, the mean over all of a layer's groups; `0` is the
objective before the term existed (with rows of zeros now decoding to zeros either way).

`prior` (`hf_vq.calibrate.hessian.PRIOR_ROWS`) adds `prior · cols` isotropic pseudo-rows of the inputs' mean energy to
a layer's `count` calibration rows (`H / count + prior · (cols / count) · mean(diag H / count) · I`): large where a
layer reads few rows for its columns (Lite0's classifier: one pooled vector per image), negligible where it reads
every token or position. `0` is the objective before the prior existed.

Every row is `hf-vq compress --ratio R --seed S` as a user runs it (in process, no fine-tuning); fidelity as in
experiment_seeds.py (MiniLM: sentence-embedding cosine on 256 held-out Lee news sentences; Lite0: top-1 agreement and
KL on 128 crops of 8 held-out photos).

    .venv/bin/python benchmarks/experiment_hessian_floor.py --model lite0 --ratio 6 --floors 0 1e-4 1e-2 1e-1
    .venv/bin/python benchmarks/experiment_hessian_floor.py --model minilm --ratio 16 --floors 1e-2 1e-1
    .venv/bin/python benchmarks/experiment_hessian_floor.py --model minilm --ratio 16 --floors 1e-4 --priors 0 1 \
        --out benchmarks/results/experiment_hessian_prior_minilm
    .venv/bin/python benchmarks/experiment_hessian_floor.py --model lite0 --ratio 6 --floors 1e-1 3e-1 --seeds 0 1 \
        --out benchmarks/results/experiment_hessian_floor_lite0_prior

A run sets the floor through the module default (`hf_vq.codec.output_aware.FLOOR`), which `hf-vq compress
--hessian-floor` / `VQConfig(hessian_floor=...)` overrides per run.

The committed floor sweep of MiniLM has no floor 0 and 1e-4 rows (for time): floor 0 is seed 0 of
`experiment_seeds_minilm.md` at commit 982b7b5 (0.9077); floor 1e-4 (without and with the prior) is
`experiment_hessian_prior_minilm.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys

# importing bench_engine sets 2 torch threads and offline mode
from bench_engine import REPORTED, _row, allocation_text, dense_folder
from _common import RESULTS, machine, write

import hf_vq.calibrate.hessian as hessian  # noqa: E402
import hf_vq.codec.output_aware as output_aware  # noqa: E402

OUT = RESULTS / "experiment_hessian_floor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REPORTED), default="lite0")
    parser.add_argument("--ratio", type=float, default=6.0)
    parser.add_argument("--floors", type=float, nargs="+", default=[0.0, 1e-4, 1e-2, 1e-1])
    parser.add_argument("--priors", type=float, nargs="+", default=[hessian.PRIOR_ROWS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", help=f"default: {OUT.relative_to(RESULTS.parent)}_<model>")
    args = parser.parse_args()
    report = REPORTED[args.model]
    path, dense_bytes = dense_folder(args.model)
    default, default_prior, rows = output_aware.FLOOR, hessian.PRIOR_ROWS, []
    try:
        for floor in args.floors:
            output_aware.FLOOR = floor
            for prior in args.priors:
                hessian.PRIOR_ROWS = prior
                for seed in args.seeds:
                    cli_args = [str(path), "--ratio", f"{args.ratio:g}", "--seed", str(seed)]
                    row = _row(args.model, f"floor {floor:g}, prior {prior:g}, seed {seed}", cli_args, dense_bytes,
                               report.fidelity)
                    row.update(floor=floor, prior=prior, seed=seed, second=row["fidelity_all"].get(report.second))
                    rows.append(row)
    finally:
        output_aware.FLOOR, hessian.PRIOR_ROWS = default, default_prior
    data = {"machine": machine(), "command": "python benchmarks/experiment_hessian_floor.py " + " ".join(sys.argv[1:]),
            "model": args.model, "ratio": args.ratio, "default_floor": default, "default_prior": default_prior,
            "rows": rows}
    write(args.out or f"{OUT}_{args.model}", data, markdown(data))


def markdown(data: dict) -> str:
    """The Markdown table of a run's JSON (`data`: what `main` writes). Runs from before the prior existed have no
    `prior` in their rows (it was 0) and keep their table."""
    rows, info, report = data["rows"], data["machine"], REPORTED[data["model"]]
    priors = "prior" in rows[0]
    prior_text = (f" with `prior · cols` isotropic pseudo-rows added to the calibration rows (default prior "
                  f"{data['default_prior']:g})" if priors else "")
    lines = [f"# The output-aware objective's weight-space term{'s' if priors else ''}: `hf-vq compress --ratio "
             f"{data['ratio']:g}` ({report.title})\n",
             f"`{data['command'].strip()}` on {info['device']}, {info['torch_threads']} torch threads, {info['date']}. "
             f"Each row encodes every layer under `H + floor · mean(diag H) · I` (hf-vq compress's default: floor "
             f"{data['default_floor']:g}){prior_text}; no fine-tuning; fidelity on {report.held_out}.\n",
             f"| floor | {'prior | ' if priors else ''}seed | weights file ratio | {report.fidelity} | "
             f"{report.second_name} | seconds | allocation |",
             "|---|---|---|---|---|---|---|" + ("---|" if priors else "")]
    for r in rows:
        prior = f"{r['prior']:g} | " if priors else ""
        lines.append(f"| {r['floor']:g} | {prior}{r['seed']} | {r['file_ratio']:.2f}× | {r['fidelity']:.4f} | "
                     f"{r['second']:.4g} | {r['seconds']:.0f} | {allocation_text(r['allocation'])} |")
    if len({r["seed"] for r in rows}) > 1:
        lines.append("")
        for floor, prior in sorted({(r["floor"], r.get("prior", 0.0)) for r in rows}):
            fid = [r["fidelity"] for r in rows if (r["floor"], r.get("prior", 0.0)) == (floor, prior)]
            lines.append(f"- floor {floor:g}{f', prior {prior:g}' if priors else ''}: mean {report.fidelity} "
                         f"{statistics.fmean(fid):.4f} over {len(fid)} seeds")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
