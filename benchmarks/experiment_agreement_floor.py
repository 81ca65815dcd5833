#!/usr/bin/env python
"""How much top-1 agreement EfficientNet-Lite0 keeps under roundings of its weights that no compressor would count
as lossy: the floor under the Lite0 fidelity bars.

The dense model (real ImageNet weights) is scored against copies of itself whose conv and linear weights (depthwise
included) are cast to float16 or bfloat16 and back, or rounded per output channel to b bits (symmetric
round-to-nearest; `_common.rounded_weights`). Nothing is compressed or written; every copy computes in float32.
Each is scored on three sets of photos, none of which calibration uses:

* `held-out crops`: what `hf-vq compress` reports on for image models (128 random crops, 10-100 % of the area, of the
  8 scikit-image photos `hf_vq.data.EVAL_PHOTOS`);
* `opencv crops`: 256 random crops, drawn the same way, of 31 natural photos of OpenCV's samples (`_common.
  OPENCV_PHOTOS`, Debian's opencv-doc);
* `opencv whole`: the same 31 photos whole (timm's evaluation transform: resize, centre crop).

It also gives each set's median top-1 probability of the dense model and the share of inputs whose two best classes
are within 0.05 of each other: near-ties that flip under small changes of the weights.

    .venv/bin/python benchmarks/experiment_agreement_floor.py   # ~7 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys

import _threads  # noqa: F401 - thread counts fixed before torch starts its pool
import torch
from _common import (OPENCV_PHOTOS, RESULTS, efficientnet_lite0_converter, machine, opencv_photos, rounded_weights,
                     write)

from hf_vq.evaluate import image_fidelity

OUT = RESULTS / "experiment_agreement_floor"
#: Each copy's rounding of the conv / linear weights: `_common.rounded_weights`'s arguments, by row name.
ROUNDINGS = {"float16": {"dtype": torch.float16}, "bfloat16": {"dtype": torch.bfloat16},
             **{f"{b} bits": {"bits": b} for b in (12, 10, 8, 7, 6)}}


def image_sets(dense: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The three sets of photos, preprocessed for `dense` (each `[n, 3, 224, 224]`)."""
    from hf_vq.data import EVAL_PHOTOS, _crops, photo_folder, real_images
    from hf_vq.integrations.timm import eval_transform

    photos = photo_folder(opencv_photos())
    transform, _ = eval_transform(dense)
    return {f"held-out crops ({len(EVAL_PHOTOS)} photos)": real_images(128, model=dense, photos=EVAL_PHOTOS),
            f"opencv crops ({len(OPENCV_PHOTOS)} photos)": _crops(photos, 256, model=dense, seed=7),
            f"opencv whole ({len(OPENCV_PHOTOS)} photos)": torch.stack([transform(p) for p in photos])}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(int(_threads.THREADS))
    dense = efficientnet_lite0_converter().convert().eval()
    sets = image_sets(dense)
    copies = {name: rounded_weights(dense, **rounding) for name, rounding in ROUNDINGS.items()}
    data = {"machine": machine(), "command": "python benchmarks/experiment_agreement_floor.py " + " ".join(sys.argv[1:]),
            "sets": []}
    for set_name, images in sets.items():
        probs = dense(images).softmax(-1).topk(2, dim=-1).values  # [n, 2]
        entry = {"set": set_name, "n": len(images), "median_top1_prob": float(probs[:, 0].median()),
                 "near_ties": float(((probs[:, 0] - probs[:, 1]) < 0.05).float().mean()), "rows": []}
        for name, model in copies.items():
            fidelity = image_fidelity(dense, model, images)  # what `hf-vq compress` reports, on these images
            entry["rows"].append({"rounding": name, "agreement": fidelity["top1_agreement"], "kl": fidelity["mean_kl"]})
            print(set_name, entry["rows"][-1], flush=True)
        data["sets"].append(entry)
    write(args.out, data, markdown(data))


def markdown(data: dict) -> str:
    """The Markdown table of a run's JSON (`data`: what `main` writes)."""
    info, sets = data["machine"], data["sets"]
    lines = ["# The floor under Lite0's agreement: the dense model against itself with rounded weights\n",
             f"`{data['command'].strip()}` on {info['device']}, {info['torch_threads']} torch threads, {info['date']}. "
             "Every conv and linear weight of EfficientNet-Lite0 (depthwise included) cast to float16 / bfloat16 and "
             "back, or rounded per output channel to b bits (symmetric round-to-nearest); nothing compressed, all "
             "computed in float32. Top-1 agreement with the dense model (KL in nats below it).\n",
             "| weights | " + " | ".join(f"{s['set']}, n = {s['n']}" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for i, name in enumerate(ROUNDINGS):
        cells = [f"{s['rows'][i]['agreement']:.4f} (KL {s['rows'][i]['kl']:.4f})" for s in sets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| dense model's median top-1 probability | "
                 + " | ".join(f"{s['median_top1_prob']:.2f}" for s in sets) + " |")
    lines.append("| inputs whose two best classes are within 0.05 | "
                 + " | ".join(f"{s['near_ties']:.1%}" for s in sets) + " |")
    eight = [s["rows"][list(ROUNDINGS).index("8 bits")]["agreement"] for s in sets]
    lines += ["", f"Every weight rounded to 8 bits per channel keeps {eight[0]:.4f} agreement on the held-out crops "
              f"`hf-vq compress` reports on ({min(eight):.4f} to {max(eight):.4f} over the three sets)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
