"""Decode exactness: every VQ module computes exactly what its float class computes with the decoded weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_vq import CodesError, VQConfig, dequantize_, quantize_, vq_modules
from hf_vq.codec import decode
from hf_vq.nn import VQConv2d, VQEmbedding, VQLinear

CFG = VQConfig(n_iter=5)


def _one(module):
    model = nn.ModuleDict({"m": module})
    quantize_(model, CFG, progress=False)
    return model["m"]


def test_linear_decode_exact():
    torch.manual_seed(0)
    vq = _one(nn.Linear(64, 32))
    assert isinstance(vq, VQLinear) and isinstance(vq, nn.Linear) and "weight" not in vq._parameters
    x = torch.randn(5, 64)
    w = decode(vq.unpacked_codes(), vq.codebooks).reshape(32, 64)
    assert torch.equal(vq(x), F.linear(x, w, vq.bias))
    assert vq.codes.dtype == torch.uint8 and vq.codebooks.shape == (1, vq.k, 4)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=2, groups=2),
    dict(kernel_size=1, stride=1),
    dict(kernel_size=3, padding=1, padding_mode="reflect", bias=False),
])
def test_conv2d_decode_exact(kwargs):
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 32, **kwargs)
    model = nn.ModuleDict({"stem": nn.Conv2d(3, 16, 3), "m": dense})
    quantize_(model, CFG, progress=False)
    vq = model["m"]
    assert isinstance(vq, VQConv2d) and isinstance(model["stem"], nn.Conv2d) and not isinstance(model["stem"], VQConv2d)
    x = torch.randn(2, 16, 12, 12)
    ref = dense._conv_forward(x, vq.weight.detach().clone(), vq.bias)
    assert torch.equal(vq(x), ref)


def test_conv1d_gpt2_layout():
    torch.manual_seed(0)
    dense = Conv1D(48, 32)  # weight [in=32, out=48]
    vq = _one(dense)
    assert vq.vq_kind == "conv1d" and vq.weight.shape == (32, 48)
    rows = decode(vq.unpacked_codes(), vq.codebooks)  # [out, in]
    assert torch.equal(vq.weight, rows.t())
    x = torch.randn(3, 32)
    assert torch.equal(vq(x), torch.addmm(vq.bias, x, rows.t()))


def test_embedding_decodes_only_looked_up_rows_exactly():
    torch.manual_seed(0)
    vq = _one(nn.Embedding(500, 32, padding_idx=0))
    assert isinstance(vq, VQEmbedding)
    ids = torch.tensor([[0, 5, 499], [7, 7, 1]])
    assert torch.equal(vq(ids), F.embedding(ids, vq.weight))


def test_codebooks_train_codes_frozen():
    torch.manual_seed(0)
    vq = _one(nn.Linear(64, 32))
    codes_before = vq.codes.clone()
    opt = torch.optim.SGD([p for p in vq.parameters() if p.requires_grad], lr=0.1)
    loss = vq(torch.randn(4, 64)).pow(2).sum()
    loss.backward()
    assert vq.codebooks.grad is not None and vq.codebooks.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(vq.codes, codes_before)
    assert not any(b.requires_grad for b in vq.buffers())


def test_decode_cache_follows_codebook_updates():
    torch.manual_seed(0)
    vq = _one(nn.Linear(64, 32))
    vq.cache_decoded = True
    with torch.no_grad():
        w1 = vq.weight
        assert vq.weight is w1  # cached
        vq.codebooks.add_(1.0)
        assert not torch.equal(vq.weight, w1)  # invalidated by the in-place update


def test_dequantize_returns_dense_same_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_(model, CFG, progress=False)
    x = torch.randn(3, 32)
    y = model(x)
    dequantize_(model)
    assert not vq_modules(model) and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), y)


def test_tied_embedding_and_head_share_codes():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    cfg = quantize_(model, CFG, progress=False)
    assert cfg.modules["head"]["tied_to"] == "emb"
    assert model["head"].codebooks is model["emb"].codebooks and model["head"].codes is model["emb"].codes


def test_codes_out_of_range_detected():
    model = nn.ModuleDict({"m": nn.Linear(64, 32)})
    quantize_(model, VQConfig(k=100, n_iter=5), progress=False)  # 7-bit codes, k=100
    vq = model["m"]
    with torch.no_grad():
        vq.codes.fill_(255)  # every code becomes 127 >= k
    with pytest.raises(CodesError, match=">= k=100"):
        vq(torch.randn(1, 64))


def test_block_size_must_divide_layer():
    model = nn.Sequential(nn.Linear(30, 8))
    with pytest.raises(ValueError) as err:
        quantize_(model, VQConfig(block_size={"linear": 4}), progress=False)
    msg = str(err.value)
    assert "'0'" in msg and "row length 30" in msg and "modules_to_not_convert" in msg
    assert type(model[0]) is nn.Linear  # untouched


def test_already_compressed_refused():
    model = nn.Sequential(nn.Linear(32, 8))
    quantize_(model, CFG, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        quantize_(model, CFG, progress=False)
