"""Checkpoint format: safetensors round trip, size accounting, atomic saves and clear errors on bad files."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from hf_vq import CheckpointError, VQConfig, checkpoint_size_report, load_compressed_, quantize_, size_report
from hf_vq.serialization import WEIGHTS_NAME, load_weights
from hf_vq.integrations import timm as vq_timm

CFG = VQConfig(n_iter=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    quantize_(model, VQConfig(k=100, n_iter=5, block_size={"depthwise": 9}), progress=False)
    folder = tmp_path_factory.mktemp("ckpt") / "vq"
    vq_timm.save_compressed(model, folder)
    return model, folder


def _fresh():
    return timm.create_model("test_efficientnet", num_classes=10).eval()


def test_round_trip_identical_outputs(saved):
    model, folder = saved
    loaded = load_compressed_(_fresh(), folder).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_disk_format(saved):
    model, folder = saved
    tensors = load_file(folder / WEIGHTS_NAME)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "hf_vq" and cfg["version"] == 1 and cfg["modules"]
    for name, layout in cfg["modules"].items():
        assert tensors[f"{name}.codes"].dtype == torch.uint8
        assert tensors[f"{name}.codebooks"].dtype == torch.float16
        assert f"{name}.weight" not in tensors


def test_accounted_size_matches_in_memory_report(saved):
    model, folder = saved
    disk = checkpoint_size_report(folder)
    mem = size_report(model)
    assert disk.compressed_bits == mem.compressed_bits and disk.dense_bits == mem.dense_bits
    assert disk.ratio > 1


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    _, folder = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / WEIGHTS_NAME).read_bytes()
    (bad / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_compressed_(_fresh(), bad)
    (bad / WEIGHTS_NAME).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        load_compressed_(_fresh(), bad)


def _tamper(folder, tmp_path, edit):
    out = tmp_path / "tampered"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, out / WEIGHTS_NAME)
    return out


def test_codes_out_of_range_is_a_clear_error(saved, tmp_path):
    model, folder = saved
    name, layout = next((n, l) for n, l in model.vq_config.layouts.items() if l.bits > 1 and l.k < 2**l.bits)
    out = _tamper(folder, tmp_path, lambda t: t[f"{name}.codes"].fill_(255))
    with pytest.raises(CheckpointError, match=rf"'{name}\.codes' holds code .* >= k={layout.k}"):
        load_compressed_(_fresh(), out)


def test_missing_codes_tensor_names_it(saved, tmp_path):
    model, folder = saved
    name = next(iter(model.vq_config.modules))
    out = _tamper(folder, tmp_path, lambda t: t.pop(f"{name}.codes"))
    with pytest.raises(CheckpointError, match=f"lacks the tensor '{name}.codes'"):
        load_compressed_(_fresh(), out)


def test_wrong_shape_names_tensor(saved, tmp_path):
    model, folder = saved
    name = next(iter(model.vq_config.modules))
    out = _tamper(folder, tmp_path, lambda t: t.__setitem__(f"{name}.codebooks", torch.zeros(1, 3, 3)))
    with pytest.raises(CheckpointError, match=f"'{name}.codebooks' is torch.float32 \\[1, 3, 3\\]"):
        load_compressed_(_fresh(), out)


def test_config_naming_missing_module(saved, tmp_path):
    _, folder = saved
    out = tmp_path / "renamed"
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    mods = cfg["quantization_config"]["modules"]
    first = next(iter(mods))
    mods["no.such.module"] = mods.pop(first)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="names 'no.such.module', which this model does not have"):
        load_compressed_(_fresh(), out)


def test_newer_format_version_refused(saved, tmp_path):
    _, folder = saved
    out = tmp_path / "newer"
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Upgrade hf_vq"):
        load_compressed_(_fresh(), out)


def test_crash_mid_save_leaves_previous_folder_intact(saved, tmp_path, monkeypatch):
    model, folder = saved
    target = tmp_path / "target"
    vq_timm.save_compressed(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import hf_vq.integrations.timm.saving as mod

    def crash(*args, **kwargs):
        (args[1] / WEIGHTS_NAME).write_bytes(b"half-written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "save_weights", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        vq_timm.save_compressed(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no temporary folder left behind


def test_load_weights_reads_every_dtype_into_separate_tensors(tmp_path):
    """One read per file; each tensor its own storage (savers must not take them for tied tensors)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "codes": torch.randint(0, 255, (5, 3), dtype=torch.uint8),
               "i64": torch.tensor([3, -1]), "flag": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    got = load_weights(tmp_path / "t.safetensors")
    assert got.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    storages = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
    assert len(set(storages)) == len(storages)
    got["f32"].add_(1)  # writable, and only its own slice changes
    assert torch.equal(got["f16"], tensors["f16"])
    assert load_weights(tmp_path / "t.safetensors", keys={"i64"}).keys() == {"i64"}
    save_file(got, tmp_path / "again.safetensors")  # safetensors refuses tensors sharing memory
    assert torch.equal(load_file(tmp_path / "again.safetensors")["f32"], tensors["f32"] + 1)
