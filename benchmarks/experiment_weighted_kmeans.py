#!/usr/bin/env python
"""Exploratory experiment that led to the library's weighted k-means: activation-weighted k-means, with and
without permutation, simulated with plain Lloyd. The library version (annealed, `quantize_(..., calibration=)`)
is measured in benchmarks/bench_permute.py; this script is kept as the record of the experiment.

EfficientNet-Lite0's outputs do not follow the weight error: k-means minimises the unweighted error and the
permutation (either objective) can move error onto channels that carry large activations. Here every quantized
layer is k-means'd with each subvector entry weighted by the second moment of its input channel (measured on 32
held-out views, seed 1), and the decoded weights are written back into a dense copy (a simulation of the
compressed model: same codebook size, no packing). Plain Lloyd iterations, no annealing, so "kmeans" here is
weaker than hf_vq's annealed k-means; compare the rows with each other.

    .venv/bin/python benchmarks/experiment_weighted_kmeans.py D SEEDS ITERS VARIANTS
    .venv/bin/python benchmarks/experiment_weighted_kmeans.py 2 3 30 kmeans,wkmeans,act-perm+wkmeans,paper-perm+wkmeans

Writes benchmarks/results/experiment_weighted_kmeans.{json,md} (mean ± std of KL and top-1 agreement per variant).
"""
from __future__ import annotations

import copy
import statistics
import sys

import torch

from _common import RESULTS, efficientnet_lite0_converter, machine, write

import hf_vq
from hf_vq.evaluate import calibration_batches, image_fidelity, real_images
from hf_vq.integrations.timm import fit_config
from hf_vq.calibrate import input_moments
from hf_vq.pipeline import plan

VARIANTS = {"kmeans": (None, False), "wkmeans": (None, True), "act-perm+wkmeans": ("act", True),
            "paper-perm+wkmeans": ("paper", True)}


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd k-means minimising sum w * (x - c)^2; returns the decoded subvectors.

    x, w: [n, d] subvectors and their per-entry weights (float64).
    """
    n, d = x.shape
    c = x[torch.randperm(n, generator=gen)[:k]].clone()  # [k, d]

    def assign(c: torch.Tensor) -> torch.Tensor:
        return (-2 * (w * x) @ c.T + w @ (c * c).T).argmin(1)  # [n]: argmin_c sum_t w_t (x_t - c_t)^2

    for _ in range(iters):
        a = assign(c)
        num = torch.zeros(k, d, dtype=x.dtype).index_add_(0, a, w * x)  # [k, d]
        den = torch.zeros(k, d, dtype=x.dtype).index_add_(0, a, w)  # [k, d]
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)  # weighted mean per entry; empty: keep
    return c[assign(c)]  # [n, d]


def simulate_(model, config, seed: int, weighted: bool, calibration) -> None:
    """Replace every planned layer's weight by its (weighted) k-means reconstruction, in place."""
    layouts = plan(model, config)
    modules = dict(model.named_modules())
    moments = input_moments(model, list(layouts), calibration) if weighted else {}
    gen = torch.Generator().manual_seed(seed)
    for name, layout in layouts.items():
        weight = modules[name].weight
        mat = weight.detach().reshape(weight.shape[0], -1).double()  # [rows, cols]
        rows, cols = mat.shape
        second = moments.get(name)  # [in_channels]
        if second is not None and cols % second.numel() == 0:
            scale = second.repeat_interleave(cols // second.numel())  # [cols]
        else:
            scale = torch.ones(cols, dtype=torch.float64)
        x = mat.reshape(-1, layout.d)  # [rows * cols/d, d]
        w = scale.reshape(1, cols // layout.d, layout.d).expand(rows, -1, -1).reshape(-1, layout.d)  # like x
        with torch.no_grad():
            weight.copy_(weighted_kmeans(x, w, layout.k, ITERS, gen).reshape(weight.shape).to(weight.dtype))


def main() -> None:
    global ITERS
    d, seeds, ITERS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    names = sys.argv[4].split(",")
    torch.set_num_threads(2)
    dense = efficientnet_lite0_converter().convert().eval()
    images = real_images(128, model=dense)  # evaluation views (seed 0)
    calibration = calibration_batches(32, model=dense)  # held-out views (seed 1)
    config = fit_config(dense, hf_vq.VQConfig(k=256, permute_iters=1000, block_size={"conv1x1": d, "linear": d}))
    rows = {}
    for label in names:
        permute, weighted = VARIANTS[label]
        base = copy.deepcopy(dense)
        if permute:
            hf_vq.permute_(base, config, calibration=calibration if permute == "act" else None)
        kls, agreements = [], []
        for seed in range(seeds):
            model = copy.deepcopy(base)
            simulate_(model, config, seed, weighted, calibration)
            r = image_fidelity(dense, model, images)
            kls.append(r["mean_kl"])
            agreements.append(r["top1_agreement"])
        rows[label] = {"kl_mean": statistics.mean(kls), "kl_std": statistics.stdev(kls) if seeds > 1 else 0.0,
                       "top1_agreement_mean": statistics.mean(agreements), "kl_per_seed": kls}
        print(f"d={d} {label}: {rows[label]}", flush=True)
    data = {"machine": machine(), "d": d, "seeds": seeds, "lloyd_iters": ITERS, "variants": rows}
    lines = ["# Activation-weighted k-means, with and without permutation (exploratory simulation)\n",
             f"Machine: {data['machine']['device']}, {data['machine']['date']}. EfficientNet-Lite0, d={d}, k=256, "
             f"{seeds} seeds, {ITERS} Lloyd iterations (no annealing); decoded weights written back into a dense "
             "copy; KL to the dense model on 128 views. See the docstring of "
             "benchmarks/experiment_weighted_kmeans.py.\n",
             "| variant | KL mean ± std | top-1 agreement | KL per seed |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['kl_mean']:.3f} ± {r['kl_std']:.3f} | {r['top1_agreement_mean']:.3f} "
              f"| {[round(v, 3) for v in r['kl_per_seed']]} |" for name, r in rows.items()]
    lines.append(f"\n```bash\n.venv/bin/python benchmarks/experiment_weighted_kmeans.py {' '.join(sys.argv[1:])}\n```\n")
    write(RESULTS / "experiment_weighted_kmeans", data, "\n".join(lines))


ITERS = 30

if __name__ == "__main__":
    main()
