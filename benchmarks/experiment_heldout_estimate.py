#!/usr/bin/env python
"""Why bit allocation measures each option on calibration inputs its fit did not see (EfficientNet-Lite0).

For a few Lite0 layers, at d = 4 and d = 2 (k = 256, per-channel scales), the output-aware encoder as the allocation
runs it (one GPTQ pass, 8 k-means iterations) is fitted under the second moment `H` of some inputs, and its
relative output error `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` measured under:

* **in-sample**: the same `H` it was fitted to (256 calibration crops of the calibration photos);
* **held-out half**: fitted on the even calibration batches, measured on the odd ones (what the allocation did
  before its halves held other photos, `hf_vq.data.photo_batches`: `experiment_floor_cv.py`);
* **test photos**: fitted on all 256 calibration crops, measured on 128 crops of the 8 evaluation photos (what
  `hf-vq compress` reports fidelity on; used here only to show the gap, never by the allocation).

The classifier reads one pooled vector per image (256 vectors of 1,280 channels): its in-sample error is far more
optimistic than that of layers reading thousands of rows.

    .venv/bin/python benchmarks/experiment_heldout_estimate.py   # ~2 min -> results/experiment_heldout_estimate.*
"""

from __future__ import annotations

import torch

torch.set_num_threads(2)

from _common import RESULTS, efficientnet_lite0_converter, machine, write  # noqa: E402

OUT = RESULTS / "experiment_heldout_estimate"
LAYERS = ("classifier", "conv_head", "blocks.5.3.conv_pwl", "blocks.6.0.conv_pwl")
BATCH = 32


def _statistics(model, modules, images):
    from hf_vq.calibrate import HessianCollector

    collector = HessianCollector(modules, max_rows=16_384)
    with collector.collecting(), torch.no_grad():
        for i in range(0, len(images), BATCH):
            model(images[i:i + BATCH])
    return {n: s.mean_hessian() for n, s in collector.result(collector.take()).items()}  # name -> H [cols, cols]


def _fitted(weight, h, d):
    from hf_vq.codec.output_aware import encode_output_aware
    from hf_vq.codec.pq import decode

    result = encode_output_aware(weight, h, k=256, d=d, scales=True, n_iter=0, kmeans_iters=8, reassign="gptq")
    return decode(result.codes, result.codebooks) * result.scales[:, None]  # [rows, cols]


def main() -> None:
    from hf_vq.codec.hessian import output_error
    from hf_vq.data import EVAL_PHOTOS, calibration_images, real_images

    model = efficientnet_lite0_converter().convert().eval()
    modules = {n: model.get_submodule(n) for n in LAYERS}
    calibration = calibration_images(256, model=model)  # [256, 3, 224, 224]
    batches = calibration.split(BATCH)
    even = _statistics(model, modules, torch.cat(batches[0::2]))
    odd = _statistics(model, modules, torch.cat(batches[1::2]))
    full = _statistics(model, modules, calibration)
    test = _statistics(model, modules, real_images(128, model=model, photos=EVAL_PHOTOS))
    rows = []
    for name in LAYERS:
        weight = modules[name].weight.detach().reshape(modules[name].weight.shape[0], -1)  # [rows, cols]
        for d in (4, 2):
            approx = _fitted(weight, full[name], d)
            rows.append({"layer": name, "d": d, "in_sample": output_error(weight, approx, full[name]),
                         "held_out_half": output_error(weight, _fitted(weight, even[name], d), odd[name]),
                         "test_photos": output_error(weight, approx, test[name])})
            print(rows[-1], flush=True)
    info = machine()
    lines = ["# Allocation estimates: in-sample vs a held-out half of the calibration (EfficientNet-Lite0)\n",
             f"`python benchmarks/experiment_heldout_estimate.py` on {info['device']}, {info['date']}. Relative output "
             "error of the output-aware encoder (one GPTQ pass, k = 256, scales) fitted on calibration crops; see the "
             "script's docstring.\n",
             "| layer | d | in-sample | held-out half | test photos | test / in-sample | test / held-out |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['d']} | {r['in_sample']:.5f} | {r['held_out_half']:.5f} | {r['test_photos']:.5f} | "
              f"{r['test_photos'] / r['in_sample']:.0f}× | {r['test_photos'] / r['held_out_half']:.0f}× |" for r in rows]
    write(OUT, {"machine": info, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
