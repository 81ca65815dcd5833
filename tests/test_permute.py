"""Channel-space discovery and permutation on real architectures: the function must never change."""

import copy

import pytest
import torch
from torch import nn

import hf_vq
from hf_vq.calibrate import input_moments
from hf_vq.graph import default_example_inputs, find_channel_spaces
from hf_vq.pipeline import permute_, shard_groups

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every per-channel tensor distinct, so that a missed follower (bias, norm, statistics) shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(("gamma", "cls_token", "pos_embed", "position_embeddings")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _assert_same_function(dense, model, args, kwargs):
    with torch.no_grad():
        a, b = _flat(dense(*args, **kwargs)), _flat(model(*args, **kwargs))
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        err = float((x.double() - y.double()).norm() / x.double().norm().clamp_min(1e-30))
        assert err <= 1e-5, err


def _check(model, example_inputs=None, *, config=None, expect_permuted=1):
    _randomize_(model)
    dense = copy.deepcopy(model)
    if config is None:
        config = hf_vq.VQConfig(permute_iters=20)
        if hasattr(model, "pretrained_cfg"):
            from hf_vq.integrations.timm import fit_config

            config = fit_config(model, config)
    report = permute_(model, config, example_inputs=example_inputs)
    assert report.traced, report.reason
    assert len(report.permuted) >= expect_permuted, str(report)
    assert str(report).startswith("permutation:")
    if example_inputs is None:
        args, kwargs = default_example_inputs(model)
    else:
        args, kwargs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs, {}
        if isinstance(example_inputs, dict):
            args, kwargs = (), example_inputs
    _assert_same_function(dense, model, args, kwargs)
    changed = sum(not torch.equal(p, q) for p, q in zip(dense.state_dict().values(), model.state_dict().values()))
    assert changed > 0
    return report


TIMM = [("resnet18", 64), ("resnet50", 64), ("mobilenetv2_100", 64), ("efficientnet_b0", 64),
        ("convnext_atto", 64), ("vit_tiny_patch16_224", None)]


@pytest.mark.parametrize("name,size", TIMM)
def test_timm_permutation_preserves_function(name, size):
    kwargs = {"img_size": 32} if size is None else {}
    model = timm.create_model(name, **kwargs)
    x = torch.randn(2, 3, size or 32, size or 32)
    report = _check(model, x)
    refused = {s.name for s in report.refused}
    assert refused == {report.spaces[-1].name}  # only the classifier's logits, returned to the user
    if name == "resnet18":  # one residual stream per stage: block outputs + downsample are parents
        stage2 = next(s for s in report.spaces if "layer2.0.downsample.0" in s.parents)
        assert {"layer2.0.conv2", "layer2.1.conv2"} <= set(stage2.parents)
        assert {"layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"} <= set(stage2.children)
    if name == "vit_tiny_patch16_224":  # fused qkv: value heads permuted with the projection reading them
        assert any("blocks.0.attn.qkv" in s.parents and "blocks.0.attn.proj" in s.children and s.repeats > 1
                   for s in report.permuted)


def _tiny(kind: str):
    from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertModel, GPT2Config,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration,
                              ViTConfig, ViTForImageClassification)

    torch.manual_seed(0)
    if kind == "bert":
        return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))
    if kind == "vit":
        return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, num_labels=10))
    if kind == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    return BartForConditionalGeneration(BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit", "t5", "bart"])
def test_transformers_permutation_preserves_logits_and_hidden_states(kind):
    model = _tiny(kind)
    report = _check(model, expect_permuted=4)  # default inputs: output_hidden_states=True
    # MLP hidden dim and value/output heads are permuted ...
    assert any(s.repeats > 1 for s in report.permuted), str(report)
    # ... the residual stream is refused: the hidden states are returned to the user
    assert any(any("returned to the user" in r for r in s.reasons) and len(s.children) > 2 for s in report.refused)


def test_residual_stream_permuted_when_outputs_allow_it():
    # traced without output_hidden_states, the residual stream of a causal LM feeds only the logits
    model = _tiny("llama")
    ids = torch.randint(0, 100, (2, 8))
    report = _check(model, {"input_ids": ids, "use_cache": False})
    assert any(len(s.children) > 5 for s in report.permuted), str(report)


def test_generation_unchanged_with_cache():
    model = _randomize_(_tiny("llama"))
    dense = copy.deepcopy(model)
    permute_(model, hf_vq.VQConfig(permute_iters=20))
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    a = dense.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 4)
        self.d, self.e = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], -1)) + self.e(torch.relu(self.d(x)))


def test_unknown_structure_is_refused_safely():
    model = _Concat().eval()
    spaces = find_channel_spaces(model, torch.randn(3, 8))
    by_parent = {s.names("parent")[0]: s for s in spaces}
    assert not by_parent["a"].open and "concatenation" in by_parent["a"].reasons[0]
    assert by_parent["d"].open and by_parent["d"].names("child") == ["e"]
    dense = copy.deepcopy(model)
    report = permute_(model, hf_vq.VQConfig(permute_iters=20), example_inputs=torch.randn(3, 8))
    assert [s.name for s in report.permuted] == ["d"]
    _assert_same_function(dense, model, (torch.randn(5, 8),), {})


def test_untraceable_model_is_left_alone():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    before = copy.deepcopy(model.state_dict())
    report = permute_(model)  # no example inputs for a plain module
    assert not report.traced and "example_inputs" in str(report)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantize_permutes_by_default_and_can_be_turned_off():
    model = _randomize_(_tiny("bert"))
    config = hf_vq.quantize_(copy.deepcopy(model), hf_vq.VQConfig(k=16, n_iter=5, permute_iters=10), progress=False)
    assert config.permute
    m = copy.deepcopy(model)
    hf_vq.quantize_(m, hf_vq.VQConfig(k=16, n_iter=5, permute_iters=10), progress=False)
    assert m.vq_permutation_report.permuted
    m2 = copy.deepcopy(model)
    hf_vq.quantize_(m2, hf_vq.VQConfig(k=16, n_iter=5, permute=False), progress=False)
    assert not hasattr(m2, "vq_permutation_report")


def test_shard_groups_cover_every_group_once():
    shards = [shard_groups(11, i, 3) for i in range(3)]
    assert sorted(g for s in shards for g in s) == list(range(11))
    with pytest.raises(ValueError):
        shard_groups(4, 3, 3)


def test_input_moments_match_the_inputs_seen():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 25, 6))
    x1, x2 = torch.randn(2, 3, 5, 5), torch.randn(3, 3, 5, 5)
    moments = input_moments(model, ["0", "2", "4"], [x1, x2])
    hidden = torch.cat([model[1](model[0](x1)), model[1](model[0](x2))]).double()  # [5, 8, 5, 5]
    torch.testing.assert_close(moments["0"], torch.cat([x1, x2]).double().pow(2).mean((0, 2, 3)))
    torch.testing.assert_close(moments["2"], hidden.pow(2).mean((0, 2, 3)))
    flat = model[3](model[2](hidden.float())).double()  # [5, 100]
    torch.testing.assert_close(moments["4"], flat.pow(2).mean(0), rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="calibration"):
        input_moments(model, ["0"], "not a batch")


def test_activation_aware_objective_scales_columns_by_input_rms():
    """The objective terms are the child's columns times the RMS of its input channels (here: known scales)."""
    from hf_vq.pipeline.permute import _objective_terms

    model = _randomize_(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)))
    config = hf_vq.VQConfig(block_size={"linear": 4}, k=4)
    layouts = hf_vq.plan(model, config)
    (space,) = [s for s in find_channel_spaces(model, torch.randn(2, 8)) if s.open]
    tensors = dict(model.named_parameters())
    owners = {id(model[2].weight): "2"}
    moments = {"2": torch.arange(1.0, 17.0, dtype=torch.float64)}  # E[x_c^2] = c + 1
    (plain,), _ = _objective_terms(space, tensors, layouts, owners)
    (aware,), _ = _objective_terms(space, tensors, layouts, owners, moments)
    torch.testing.assert_close(aware.x, plain.x * moments["2"].float().sqrt()[None, :, None])


def test_calibrated_permutation_preserves_function_and_is_reported():
    model = _randomize_(timm.create_model("mobilenetv2_100", num_classes=10))
    dense = copy.deepcopy(model)
    from hf_vq.integrations.timm import fit_config

    config = fit_config(model, hf_vq.VQConfig(permute_iters=20))
    calibration = [torch.randn(2, 3, 64, 64) * 2 + 0.5, torch.randn(2, 3, 64, 64)]
    report = permute_(model, config, example_inputs=torch.randn(2, 3, 64, 64), calibration=calibration)
    assert report.objective == "activation-aware" and "activation-aware objective" in str(report)
    assert report.permuted
    _assert_same_function(dense, model, (torch.randn(2, 3, 64, 64),), {})
    weights_only = permute_(copy.deepcopy(dense), config, example_inputs=torch.randn(2, 3, 64, 64))
    assert weights_only.objective == "weights"
    # the objective differs, so the searched values do
    aware = {s.name: s.objective_identity for s in report.spaces if s.objective_identity is not None}
    plain = {s.name: s.objective_identity for s in weights_only.spaces if s.objective_identity is not None}
    assert aware.keys() == plain.keys() and any(abs(aware[n] - plain[n]) > 1e-3 for n in aware)


def test_quantize_passes_calibration_to_the_permutation():
    model = _randomize_(_tiny("bert"))
    ids = torch.randint(0, 100, (2, 8))
    m = copy.deepcopy(model)
    hf_vq.quantize_(m, hf_vq.VQConfig(k=16, n_iter=5, permute_iters=10), progress=False,
                    calibration={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert m.vq_permutation_report.objective == "activation-aware"


def test_entry_weights_follow_the_input_channel_of_each_entry():
    """Weighted k-means weights every matrix entry by the second moment of the input channel it multiplies."""
    from transformers.pytorch_utils import Conv1D

    from hf_vq.nn import vq_class_for
    from hf_vq.pipeline.encode import entry_weights as _entry_weights

    def weights(module, kind, second):
        return _entry_weights(module, vq_class_for(type(module)), kind, second)

    m = torch.arange(1.0, 7.0, dtype=torch.float64)  # [6]
    linear = weights(nn.Linear(6, 3), "linear", m)  # [3, 6]
    torch.testing.assert_close(linear, (m / m.mean()).float().expand(3, 6))
    conv = weights(nn.Conv2d(6, 4, 3, groups=2), "conv3x3", m)  # weight [4, 3, 3, 3] -> [4, 27]
    expected = torch.stack([(m[g * 3:(g + 1) * 3] / m.mean()).repeat_interleave(9) for g in (0, 0, 1, 1)]).float()
    torch.testing.assert_close(conv, expected)
    gpt2 = weights(Conv1D(5, 6), "conv1d", m)  # weight [in=6, out=5] -> matrix [5, 6]
    torch.testing.assert_close(gpt2, (m / m.mean()).float().expand(5, 6))
    assert weights(nn.Embedding(10, 6), "embedding", m) is None
    assert weights(nn.Linear(4, 3), "linear", m) is None  # moments of another shape: unweighted
    dead = weights(nn.Linear(6, 3), "linear", torch.tensor([0.0, 0, 0, 0, 0, 6]))
    assert float(dead.min()) == pytest.approx(1e-3)  # dead channels keep a small weight


def test_calibrated_quantize_weights_kmeans_by_input_moments():
    """With calibration data, k-means spends its codewords where the inputs are large: the layer's outputs
    are closer on fresh inputs of the same distribution, at a larger unweighted weight error."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-1, 1, 64)[torch.randperm(64, generator=gen)]  # [64] input channel scales 0.1..10

    def inputs(n):
        return torch.randn(n, 64, generator=gen) * scale  # [n, 64]

    dense = nn.Sequential(nn.Linear(64, 48))
    config = hf_vq.VQConfig(k=16, n_iter=30, permute=False, block_size={"linear": 4})
    results = {}
    for calibrated in (False, True):
        model = copy.deepcopy(dense)
        filled = hf_vq.quantize_(model, config, progress=False, calibration=inputs(256) if calibrated else None)
        x = inputs(512)
        with torch.no_grad():
            out_err = float((model(x) - dense(x)).pow(2).sum() / dense(x).pow(2).sum())
        results[calibrated] = (out_err, filled.layouts["0"].rel_error)
    assert results[True][0] < 0.7 * results[False][0]  # outputs closer
    assert results[True][1] > results[False][1]  # weights further: the weights were really used


@pytest.mark.slow
def test_real_minilm_permute_then_kmeans_beats_kmeans_alone(minilm):
    """Real weights: total relative weight error after permute + k-means < k-means alone, same bits."""
    cfg = dict(k=256, n_iter=20, modules_to_not_convert=["embeddings.*", "pooler.*"])
    results = {}
    for permute in (False, True):
        model = copy.deepcopy(minilm)
        config = hf_vq.quantize_(model, hf_vq.VQConfig(permute=permute, permute_iters=200, **cfg), progress=False)
        norms = {n: float(minilm.get_submodule(n).weight.detach().double().pow(2).sum()) for n in config.layouts}
        num = sum(layout.rel_error * norms[n] for n, layout in config.layouts.items())
        results[permute] = num / sum(norms.values())
    assert results[True] < results[False]



def test_cli_no_permute_flag():
    from hf_vq.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["compress", "--out", "x", "--no-permute"])
    assert _config_from_args(args).permute is False
    args = build_parser().parse_args(["compress", "--out", "x", "--permute-iters", "50"])
    config = _config_from_args(args)
    assert config.permute is True and config.permute_iters == 50


def test_cli_calibrate_uses_held_out_real_inputs(tmp_path, capsys):
    pytest.importorskip("skimage")
    from hf_vq.cli import main

    out = tmp_path / "vq"
    code = main(["compress", "mobilenetv3_small_050", "--out", str(out), "--calibrate", "8", "--n-iter", "2",
                 "--permute-iters", "5", "--no-eval", "--quiet", "-k", "16"])
    assert code == 0 and (out / "model.safetensors").exists()
    assert "activation-aware objective" in capsys.readouterr().out
    card = (out / "README.md").read_text()  # the model card says how it was made
    assert "activation-aware objective" in card and "weighted by the input channels' second moments" in card
    plain = tmp_path / "plain"  # no permutation: the card still says k-means was weighted by the calibration data
    assert main(["compress", "mobilenetv3_small_050", "--out", str(plain), "--calibrate", "8", "--n-iter", "2",
                 "--no-permute", "--no-eval", "--quiet", "-k", "16"]) == 0
    card = (plain / "README.md").read_text()
    assert "weighted by the input channels' second moments" in card and "activation-aware" not in card
    unweighted = tmp_path / "unweighted"
    assert main(["compress", "mobilenetv3_small_050", "--out", str(unweighted), "--n-iter", "2", "--no-permute",
                 "--no-eval", "--quiet", "-k", "16"]) == 0
    assert "second moments" not in (unweighted / "README.md").read_text()
    with pytest.raises(SystemExit, match="positive"):
        main(["compress", "mobilenetv3_small_050", "--out", str(tmp_path / "x"), "--calibrate", "-1"])


def test_calibration_batches_are_disjoint_from_the_evaluation(minilm_path):
    pytest.importorskip("gensim")
    from transformers import AutoTokenizer

    from hf_vq.evaluate import EVAL_SENTENCES, calibration_batches, real_sentences

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batches = calibration_batches(40, tokenizer=tokenizer, batch_size=32)
    assert [len(b["input_ids"]) for b in batches] == [32, 8]
    held_out = {tokenizer.decode(ids, skip_special_tokens=True) for b in batches for ids in b["input_ids"]}
    evaluated = {tokenizer.decode(tokenizer(s, truncation=True, max_length=128)["input_ids"], skip_special_tokens=True)
                 for s in real_sentences(EVAL_SENTENCES)}
    assert len(held_out) == 40 and not held_out & evaluated
    with pytest.raises(ValueError, match="n >= 1"):
        calibration_batches(0, tokenizer=tokenizer)
