"""Accuracy vs size on a real labelled task: Fashion-MNIST, a narrow timm ResNet-18, compressed ~20x and ~40x.

For each scheme — PQ without permutation (`VQConfig(permute=False)`), PQF (`permute=True`), and shared additive
quantization when this hf_vq has it — the dense baseline is compressed and fine-tuned with the library loop
(`hf_vq.finetune.finetune`: codes frozen; codebooks, BatchNorm, biases and the dense stem train; KL distillation
from the dense model + cross-entropy; Adam, cosine schedule, as in the paper's recipe). Test accuracy before and
after fine-tuning vs the accounted size (`hf_vq.size_report`) goes to
`benchmarks/results/finetune_fashion_mnist.{json,md,png}`.

    apt-get install -y dataset-fashion-mnist                 # the data (FIXTURES.md)
    nice .venv/bin/python benchmarks/bench_finetune.py       # the whole table, < 1 hour on 2 CPU cores

The dense baseline is cached in `~/.cache/hf_vq/bench_finetune/` (`--retrain` ignores the cache).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # thread counts must be fixed before torch / numba start their pools
    _threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
    if _threads is None and "--threads" in sys.argv:
        _threads = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, _threads or str(min(2, os.cpu_count() or 1)))

import argparse
import copy
import gzip
import hashlib
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, machine, write  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
CHANNELS = (32, 64, 128, 256)  # a ResNet-18 at half width: 2.8 M parameters, 10.7 MB in fp32
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
CACHE = Path.home() / ".cache" / "hf_vq" / "bench_finetune"

# ~20x: the paper's "small blocks" (3x3 d=9, 1x1/linear d=4) with k=512; ~40x: "large blocks" (d=18 / d=8), k=128.
# Additive quantization sums M=2 codewords per subvector: twice the block size gives the same bits per weight.
SIZES = {
    "~20x": {"k": 512, "block_size": {"conv3x3": 9, "conv1x1": 4, "linear": 4}},
    "~40x": {"k": 128, "block_size": {"conv3x3": 18, "conv1x1": 8, "linear": 8}},
}


#: Fine-tuning settings of the "PQF + code updates" rows.
CODE_UPDATES = {"code_update_fraction": 0.01, "code_update_every": 10}


def scheme_config(size: dict, scheme: dict) -> dict:
    """VQConfig keyword arguments of one (size, scheme) cell."""
    m = scheme.get("num_codebooks", 1)
    # "finetune": FinetuneArguments overrides; "calibrate": pass calibration images to quantize_
    vq = {k: v for k, v in scheme.items() if k not in ("finetune", "calibrate")}
    return {**size, **vq, "block_size": {kind: d * m for kind, d in size["block_size"].items()}}


class TensorDictDataset(torch.utils.data.Dataset):
    """Items `{"pixel_values": [1, 28, 28], "labels": []}` from two tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels  # [N, 1, 28, 28] float, [N] int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def load_fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x_train [60000, 1, 28, 28], y_train [60000], x_test [10000, 1, 28, 28], y_test [10000])`, normalised."""
    files = {name: DATA / f"{name}-ubyte.gz" for name in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        sys.exit(f"bench_finetune: Fashion-MNIST is not installed ({missing[0]} is missing). Install it with:\n"
                 f"    {INSTALL}")

    def images(path: Path) -> torch.Tensor:
        raw = np.frombuffer(gzip.open(path).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        return (torch.from_numpy(raw.copy()).float() / 255 - MEAN) / STD

    def labels(path: Path) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(gzip.open(path).read(), np.uint8, offset=8).astype(np.int64))

    return (images(files["train-images-idx3"]), labels(files["train-labels-idx1"]),
            images(files["t10k-images-idx3"]), labels(files["t10k-labels-idx1"]))


def make_model():
    import timm

    return timm.create_model("resnet18", in_chans=1, num_classes=10, channels=CHANNELS, pretrained_cfg_overlay=dict(
        input_size=(1, 28, 28), mean=(MEAN,), std=(STD,), crop_pct=1.0))


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and ±2-pixel shifts of a batch `[B, 1, 28, 28]`."""
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_dense(x, y, *, epochs: int, batch: int, lr: float, seed: int):
    """The dense baseline: Adam + cosine, cross-entropy, light augmentation."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    key = hashlib.sha1(json.dumps([CHANNELS, epochs, batch, lr, seed]).encode()).hexdigest()[:10]
    path = CACHE / f"dense-{key}.safetensors"
    torch.manual_seed(seed)
    model = make_model()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model, None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(y) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="dense baseline")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(augment(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, time.perf_counter() - start


def dense_control(dense, x, y, *, steps: int, batch: int, lr: float, seed: int):
    """The fine-tuning recipe applied to the dense model itself (every parameter trains, same loss, steps and
    schedule): the control for "fine-tuning is just more training". Cached like the baseline."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    key = hashlib.sha1(json.dumps([CHANNELS, "control", steps, batch, lr, seed,
                                   float(sum(p.sum() for p in dense.parameters()))]).encode()).hexdigest()[:10]
    path = CACHE / f"control-{key}.safetensors"
    model = copy.deepcopy(dense)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(y), generator=gen) for _ in range(-(-steps * batch // len(y)))])
    model.train()
    for step in tqdm(range(steps), desc="dense control"):
        idx = order[step * batch:(step + 1) * batch]
        with torch.no_grad():
            teacher = dense(x[idx])  # [B, 10]
        logits = model(x[idx])  # [B, 10]
        loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True,
                        reduction="batchmean") + F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def schemes() -> dict[str, dict]:
    """PQ without permutation, PQF, and shared additive quantization if this hf_vq has it."""
    import hf_vq
    from hf_vq import config as config_module

    out = {"PQ (no permutation)": {"permute": False}, "PQF": {"permute": True},
           # the same PQF model, its codes also re-assigned during fine-tuning (hf_vq.finetune.codes)
           "PQF + code updates": {"permute": True, "finetune": CODE_UPDATES},
           # the calibrated engine (output-aware encoding, per-channel scales) at the same k and block sizes,
           # calibrated on 256 training images (never the test images accuracy is measured on)
           "PQF, calibrated engine": {"permute": True, "encoder": "output-aware", "scales": True, "calibrate": True}}
    params = inspect.signature(hf_vq.VQConfig.__init__).parameters
    if "aq" in getattr(config_module, "METHODS", ()) and "share" in params:
        # one codebook set per block size (3x3 convs, pointwise convs + classifier), shared by all those layers
        out["AQ M=2, shared codebooks"] = {"method": "aq", "num_codebooks": 2, "share": "pool", "permute": False}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense_epochs", type=int, default=3)
    parser.add_argument("--ft_epochs", type=float, default=1.0, help="fine-tuning epochs per compressed model")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ft_lr", type=float, default=1e-3)
    parser.add_argument("--n_iter", type=int, default=100, help="k-means iterations")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="subset of schemes (names as in the table)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached dense baseline")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also apply the fine-tuning recipe to the dense model (is the gain just more training?)")
    parser.add_argument("--out", default=str(RESULTS / "finetune_fashion_mnist"))
    parser.add_argument("--render_only", action="store_true", help="rewrite the .md/.png from the existing .json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.render_only:
        render(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
        return

    import hf_vq
    from hf_vq.finetune import FinetuneArguments, finetune
    from hf_vq.integrations.timm import fit_config

    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    if args.retrain:
        for p in CACHE.glob("dense-*.safetensors"):
            p.unlink()
    dense, dense_s = train_dense(x_train, y_train, epochs=args.dense_epochs, batch=args.batch, lr=1e-3, seed=args.seed)
    dense.eval()
    dense_acc = accuracy(dense, x_test, y_test)
    n_params = sum(p.numel() for p in dense.parameters())
    dense_mb = sum(t.numel() * 32 for k, t in dense.state_dict().items()
                   if t.is_floating_point() and not k.endswith((".running_mean", ".running_var"))) / 2**23
    print(f"dense: {dense_acc:.4f} test accuracy, {dense_mb:.2f} MB ({n_params:,} parameters)")

    train_ds, test_ds = TensorDictDataset(x_train, y_train), TensorDictDataset(x_test, y_test)
    steps_per_epoch = len(train_ds) // args.batch + (len(train_ds) % args.batch > 0)
    ft_steps = max(1, round(args.ft_epochs * steps_per_epoch))
    control_acc = None
    if args.control:
        control_acc = accuracy(dense_control(dense, x_train, y_train, steps=ft_steps, batch=args.batch, lr=args.ft_lr,
                                             seed=args.seed), x_test, y_test)
        print(f"dense + the fine-tuning recipe ({ft_steps} steps): {control_acc:.4f}", flush=True)
    rows = []
    for scheme, scheme_cfg in schemes().items():
        for size_name, size_cfg in SIZES.items():
            if args.only and scheme not in args.only:
                continue
            student = copy.deepcopy(dense)
            config = fit_config(student, hf_vq.VQConfig(**scheme_config(size_cfg, scheme_cfg), n_iter=args.n_iter,
                                                        seed=args.seed))
            start = time.perf_counter()
            calibration = list(x_train[:256].split(64)) if scheme_cfg.get("calibrate") else None  # [64, 1, 28, 28] each
            hf_vq.quantize_(student, config, progress=False, example_inputs=torch.randn(2, 1, 28, 28),
                            calibration=calibration)
            compress_s = time.perf_counter() - start
            report = hf_vq.size_report(student)
            acc_before = accuracy(student, x_test, y_test)
            print(f"{size_name} {scheme}: {report.ratio:.1f}x, {acc_before:.4f} before fine-tuning "
                  f"(compressed in {compress_s:.0f} s)", flush=True)
            torch.manual_seed(args.seed)
            ft_args = FinetuneArguments(
                per_device_train_batch_size=args.batch, per_device_eval_batch_size=500, learning_rate=args.ft_lr,
                max_train_steps=ft_steps, lr_scheduler_type="cosine",
                train_dense=True, loss="kl", task_weight=1.0, distill_weight=1.0, seed=args.seed,
                eval_every_epoch=False, evaluate_before=False, progress=args.progress,
                **scheme_cfg.get("finetune", {}))
            start = time.perf_counter()
            result = finetune(ft_args, student=student, teacher=dense, train_dataset=train_ds, eval_dataset=test_ds)
            ft_s = time.perf_counter() - start
            perm = getattr(student, "vq_permutation_report", None)
            row = {
                "size": size_name, "scheme": scheme, "spec": config.spec, "k": config.k,
                "block_size": {k: v for k, v in config.block_size.items() if v}, "compressed_mb": round(report.compressed_mb, 4),
                "ratio": round(report.ratio, 2),
                "mean_rel_error": round(float(np.mean([l.rel_error for l in report.layers if l.rel_error is not None])), 5),
                "acc_before_ft": round(acc_before, 4),
                "acc_after_ft": round(result.metrics["eval_accuracy"], 4),
                "agreement_after_ft": round(result.metrics["eval_agreement"], 4),
                "ft_steps": result.completed_steps, "compress_s": round(compress_s, 1), "finetune_s": round(ft_s, 1),
                "permutation": None if perm is None else str(perm)[:200],
            }
            rows.append(row)
            print(json.dumps(row))

    total_s = time.perf_counter() - t0
    previous = Path(args.out).with_suffix(".json")
    if args.only and previous.is_file():  # a partial run updates its cells of the existing table
        old = json.loads(previous.read_text())
        if old.get("dense", {}).get("acc") == round(dense_acc, 4):
            done = {(r["size"], r["scheme"]) for r in rows}
            rows = [r for r in old["rows"] if (r["size"], r["scheme"]) not in done] + rows
            rows.sort(key=lambda r: (list(SIZES).index(r["size"]), r["scheme"]))
            total_s += old.get("total_s", 0)
    data = {
        "task": "Fashion-MNIST (60,000 train / 10,000 test), test accuracy",
        "model": f"timm resnet18, channels {list(CHANNELS)}, in_chans=1, 28x28 input, {n_params:,} parameters",
        "dense": {"acc": round(dense_acc, 4), "mb": round(dense_mb, 4), "epochs": args.dense_epochs,
                  "train_s": None if dense_s is None else round(dense_s, 1),
                  "acc_plus_finetune_recipe": None if control_acc is None else round(control_acc, 4)},
        "finetune_recipe": {"epochs": args.ft_epochs, "batch": args.batch, "lr": args.ft_lr, "optimizer": "AdamW (wd 0)",
                            "schedule": "cosine", "loss": "KL to dense teacher (T=1) + cross-entropy",
                            "trainable": "codebooks, BatchNorm, biases, dense stem; codes frozen"},
        "kmeans_n_iter": args.n_iter, "rows": rows, "total_s": round(total_s, 1),
        "command": "nice .venv/bin/python benchmarks/bench_finetune.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
    }
    if args.only:  # the reproduce line is the whole table's
        data["command"] = "nice .venv/bin/python benchmarks/bench_finetune.py" + (
            f" --threads {args.threads}" if "--threads" in " ".join(sys.argv) else "")
    render(data, Path(args.out))


def render(data: dict, out: Path) -> None:
    """Write `<out>.md` (table + reading of the figures) and `<out>.png` from the benchmark's data."""
    dense, recipe = data["dense"], data["finetune_recipe"]
    order = ["PQ (no permutation)", "PQF", "PQF + code updates", "PQF, calibrated engine"]
    rows = sorted(data["rows"], key=lambda r: (list(SIZES).index(r["size"]) if r["size"] in SIZES else 9,
                                               order.index(r["scheme"]) if r["scheme"] in order else 9))
    dense_acc, dense_mb, control = dense["acc"], dense["mb"], dense.get("acc_plus_finetune_recipe")
    md = [
        "# Fine-tuning compressed models: Fashion-MNIST accuracy vs size\n",
        f"{data['model']}; dense baseline {dense_acc:.2%} test accuracy at {dense_mb:.2f} MB (fp32), trained "
        f"{dense['epochs']} epochs. Each compressed model is fine-tuned {recipe['epochs']:g} epoch(s) with "
        "`hf_vq.finetune` (codebooks, BatchNorm, biases, stem train; codes frozen except in the \"code updates\" rows, "
        f"which re-assign at most {CODE_UPDATES['code_update_fraction']:g} of each layer's blocks every "
        f"{CODE_UPDATES['code_update_every']} steps; KL to the dense model + "
        f"cross-entropy; Adam lr {recipe['lr']:g}, cosine; batch {recipe['batch']}). Sizes are accounted by "
        "`hf_vq.size_report` (log2 k bits per code, fp16 codebooks, other tensors fp32, BN statistics folded). "
        "PQ and PQF use the same k and block sizes; AQ sums M = 2 codewords over blocks twice as long (same bits "
        "per weight for the codes) with one codebook set per block size shared by all layers, hence a smaller "
        "file at the same code rate.\n",
        "| target | scheme | spec | size MB | ratio | mean rel. error | acc. before FT | acc. after FT | Δ vs dense "
        "| Δ vs dense + FT recipe |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | fp32 | — | {dense_mb:.3f} | 1× | — | {dense_acc:.2%} | — | — | — |",
    ]
    if control is not None:
        md.append(f"| dense + FT recipe | fp32 | — | {dense_mb:.3f} | 1× | — | {dense_acc:.2%} | {control:.2%} | "
                  f"{(control - dense_acc) * 100:+.2f} pt | — |")
    for r in rows:
        vs_control = "—" if control is None else f"{(r['acc_after_ft'] - control) * 100:+.2f} pt"
        md.append(f"| {r['size']} | {r['scheme']} | `{r['spec']}` | {r['compressed_mb']:.3f} | {r['ratio']:.1f}× | "
                  f"{r['mean_rel_error']:.4f} | {r['acc_before_ft']:.2%} | {r['acc_after_ft']:.2%} | "
                  f"{(r['acc_after_ft'] - dense_acc) * 100:+.2f} pt | {vs_control} |")
    if not any(r["scheme"].startswith("AQ") for r in rows):
        md.append("\nShared additive quantization (`VQConfig(method='aq', share=...)`) was not available in this "
                  "hf_vq when the table was made.")
    # Reading: binomial standard error of a 10,000-image accuracy, PQF vs PQ at equal size, the control.
    se = (dense_acc * (1 - dense_acc) / 10_000) ** 0.5 * 100
    notes = [f"One seed; the standard error of a test accuracy here is about {se:.2f} pt "
             f"(so differences under ~{2 * se:.1f} pt are not resolved)."]
    by = {(r["size"], r["scheme"]): r for r in rows}
    for size in SIZES:
        pq, pqf = by.get((size, "PQ (no permutation)")), by.get((size, "PQF"))
        if pq and pqf:
            notes.append(f"{size}: PQF − PQ = {(pqf['acc_after_ft'] - pq['acc_after_ft']) * 100:+.2f} pt after "
                         f"fine-tuning ({(pqf['acc_before_ft'] - pq['acc_before_ft']) * 100:+.2f} pt before; mean "
                         f"relative weight error {pq['mean_rel_error']:.4f} → {pqf['mean_rel_error']:.4f}).")
    for size in SIZES:
        cal, pqf, codes = (by.get((size, name)) for name in ("PQF, calibrated engine", "PQF", "PQF + code updates"))
        if cal:
            notes.append(f"{size}: the calibrated engine (output-aware encoding on 256 training images) keeps "
                         f"{cal['acc_before_ft']:.2%} before fine-tuning, {(cal['acc_before_ft'] - dense_acc) * 100:+.2f} pt "
                         f"from dense" + (f" (k-means PQF: {pqf['acc_before_ft']:.2%})" if pqf else "") + ".")
        if codes and pqf:
            notes.append(f"{size}: code updates during fine-tuning: {codes['acc_after_ft']:.2%} vs {pqf['acc_after_ft']:.2%} "
                         f"with frozen codes ({(codes['acc_after_ft'] - pqf['acc_after_ft']) * 100:+.2f} pt).")
    if control is not None:
        best = max(rows, key=lambda r: r["acc_after_ft"]) if rows else None
        notes.append(
            f"The dense baseline is not converged: the same fine-tuning recipe applied to the dense model itself "
            f"(every parameter trains) gives {control:.2%}. Compare compressed models against that "
            f"({'best compressed ' + format(best['acc_after_ft'], '.2%') + ' at ' + format(best['ratio'], '.0f') + '×' if best else ''}), "
            "not only against the baseline they were distilled from.")
    md.append("\n" + "\n".join(f"- {n}" for n in notes))
    md.append(f"\nWhole table: {data['total_s'] / 60:.1f} min on {data['machine']['device']}, "
              f"{data['machine'].get('torch_threads')} torch thread(s), machine shared with other jobs. "
              f"Reproduce: `{data['command']}` (after `{INSTALL}`). ![accuracy vs size](finetune_fashion_mnist.png)\n")
    write(out, data, "\n".join(md) + "\n")
    plot(data, out.with_suffix(".png"))


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure.")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "acc_after_ft", "after fine-tuning (1 epoch)"),
                           (axes[1], "acc_before_ft", "before fine-tuning")):
        ax.axhline(data["dense"]["acc"] * 100, color="k", lw=1, ls="--", label=f"dense ({data['dense']['mb']:.1f} MB)")
        if data["dense"].get("acc_plus_finetune_recipe") is not None:
            ax.axhline(data["dense"]["acc_plus_finetune_recipe"] * 100, color="gray", lw=1, ls=":",
                       label="dense + the fine-tuning recipe")
        for i, scheme in enumerate(dict.fromkeys(r["scheme"] for r in data["rows"])):
            rows = sorted((r for r in data["rows"] if r["scheme"] == scheme), key=lambda r: r["compressed_mb"])
            ax.plot([r["compressed_mb"] for r in rows], [r[key] * 100 for r in rows], marker="o", color=f"C{i}",
                    label=scheme)
            for r in rows:
                ax.annotate(f"{r['ratio']:.0f}×", (r["compressed_mb"], r[key] * 100), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
        ax.set_xscale("log")
        ax.set_xlabel("accounted size (MB, log scale)")
        ax.set_ylabel("Fashion-MNIST test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("hf_vq on a narrow ResNet-18: accuracy vs size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
