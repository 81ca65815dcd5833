#!/usr/bin/env python
"""What checking the checksums costs when loading compressed all-MiniLM-L6-v2 (`from_pretrained`, one device).

Each load runs in a fresh child process with the modeling code imported before the clock, checksums checked
(`HF_VQ_VERIFY=1`, the default) and not (`HF_VQ_VERIFY=0`) alternating, so both see the same machine load; the
checkpoint is in the page cache. Also timed: the check alone (CRC32 of every tensor of the file, in-process).

    .venv/bin/python benchmarks/bench_verify.py [--pairs 15] [--folder minilm-vq]   # writes results/verify.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import RESULTS, machine, minilm_path, write

_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(2)
    import hf_vq
    import transformers.models.bert.modeling_bert  # noqa: F401 - imported before the clock
    from transformers import AutoModel
    start = time.perf_counter()
    AutoModel.from_pretrained(sys.argv[1])
    print(json.dumps({"from_pretrained": time.perf_counter() - start}))
""")


def _compressed(folder: str | None, tmp: str) -> Path:
    if folder:
        return Path(folder)
    from transformers import AutoModel

    import hf_vq

    out = Path(tmp) / "minilm-vq"
    AutoModel.from_pretrained(minilm_path(), quantization_config=hf_vq.VQConfig(k=256, n_iter=5, permute=False)
                              ).save_pretrained(out)
    return out


def run(pairs: int, folder: str | None) -> dict:
    from hf_vq.serialization import verify_files, weight_files

    with tempfile.TemporaryDirectory() as tmp:
        path = _compressed(folder, tmp)
        files = weight_files(path)
        checks = []
        for _ in range(20):
            start = time.perf_counter()
            verify_files(files, verify=True)
            checks.append(time.perf_counter() - start)
        samples: dict[str, list[float]] = {"1": [], "0": []}
        for _ in range(pairs):
            for flag in ("1", "0"):
                proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                                      timeout=600, env={**os.environ, "HF_VQ_VERIFY": flag})
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                samples[flag].append(json.loads(proc.stdout.strip().splitlines()[-1])["from_pretrained"])
        diffs = [a - b for a, b in zip(samples["1"], samples["0"])]
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        return {"file_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2), "pairs": pairs,
                "check_alone_ms": round(1e3 * statistics.median(checks), 2),
                "from_pretrained_verified_ms": round(1e3 * statistics.median(samples["1"]), 1),
                "from_pretrained_unverified_ms": round(1e3 * statistics.median(samples["0"]), 1),
                "paired_difference_ms": round(1e3 * statistics.median(diffs), 2),
                "paired_difference_iqr_ms": [round(1e3 * q1, 2), round(1e3 * q3, 2)]}


def markdown(data: dict) -> str:
    m = data["machine"]
    return "\n".join([
        "# Checksum verification when loading all-MiniLM-L6-v2 (compressed, k=256, d=4)\n",
        f"Machine: {m['device']}, torch {m['torch']}, {m['date']}. Fresh child process per load, {data['pairs']} "
        f"alternating pairs (`HF_VQ_VERIFY=1` / `0`), medians; model.safetensors {data['file_mb']} MB, in the page "
        "cache.\n",
        "| | ms |", "|---|---|",
        f"| CRC32 of every tensor of the file (the check alone, in-process) | {data['check_alone_ms']} |",
        f"| `from_pretrained`, checksums checked (default) | {data['from_pretrained_verified_ms']} |",
        f"| `from_pretrained`, `HF_VQ_VERIFY=0` | {data['from_pretrained_unverified_ms']} |",
        f"| paired difference (quartiles) | {data['paired_difference_ms']} ({data['paired_difference_iqr_ms'][0]} to "
        f"{data['paired_difference_iqr_ms'][1]}) |",
        "\n```bash\n.venv/bin/python benchmarks/bench_verify.py\n```\n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--folder", help="an existing compressed MiniLM folder (default: compress one, n_iter=5)")
    args = parser.parse_args()
    data = {"machine": machine(), **run(args.pairs, args.folder)}
    write(RESULTS / "verify", data, markdown(data))


if __name__ == "__main__":
    main()
