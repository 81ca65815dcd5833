#!/usr/bin/env python
"""How well bit allocation's distortion estimates predict what a layer's compression costs on held-out text.

Bit allocation (hf_vq/pipeline/allocation.py) adds up, over the layers, an estimate of what each option costs the
model. This experiment takes MiniLM's word embeddings and all six weight matrices of blocks 1 and 4, compresses ONE
layer at a time with the real encoder (the rest of the model dense), and measures the truth: 1 - the mean cosine of
the mean-pooled sentence embedding to the dense one on the 256 held-out Lee news sentences. Against it, the
estimates (calibration: 1,024 Wikipedia sentences as `hf-vq compress` draws them; the probe is their first two
batches):

* **noise, tokens**: `α` from Gaussian noise of relative output error 0.01 injected in the layer, measured on every
  token state (the allocation before this experiment), times the option's quick error `e`;
* **quantization, tokens**: `α` from the error a quick 2-bit encoding (d = 4, k = 256) leaves in the layer, times `e`;
* **quantization, pooled**: the same, measured on the token states averaged over each sentence
  (`last_hidden_state:mean`);
* **engine**: the last, with the embedding table's options measured end to end (each option's quickly coded table
  in the model) instead of `α·e` — what the allocation does now.

An additive allocation needs estimates proportional to the truth: the table reports, per estimate, the spread of
`log(truth / estimate)` over the rows (0 = a constant factor everywhere) and Spearman's rank correlation.

    .venv/bin/python benchmarks/experiment_sensitivity.py      # about 4 minutes on 2 cores
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics

import torch
import torch.nn.functional as F

torch.set_num_threads(2)

from _common import RESULTS, machine, minilm_path, write  # noqa: E402

OUT = RESULTS / "experiment_sensitivity"
BLOCKS = (1, 4)
ESTIMATES = ("noise, tokens", "quantization, tokens", "quantization, pooled", "engine")


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    from hf_vq import VQConfig
    from hf_vq.calibrate import merge_statistics
    from hf_vq.codec.hessian import output_error
    from hf_vq.data import calibration_batches
    from hf_vq.evaluate import EVAL_SENTENCES, mean_pool, real_sentences
    from hf_vq.calibrate.sources import tokenize_batches
    from hf_vq.pipeline import allocation as A
    from hf_vq.pipeline.calibrated import fit_layer, install_layer
    from hf_vq.pipeline.parallel import Workers
    from hf_vq.pipeline.select import plan

    path = minilm_path()
    dense = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batches = [((), b) for b in calibration_batches(1024, tokenizer=tok, model=dense)]
    config = VQConfig(encoder="output-aware", scales=True, target_ratio=16)
    layouts = plan(dense, config)
    modules = dict(dense.named_modules())
    names = ["embeddings.word_embeddings"] + [n for n in layouts if any(n.startswith(f"encoder.layer.{b}.")
                                                                       for b in BLOCKS)]
    halves = A._dense_statistics(dense, modules, names, batches, Workers())
    stats: dict = {}
    for half in halves:
        merge_statistics(stats, half)
    probes = {"tokens": A._Probe(dense, batches, ("last_hidden_state",)),
              "pooled": A._Probe(dense, batches, ("last_hidden_state:mean",))}
    held_out = tokenize_batches(tok, real_sentences(EVAL_SENTENCES), model=dense, batch_size=32)

    @torch.no_grad()
    def pooled(model) -> torch.Tensor:  # [sentences, hidden]
        return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in held_out])

    reference = pooled(dense)
    rows = []
    for name in names:
        layout, module = layouts[name], modules[name]
        matrix = module.weight.detach().float()  # [rows, cols]
        stat = stats.get(name)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(matrix.shape, generator=gen)
        rows_w = A._row_weights(stat)
        if rows_w is not None:
            ratio = float((noise.pow(2).sum(1) * rows_w).sum() / (matrix.pow(2).sum(1) * rows_w).sum())
        else:
            ratio = output_error(matrix, matrix + noise, A._hessian(stat, matrix.shape[1], matrix.device))
        noise = noise * math.sqrt(1e-2 / ratio)
        delta, e_ref = A._reference_error(layout, matrix, stat, config)
        alpha = {"noise, tokens": probes["tokens"].change(module, noise) / 1e-2,
                 "quantization, tokens": probes["tokens"].change(module, delta) / e_ref,
                 "quantization, pooled": probes["pooled"].change(module, delta) / e_ref}
        menu = {c: o for o, c in A._menu(layout, matrix, stat, config, 1.0, halves[0].get(name), halves[1].get(name))}
        table = {c: o for o, c in A._menu(layout, matrix, stat, config, 1.0,
                                          change=lambda dw: probes["pooled"].change(module, dw))
                 } if layout.kind == "embedding" else {}
        options = [(8, 2048), (8, 256), (4, 256)] if layout.kind == "embedding" else [(4, 256), (8, 256)]
        for d, k in options:
            e = menu[(d, k)].distortion
            model = copy.deepcopy(dense)
            lay = dataclasses.replace(layout, d=d, k=k)
            install_layer(model, name, lay, *fit_layer(model, name, lay, stat, config, torch.device("cpu")),
                          torch.device("cpu"))
            truth = 1 - float(F.cosine_similarity(pooled(model), reference, dim=-1).mean())
            est = {key: a * e for key, a in alpha.items()}
            est["engine"] = table[(d, k)].distortion if layout.kind == "embedding" else est["quantization, pooled"]
            rows.append({"layer": name, "option": f"d{d}k{k}", "quick_error": e, "truth": truth, "estimates": est})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for key in ESTIMATES:
        logs = [math.log(r["truth"] / r["estimates"][key]) for r in rows]
        summary[key] = {"log_ratio_std": statistics.pstdev(logs), "spearman": _spearman(
            [r["truth"] for r in rows], [r["estimates"][key] for r in rows])}
    data = {"machine": machine(), "command": "python benchmarks/experiment_sensitivity.py", "rows": rows,
            "summary": summary}
    write(OUT, data, markdown(data))


def _spearman(a: list[float], b: list[float]) -> float:
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=xs.__getitem__))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def markdown(data: dict) -> str:
    info = data["machine"]
    lines = ["# Allocation's distortion estimates against one layer's real cost (MiniLM)\n",
             f"`{data['command']}` on {info['device']}, {info['torch_threads']} torch threads, {info['date']}. One "
             "layer compressed by the real encoder at a time; truth = 1 − mean cosine of the mean-pooled sentence "
             "embedding on 256 held-out Lee news sentences; estimates from 1,024 Wikipedia calibration sentences "
             "(see the script's docstring).\n",
             "| estimate | spread of log(truth / estimate) | Spearman rank correlation |", "|---|---|---|"]
    for key, s in data["summary"].items():
        lines.append(f"| {key} | {s['log_ratio_std']:.3f} | {s['spearman']:.3f} |")
    lines += ["", "| layer | option | quick error e | truth | " + " | ".join(ESTIMATES) + " |",
              "|---|---|---|---|" + "---|" * len(ESTIMATES)]
    for r in data["rows"]:
        lines.append(f"| {r['layer']} | {r['option']} | {r['quick_error']:.4f} | {r['truth']:.5f} | "
                     + " | ".join(f"{r['estimates'][k]:.5f}" for k in ESTIMATES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
