#!/usr/bin/env python
"""One fine-tuning step, dense vs compressed: forward, backward and AdamW step of a BERT-shaped encoder.

GPU (`--device cuda`): BERT-base shape (hidden 768, 12 layers, intermediate 3072), batch 32 x 128 tokens, bf16
autocast; CPU: MiniLM shape (hidden 384, 6 layers, intermediate 1536), batch 16 x 64 tokens, fp32. Random weights
(speed does not depend on them). The compressed model is `quantize_`'d data-free (k = 256, d = 4 for every linear
and the token embedding: 2 bits/weight, 2 k-means iterations: the values do not matter for timing). What trains is
what fine-tuning trains: everything for the dense model; codebooks, norms and biases for the compressed one. Rows:

* `dense`;
* `hf_vq` (the training decode: the device's decode kernel forward, scatter-add backward, `hf_vq/kernels/train.py`);
* `hf_vq, reference decode` (the differentiable `F.embedding` decode the modules used before), same process;
* on CPU, `hf_vq, index_add_ backward` (the training decode summing codebook gradients with `index_add_` every step
  instead of the cached sparse assignment: `hf_vq.kernels.train.SPARSE_BACKWARD = False`).

Median of `--repeats` timed steps after 3 warm-up steps.

    python benchmarks/bench_train_step.py                                  # CPU -> results/train_step_cpu.{json,md}
    python benchmarks/bench_train_step.py --device cuda --out $OUT/train_step_cuda    # scripts/gpu_checks.sh
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, machine, write  # noqa: E402

SHAPES = {"cuda": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                       batch=32, seq=128),
          "cpu": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1536, num_attention_heads=12,
                      batch=16, seq=64)}


def step_time(model, batch: dict, device: str, repeats: int) -> float:
    """Median seconds of forward + backward + AdamW step over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).last_hidden_state.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import hf_vq
    from hf_vq.finetune import mark_trainable_
    from hf_vq.kernels import dispatch, train
    from transformers import BertConfig, BertModel

    shape = dict(SHAPES[args.device])
    batch_size, seq = shape.pop("batch"), shape.pop("seq")
    torch.manual_seed(0)
    dense = BertModel(BertConfig(**shape), add_pooling_layer=False).to(args.device).train()
    compressed = copy.deepcopy(dense).cpu()
    hf_vq.quantize_(compressed, hf_vq.VQConfig(k=256, block_size={"linear": 4, "embedding": 4}, n_iter=2,
                                               permute=False), progress=False, device=args.device)
    compressed = compressed.to(args.device).train()
    mark_trainable_(compressed)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30522, (batch_size, seq), generator=gen).to(args.device),
             "attention_mask": torch.ones(batch_size, seq, dtype=torch.long, device=args.device)}
    rows = [{"variant": "dense", "seconds": step_time(dense, batch, args.device, args.repeats)}]
    rows.append({"variant": "hf_vq", "seconds": step_time(compressed, batch, args.device, args.repeats)})
    variants = [("hf_vq, reference decode", dispatch, "TRAIN_DECODE")]
    if args.device == "cpu":
        variants.append(("hf_vq, index_add_ backward", train, "SPARSE_BACKWARD"))
    for name, module, switch in variants:  # each switch off for its row only
        with patch.object(module, switch, False):
            rows.append({"variant": name, "seconds": step_time(compressed, batch, args.device, args.repeats)})
    for row in rows:
        row["ms"] = round(1000 * row.pop("seconds"), 2)
        row["vs_dense"] = round(row["ms"] / rows[0]["ms"], 3)
    info = machine()
    data = {"device": args.device, "shape": {**shape, "batch": batch_size, "seq": seq}, "rows": rows,
            "repeats": args.repeats, "machine": info,
            "command": "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:])}
    lines = [f"# One fine-tuning step, dense vs compressed ({info['device']})", "",
             f"`{data['command']}`: BERT-shaped encoder {shape}, batch {batch_size} x {seq} tokens"
             + (", bf16 autocast" if args.device == "cuda" else ", fp32") + f"; median of {args.repeats} steps "
             "(forward, backward, AdamW) after 3 warm-up steps. Compressed: 2 bits/weight (k = 256, d = 4), "
             "codebooks + norms + biases train.", "", "| variant | ms / step | vs dense |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ms']} | {r['vs_dense']}× |" for r in rows]
    write(args.out or RESULTS / f"train_step_{args.device}", data, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
