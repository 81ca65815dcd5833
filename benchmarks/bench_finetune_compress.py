"""`hf-vq compress --finetune-steps N` as users run it: fidelity before and after PQF's third step, per model.

Each row is one CLI run (in this process): compression (calibrated engine, bit allocation to the ratio), then
distillation from the dense model on the calibration source (Wikipedia sentences after the calibration ones; fresh
crops of the calibration photos for images), held-out early stopping, and the CLI's own fidelity report on
inputs neither step saw (256 Lee news sentences; 128 crops of 8 other photos). EfficientNet-Lite0 is the real
model converted by scripts/convert_efficientnet_lite0.py.

    .venv/bin/python benchmarks/bench_finetune_compress.py     # -> benchmarks/results/finetune_compress.{json,md}
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    import _threads  # noqa: F401 - thread counts fixed before torch / numba start their pools

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, ROOT, machine, write  # noqa: E402
from hf_vq.evaluate import AGREEMENT, COSINE_MEAN  # noqa: E402

#: name -> (MODEL argument or None for the embedded default, extra CLI flags, fidelity key)
MODELS = {
    "minilm": (None, [], COSINE_MEAN),
    "lite0": ("lite0", ["--ratio", "6"], AGREEMENT),
}


def compress_with_finetuning(cli, argv: list[str], json_path: str) -> dict:
    """Run `hf-vq compress *argv --json json_path` in this process; its report, fine-tuning record and seconds."""
    start = time.perf_counter()
    cli(["compress", *argv, "--quiet", "--json", json_path])
    report = json.loads(Path(json_path).read_text())
    return {"command": "hf-vq compress " + " ".join(argv), "seconds": round(time.perf_counter() - start, 1),
            "phases": report["phases"], "ratio": report["ratio"], "fidelity": report["fidelity"],
            "finetuning": report["record"].get("finetuning")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lite0", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "finetune_compress"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from hf_vq.cli import main as cli

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, flags, key = MODELS[name]
            if model == "lite0":
                model = f"{tmp}/lite0-dense"
                subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_efficientnet_lite0.py"), "--out", model],
                               check=True, capture_output=True)
            argv = ([model] if model else []) + ["--out", f"{tmp}/{name}-vq", *flags,
                                                  "--finetune-steps", str(args.steps)]
            row = compress_with_finetuning(cli, argv, f"{tmp}/{name}.json")
            row["command"] = row["command"].replace(f"{tmp}/lite0-dense", "LITE0_DIR").replace(f"{tmp}/", "")
            rows.append({"model": name, "key": key, **row})
            print(json.dumps(rows[-1]), flush=True)
    data = {"rows": rows, "steps": args.steps, "threads": args.threads, "machine": machine(),
            "command": "python benchmarks/bench_finetune_compress.py " + " ".join(sys.argv[1:])}
    lines = ["# `hf-vq compress --finetune-steps`: fidelity before and after PQF's third step", "",
             f"`{data['command']}` on {data['machine']['device']}, {args.threads} torch threads; LITE0_DIR is the folder "
             "written by scripts/convert_efficientnet_lite0.py. Fidelity on held-out inputs (Lee news sentences / "
             "crops of 8 photos), never calibrated or trained on.", "",
             "| model | command | ratio | fidelity before → after | fine-tuning | minutes (fine-tuning) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        f = r["fidelity"]
        lines.append(f"| {r['model']} | `{r['command']}` | {r['ratio']:.2f}× | {r['key']}: {f[r['key'] + ' before fine-tuning']:.4f} "
                     f"→ **{f[r['key']]:.4f}** | {r['finetuning']['steps']}; held-out loss {r['finetuning']['held-out loss']} "
                     f"| {r['seconds'] / 60:.1f} ({r['phases'].get('finetuning', 0) / 60:.1f}) |")
    write(args.out, data, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
