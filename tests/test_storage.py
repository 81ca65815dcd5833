"""What stays dense is stored at 16 bits (`Recipe.dense_dtype`), losslessly: the model holds the rounded values."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import hf_vq
from hf_vq.serialization import checkpoint_size_report, load_compressed_, read_header, save_weights


def _net() -> nn.Module:
    """A conv + BatchNorm + LayerNorm net whose dense tensors (norms, biases, statistics) are a large share."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1),
                        nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.LayerNorm(64),
                        nn.Linear(64, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        net[4].running_var[0] = 1e6  # outside fp16's range: this tensor must stay fp32
    return net.eval()


def _save_and_load(model: nn.Module, config: hf_vq.VQConfig, folder) -> nn.Module:
    save_weights(model, folder)
    (folder / "config.json").write_text(json.dumps({"quantization_config": config.to_dict()}))
    return load_compressed_(_net(), folder)


def test_defaults_and_validation():
    assert hf_vq.VQConfig().dense_dtype is None  # the PQF paper's convention: other tensors as the model holds them
    assert hf_vq.VQConfig(target_ratio=8).dense_dtype == "float16"
    assert hf_vq.VQConfig(bits_per_weight=3).dense_dtype == "float16"
    assert hf_vq.VQConfig(target_ratio=8, dense_dtype=None).dense_dtype is None
    assert hf_vq.VQConfig(dense_dtype="bfloat16").dense_dtype == "bfloat16"
    with pytest.raises(ValueError, match="dense_dtype='float8'"):
        hf_vq.VQConfig(dense_dtype="float8")
    assert "dense_dtype" not in hf_vq.VQConfig(target_ratio=8).to_dict()  # a recipe field: not in config.json


def test_dense_tensors_are_stored_in_fp16_and_load_back_bit_for_bit(tmp_path):
    """With allocation the norms, biases and BatchNorm statistics are rounded in memory and written as F16; the
    tensor with a value outside fp16's range stays F32; integer buffers keep their dtype; the loaded model holds
    fp32 tensors and computes exactly what the compressed one did."""
    model = _net()
    dense = copy.deepcopy(model)
    config = hf_vq.quantize_(model, hf_vq.VQConfig(n_iter=5, permute=False, bits_per_weight=3), progress=False)
    loaded = _save_and_load(model, config, tmp_path)
    header = read_header(tmp_path / "model.safetensors")
    dtypes = {key: header[key][0] for key in header}
    for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var", "8.weight", "8.bias", "4.running_mean"):
        assert dtypes[key] == "F16", (key, dtypes[key])
    assert dtypes["4.running_var"] == "F32" and dtypes["1.num_batches_tracked"] == "I64"
    state = model.state_dict()
    assert torch.equal(state["4.running_var"], dense.state_dict()["4.running_var"])  # out of range: untouched
    rounded = state["1.running_mean"]
    assert rounded.dtype == torch.float32 and torch.equal(rounded.half().float(), rounded)
    assert not torch.equal(rounded, dense.state_dict()["1.running_mean"])  # it was rounded, not stored as is
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_without_dense_dtype_every_dense_tensor_keeps_its_width(tmp_path):
    """The paper's convention (no allocation): the dense tensors are written as the model holds them."""
    model = _net()
    config = hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=5, permute=False), progress=False)
    _save_and_load(model, config, tmp_path)
    header = read_header(tmp_path / "model.safetensors")
    assert {header[key][0] for key in header if key.endswith((".bias", "running_mean", "running_var"))} == {"F32"}


def test_a_file_budget_buys_the_weights_what_16_bit_dense_tensors_free(tmp_path):
    """At one target ratio of the whole file, 16-bit norms, biases and statistics (and 16-bit layers where the
    allocation leaves one dense) leave the weights more bits than 32-bit ones, and both files still meet the ratio."""
    weight_bits, ratios = {}, {}
    for dtype in (None, "float16"):
        model = _net()
        config = hf_vq.quantize_(model, hf_vq.VQConfig(n_iter=5, permute=False, target_ratio=6, dense_dtype=dtype),
                                 progress=False)
        allocation = config.record.allocation
        weight_bits[dtype] = allocation["planned_bits"] - allocation["fixed_bits"]  # what the weights' options take
        folder = tmp_path / str(dtype)
        folder.mkdir()
        _save_and_load(model, config, folder)
        report = checkpoint_size_report(folder)
        ratios[dtype] = report.dense_bits / 8 / report.file_bytes
    assert weight_bits["float16"] > 1.2 * weight_bits[None], weight_bits
    assert min(ratios.values()) >= 6.0, ratios
