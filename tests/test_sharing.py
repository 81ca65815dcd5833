"""Additive quantization and codebooks shared across layers, end to end.

Every sharing scope x method goes through quantize_ -> save -> load (transformers' `from_pretrained`,
timm's `create_model('local-dir:...')`): identical outputs, a shared set stored once in the safetensors
file, counted once in the size report, and held as one `nn.Parameter` by all its modules.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import hf_vq
from hf_vq.serialization import checkpoint_size_report, size_report
from hf_vq.cli import _config_from_args, build_parser
from hf_vq.codec.packing import bits_for
from hf_vq.config import shared_codebooks_key

SCHEMES = [("pq", "layer"), ("pq", "pool"), ("pq", "global"), ("aq", "layer"), ("aq", "pool"), ("aq", "global")]
IDS = [f"{method}-{share}" for method, share in SCHEMES]


def _config(method: str, share: str, **kwargs) -> hf_vq.VQConfig:
    d = 8 if method == "aq" else 4
    block_size = {"linear": d, "embedding": d, "conv1x1": d, **kwargs.pop("block_size", {})}
    return hf_vq.VQConfig(**{"method": method, "share": share, "k": 16, "n_iter": 3, "aq_iters": 1, "beam_size": 4,
                             "permute": False, "block_size": block_size, **kwargs})


def _keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _check_shared(model: nn.Module, config: hf_vq.VQConfig, keys: list[str]) -> None:
    """One Parameter per set in model.parameters(), held by every member; stored once; no member codebooks on disk."""
    vq = hf_vq.vq_modules(model)
    params = list(model.parameters())
    for set_name, members in config.codebook_sets.items():
        shared = vq[members[0]].codebooks
        assert all(vq[name].codebooks is shared for name in members)
        assert sum(p is shared for p in params) == 1
        assert [k for k in keys if k.endswith(shared_codebooks_key(set_name))] != []
        assert not any(k == f"{name}.codebooks" for name in members for k in keys)
    n_sets = len(config.codebook_sets)
    assert sum(k.rpartition(".")[2].startswith("vq_shared_codebooks_") for k in keys) == n_sets


def _accounted_bits(config: hf_vq.VQConfig) -> int:
    """Codes of every owning module + each codebook set once (fp16)."""
    bits, sets = 0, {}
    for layout in config.layouts.values():
        if layout.tied_to is not None:
            continue
        rows, cols = layout.matrix_shape
        bits += rows * (cols // layout.d) * layout.num_codebooks * bits_for(layout.k)
        books = layout.num_codebooks * layout.k * layout.d * 16
        if layout.codebook_set is None:
            bits += books
        else:
            sets[layout.codebook_set] = books
    return bits + sum(sets.values())


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    ({"method": "vq"}, "method"),
    ({"method": "aq", "num_codebooks": 0}, "num_codebooks"),
    ({"num_codebooks": 2}, "num_codebooks"),
    ({"share": "network"}, "share"),
    ({"method": "aq", "version": 1}, "version"),
    ({"method": "aq", "beam_size": 0}, "beam_size"),
    ({"method": "aq", "aq_iters": -1}, "aq_iters"),
], ids=["method", "num_codebooks<1", "pq-with-M2", "share", "old-version", "beam", "aq_iters"])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"VQConfig\.{field}="):
        hf_vq.VQConfig(**kwargs)


def test_version_1_configs_load_as_before():
    old = {"quant_method": "hf_vq", "version": 1, "method": "pq", "k": 16,
           "modules": {"fc": {"kind": "linear", "shape": [8, 16], "k": 16, "d": 4, "num_codebooks": 1}}}
    config = hf_vq.VQConfig.from_dict(old)
    assert (config.share, config.num_codebooks, config.version) == ("layer", 1, 1)
    assert config.codebook_sets == {} and config.layouts["fc"].codebook_set is None
    assert config.to_dict()["version"] == 1  # a re-saved old checkpoint keeps claiming the old format


def test_spec_round_trip():
    config = hf_vq.VQConfig(method="aq", num_codebooks=2, block_size={"linear": 8}, share="pool")
    assert config.spec == "aq-2x8-l8p4c9e4-pool"
    assert hf_vq.VQConfig.from_spec(config.spec) == config
    assert hf_vq.VQConfig().spec == "pq-1x8-l4p4c9e4"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_global_with_mixed_block_sizes_is_a_clear_error():
    config = _config("pq", "global", overrides={"2": {"d": 8}})
    with pytest.raises(ValueError, match=r"share='global'.*d=4.*d=8.*share='pool'"):
        hf_vq.plan(_mlp(), config)


def test_shared_set_with_different_k_is_a_clear_error():
    config = _config("pq", "pool", overrides={"4": {"k": 8}})
    with pytest.raises(ValueError, match=r"codebook set 'd4'.*different k"):
        hf_vq.plan(_mlp(), config)


def test_plan_groups_modules_and_clamps_k_on_the_pool():
    model = _mlp()
    layouts = hf_vq.plan(model, hf_vq.VQConfig(share="pool", k=256, overrides={"4": {"d": 8}}))
    assert {n: l.codebook_set for n, l in layouts.items()} == {"0": "d4", "2": "d4", "4": "d8"}
    # 32*64/4 + 64*64/4 = 1536 subvectors -> 256 fits; layer "4" alone: 64 subvectors -> 16
    assert [layouts[n].k for n in ("0", "2", "4")] == [256, 256, 16]


# ---------------------------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("method, share", SCHEMES, ids=IDS)
def test_quantize_shares_one_parameter_and_counts_it_once(method, share):
    model = _mlp()
    dense = copy.deepcopy(model)
    config = hf_vq.quantize_(model, _config(method, share), progress=False)
    if share == "layer":
        assert config.codebook_sets == {}
    else:
        assert len(config.codebook_sets) == 1 and sorted(next(iter(config.codebook_sets.values()))) == ["0", "2", "4"]
    _check_shared(model, config, list(hf_vq.serialization.disk_state_dict(model)))
    report = size_report(model)
    assert sum(layer.compressed_bits for layer in report.layers) == _accounted_bits(config)  # a set split, once
    assert report.compressed_bits == _accounted_bits(config) + sum(
        m.bias.numel() * 32 for m in dense.modules() if isinstance(m, nn.Linear))
    x = torch.randn(5, 32)
    for name, module in hf_vq.vq_modules(model).items():  # the recorded error is the module's own
        w = dense.get_submodule(name).weight
        with torch.no_grad():
            own = float((module.weight - w).pow(2).sum() / w.pow(2).sum())
        assert config.layouts[name].rel_error == pytest.approx(own, rel=1e-3)
    assert model(x).shape == (5, 8)
    grads = torch.autograd.grad(model(x).sum(), [p for p in model.parameters()])  # one grad per shared set
    assert len(grads) == len(list(model.parameters()))
    hf_vq.dequantize_(model)
    assert not any(n.startswith("vq_shared") for n, _ in model.named_parameters())
    assert isinstance(model[2], nn.Linear) and model[2].weight is not model[0].weight


def test_aq_beats_pq_per_layer_at_equal_bits_on_correlated_weights():
    torch.manual_seed(0)
    layer = nn.Linear(256, 128, bias=False)
    with torch.no_grad():  # correlated inputs -> correlated weight rows, like trained layers
        layer.weight.copy_(torch.randn(128, 256) @ (torch.eye(256) + 0.9 * torch.randn(256, 256) / 16))
    errors = {}
    for method, d in (("pq", 4), ("aq", 8)):
        model = nn.Sequential(copy.deepcopy(layer))
        cfg = hf_vq.VQConfig(method=method, k=64, block_size={"linear": d}, n_iter=20, aq_iters=2, permute=False)
        layout = hf_vq.quantize_(model, cfg, progress=False).layouts["0"]
        assert layout.num_codebooks * layout.bits / layout.d == 1.5  # code bits per weight: equal rate
        errors[method] = layout.rel_error
    assert errors["aq"] < errors["pq"], errors


def test_permutation_runs_before_aq_encoding(monkeypatch):
    import hf_vq.pipeline.encode
    import hf_vq.pipeline.quantize

    calls = []
    real_permute, real_aq = hf_vq.pipeline.quantize.permute_, hf_vq.pipeline.encode.aq_quantize
    monkeypatch.setattr(hf_vq.pipeline.quantize, "permute_", lambda *a, **k: calls.append("permute") or real_permute(*a, **k))
    monkeypatch.setattr(hf_vq.pipeline.encode, "aq_quantize", lambda *a, **k: calls.append("aq") or real_aq(*a, **k))
    model = _mlp()
    dense = copy.deepcopy(model)
    config = _config("aq", "global", permute=True, permute_iters=20)
    hf_vq.quantize_(model, config, progress=False, example_inputs=torch.randn(2, 32))
    assert calls == ["permute", "aq"]  # one global set: one AQ run, after the permutation
    report = model.vq_permutation_report
    assert report.traced and report.permuted, report
    # the permutation keeps the function: the compressed model tracks the dense one, permuted or not
    x = torch.randn(64, 32)
    with torch.no_grad():
        err = float((model(x) - dense(x)).pow(2).sum() / dense(x).pow(2).sum())
    assert err < 0.5


# ---------------------------------------------------------------------------------------------- transformers
def _bert(cls_name: str = "BertForMaskedLM"):
    import transformers

    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize("method, share", SCHEMES, ids=IDS)
def test_transformers_round_trip(method, share, tmp_path):
    model = _bert()  # tied input embedding <-> MLM decoder, as in real language models
    config = hf_vq.quantize_(model, _config(method, share), progress=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    keys = _keys(tmp_path / "model.safetensors")
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved.get("share", "layer") == share and saved["method"] == method  # format 1 (per-layer PQ) omits it
    assert saved["version"] == (1 if (method, share) == ("pq", "layer") else hf_vq.FORMAT_VERSION)
    assert {n: m.get("codebook_set") for n, m in saved["modules"].items()} == {
        n: l.codebook_set for n, l in config.layouts.items()}
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, expected)
    _check_shared(loaded, loaded.vq_config, keys)
    report = checkpoint_size_report(tmp_path)
    assert size_report(model).compressed_bits == size_report(loaded).compressed_bits
    assert 0 <= report.compressed_bits - size_report(model).compressed_bits <= 16  # + the fp16 one-element guard
    assert len(report.shared) == len(config.codebook_sets)


def test_transformers_shared_checkpoint_loads_into_the_base_model(tmp_path):
    model = _bert()
    hf_vq.quantize_(model, _config("pq", "pool"), progress=False)
    model.save_pretrained(tmp_path)
    assert "bert.vq_shared_codebooks_d4" in _keys(tmp_path / "model.safetensors")
    from transformers import BertModel

    base = BertModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.bert(ids).last_hidden_state)
    assert base.vq_shared_codebooks_d4 is base.encoder.layer[0].attention.self.query.codebooks


def test_shared_codebooks_train_as_one_parameter():
    model = _bert()
    hf_vq.quantize_(model, _config("aq", "global"), progress=False)
    shared = model.bert.vq_shared_codebooks_global
    before = shared.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 96, (2, 8))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(shared, before)
    decoder = model.cls.predictions.decoder
    assert decoder.codebooks is shared  # the head decodes with the updated set too


# ---------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("method, share", SCHEMES, ids=IDS)
def test_timm_round_trip(method, share, tmp_path):
    timm = pytest.importorskip("timm")
    from hf_vq.integrations.timm import fit_config, save_compressed

    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    config = hf_vq.quantize_(model, fit_config(model, _config(method, share)), progress=False)
    x = torch.randn(2, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    save_compressed(model, tmp_path / "vq")
    keys = _keys(tmp_path / "vq" / "model.safetensors")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    _check_shared(loaded, config, keys)
    report = checkpoint_size_report(tmp_path / "vq")
    assert report.compressed_bits == size_report(model).compressed_bits
    assert len(report.shared) == len(config.codebook_sets)


def test_timm_pool_sharing_on_a_convnet(tmp_path):
    timm = pytest.importorskip("timm")
    from hf_vq.integrations.timm import fit_config, save_compressed

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    config = hf_vq.quantize_(model, fit_config(model, _config("aq", "pool", block_size={"conv3x3": 18})),
                             progress=False)
    assert len(config.codebook_sets) >= 2  # d = 8 (pointwise) and d = 18 (3x3) at least
    with pytest.raises(ValueError, match="share='global'"):
        hf_vq.quantize_(timm.create_model("test_efficientnet"), fit_config(model, _config("aq", "global")),
                        progress=False)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    save_compressed(model, tmp_path / "vq")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    feats = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        assert len(feats(x)) > 1


# ---------------------------------------------------------------------------------------------- CLI
def _cli_config(*args: str) -> hf_vq.VQConfig:
    return _config_from_args(build_parser().parse_args(["compress", "--out", "unused", *args]))


def test_cli_aq_default_lands_at_the_pq_rate():
    pq, aq = _cli_config(), _cli_config("--method", "aq")
    assert (aq.method, aq.num_codebooks, aq.k, aq.block_size["linear"], aq.block_size["conv3x3"]) == ("aq", 2, 256, 8, 18)
    for kind in ("linear", "conv1x1", "conv3x3", "embedding"):  # bits per weight = M * log2(k) / d
        assert aq.num_codebooks * 8 / aq.block_size[kind] == pq.num_codebooks * 8 / pq.block_size[kind]
    three = _cli_config("--method", "aq", "--num-codebooks", "3", "-k", "64", "--share", "global")
    assert (three.num_codebooks, three.k, three.block_size["linear"], three.share) == (3, 64, 12, "global")
    assert _cli_config("--method", "aq", "-d", "4").block_size["linear"] == 4


@pytest.mark.slow
def test_cli_compress_aq_global_timm(tmp_path, capsys):
    from hf_vq.cli import main

    out = tmp_path / "vit-aq"
    code = main(["compress", "test_vit", "--out", str(out), "--method", "aq", "--share", "global", "-k", "16",
                 "--n-iter", "3", "--aq-iters", "1", "--no-eval", "--quiet", "--no-permute"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["method"], saved["share"], saved["num_codebooks"]) == ("aq", "global", 2)
    assert set(m["codebook_set"] for m in saved["modules"].values()) == {"global"}
    assert "vq_shared_codebooks_global" in _keys(out / "model.safetensors")
