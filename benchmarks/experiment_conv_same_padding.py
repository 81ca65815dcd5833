#!/usr/bin/env python
"""Calibration statistics of timm's `Conv2dSame` layers: the patches the conv really multiplies, against unpadded ones.

The `tf_*` timm models (EfficientNet-Lite0 among them) pad their strided convs the TensorFlow "SAME" way inside
`forward` (`Conv2dSame`: static padding 0, the odd pixel on the right / bottom). `HessianCollector` used to unfold
their inputs with the static padding (none): the patches it averaged missed the border positions and, for 5 x 5
kernels, were shifted by one pixel against the ones the conv multiplies. It now pads as the conv does (asserted in
tests/test_engine.py::test_conv_statistics_read_the_patches_the_conv_multiplies). Here each of Lite0's five
`Conv2dSame` layers is encoded by the output-aware encoder under either statistic (256 crops of the 9 calibration
photos), and the relative output error is measured under the true statistic of 128 crops of the 8 held-out photos.

    .venv/bin/python benchmarks/experiment_conv_same_padding.py   # -> results/experiment_conv_same_padding.{json,md}
"""

from __future__ import annotations

import argparse

import torch

torch.set_num_threads(2)

from _common import RESULTS, efficientnet_lite0_converter, machine, write  # noqa: E402

OUT = RESULTS / "experiment_conv_same_padding"
OPTIONS = ((1, 16), (1, 8))  # (d, k): 4 and 3 bits per weight; the allocation gives these layers d = 1
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    import hf_vq.calibrate.hessian as hessian
    from hf_vq.codec.hessian import output_error
    from hf_vq.codec.output_aware import encode_output_aware
    from hf_vq.codec.pq import decode
    from hf_vq.data import CALIBRATION_PHOTOS, EVAL_PHOTOS, real_images

    model = efficientnet_lite0_converter().convert().eval()
    modules = {n: m for n, m in model.named_modules() if hessian._pads_like_tensorflow(m)}
    fixed = hessian._pads_like_tensorflow

    def statistics(images: torch.Tensor, padded: bool) -> dict[str, torch.Tensor]:
        hessian._pads_like_tensorflow = fixed if padded else (lambda m: False)  # False: the statistic before the fix
        try:
            collector = hessian.HessianCollector(modules)
            with torch.no_grad(), collector.collecting():
                for i in range(0, len(images), 32):
                    model(images[i:i + 32])
        finally:
            hessian._pads_like_tensorflow = fixed
        return {n: s.mean_hessian() for n, s in collector.stats.items()}  # [G, cols, cols]

    calibration = real_images(256, model=model, photos=CALIBRATION_PHOTOS, seed=0)  # [256, 3, 224, 224]
    held_out = real_images(128, model=model, photos=EVAL_PHOTOS, seed=0)  # [128, 3, 224, 224]
    fits = {"unpadded (before)": statistics(calibration, False), "as the conv pads (now)": statistics(calibration, True)}
    test = statistics(held_out, True)
    rows = []
    for name, module in modules.items():
        weight = module.weight.detach().reshape(module.out_channels, -1).float()  # [out, in/G·kh·kw]
        for d, k in OPTIONS:
            row = {"layer": name, "shape": list(weight.shape), "kernel": list(module.kernel_size), "d": d, "k": k}
            for label, fit in fits.items():
                errors = []
                for seed in SEEDS:
                    r = encode_output_aware(weight, fit[name], k=k, d=d, scales=True, seed=seed)
                    errors.append(output_error(weight, decode(r.codes, r.codebooks) * r.scales[:, None], test[name]))
                row[label] = sum(errors) / len(errors)
            rows.append(row)
            print(row, flush=True)
    before, now = fits
    lower = sum(r[now] < r[before] for r in rows)
    info = machine()
    lines = ["# timm `Conv2dSame` statistics: the patches the conv multiplies vs unpadded ones (EfficientNet-Lite0)\n",
             f"`python benchmarks/experiment_conv_same_padding.py` on {info['device']}, {info['date']}, 2 torch threads. "
             "Each `Conv2dSame` layer encoded alone by the output-aware encoder (per-channel scales) under the "
             f"statistic of 256 crops of the {len(CALIBRATION_PHOTOS)} calibration photos, collected either way; "
             "relative output error under the true statistic of 128 crops of the 8 held-out photos, mean over "
             f"seeds {', '.join(map(str, SEEDS))}.\n",
             f"| layer | weight | kernel | d | k | error, {before} | error, {now} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape'][0]}×{r['shape'][1]} | {r['kernel'][0]}×{r['kernel'][1]} | {r['d']} "
                     f"| {r['k']} | {r[before]:.6f} | **{r[now]:.6f}** |")
    lines.append(f"\nLower with the statistic the conv really sees: {lower} of {len(rows)}.")
    write(args.out, {"machine": info, "rows": rows, "lower": lower}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
