#!/usr/bin/env python
"""How bit allocation should estimate each option's error: a short k-means, or the encoder that will run.

Bit allocation (hf_vq/pipeline/allocation.py) compares, for every layer, the relative output error of each (d, k)
option on a sample of 256 rows. Two estimates on the same MiniLM layers and the same calibration statistics (64
sentences of gensim's Wikipedia pages):

* **k-means**: Hessian-diagonal-weighted k-means, 8 iterations (the estimate before this experiment);
* **encoder**: the output-aware encoder as the engine runs it (one GPTQ pass and a codebook/scale refit).

Then the whole default (`hf-vq compress`, MiniLM at `--ratio 10`, 256 calibration sentences) with each estimate,
fidelity on 256 held-out Lee news sentences (`--end-to-end`; about 5 minutes on 2 cores).

    .venv/bin/python benchmarks/experiment_allocation_proxy.py --end-to-end
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(2)

from _common import RESULTS, machine, minilm_path, write  # noqa: E402
from hf_vq.evaluate import COSINE_MEAN  # noqa: E402

OUT = RESULTS / "experiment_allocation_proxy"
LAYERS = ("encoder.layer.5.output.dense", "encoder.layer.2.output.dense", "encoder.layer.0.attention.self.query")


def per_layer() -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    from hf_vq import VQConfig
    from hf_vq.codec.output_aware import encode_output_aware
    from hf_vq.calibrate import merge_statistics
    from hf_vq.data import calibration_batches
    from hf_vq.pipeline import allocation as A
    from hf_vq.pipeline.parallel import Workers

    path = minilm_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    batches = [((), b) for b in calibration_batches(64, tokenizer=tok, model=model)]
    modules = dict(model.named_modules())
    stats = {}
    for half in A._dense_statistics(model, modules, list(LAYERS), batches, Workers()):
        merge_statistics(stats, half)
    kmeans_cfg = VQConfig(encoder="kmeans", scales=True)
    rows = []
    for name in LAYERS:
        weight = modules[name].weight.detach().float()  # [rows, cols]
        h = A._hessian(stats.get(name), weight.shape[1], weight.device)
        sample = weight[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))[:256].sort().values]
        for d, k in A.MENU:
            t0 = time.perf_counter()
            quick = A._quick_error(weight, h, d, k, kmeans_cfg, True)
            t1 = time.perf_counter()
            enc = encode_output_aware(sample, h, k=min(k, sample.numel() // d // 4), d=d, scales=True, n_iter=0,
                                      kmeans_iters=8, reassign="gptq").stats["output_error"]
            rows.append({"layer": name, "d": d, "k": k, "kmeans": quick, "encoder": float(enc),
                         "kmeans_s": t1 - t0, "encoder_s": time.perf_counter() - t1})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def end_to_end() -> list[dict]:
    from hf_vq.cli import main
    from hf_vq.pipeline import allocation as A

    encoder_estimate = A._quick_error
    out = []
    for label, estimate in (("k-means estimate", lambda m, h, d, k, c, s, **kw: encoder_estimate(
            m, h, d, k, c.replace(encoder="kmeans"), s, **kw)), ("encoder estimate", encoder_estimate)):
        A._quick_error = estimate
        try:
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / "r.json"
                with contextlib.redirect_stdout(io.StringIO()):
                    code = main(["compress", "--out", str(Path(tmp) / "vq"), "--json", str(report), "--quiet"])
                assert code == 0, code
                data = json.loads(report.read_text())
                size = (Path(tmp) / "vq" / "model.safetensors").stat().st_size
        finally:
            A._quick_error = encoder_estimate
        layers = data["record"]["allocation"]["layers"]
        out.append({"estimate": label, "file_ratio": (minilm_path() / "model.safetensors").stat().st_size / size,
                    "cosine": data["fidelity"][COSINE_MEAN], "seconds": data["seconds"],
                    "dense_layers": sorted(n for n, v in layers.items() if v["choice"] == "dense")})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--end-to-end", action="store_true")
    args = parser.parse_args()
    rows = per_layer()
    e2e = end_to_end() if args.end_to_end else []
    info = machine()
    command = "python benchmarks/experiment_allocation_proxy.py " + " ".join(sys.argv[1:])
    lines = [f"# Allocation: estimating each option's error\n\n`{command}` on {info['device']}, {info['date']}. "
             "Relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of each option on 256 sampled rows, H from 64 calibration "
             "sentences (Wikipedia).\n", "| layer | d | k-means estimate | encoder estimate | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['d']} | {r['kmeans']:.3g} | {r['encoder']:.3g} | {r['kmeans'] / max(r['encoder'], 1e-30):.0f}× |"
              for r in rows]
    if e2e:
        lines += ["\nThe default `hf-vq compress` (MiniLM, `--ratio 10`), fidelity on 256 held-out Lee sentences:\n",
                  "| estimate | file ratio | cosine | seconds | layers left dense |", "|---|---|---|---|---|"]
        lines += [f"| {r['estimate']} | {r['file_ratio']:.2f}× | {r['cosine']:.4f} | {r['seconds']:.0f} | "
                  f"{', '.join(r['dense_layers']) or '-'} |" for r in e2e]
    write(OUT, {"machine": info, "command": command, "layers": rows, "end_to_end": e2e}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
