#!/usr/bin/env python
"""How much `hf-vq compress --ratio R` moves with its seed: the spread a change to the engine has to beat.

Every row is `hf-vq compress --ratio R --seed S` as a user runs it (in process, `hf_vq.cli.main`, no fine-tuning).
The seed feeds every random step (k-means initialisations, the permutation search, the rows the allocation samples;
the calibration data stay the same), so the rows are equally good runs of the same engine, and a change is only
measured when it moves the mean over seeds by more than their spread. Fidelity as in `experiment_block_tuning.py`:
MiniLM, mean (min) sentence-embedding cosine on 256 held-out Lee news sentences; Lite0, top-1 agreement (and KL) on
128 crops of 8 held-out photos.

The committed results for `lite0`, `minilm` (16x) and `minilm_10x` are of the allocation that measures a layer by
the error a quick coding of it leaves (benchmarks/experiment_sensitivity.py); those of the noise-injection allocation
before it, and the BatchNorm channel weighting tried at commit 799851b, are the same files at commit 5d5df25.
`experiment_seeds_lite0` is also of the calibration statistics that pad timm's `Conv2dSame` inputs as the conv does
(experiment_conv_same_padding.py; the run without that fix is the file at commit 1ed14ee).
The committed `lite0` and `minilm_10x` files are also of the output-aware objective's weight-space term
(`hf_vq.codec.output_aware.FLOOR`, experiment_hessian_floor.py; the same files without it are at commit 982b7b5), and
`lite0` of the prior of pseudo-rows (`hf_vq.calibrate.hessian.PRIOR_ROWS`; without it: the file at commit e4d7fbc).
`minilm` (16x) and `minilm_10x` are of the term, the prior and the allocation's estimate from sampled rows over the
whole layer's output energy (`hf_vq.pipeline.allocation._quick_error`; before it: the files at commit 68bbd87, where
`minilm` predates the term and the prior). Lite0 re-run with that estimate gave the same rows.
`lite0_no_permute` and `minilm_10x_no_permute` are the same release as `lite0` and `minilm_10x` without PQF's
permutation (`--no-permute`, every other flag the same): what the permutation does under the calibrated engine.
`lite0_opencv` and `lite0_8x_opencv` calibrate on 31 natural photos of OpenCV's samples instead of the bundled
photos (`--opencv-photos`: `OPENCV_PHOTOS` in _common.py, extracted from Debian's opencv-doc package on first use,
passed as `--calibration-data`); `lite0_8x` is the same release with the bundled photos.
`lite0`, `lite0_8x`, `lite0_opencv`, `lite0_8x_opencv`, `minilm` and `minilm_10x` are of the allocation menu with 5-
and 6-bit scalar codes (`hf_vq.pipeline.allocation.MENU`); the same files without them are at commit 93e080c
(the `no_permute` files are of that release and were not re-run).
`lite0`, `lite0_8x`, `lite0_opencv`, `minilm` and `minilm_10x` are also of the tensors left dense stored at 16 bits (`Recipe.dense_dtype`,
`hf_vq/nn/storage.py`; the default with allocation), which gives their bytes to the weights; the same files with them
at 32 bits are at commit c62e964 (`lite0_opencv` too; `lite0_8x_opencv` was not re-run).
`minilm` (16x) is also of block-wise tuning on by default at budgets of at most 2.5 bits per weight
(`hf_vq.config.AUTO_TUNE_BITS`: 400 steps per block at lr 3e-4); the same run without it (`--tune-steps 0`) is the
file at commit e9769b7, and the explicit `--tune-steps 400 --tune-lr 3e-4` of the release before
(`experiment_seeds_minilm_tuned`) is at that commit too.
`lite0` was re-run at commit 4a0d67d (the same code path as caf634f for it) on a slower 2-core machine: mean
agreement 0.820 against 0.867 at caf634f, the same mean KL (0.0374 / 0.0375); the file names the earlier rows
(`previous_machine_rows`). The other Lite0 files are of the earlier machine (experiment_agreement_floor.py: how
fine a measure the agreement is).

    .venv/bin/python benchmarks/experiment_seeds.py --model lite0 --ratio 6 --seeds 0 1 2
    .venv/bin/python benchmarks/experiment_seeds.py --model minilm --ratio 16 --seeds 0 1 2
    .venv/bin/python benchmarks/experiment_seeds.py --model minilm --ratio 10 --seeds 0 1 2 \
        --out benchmarks/results/experiment_seeds_minilm_10x
    .venv/bin/python benchmarks/experiment_seeds.py --model minilm --ratio 16 --seeds 0 1 2 --tune-steps 0 \
        --out /tmp/minilm_16x_untuned   # other flags go to hf-vq compress
    .venv/bin/python benchmarks/experiment_seeds.py --model lite0 --ratio 6 --seeds 0 1 2 --no-permute \
        --out benchmarks/results/experiment_seeds_lite0_no_permute
    .venv/bin/python benchmarks/experiment_seeds.py --model minilm --ratio 10 --seeds 0 1 2 --no-permute \
        --out benchmarks/results/experiment_seeds_minilm_10x_no_permute
    .venv/bin/python benchmarks/experiment_seeds.py --model lite0 --ratio 6 --seeds 0 1 2 --opencv-photos \
        --out benchmarks/results/experiment_seeds_lite0_opencv
    .venv/bin/python benchmarks/experiment_seeds.py --model lite0 --ratio 8 --seeds 0 1 2 --opencv-photos \
        --out benchmarks/results/experiment_seeds_lite0_8x_opencv
    .venv/bin/python benchmarks/experiment_seeds.py --model lite0 --ratio 8 --seeds 0 1 2 \
        --out benchmarks/results/experiment_seeds_lite0_8x
    .venv/bin/python benchmarks/experiment_seeds.py --model lite0 --ratio 6 --seeds 0 --finetune-steps 600 \
        --out benchmarks/results/experiment_seeds_lite0_finetune600   # fidelity after PQF's third step
"""

from __future__ import annotations

import argparse
import statistics
import sys

# importing bench_engine sets 2 torch threads and offline mode
from bench_engine import REPORTED, _row, _samples, allocation_text, dense_folder
from _common import OPENCV_PHOTOS, RESULTS, machine, opencv_photos, write

OUT = RESULTS / "experiment_seeds"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REPORTED), default="lite0")
    parser.add_argument("--ratio", type=float, default=6.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help=f"default: {OUT.relative_to(RESULTS.parent)}_<model>")
    parser.add_argument("--opencv-photos", action="store_true",
                        help="lite0: calibrate on natural photos from Debian's opencv-doc (benchmarks/_common.py's "
                             "OPENCV_PHOTOS, passed as --calibration-data) instead of the default calibration photos")
    args, flags = parser.parse_known_args()  # the rest: hf-vq compress flags, the same for every seed
    calibration = None
    if args.opencv_photos and args.model != "lite0":
        parser.error("--opencv-photos calibrates an image model: use it with --model lite0")
    if args.opencv_photos:
        calibration = f"{_samples(args.model)} crops of {len(OPENCV_PHOTOS)} natural photos from Debian's opencv-doc"
        flags = [*flags, "--calibration-data", str(opencv_photos())]
    report = REPORTED[args.model]
    path, dense_bytes = dense_folder(args.model)
    rows = []
    for seed in args.seeds:
        cli_args = [str(path), "--ratio", f"{args.ratio:g}", "--seed", str(seed), *flags]
        row = _row(args.model, f"seed {seed}", cli_args, dense_bytes, report.fidelity)
        row.update(seed=seed, second=row["fidelity_all"].get(report.second))
        rows.append(row)
    data = {"machine": machine(), "command": "python benchmarks/experiment_seeds.py " + " ".join(sys.argv[1:]),
            "model": args.model, "ratio": args.ratio, "flags": flags, "calibration": calibration, "rows": rows}
    write(args.out or f"{OUT}_{args.model}", data, markdown(data))


def markdown(data: dict) -> str:
    """The Markdown table of a run's JSON (`data`: what `main` writes)."""
    rows, info, report = data["rows"], data["machine"], REPORTED[data["model"]]
    fid, sec = [r["fidelity"] for r in rows], [r["second"] for r in rows]
    flags = list(data["flags"])
    if data.get("calibration"):  # --opencv-photos: name the photos, not this machine's folder of them
        flags[flags.index("--calibration-data") + 1] = "OPENCV_PHOTOS"
        report = report._replace(calibration=data["calibration"])
    run = " ".join([f"hf-vq compress --ratio {data['ratio']:g}", *flags])
    tuned = {r.get("tune_steps") for r in rows} - {None, 0}
    tuning = (f" With {'/'.join(map(str, sorted(tuned)))} steps of block-wise tuning per block"
              f"{'' if '--tune-steps' in flags else ' (VQConfig defaults it at this ratio)'}." if tuned else "")
    listed = " Each layer's choice is in the JSON (`choices`)." if rows[0].get("choices") else ""
    finetuning = ("scored after the fine-tuning (before it: the JSON's `fidelity_all`)" if "--finetune-steps" in flags
                  else "no fine-tuning")
    lines = [f"# `{run}` across seeds ({report.title})\n",
             f"`{data['command'].strip()}` on {info['device']}, {info['torch_threads']} torch threads, {info['date']}. "
             f"Each row is `{run} --seed S`, {finetuning}; fidelity on {report.held_out}.{tuning}"
             f"{listed}\n",
             f"| seed | weights file ratio | {report.fidelity} | {report.second_name} | seconds | allocation |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['file_ratio']:.2f}× | {r['fidelity']:.4f} | {r['second']:.4g} | "
                     f"{r['seconds']:.0f} | {allocation_text(r['allocation'])} |")
    lines += ["", f"Mean over the {len(rows)} seeds: **{statistics.fmean(fid):.4f}** (range {min(fid):.4f} to "
              f"{max(fid):.4f}); {report.second_name} {statistics.fmean(sec):.4g} (range {min(sec):.4g} to "
              f"{max(sec):.4g})."]
    if data.get("runs"):  # a file not written by the one command above says how it was made
        lines.append(f"\nRuns: {'; '.join(data['runs'])}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
