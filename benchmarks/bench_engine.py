#!/usr/bin/env python
"""The calibrated engine against plain and diagonal-weighted k-means: fidelity vs weights-file ratio, one run.

Every row is `hf-vq compress` as a user runs it (in process, `hf_vq.cli.main`), on the real weights, no fine-tuning:

* **plain**: `--data-free` k-means at a fixed block size d (one bit width for every layer);
* **diagonal**: `--calibrate N` — k-means weighted by the input channels' second moments (the earlier calibrated path);
* **engine**: the output-aware encoder (`--encoder output-aware`) at the same fixed d;
* **engine + allocation**: `--ratio R` — bits allocated per layer by measured sensitivity to a weights-file ratio
  (and block-wise tuning where `hf-vq compress` defaults it, R >= 12.8; the committed engine.md predates that default).

The ratio is measured on the files: dense `model.safetensors` bytes over compressed `model.safetensors` bytes (MiniLM)
(EfficientNet-Lite0: the dense timm folder written by scripts/convert_efficientnet_lite0.py, fp32). Fidelity is
measured on held-out inputs the calibration never saw: MiniLM — mean cosine of mean-pooled sentence embeddings on 256
sentences of gensim's Lee news corpus (calibration: gensim's Wikipedia pages); Lite0 — top-1 agreement and KL on 128
crops of 8 scikit-image photos (calibration: crops of other photos, `hf_vq.data.CALIBRATION_PHOTOS`). A per-layer
table compares weight error and output error of plain, diagonal and output-aware encoding on the same MiniLM layers
(`--layers`).

    .venv/bin/python benchmarks/bench_engine.py                 # both models -> benchmarks/results/engine.{json,md,png}
    .venv/bin/python benchmarks/bench_engine.py --only minilm --ratios 10 16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

torch.set_num_threads(2)

from _common import RESULTS, efficientnet_lite0_converter, machine, minilm_path, rounded_weights, write  # noqa: E402

from hf_vq.cli import DEFAULT_RATIO, DEFAULT_SAMPLES  # noqa: E402
from hf_vq.data import CALIBRATION_PHOTOS  # noqa: E402
from hf_vq.evaluate import AGREEMENT, COSINE_MEAN, COSINE_MIN, KL  # noqa: E402

OUT = RESULTS / "engine"
# block size d of linear / pointwise layers (and embeddings) for the fixed-scheme rows: 4, 2.67 and 2 bits per weight
FIXED = {"minilm": (2, 3, 4), "lite0": (2, 4)}
RATIOS = {"minilm": (8, 10, 12, 16, 20), "lite0": (4, 5, 6, 8)}


def _cli(args: list[str]) -> dict:
    """Run `hf-vq compress` in process; returns its JSON report plus the wall time."""
    from hf_vq.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        out = Path(tmp) / "vq"
        buf = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            code = main(["compress", *args, "--out", str(out), "--json", str(report), "--quiet"])
        if code != 0:
            raise RuntimeError(f"hf-vq compress {' '.join(args)} failed ({code}): {buf.getvalue()[-2000:]}")
        data = json.loads(report.read_text())
        data["wall_seconds"] = time.perf_counter() - start
        data["weights_bytes"] = (out / "model.safetensors").stat().st_size
        return data


def _row(name: str, variant: str, args: list[str], dense_bytes: int, fidelity_key: str) -> dict:
    data = _cli(args)
    record = data.get("record") or {}
    allocation = record.get("allocation") or {}
    layers = {layer: v["choice"] for layer, v in (allocation.get("layers") or {}).items()}  # each layer's choice
    choices = list(layers.values())
    row = {"model": name, "variant": variant, "args": " ".join(args), "file_ratio": dense_bytes / data["weights_bytes"],
           "weights_mb": data["weights_bytes"] / 2**20, "fidelity": data["fidelity"].get(fidelity_key),
           "fidelity_all": data["fidelity"], "seconds": data["seconds"],
           "allocation": {c: choices.count(c) for c in sorted(set(choices))} if choices else None,
           "choices": layers or None, "tune_steps": (record.get("recipe") or {}).get("tune_steps")}
    print(json.dumps(row), flush=True)
    return row


def allocation_text(allocation: dict[str, int] | None) -> str:
    """A row's allocation (choice -> layers) as `d2k256×12, dense×7` (empty without an allocation)."""
    return ", ".join(f"{k}×{v}" for k, v in (allocation or {}).items())


def _samples(model: str) -> int:
    """`hf-vq compress`'s default number of calibration inputs for this model's library."""
    return DEFAULT_SAMPLES["transformers" if model == "minilm" else "timm"]


def _variants(model: str, n: int) -> list[tuple[str, list[str]]]:
    spec = (lambda d: f"pq-1x8-l{d}p{d}c9e{d}") if model == "minilm" else (lambda d: f"pq-1x8-l{d}p{d}c9")
    rows = []
    for d in FIXED[model]:
        rows.append((f"plain d={d}", ["--data-free", "--spec", spec(d)]))
        rows.append((f"diagonal d={d}", ["--calibrate", str(n), "--spec", spec(d)]))
        rows.append((f"engine d={d}", ["--encoder", "output-aware", "--calibration-samples", str(n), "--spec", spec(d)]))
    for ratio in RATIOS[model]:
        rows.append((f"engine + allocation R={ratio:g}", ["--ratio", str(ratio), "--calibration-samples", str(n)]))
    if n != 256:  # what the default's calibration size buys, against the earlier 256 inputs (same run)
        rows.append((f"engine + allocation R={DEFAULT_RATIO:g}, 256 inputs",
                     ["--ratio", str(DEFAULT_RATIO), "--calibration-samples", "256"]))
    return rows


class Reported(NamedTuple):
    """What `hf-vq compress` reports for a model: keys of its report's "fidelity" and how the held-out set is
    described."""

    title: str
    fidelity: str  # the headline figure
    second: str  # the figure shown next to it
    second_name: str  # its column name
    evaluation: str  # the held-out inputs fidelity is measured on
    calibration: str  # the default calibration inputs

    @property
    def held_out(self) -> str:
        """The held-out inputs, with the calibration inputs they are disjoint from."""
        return f"{self.evaluation} (calibration: {self.calibration})"


REPORTED = {
    "minilm": Reported("MiniLM", COSINE_MEAN, COSINE_MIN, "min cosine", "256 held-out Lee news sentences",
                       f"{_samples('minilm'):,} Wikipedia sentences"),
    "lite0": Reported("EfficientNet-Lite0", AGREEMENT, KL, "KL", "128 crops of 8 held-out photos",
                      f"{_samples('lite0')} crops of {len(CALIBRATION_PHOTOS)} other photos"),
}


def dense_folder(model: str) -> tuple[Path, int]:
    """The dense model's folder (MiniLM's package folder; Lite0 converted to a timm folder in a temporary directory)
    and the size of its weights file."""
    if model == "minilm":
        path = minilm_path()
    else:
        conv = efficientnet_lite0_converter()
        path = Path(conv.save_dense(conv.convert(), Path(tempfile.mkdtemp()) / "lite0"))
    return path, (path / "model.safetensors").stat().st_size


def run_model(model: str, n: int | None, ratios: list[float] | None) -> list[dict]:
    n = n or _samples(model)
    if ratios:
        RATIOS[model] = tuple(ratios)
    folder, dense_bytes = dense_folder(model)
    return [_row(model, variant, [str(folder), *args], dense_bytes, REPORTED[model].fidelity)
            for variant, args in _variants(model, n)]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for family in ("plain", "diagonal", "engine", "engine + allocation"):
            pts = sorted((r["file_ratio"], r["fidelity"]) for r in rows
                         if r["model"] == model and r["variant"].rsplit(" ", 1)[0] == family)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=family)
        ax.set_xlabel("weights file ratio (dense / compressed)")
        ax.set_ylabel("embedding cosine (held-out)" if model == "minilm" else "top-1 agreement (held-out)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def metric_reference(bits: tuple[int, ...] = (8, 6, 5, 4)) -> list[dict]:
    """How sensitive Lite0's held-out agreement is: every conv / linear weight (depthwise too) rounded to `b` bits
    per output channel (symmetric round-to-nearest, no file written), on the same 128 held-out crops
    (experiment_agreement_floor.py widens this to more roundings and other photos)."""
    from hf_vq.data import EVAL_PHOTOS, real_images
    from hf_vq.evaluate import image_fidelity

    dense = efficientnet_lite0_converter().convert().eval()
    images = real_images(128, model=dense, photos=EVAL_PHOTOS)  # [128, 3, 224, 224], what `hf-vq compress` reports on
    rows = []
    for b in bits:
        fidelity = image_fidelity(dense, rounded_weights(dense, b), images)
        rows.append({"bits": b, "agreement": fidelity["top1_agreement"], "kl": fidelity["mean_kl"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _markdown(rows: list[dict], info: dict, command: str, reference: list[dict] | None = None,
              kept: dict | None = None, samples: dict | None = None) -> str:
    samples = samples or {m: _samples(m) for m in ("minilm", "lite0")}
    lines = [f"# The calibrated engine: fidelity vs weights-file ratio\n\n`{command}` on {info['device']}, "
             f"{info['torch_threads']} torch threads, {info['date']}. No fine-tuning. Fidelity on held-out inputs "
             f"(MiniLM: 256 Lee news sentences, calibration on {samples['minilm']:,} Wikipedia sentences unless the "
             f"row says otherwise; Lite0: 128 crops of 8 photos, calibration on {samples['lite0']:,} crops of 9 other "
             "photos).\n",
             "| model | variant | weights file ratio | MB | fidelity | min / KL | seconds | allocation |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        other = r["fidelity_all"].get("sentence embedding cosine (min)",
                                      r["fidelity_all"].get("KL(dense || compressed) mean, nats"))
        alloc = allocation_text(r["allocation"]) or "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['file_ratio']:.2f}× | {r['weights_mb']:.2f} | "
                     f"{r['fidelity']:.4f} | {other} | {r['seconds']:.0f} | {alloc} |")
    if kept:
        lines.append(f"\nRows of {', '.join(kept['models'])} are kept from the run of {kept['date']} "
                     f"(`{kept['command']}`); each model's rows come from one run.")
    if reference:
        lines += ["\n**How sensitive the Lite0 agreement is**: every conv and linear weight of the dense model "
                  "(depthwise included) rounded per output channel to b bits (symmetric round-to-nearest, no file written), "
                  "scored on the same 128 held-out crops. The dense model's top-1 probability on these crops has a "
                  "median of 0.33 (random 10–100 % crops of photos such as an astronaut, coins or the Hubble deep "
                  "field): near-ties flip under small changes.\n",
                  "| bits per weight | top-1 agreement | KL |", "|---|---|---|"]
        lines += [f"| {r['bits']} | {r['agreement']:.4f} | {r['kl']:.4f} |" for r in reference]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("minilm", "lite0"))
    parser.add_argument("--samples", type=int,
                        help="calibration inputs (default: hf-vq compress's for the model's library)")
    parser.add_argument("--ratios", type=float, nargs="*", help="allocation targets (default per model)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--merge", action="store_true",
                        help="with --only: keep the other model's rows of the existing results (marked as such)")
    args = parser.parse_args()
    models = [args.only] if args.only else ["minilm", "lite0"]
    rows = []
    for model in models:
        rows += run_model(model, args.samples, args.ratios)
    reference = metric_reference() if "lite0" in models else None
    info = machine()
    command = "python benchmarks/bench_engine.py " + " ".join(sys.argv[1:])
    kept = None
    old_path = Path(args.out).with_suffix(".json")
    if args.merge and old_path.exists():
        old = json.loads(old_path.read_text())
        other = [r for r in old["rows"] if r["model"] not in models]
        if other:
            names = sorted({r["model"] for r in other})
            prior = old.get("kept") or {}
            # rows the previous run had itself kept come from the run it names, not from the previous run
            origin = prior if set(names) <= set(prior.get("models", ())) else \
                {"date": old["machine"].get("date"), "command": old.get("command")}
            kept = {"models": names, "date": origin["date"], "command": origin["command"]}
            rows = other + rows
        reference = reference if reference is not None else old.get("metric_reference")
    write(args.out, {"machine": info, "command": command, "rows": rows, "kept": kept, "metric_reference": reference},
          _markdown(rows, info, command, reference, kept,
                    {m: args.samples or _samples(m) for m in ("minilm", "lite0")}))
    _plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
