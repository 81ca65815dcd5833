#!/usr/bin/env python
"""GPU timings of the compression engine on a 7B-shaped layer (run by scripts/gpu_checks.sh; random weights, so
speed only): annealed k-means of one 4096x11008 layer (d = 4, k = 256, 100 iterations) and the output-aware encoder
(GPTQ-style pass + refits) on a 4096x4096 layer with the Hessian of 8192 random inputs. Prints `ENGINE ...` lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_vq.codec.kmeans import kmeans  # noqa: E402
from hf_vq.codec.output_aware import encode_output_aware  # noqa: E402
from hf_vq.codec.pq import split_blocks  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(11008, 4096, device=dev, generator=gen) * 0.02  # [out, in] of a 7B MLP up-projection
    x = split_blocks(w, 4)  # [11.3M, 4]
    kmeans(x[:100_000], 256, n_iter=2, seed=0)  # warm-up
    (_, _), seconds = timed(lambda: kmeans(x, 256, n_iter=100, seed=0))
    print(f"ENGINE kmeans 4096x11008 d=4 k=256 100 iterations: {seconds:.2f} s", flush=True)
    w2 = torch.randn(4096, 4096, device=dev, generator=gen) * 0.02
    inputs = torch.randn(8192, 4096, device=dev, generator=gen)
    h = (inputs.T @ inputs).double() / inputs.shape[0]  # [4096, 4096]
    result, seconds = timed(lambda: encode_output_aware(w2, h, k=256, d=4, scales=True, n_iter=1, kmeans_iters=25))
    print(f"ENGINE output-aware 4096x4096 d=4 k=256 (GPTQ pass, 1 refit round, scales): {seconds:.2f} s, relative "
          f"output error {result.stats['output_error']:.4f} (init {result.stats['output_error_init']:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
