#!/usr/bin/env python
"""Can a held-out half of the calibration choose a layer's weight-space floor? (EfficientNet-Lite0, dense inputs)

Every layer is encoded under `H + floor · mean(diag H) · I` (`hf_vq.codec.output_aware.FLOOR`): the larger the floor,
the less the code trusts the calibration inputs' second moment `H`. For a few Lite0 layers and three options
(d = 1 / k = 64, d = 2 / k = 256, d = 4 / k = 256, per-channel scales), each floor of
`hf_vq.codec.output_aware.FLOOR_CANDIDATES` is fitted as the allocation estimates an option (at most 256 rows, one
GPTQ pass: `hf_vq.pipeline.allocation._quick_error`) and its relative output error measured three ways:

* **other photos**: fitted on the calibration crops of some of the 9 calibration photos, measured on those of the
  others, both ways round (what `hessian_floor="auto"` does, `cross_validated_floor`, on halves of
  `hf_vq.data.photo_batches`);
* **other crops**: the same with the halves the even and odd crops (each half holds crops of every photo: how the
  allocation's halves were drawn before `photo_batches`);
* **test photos**: fitted on all 256 calibration crops, measured on 128 crops of the 8 evaluation photos (what
  `hf-vq compress` reports fidelity on; never used to choose anything).

Inputs are the dense model's (not a compressed prefix's). For each way, the floor it would choose (the smallest
within 1 % of its best) and that floor's error on the test photos.

    .venv/bin/python benchmarks/experiment_floor_cv.py   # ~5 min on 2 cores -> results/experiment_floor_cv.*
"""

from __future__ import annotations

import sys

import torch

torch.set_num_threads(2)

from _common import RESULTS, efficientnet_lite0_converter, machine, write  # noqa: E402

OUT = RESULTS / "experiment_floor_cv"
LAYERS = ("classifier", "conv_head", "blocks.6.0.conv_pwl", "blocks.5.3.conv_pwl", "blocks.5.0.conv_pw",
          "blocks.4.0.conv_pwl", "blocks.2.0.conv_pwl", "blocks.1.0.conv_pw")
OPTIONS = ((1, 64), (2, 256), (4, 256))
TOLERANCE = 0.01


def _statistics(model, modules, batches):
    from hf_vq.calibrate import HessianCollector

    collector = HessianCollector(modules, max_rows=16_384)
    with collector.collecting(), torch.no_grad():
        for batch in batches:
            model(batch)
    return collector.result(collector.take())  # name -> LayerStatistics


def _choice(errors: dict[float, float]) -> float:
    best = min(errors.values())
    return next(f for f in sorted(errors) if errors[f] <= best * (1 + TOLERANCE))


def main() -> None:
    from hf_vq import VQConfig
    from hf_vq.codec.output_aware import FLOOR_CANDIDATES
    from hf_vq.data import CALIBRATION_PHOTOS, EVAL_PHOTOS, calibration_images, photo_batches, real_images
    from hf_vq.pipeline.allocation import _quick_error, cross_validated_floor

    model = efficientnet_lite0_converter().convert().eval()
    modules = {n: model.get_submodule(n) for n in LAYERS}
    crops = calibration_images(256, model=model)  # [256, 3, 224, 224], crop i of photo i mod 9
    by_photo = photo_batches(crops, len(CALIBRATION_PHOTOS))  # one photo's crops per batch
    half = (len(by_photo) + 1) // 2  # the library's split: batch i is in the second half when 2i >= n
    photo_halves = (_statistics(model, modules, by_photo[:half]), _statistics(model, modules, by_photo[half:]))
    crop_halves = (_statistics(model, modules, crops[0::2].split(32)), _statistics(model, modules, crops[1::2].split(32)))
    full = _statistics(model, modules, crops.split(32))
    test = _statistics(model, modules, real_images(128, model=model, photos=EVAL_PHOTOS).split(32))
    config = VQConfig(encoder="output-aware")
    rows = []
    for name in LAYERS:
        weight = modules[name].weight.detach().reshape(modules[name].weight.shape[0], -1).float()  # [rows, cols]
        for d, k in OPTIONS:
            _, photos = cross_validated_floor(weight, d, k, True, (photo_halves[0][name], photo_halves[1][name]), config)
            _, other_crops = cross_validated_floor(weight, d, k, True, (crop_halves[0][name], crop_halves[1][name]),
                                                   config)
            h_full, h_test = full[name].objective_hessian(), test[name].mean_hessian()
            tested = {f: _quick_error(weight, h_full, d, k, config, True, h_test=h_test, floor=f)
                      for f in FLOOR_CANDIDATES}
            row = {"layer": name, "d": d, "k": k, "other_photos": photos, "other_crops": other_crops, "test": tested,
                   "choice": {way: _choice(errors) for way, errors in
                              (("other_photos", photos), ("other_crops", other_crops), ("test", tested))}}
            rows.append(row)
            print(name, d, k, row["choice"], flush=True)
    data = {"machine": machine(), "command": "python benchmarks/experiment_floor_cv.py " + " ".join(sys.argv[1:]),
            "floors": list(FLOOR_CANDIDATES), "tolerance": TOLERANCE, "rows": rows}
    write(OUT, data, markdown(data))


def markdown(data: dict) -> str:
    """The Markdown tables of a run's JSON (`data`: what `main` writes)."""
    floors, rows, info = data["floors"], data["rows"], data["machine"]

    def errs(errors: dict) -> str:
        return " / ".join(f"{errors[str(f)] if str(f) in errors else errors[f]:.4f}" for f in floors)

    def test_at(row: dict, way: str) -> float:
        f = row["choice"][way]
        return row["test"][str(f)] if str(f) in row["test"] else row["test"][f]

    head = " / ".join(f"{f:g}" for f in floors)
    lines = ["# Choosing the weight-space floor on a held-out half of the calibration (EfficientNet-Lite0)\n",
             f"`{data['command'].strip()}` on {info['device']}, {info['date']}. Relative output error of the "
             "allocation's quick fit (at most 256 rows, one GPTQ pass, per-channel scales) of a layer of the dense "
             "model at each floor, fitted on one half of the 256 calibration crops and measured on the other (both "
             "ways round, mean) — halves of different photos, or of different crops of the same photos — and fitted "
             "on all of them and measured on 128 crops of the 8 evaluation photos; see the script's docstring.\n",
             f"| layer | d, k | other photos ({head}) | other crops | test photos | chosen on other photos / other "
             "crops / test: floor (its test error) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        choice = " / ".join(f"{r['choice'][w]:g} ({test_at(r, w):.4f})" for w in ("other_photos", "other_crops", "test"))
        lines.append(f"| {r['layer']} | {r['d']}, {r['k']} | {errs(r['other_photos'])} | {errs(r['other_crops'])} | "
                     f"{errs(r['test'])} | {choice} |")
    default = floors[0]

    def total(way: str | None) -> float:
        return sum(test_at(r, way) if way else (r["test"][str(default)] if str(default) in r["test"]
                                                 else r["test"][default]) for r in rows)

    lines += ["", f"Sum over the rows of the test-photo error: at the default floor {default:g} {total(None):.4f}; "
              f"at the floor chosen on other photos {total('other_photos'):.4f}, on other crops "
              f"{total('other_crops'):.4f}; the best floor per row (chosen on the test photos themselves) "
              f"{total('test'):.4f}."]
    for way, label in (("other_photos", "other photos"), ("other_crops", "other crops")):
        ratios = [min(r[way].values()) / min(r["test"].values()) for r in rows]
        lines.append(f"- {label}: best held-out error / best test error from {min(ratios):.2f} to {max(ratios):.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
