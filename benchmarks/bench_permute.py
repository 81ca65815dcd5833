#!/usr/bin/env python
"""PQF's permutation step on real weights: does permute + k-means beat k-means alone, and how fast is the search?

Two real models (FIXTURES.md), compressed at the same bits four ways, everything else equal — two
pipelines, each with and without its permutation step:

* the paper's: k-means alone vs the weight-only log-det permutation + k-means;
* the activation-aware one (`quantize_(..., calibration=...)`, held-out calibration data): weighted
  k-means alone (each weight entry weighted by the second moment of its input channel) vs the
  activation-aware permutation + weighted k-means.

Each method permutes once, then k-means runs with several seeds: a sensitive model's fidelity scatters
with the k-means seed more than with the permutation, so every figure is a mean ± std over seeds.

* all-MiniLM-L6-v2: every encoder linear at k=256, d=4 (2 bits/weight), and at d=2 (4 bits/weight, paper
  pipeline only, 30 k-means seeds: close enough to the dense model for a small effect to show)
  (embeddings and pooler dense). The residual
  stream is refused (it is `last_hidden_state`, returned to the user); the MLP hidden dims and the
  value/output heads are permuted. Fidelity: cosine of mean-pooled sentence embeddings to the dense
  model on 256 real sentences (gensim's lee_background.cor).
* EfficientNet-Lite0 (ImageNet weights): pointwise convs and classifier at k=256, d=4 (2 bits/weight) and
  d=2 (4 bits/weight, where the uncompressed-by-fine-tuning model still agrees on top-1 often enough to
  compare) (`fit_config`; 3x3 / depthwise as the library's defaults). Fidelity: top-1 agreement and KL to the dense model on 128 views of
  scikit-image's photos.

Reported: per channel space the log-det objective (identity, greedy start, after the search), the
total relative weight error Σ‖W−Ŵ‖²/Σ‖W‖² over compressed layers, the same error weighted by the input
channels' second moments (what the outputs see), output fidelity, wall times.

Speed: on one MiniLM space (layer 0's MLP hidden dim, P=1536, child `output.dense` [384, 1536], d=4),
the paper-style search — 10,000 single-swap proposals, each scored by recomputing the covariance of
all subvectors with numpy — against hf_vq's batched incremental search, timed to reach the
objective numpy ends at.

    .venv/bin/python benchmarks/bench_permute.py            # writes benchmarks/results/permute.{json,md}
    .venv/bin/python benchmarks/bench_permute.py --only minilm-d2 --keep benchmarks/results/permute.json
    .venv/bin/python benchmarks/bench_permute.py --quick    # fewer iterations, numpy baseline 500 swaps
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, efficientnet_lite0_converter, machine, minilm_path, write

import hf_vq
from hf_vq.codec.permutation import ObjectiveTerm, search_permutation
from hf_vq.calibrate import input_moments
from hf_vq.pipeline.encode import entry_weights as _entry_weights


# method -> (permutation objective: None / "weights" / "act", weighted k-means)
# method: (permutation objective or None, weighted k-means, search steps per space or None for VQConfig's)
METHODS = {"kmeans": (None, False, None), "permute+kmeans": ("weights", False, None),
           "permute+kmeans, 5000 steps": ("weights", False, 5000),
           "weighted kmeans": (None, True, None), "permute(act)+weighted kmeans": ("act", True, None)}
# each pipeline's "k-means alone" baseline
BASELINE = {"permute+kmeans": "kmeans", "permute+kmeans, 5000 steps": "kmeans",
            "permute(act)+weighted kmeans": "weighted kmeans"}
DEFAULT_METHODS = ("kmeans", "permute+kmeans", "weighted kmeans", "permute(act)+weighted kmeans")


def total_error(dense: torch.nn.Module, config: hf_vq.VQConfig) -> float:
    norms = {n: float(dense.get_submodule(n).weight.detach().double().pow(2).sum()) for n in config.layouts}
    return sum(lay.rel_error * norms[n] for n, lay in config.layouts.items()) / sum(norms.values())


def activation_error(base: torch.nn.Module, model: torch.nn.Module, config: hf_vq.VQConfig,
                     moments: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Total relative error with every weight entry weighted by the second moment of its input channel
    (`moments`, measured on `base`, the dense model the codes were learnt from, on the calibration batches):
    the error as the layers' outputs see it, Σ w (W - Ŵ)² / Σ w W², each layer's weights normalised to mean 1;
    and each layer's share of it (its Σ w (W - Ŵ)² over the same total Σ w W²: the shares add up to the total)."""
    names = [n for n, lay in config.layouts.items() if lay.tied_to is None]
    num, den, by_layer = 0.0, 0.0, {}
    for name in names:
        dense, vq = base.get_submodule(name), model.get_submodule(name)
        cls = type(vq)
        w = cls._weight_to_matrix(dense.weight.detach()).double()  # [rows, cols]
        err = (w - cls._weight_to_matrix(vq.weight.detach()).double()).pow(2)  # [rows, cols]
        scale = _entry_weights(dense, cls, config.layouts[name].kind, moments.get(name))
        scale = torch.ones_like(w) if scale is None else scale.double()
        by_layer[name] = float((scale * err).sum())
        num += by_layer[name]
        den += float((scale * w.pow(2)).sum())
    return num / den, {name: value / den for name, value in by_layer.items()}


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 6), "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
            "values": [round(v, 6) for v in values]}


def compare(dense, config, fidelity, calibration, seeds: list[int], methods: tuple[str, ...] = DEFAULT_METHODS) -> dict:
    """Each method permutes (or not) once, then k-means runs with every seed on that model.

    k-means from different seeds scatters the output fidelity of a sensitive model far more than the
    permutation moves it, so every figure is a mean (and standard deviation) over the seeds.
    """
    out = {}
    for method in methods:
        objective, weighted, steps = METHODS[method]
        base = copy.deepcopy(dense)
        entry: dict = {}
        if objective is not None:
            search_config = copy.deepcopy(config)
            search_config.permute_iters = steps or config.permute_iters
            report = hf_vq.permute_(base, search_config, calibration=calibration if objective == "act" else None)
            entry["permutation_seconds"] = round(report.seconds, 1)
            entry["objective"] = report.objective
            entry["spaces"] = [{"name": s.name, "P": s.size, "repeats": s.repeats, "children": s.children,
                                "status": s.status, "logdet_identity": s.objective_identity,
                                "logdet_greedy": s.objective_greedy, "logdet_after": s.objective, "swaps": s.accepted,
                                "reasons": s.reasons} for s in report.spaces]
            entry["report"] = str(report)
        moments = input_moments(base, list(hf_vq.plan(base, config)), calibration)  # once per (permuted) base
        runs = []
        for seed in seeds:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            run_config = copy.deepcopy(config)
            run_config.permute, run_config.seed = False, seed  # already permuted (or not) above
            filled = hf_vq.quantize_(model, run_config, progress=False, calibration=calibration if weighted else None)
            seconds = round(time.perf_counter() - start, 1)
            act, by_layer = activation_error(base, model, filled, moments)
            runs.append({"seed": seed, "seconds": seconds, "total_rel_error": total_error(dense, filled),
                         "activation_rel_error": act, **fidelity(model)})
            print(f"[{method}] seed {seed}: {runs[-1]}", flush=True)
            for name, value in by_layer.items():
                entry.setdefault("activation_error_by_layer", {}).setdefault(name, []).append(value)
        entry["runs"] = runs
        for key in runs[0]:
            if key not in ("seed", "seconds"):
                entry[key] = _stats([r[key] for r in runs])
        entry["activation_error_by_layer"] = {name: round(statistics.mean(v), 7)  # mean over the seeds
                                              for name, v in entry["activation_error_by_layer"].items()}
        entry["kmeans_seconds"] = round(statistics.mean(r["seconds"] for r in runs), 1)
        out[method] = entry
    return out


def minilm(iters: int, n_iter: int, seeds: list[int], d: int = 4, methods: tuple[str, ...] = DEFAULT_METHODS) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from hf_vq.evaluate import EVAL_SENTENCES, calibration_batches, embedding_cosine, real_sentences

    dense = AutoModel.from_pretrained(minilm_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    evaluation = real_sentences(EVAL_SENTENCES)
    calibration = calibration_batches(64, tokenizer=tokenizer)  # the 64 sentences after the evaluated ones

    def fidelity(model):
        r = embedding_cosine(dense, model, tokenizer, evaluation)
        return {"cosine_mean": r["mean_cosine"], "cosine_min": r["min_cosine"]}

    config = hf_vq.VQConfig(k=256, n_iter=n_iter, modules_to_not_convert=["embeddings.*", "pooler.*"], permute_iters=iters,
                            block_size={"linear": d})
    return compare(dense, config, fidelity, calibration, seeds, methods)


def lite0(iters: int, n_iter: int, d: int, seeds: list[int]) -> dict:
    from hf_vq.evaluate import calibration_batches, image_fidelity, real_images
    from hf_vq.integrations.timm import fit_config

    dense = efficientnet_lite0_converter().convert().eval()
    images = real_images(128, model=dense)  # evaluation: views drawn with seed 0
    calibration = calibration_batches(32, model=dense)  # other random views (seed 1) of the photos

    def fidelity(model):
        r = image_fidelity(dense, model, images)
        return {"top1_agreement": r["top1_agreement"], "mean_kl": r["mean_kl"]}

    config = fit_config(dense, hf_vq.VQConfig(k=256, n_iter=n_iter, permute_iters=iters,
                                              block_size={"conv1x1": d, "linear": d}))
    return compare(dense, config, fidelity, calibration, seeds)


def numpy_sls(w: np.ndarray, d: int, iters: int, seed: int = 0) -> tuple[float, float]:
    """The paper's search: one random swap per step, objective recomputed from all subvectors (numpy)."""
    rng = np.random.default_rng(seed)
    perm = np.arange(w.shape[1])

    def objective(p):
        return np.linalg.slogdet(np.cov(w[:, p].reshape(-1, d), rowvar=False))[1]

    current, start = objective(perm), time.perf_counter()
    for _ in range(iters):
        i, j = rng.choice(w.shape[1], 2, replace=False)
        perm[i], perm[j] = perm[j], perm[i]
        value = objective(perm)
        if value < current:
            current = value
        else:
            perm[i], perm[j] = perm[j], perm[i]
    return float(current), time.perf_counter() - start


SPEED_TENSOR = "encoder.layer.0.output.dense.weight"


def _earlier(path: str) -> tuple[dict, dict]:
    """An earlier result JSON and where it came from (file, device, date), for the sections reused from it."""
    data = json.loads(Path(path).read_text())
    return data, {"file": Path(path).name, "device": data["machine"]["device"], "date": data["machine"]["date"]}


def speed(numpy_iters: int, weights: str | None = None, numpy_from: str | None = None) -> dict:
    """Paper-style numpy search vs hf_vq's on MiniLM's first MLP space; `weights`: a safetensors file holding
    `SPEED_TENSOR` (default: the fixture's model.safetensors; a copy of the one tensor travels to a GPU machine);
    `numpy_from`: an earlier result JSON whose numpy search (objective and seconds) is reused instead of
    running it again (a GPU machine's time is short; the JSON records where the figures came from)."""
    from safetensors import safe_open

    with safe_open(weights or str(minilm_path() / "model.safetensors"), framework="pt") as f:
        name = next(n for n in f.keys() if n.endswith(SPEED_TENSOR))
        w = f.get_tensor(name).float()  # [384, 1536]
    if numpy_from:
        earlier, origin = _earlier(numpy_from)
        target, numpy_s, numpy_iters = (earlier["speed"][key] for key in ("numpy_objective", "numpy_seconds", "numpy_iters"))
    else:
        target, numpy_s = numpy_sls(w.double().numpy(), 4, numpy_iters)
    out = {"space": "encoder.layer.0 MLP hidden (P=1536, output.dense [384, 1536], d=4)",
           "numpy_iters": numpy_iters, "numpy_objective": round(target, 5), "numpy_seconds": round(numpy_s, 2)}
    if numpy_from:
        out["numpy_from"] = origin
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        term = [ObjectiveTerm(w.to(dev)[:, :, None], 4)]
        search_permutation(term, iters=5, device=dev)  # warm-up
        reached = None
        for steps in (10, 20, 40, 80, 160, 320, 640, 1280, 2560):
            if dev == "cuda":
                torch.cuda.synchronize()
            r = search_permutation(term, iters=steps, device=dev, patience=10**9)
            if r.objective <= target:
                reached = {"steps": steps, "proposals": r.proposals, "seconds": round(r.seconds, 3),
                           "objective": round(r.objective, 5), "speedup": round(numpy_s / r.seconds, 1)}
                break
        final = search_permutation(term, iters=1000, device=dev)
        out[dev] = {"reached_numpy_objective": reached, "default_1000_steps": {
            "objective": round(final.objective, 5), "seconds": round(final.seconds, 2), "steps": final.steps}}
    return out


def _shift(new: dict, old: dict) -> str:
    """Difference of the means over the k-means seeds, ± its standard error (independent samples)."""
    se = math.sqrt(new["std"] ** 2 / len(new["values"]) + old["std"] ** 2 / len(old["values"]))
    return f"{new['mean'] - old['mean']:+.4f} ± {se:.4f}"


def _kept_by_origin(data: dict) -> dict[str, list[str]]:
    """The sections reused from earlier runs, grouped by their origin ("file, date")."""
    out: dict[str, list[str]] = {}
    for name, origin in data.get("kept", {}).items():
        out.setdefault(f"{origin['file']}, {origin['date']}", []).append(name)
    return out


def _largest_share(res: dict, method: str, baseline: str) -> str | None:
    """The layer carrying the largest share of the baseline's activation-weighted error, and its value with `method`."""
    before, after = (res[m].get("activation_error_by_layer") for m in (baseline, method))
    if not before or not after:
        return None
    name = max(before, key=before.get)
    total = res[baseline]["activation_rel_error"]["mean"]
    return (f"`{name}` carries {before[name]:.5f} of {baseline}'s {total:.5f} ({100 * before[name] / total:.0f} %); "
            f"with {method} {after[name]:.5f}")


def _pm(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(data: dict) -> str:
    m = data["machine"]
    machine_line = f"Machine: {m['device']}, {m['torch_threads']} torch threads, torch {m['torch']}, {m['date']}."
    if data["models"]:
        lines = ["# PQF permutation: permute + k-means vs k-means alone\n", *_fidelity_lines(data, machine_line)]
    else:  # a speed-only run (--only speed)
        lines = ["# PQF permutation search speed\n", machine_line + "\n"]
    lines += _speed_lines(data.get("speed"))
    sp = data.get("speed") or {}
    command = "python benchmarks/bench_permute.py" + (
        f" --only speed --weights FILE --numpy-from {sp['numpy_from']['file']}" if "numpy_from" in sp else "")
    lines.append(f"\n```bash\n{command}\n```\n")
    return "\n".join(lines)


def _fidelity_lines(data: dict, machine_line: str) -> list[str]:
    """The comparison table, the largest per-layer shares and the per-space objectives."""
    lines = [machine_line + " "
             f"k = 256, d = 4 (linear / pointwise) unless the row says d=2, {data['n_iter']} k-means iterations, "
             f"{data['iters']} search steps per space. Each method permutes once (search seed 0), then k-means runs "
             f"with each seed listed; figures are mean ± standard deviation over those k-means seeds. In the reduction "
             "rows the fidelity column is the change of the mean (pipeline minus its k-means alone) ± its standard "
             "error: a change smaller than about twice its standard error is within the k-means seed scatter.\n",
             "Methods: **kmeans** — no permutation, plain (annealed) k-means; **permute+kmeans** — the paper's "
             "objective (log-det of the children's weight-subvector covariance), plain k-means (**, 5000 steps**: the same "
             "with a five times longer search, `VQConfig(permute_iters=5000)`); **weighted kmeans** — "
             "no permutation, k-means weighting each weight entry by the second moment of its input channel "
             "(`quantize_(..., calibration=)` with `permute=False`); **permute(act)+weighted kmeans** — what "
             "`quantize_(..., calibration=)` / `hf-vq compress --calibrate` run: the activation-aware permutation "
             "objective (each child's columns scaled by the RMS of its input channel), then weighted k-means. "
             "Each permutation pipeline is compared with its own k-means alone. Calibration data is "
             "disjoint from the evaluation: MiniLM 64 held-out sentences (after the 256 evaluated ones); "
             "EfficientNet-Lite0 32 other random views (seed 1) of the photos whose seed-0 views are evaluated.\n",
             *[f"Kept from an earlier run of the same code ({', '.join(sorted(names))}): {origin}.\n"
               for origin, names in _kept_by_origin(data).items()],
             "Errors: **weight** Σ‖W−Ŵ‖²/Σ‖W‖² over the compressed layers; **activation-weighted** the same with every "
             "entry weighted by the second moment of its input channel on the calibration data (per layer "
             "normalised to mean 1): the error as the layers' outputs see it.\n",
             "| model | method | seeds | weight error | activation-weighted error | output fidelity | permutation s | k-means s |",
             "|---|---|---|---|---|---|---|---|"]
    for model, res in data["models"].items():
        for method, r in res.items():
            fid = (f"cosine mean {_pm(r['cosine_mean'])} / min {_pm(r['cosine_min'])}" if "cosine_mean" in r
                   else f"top-1 agreement {_pm(r['top1_agreement'], 3)}, KL {_pm(r['mean_kl'], 3)}")
            lines.append(f"| {model} | {method} | {len(r['runs'])} | {_pm(r['total_rel_error'], 5)} "
                         f"| {_pm(r['activation_rel_error'], 5)} | {fid} | {r.get('permutation_seconds', '')} "
                         f"| {r['kmeans_seconds']} |")
        for method, baseline in BASELINE.items():
            if method not in res:
                continue
            cut = {key: 100 * (1 - res[method][key]["mean"] / res[baseline][key]["mean"])
                   for key in ("total_rel_error", "activation_rel_error")}
            shift = ", ".join(f"{label} {_shift(res[method][key], res[baseline][key])}" for key, label in
                              (("cosine_mean", "cosine mean"), ("top1_agreement", "top-1 agreement"), ("mean_kl", "KL"))
                              if key in res[method])
            lines.append(f"| {model} | **{method} vs {baseline}: error reduction** | | **{cut['total_rel_error']:.2f} %** "
                         f"| **{cut['activation_rel_error']:.2f} %** | {shift} | | |")
    shares = [f"- {model}, {method}: {share}" for model, res in data["models"].items() for method, baseline in
              BASELINE.items() if method in res and (share := _largest_share(res, method, baseline))]
    if shares:
        lines += ["\nLargest single-layer share of the activation-weighted error (per-layer means over the seeds; "
                  "runs that recorded it):\n", *shares]
    lines.append("\n## Per channel space (log-det objective of the children's subvector covariance)\n")
    for model, res in data["models"].items():
        for method in BASELINE:
            if method not in res:
                continue
            lines += [f"### {model}, {method}\n", "| space | P | children | identity | greedy | after | swaps |",
                      "|---|---|---|---|---|---|---|"]
            for sp in res[method].get("spaces", []):
                if sp["logdet_after"] is None:
                    continue
                size = f"{sp['P']}x{sp['repeats']}" if sp["repeats"] > 1 else str(sp["P"])
                lines.append(f"| {sp['name']} | {size} | {', '.join(sp['children'][:3])}{' …' if len(sp['children']) > 3 else ''} "
                             f"| {sp['logdet_identity']:.4f} | {sp['logdet_greedy']:.4f} | {sp['logdet_after']:.4f} | {sp['swaps']} |")
            refused = [sp for sp in res[method].get("spaces", []) if sp["status"] == "refused"]
            if refused:
                lines.append("\nRefused: " + "; ".join(f"{sp['name']} ({sp['reasons'][0]})" for sp in refused) + "\n")
    return lines


def _speed_lines(sp: dict | None) -> list[str]:
    """The search-speed table (numpy baseline vs hf_vq's search per device)."""
    lines: list[str] = []
    if sp:
        origin = (f" (from {sp['numpy_from']['file']}, run on {sp['numpy_from']['device']} {sp['numpy_from']['date']})"
                  if "numpy_from" in sp else "")
        lines += ["\n## Search speed\n", f"{sp['space']}. Paper-style numpy search: {sp['numpy_iters']} single-swap "
                  f"proposals, objective {sp['numpy_objective']} in {sp['numpy_seconds']} s{origin}.\n",
                  "| device | steps to reach numpy's objective | proposals | seconds | speed-up | 1000 steps: objective (s) |",
                  "|---|---|---|---|---|---|"]
        for dev in ("cpu", "cuda"):
            if dev in sp:
                r, f = sp[dev]["reached_numpy_objective"], sp[dev]["default_1000_steps"]
                if r:
                    lines.append(f"| {dev} | {r['steps']} | {r['proposals']} | {r['seconds']} | **{r['speedup']}×** "
                                 f"| {f['objective']} ({f['seconds']}) |")
                else:
                    lines.append(f"| {dev} | not reached | | | | {f['objective']} ({f['seconds']}) |")
    return lines




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=None, help="search steps per space (default: VQConfig's)")
    parser.add_argument("--n-iter", type=int, default=None, help="k-means iterations (default 100)")
    parser.add_argument("--seeds", type=int, default=None, help="k-means seeds per method (default 12; 5 for MiniLM)")
    parser.add_argument("--only", choices=["minilm", "minilm-d2", "lite0", "speed"], action="append")
    parser.add_argument("--out", default=str(RESULTS / "permute"))
    parser.add_argument("--weights", default=None, help=f"safetensors file with {SPEED_TENSOR} for --only speed")
    parser.add_argument("--numpy-from", default=None, help="reuse the numpy search of this earlier result JSON")
    parser.add_argument("--minilm-d2-seeds", type=int, default=30, help="k-means seeds for MiniLM at d=2")
    parser.add_argument("--keep", default=None, help="an earlier result JSON whose models / speed sections not run "
                                                     "now are kept (recorded under 'kept')")
    args = parser.parse_args(argv)
    iters = args.iters or (100 if args.quick else hf_vq.VQConfig().permute_iters)
    n_iter = args.n_iter or (20 if args.quick else 100)
    only = set(args.only or ["minilm", "minilm-d2", "lite0", "speed"])
    seeds = list(range(args.seeds or (2 if args.quick else 12)))
    data = {"machine": machine(), "iters": iters, "n_iter": n_iter, "seeds": seeds, "models": {}}
    if "minilm" in only:
        data["models"]["MiniLM"] = minilm(iters, n_iter, seeds[:5])
    if "minilm-d2" in only:
        # 4 bits/weight: the compressed encoder stays close to the dense one (cosine ~0.97), so the permutation's
        # small effect is measurable with enough k-means seeds; the paper's pipeline only (k-means is fast here)
        data["models"]["MiniLM (d=2)"] = minilm(iters, n_iter, list(range(args.minilm_d2_seeds)), 2,
                                                ("kmeans", "permute+kmeans", "permute+kmeans, 5000 steps"))
    if "lite0" in only:
        data["models"]["EfficientNet-Lite0 (d=2)"] = lite0(iters, n_iter, 2, seeds)
        data["models"]["EfficientNet-Lite0 (d=4)"] = lite0(iters, n_iter, 4, seeds)
    if "speed" in only:
        data["speed"] = speed(500 if args.quick else 10_000, args.weights, args.numpy_from)
    if args.keep:
        earlier, origin = _earlier(args.keep)
        sections = {**earlier.get("models", {}), **({"speed": earlier["speed"]} if "speed" in earlier else {})}
        for name, res in sections.items():
            if name not in data["models"] and not (name == "speed" and "speed" in data):
                (data if name == "speed" else data["models"])[name] = res
                # a section the earlier file itself kept keeps its own origin
                data.setdefault("kept", {})[name] = earlier.get("kept", {}).get(name, origin)
    order = ["MiniLM", "MiniLM (d=2)", "EfficientNet-Lite0 (d=2)", "EfficientNet-Lite0 (d=4)"]
    data["models"] = dict(sorted(data["models"].items(), key=lambda item: order.index(item[0])))
    write(args.out, data, markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
