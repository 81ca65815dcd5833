"""The calibrated engine: output-aware block-sequential encoding, bit allocation to a target size, streaming, and
calibration data that never overlaps the data fidelity is measured on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_vq

transformers = pytest.importorskip("transformers")


def _bert(hidden: int = 64, layers: int = 2, vocab: int = 512):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _batches(n: int, vocab: int = 512, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab // 4, (8, 16), generator=gen)  # a skewed token distribution
        mask = torch.ones_like(ids)
        mask[:, 12:] = 0  # padding the statistics must ignore
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _output_error(model: nn.Module, dense: nn.Module, batches: list[dict]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            a, r = model(**b).last_hidden_state, dense(**b).last_hidden_state
            m = b["attention_mask"].bool()
            num += float((a - r)[m].pow(2).sum())
            den += float(r[m].pow(2).sum())
    return num / den


def test_output_aware_engine_beats_kmeans_on_held_out_inputs():
    dense = _bert()
    calibration, held_out = _batches(6), _batches(4, seed=1)
    errors = {}
    for encoder in ("kmeans", "output-aware"):
        model = copy.deepcopy(dense)
        config = hf_vq.VQConfig(k=32, n_iter=10, permute=False, encoder=encoder, scales=encoder != "kmeans")
        hf_vq.quantize_(model, config, calibration=calibration if encoder != "kmeans" else None, progress=False)
        errors[encoder] = _output_error(model, dense, held_out)
    assert errors["output-aware"] < 0.85 * errors["kmeans"], errors  # measured 0.21 vs 0.28 (random weights)


def test_engine_records_what_it_did_and_needs_data():
    model = _bert()
    config = hf_vq.quantize_(model, hf_vq.VQConfig(k=32, n_iter=5, permute=False, encoder="output-aware",
                                                   tune_steps=4), calibration=_batches(3), progress=False)
    record = config.record
    assert record.calibration["encoder"] == "output-aware" and record.calibration["batches"] == 3
    assert record.recipe["tune_steps"] == 4 and "encoder" not in config.to_dict()
    with pytest.raises(ValueError, match="encoder='output-aware'.*calibration="):
        hf_vq.quantize_(_bert(), hf_vq.VQConfig(encoder="output-aware"), progress=False)


def test_block_tuning_never_worsens_the_held_out_block_error():
    from hf_vq.pipeline.calibrated import tune_block_

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.LayerNorm(32))
    dense = copy.deepcopy(block)
    hf_vq.quantize_(block, hf_vq.VQConfig(k=16, n_iter=5, permute=False), progress=False)
    inputs = [((torch.randn(16, 32),), {}) for _ in range(8)]
    with torch.no_grad():
        targets = [dense(*a) for a, _ in inputs]
    history = tune_block_(block, inputs, targets, steps=60, lr=1e-3)
    assert history["held_out_after"] <= history["held_out_before"]
    assert history["held_out_after"] < 0.9 * history["held_out_before"], history  # it learnt something
    assert all(float(m.codebooks.detach().half().float().sub(m.codebooks.detach()).abs().max()) == 0
               for m in hf_vq.vq_modules(block).values())  # stored as fp16


def test_block_tuning_ignores_masked_positions():
    from hf_vq.pipeline.calibrated import tune_block_

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.LayerNorm(32))
    dense = copy.deepcopy(block)
    hf_vq.quantize_(block, hf_vq.VQConfig(k=16, n_iter=5, permute=False), progress=False)
    inputs = [((torch.randn(4, 6, 32),), {}) for _ in range(6)]
    masks = [torch.arange(6).expand(4, 6) < 4 for _ in inputs]  # [batch, seq]: the last two positions are padding
    with torch.no_grad():
        targets = [dense(*a) for a, _ in inputs]
    garbage = [t.clone() for t in targets]
    for t in garbage:
        t[:, 4:] = 100.0  # what the model computes at padding: never read
    tuned = {}
    for name, tg, mk in (("clean", targets, masks), ("padding garbage", garbage, masks), ("unmasked", garbage, None)):
        model = copy.deepcopy(block)
        tune_block_(model, inputs, tg, steps=12, lr=1e-3, masks=mk)
        tuned[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(tuned["clean"], tuned["padding garbage"])
    assert not torch.allclose(tuned["clean"], tuned["unmasked"])


def test_block_tuning_targets_the_dense_models_own_block_outputs(monkeypatch):
    """Each block is tuned toward what the dense model computes there (its hidden state carried through the dense
    blocks), not toward the dense block applied to the compressed prefix's outputs; padding is masked out."""
    from hf_vq.pipeline import calibrated

    dense = _bert(layers=3)
    batches = _batches(5)
    expected: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}
    hooks = [dense.encoder.layer[i].register_forward_hook(
        lambda m, a, out, i=i: expected[i].append(out[0] if isinstance(out, tuple) else out)) for i in range(3)]
    with torch.no_grad():
        for b in batches:
            dense(**b)
    for h in hooks:
        h.remove()
    seen = []
    real = calibrated.tune_block_

    def recording_tune_block_(block, inputs, targets, **kw):  # the real tuning, its arguments kept
        seen.append((inputs, targets, kw["masks"]))
        assert kw["lr"] == 3e-4  # VQConfig.tune_lr
        return real(block, inputs, targets, **kw)

    monkeypatch.setattr(calibrated, "tune_block_", recording_tune_block_)
    model = copy.deepcopy(dense)
    config = hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=5, permute=False, encoder="output-aware",
                                                   tune_steps=3, tune_lr=3e-4), calibration=batches, progress=False)
    compressed_in: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}  # what each block reads in the result
    hooks = [model.encoder.layer[i].register_forward_pre_hook(
        lambda m, a, i=i: compressed_in[i].append(a[0])) for i in range(3)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for i, (inputs, targets, masks) in enumerate(seen):
        for b, (args, target, mask) in enumerate(zip(inputs, targets, masks)):
            torch.testing.assert_close(target, expected[i][b])  # the dense model's own output
            torch.testing.assert_close(args[0][0], compressed_in[i][b])  # trained on the compressed prefix's outputs
            assert torch.equal(mask, batches[b]["attention_mask"].bool())
    assert not torch.allclose(seen[1][0][0][0][0], expected[0][0])  # the prefix is compressed: inputs differ
    assert "dense model" in config.record.calibration["block tuning target"]


def test_tuning_learning_rate_is_validated_and_reaches_the_config_from_the_cli():
    from hf_vq.cli import _config_from_args, build_parser

    for bad in (0, -1e-3, float("nan"), True):
        with pytest.raises(ValueError, match="tune_lr"):
            hf_vq.VQConfig(tune_lr=bad)
    args = build_parser().parse_args(["compress", "model", "--out", "o", "--tune-steps", "400", "--tune-lr", "3e-4"])
    assert _config_from_args(args).recipe.tune_lr == 3e-4
    args = build_parser().parse_args(["compress", "model", "--out", "o"])
    assert _config_from_args(args).recipe.tune_lr == hf_vq.Recipe.tune_lr


def test_block_tuning_defaults_on_at_low_budgets_only():
    """`VQConfig` turns block-wise tuning on (AUTO_TUNE_STEPS) for the output-aware engine at <= 2.5 bits per weight —
    `target_ratio` >= 12.8 of the fp32 file or `bits_per_weight` <= 2.5 — and nowhere else; a given value wins."""
    from hf_vq.cli import _config_from_args, build_parser
    from hf_vq.config import AUTO_TUNE_BITS, AUTO_TUNE_STEPS

    def steps(**kw):
        return hf_vq.VQConfig(**kw).recipe.tune_steps

    engine = {"encoder": "output-aware"}
    assert steps(target_ratio=16, **engine) == steps(bits_per_weight=2, **engine) == AUTO_TUNE_STEPS
    assert steps(target_ratio=32 / AUTO_TUNE_BITS, **engine) == steps(bits_per_weight=AUTO_TUNE_BITS, **engine) \
        == AUTO_TUNE_STEPS
    assert steps(target_ratio=12, **engine) == steps(bits_per_weight=3, **engine) == 0  # 10x default: no tuning
    assert steps(target_ratio=16) == 0  # k-means encoder: nothing to tune
    assert steps(**engine) == 0  # a fixed scheme
    assert steps(target_ratio=16, tune_steps=0, **engine) == 0 and steps(target_ratio=6, tune_steps=7, **engine) == 7
    with pytest.raises(ValueError, match="target_ratio"):  # a bad value still gets the field's error
        hf_vq.VQConfig(target_ratio="16", **engine)

    def cli(*flags):
        return _config_from_args(build_parser().parse_args(["compress", "m", "--out", "o", *flags])).recipe.tune_steps

    assert cli() == 0 and cli("--ratio", "16") == cli("--bits", "2") == AUTO_TUNE_STEPS
    assert cli("--ratio", "16", "--tune-steps", "0") == 0 and cli("--data-free", "--ratio", "16") == 0


def test_dense_trajectory_only_follows_blocks_that_chain():
    """Targets are carried from block to block only where nothing runs between them (else they fall back to local)."""
    from hf_vq.pipeline.calibrated import _chained_blocks

    class Gapped(nn.Module):
        def __init__(self, gap: bool):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.gap = gap

        def forward(self, x):
            x = self.blocks[1](self.blocks[0](x))
            return self.blocks[2](2 * x if self.gap else x)  # with a gap, block 2 reads something else

    batch = ((torch.randn(4, 8),), {})
    names = ["blocks.0", "blocks.1", "blocks.2"]
    assert _chained_blocks(Gapped(gap=False), names, batch) == {"blocks.1", "blocks.2"}
    assert _chained_blocks(Gapped(gap=True), names, batch) == {"blocks.1"}


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"),
    lambda: nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4),
    lambda: __import__("timm").layers.Conv2dSame(4, 4, 5, stride=2, groups=4),  # tf_* models' strided depthwise
    lambda: __import__("timm").layers.Conv2dSame(4, 6, 3, stride=2),
])
@pytest.mark.parametrize("size", [15, 16])
def test_conv_statistics_read_the_patches_the_conv_multiplies(make, size):
    """`H = XᵀX` is only the output error's metric if `X` holds the very patches the conv multiplies: its patches
    times the weight's matrix view give the module's output, for static, reflect and timm's dynamic "SAME" padding."""
    from hf_vq.calibrate.hessian import _conv_patches

    torch.manual_seed(0)
    conv = make().eval()
    x = torch.randn(2, 4, size, size + 1)
    with torch.no_grad():
        out = conv(x) - (0 if conv.bias is None else conv.bias[:, None, None])  # [N, out, H', W']
        patches = _conv_patches(conv, x)  # [G, N·H'·W', in/G·kh·kw]
        w = conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)  # [G, out/G, in/G·kh·kw]
        mine = (patches @ w.transpose(1, 2)).permute(1, 0, 2).reshape(patches.shape[1], conv.out_channels)
    expected = out.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)  # [N·H'·W', out]
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-4)


def _layer_inputs(model: nn.Module, name: str, texts: list[str]) -> torch.Tensor:
    """The inputs layer `name` of the text model `model` (a fixture with `name_or_path`) reads on `texts`, padding
    left out: `[tokens, in_features]` float64."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen[0][batch["attention_mask"].bool()].double()


def _file_ratio(model: nn.Module, dense_folder: Path, tmp: Path) -> float:
    model.save_pretrained(tmp)
    return (dense_folder / "model.safetensors").stat().st_size / (tmp / "model.safetensors").stat().st_size


@pytest.mark.parametrize("ratio", [6.0, 10.0])
def test_allocation_meets_the_file_ratio_within_two_percent(ratio, tmp_path):
    dense = _bert(hidden=128, layers=2, vocab=2048)
    dense.save_pretrained(tmp_path / "dense")
    model = copy.deepcopy(dense)
    config = hf_vq.quantize_(model, hf_vq.VQConfig(n_iter=5, permute=False, target_ratio=ratio),
                             calibration=_batches(4, vocab=2048), progress=False)
    achieved = _file_ratio(model, tmp_path / "dense", tmp_path / "vq")
    assert abs(achieved / ratio - 1) <= 0.02, (achieved, ratio)
    allocation = config.record.allocation
    assert allocation["target_ratio"] == ratio and allocation["planned_bits"] <= allocation["budget_bits"]
    assert len({v["choice"] for v in allocation["layers"].values()}) > 1  # a mixed allocation, not one width
    ks_ds = {(lay.k, lay.d) for lay in config.layouts.values()}
    assert len(ks_ds) > 1


def test_allocation_gives_sensitive_layers_more_bits():
    """A layer whose errors the output amplifies gets at least as many bits as its equally sized neighbour."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256))
    with torch.no_grad():
        model[2].weight.mul_(0.05)  # errors of layer 0/1 are damped by layer 2; layer 2's own error is not ...
        model[0].weight.mul_(20)  # ... and layer 0 feeds it huge activations: make layer 1 the sensitive one
    calibration = [torch.randn(64, 256) for _ in range(4)]
    config = hf_vq.quantize_(copy.deepcopy(model), hf_vq.VQConfig(k=64, n_iter=5, permute=False, bits_per_weight=2.5),
                             calibration=calibration, progress=False)
    sens = {n: v["sensitivity"] for n, v in config.record.allocation["layers"].items()}
    bits = {n: lay.bits / lay.d for n, lay in config.layouts.items()}
    top = max(sens, key=sens.get)
    assert all(bits[top] >= bits[n] for n in bits), (sens, bits)


def test_allocation_measures_options_on_inputs_the_fit_did_not_see():
    """A layer that reads few input vectors (a classifier on pooled features): fitted and measured on the same 32
    inputs of 256 channels its error looks ~0; measured on 32 others it estimates the error on the input population."""
    from hf_vq.codec.hessian import output_error
    from hf_vq.codec.output_aware import encode_output_aware
    from hf_vq.codec.pq import decode
    from hf_vq.pipeline.allocation import _quick_error

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=gen)  # [rows, cols]
    fit, test = torch.randn(32, 256, generator=gen), torch.randn(32, 256, generator=gen)  # isotropic inputs
    h_fit, h_test = (fit.T @ fit / 32).double(), (test.T @ test / 32).double()  # rank 32 of 256
    config = hf_vq.VQConfig(encoder="output-aware", target_ratio=8)
    in_sample = _quick_error(weight, h_fit, 4, 256, config, True)
    held_out = _quick_error(weight, h_fit, 4, 256, config, True, h_test=h_test)
    result = encode_output_aware(weight, h_fit, k=256, d=4, scales=True, n_iter=0, kmeans_iters=8, reassign="gptq")
    approx = decode(result.codes, result.codebooks) * result.scales[:, None]
    population = output_error(weight, approx, torch.eye(256, dtype=torch.float64))  # E[xxᵀ] = I
    assert in_sample < 0.05 * population, (in_sample, population)
    assert 0.5 * population < held_out < 2 * population, (held_out, population)
    # the menu of a layer with both halves' statistics measures on the other half
    from hf_vq.calibrate import LayerStatistics
    from hf_vq.config import LayerLayout
    from hf_vq.pipeline.allocation import _menu

    layout = LayerLayout(kind="linear", shape=(128, 256), k=256, d=4, scales=True)
    halves = LayerStatistics(hessian=h_fit * 32, count=32), LayerStatistics(hessian=h_test * 32, count=32)
    errors = {opt.label: opt.distortion for opt, _ in _menu(layout, weight, halves[0], config, 1.0, *halves)}
    alone = {opt.label: opt.distortion for opt, _ in _menu(layout, weight, halves[0], config, 1.0)}
    h_fit, h_test = halves[0].objective_hessian(), halves[1].objective_hessian()  # what the menu measures under
    assert errors["d4k256"] == pytest.approx(_quick_error(weight, h_fit, 4, 256, config, True, h_test=h_test))
    assert alone["d4k256"] == pytest.approx(_quick_error(weight, h_fit, 4, 256, config, True))


def test_allocation_estimates_a_layer_whose_output_one_row_carries_from_any_row_sample(minilm):
    """MiniLM's first FFN output layer (384 x 1,536, real weights, inputs from 32 real sentences): its row 99 (the
    massive-activation channel) carries ~95% of the output energy. Each menu option is measured on 256 sampled rows;
    whichever rows the seed samples, the estimate is within 1.5x of the error of the whole layer coded alike (relative
    to the sampled rows' own energy, a sample without row 99 measured it 8x too high)."""
    from hf_vq.calibrate import LayerStatistics
    from hf_vq.data import real_sentences
    from hf_vq.pipeline.allocation import _quick_error, _sample_rows

    layer = minilm.get_submodule("encoder.layer.0.output.dense")
    x = _layer_inputs(minilm, "encoder.layer.0.output.dense", real_sentences(32))  # [tokens, 1536]
    h = LayerStatistics(hessian=x.T @ x, count=x.shape[0]).objective_hessian()
    weight = layer.weight.detach().float()  # [384, 1536]
    energy = ((weight.double() @ h) * weight.double()).sum(1)  # [384] each row's output energy
    assert energy[99] > 0.8 * energy.sum()
    config = hf_vq.VQConfig(encoder="output-aware", target_ratio=10)
    whole = _quick_error(weight, h, 4, 256, config, True, max_rows=384)
    seeds = range(4)
    assert {bool((_sample_rows(384, 1, s, 256) == 99).any()) for s in seeds} == {True, False}  # both kinds of sample
    for seed in seeds:
        sampled = _quick_error(weight, h, 4, 256, config.replace(seed=seed), True)
        assert whole / 1.5 < sampled < 1.5 * whole, (seed, sampled, whole)


def test_a_layer_calibrated_on_few_rows_codes_better_for_new_inputs_with_the_prior(minilm, monkeypatch):
    """MiniLM's last attention output projection (384 x 384, real weights) calibrated on the tokens of 4 real
    sentences (fewer rows than columns), scored on the tokens of 64 others: encoded by the pipeline
    (`fit_layer`) under the objective's prior (`LayerStatistics.objective_hessian`), its output error on the new
    sentences is lower than with the prior switched off (`PRIOR_ROWS = 0`: `H / count`)."""
    import hf_vq.calibrate.hessian as hessian
    from hf_vq.calibrate import LayerStatistics
    from hf_vq.codec.hessian import output_error
    from hf_vq.codec.pq import decode
    from hf_vq.config import LayerLayout
    from hf_vq.data import real_sentences
    from hf_vq.pipeline.calibrated import fit_layer

    name = "encoder.layer.5.attention.output.dense"
    layer = minilm.get_submodule(name)
    sentences = real_sentences(68)
    fit, new = _layer_inputs(minilm, name, sentences[:4]), _layer_inputs(minilm, name, sentences[4:])  # [tokens, 384]
    assert fit.shape[0] < fit.shape[1] < new.shape[0]
    stat = LayerStatistics(hessian=fit.T @ fit, count=fit.shape[0])
    layout = LayerLayout(kind="linear", shape=(384, 384), k=64, d=2, scales=True)
    config = hf_vq.VQConfig(n_iter=8, permute=False)
    weight = layer.weight.detach().float()  # [384, 384]
    default, errors = hessian.PRIOR_ROWS, {}
    for prior in (0.0, default):
        monkeypatch.setattr(hessian, "PRIOR_ROWS", prior)
        codebooks, codes, scales, _ = fit_layer(minilm, name, layout, stat, config, torch.device("cpu"))
        errors[prior] = output_error(weight, decode(codes, codebooks) * scales[:, None], new.T @ new)
    assert errors[default] < 0.8 * errors[0.0], errors  # measured 0.036 vs 0.059


def test_hessian_floor_is_validated_and_reaches_the_encoder_from_the_cli(minilm):
    """`hessian_floor` (`--hessian-floor`) is the weight-space term of the objective the pipeline encodes every layer
    under: on MiniLM's last attention output projection (real weights, calibrated on 64 real sentences), a large
    floor gives codes nearer the weights (lower weight error) and farther from the calibration outputs (higher output
    error on those inputs) than the default, both in the layer's encoding (`fit_layer`) and in the allocation's
    estimate of an option (`_quick_fit`): measured 0.048 -> 0.034, 0.015 -> 0.023 and 0.050 -> 0.036."""
    from hf_vq.calibrate import LayerStatistics
    from hf_vq.cli import _config_from_args, build_parser
    from hf_vq.codec.hessian import output_error
    from hf_vq.codec.pq import decode, relative_error
    from hf_vq.config import LayerLayout
    from hf_vq.data import real_sentences
    from hf_vq.pipeline.allocation import _quick_fit
    from hf_vq.pipeline.calibrated import fit_layer

    for bad in (-1e-3, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="hessian_floor"):
            hf_vq.VQConfig(hessian_floor=bad)
    args = build_parser().parse_args(["compress", "model", "--out", "o", "--hessian-floor", "0.3"])
    assert _config_from_args(args).recipe.hessian_floor == 0.3
    assert _config_from_args(build_parser().parse_args(["compress", "model", "--out", "o"])).recipe.hessian_floor is None

    name = "encoder.layer.5.attention.output.dense"
    layer = minilm.get_submodule(name)
    x = _layer_inputs(minilm, name, real_sentences(64))  # [tokens, 384]
    stat = LayerStatistics(hessian=x.T @ x, count=x.shape[0])
    h = stat.objective_hessian()  # [384, 384]
    layout = LayerLayout(kind="linear", shape=(384, 384), k=64, d=2, scales=True)
    weight = layer.weight.detach().float()  # [384, 384]
    weight_errors, output_errors, quick = {}, {}, {}
    for floor in (None, 10.0):
        config = hf_vq.VQConfig(n_iter=8, permute=False, encoder="output-aware", hessian_floor=floor)
        codebooks, codes, scales, _ = fit_layer(minilm, name, layout, stat, config, torch.device("cpu"))
        approx = decode(codes, codebooks) * scales[:, None]  # [384, 384]
        weight_errors[floor] = relative_error(weight, approx)
        output_errors[floor] = output_error(weight, approx, h)
        pick, rows = _quick_fit(weight, h, 2, 64, config, True)  # [picked], [picked, 384]
        quick[floor] = relative_error(weight[pick], rows)
    assert weight_errors[10.0] < 0.9 * weight_errors[None], weight_errors
    assert output_errors[10.0] > 1.1 * output_errors[None], output_errors
    assert quick[10.0] < 0.9 * quick[None], quick


def test_auto_floor_is_chosen_on_a_held_out_half(minilm):
    """`hessian_floor="auto"` (`--hessian-floor auto`) chooses each layer's floor by its error on the half of the
    calibration its fit did not see: where the halves' inputs differ (each excites other channels: other photos),
    the largest floor candidate codes best for the other half; where they are alike, the default's. In the pipeline
    the choice is recorded with the layer's errors."""
    from hf_vq.calibrate import LayerStatistics
    from hf_vq.cli import _config_from_args, build_parser
    from hf_vq.codec.output_aware import FLOOR, FLOOR_CANDIDATES
    from hf_vq.config import LayerLayout
    from hf_vq.data import real_sentences
    from hf_vq.pipeline.allocation import cross_validated_floor
    from hf_vq.pipeline.calibrated import fit_layer

    args = build_parser().parse_args(["compress", "model", "--out", "o", "--hessian-floor", "auto"])
    assert _config_from_args(args).recipe.hessian_floor == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "model", "--out", "o", "--hessian-floor", "big"])
    with pytest.raises(ValueError, match="hessian_floor"):
        hf_vq.VQConfig(hessian_floor="Auto")

    def stat(x: torch.Tensor) -> LayerStatistics:  # x [rows, cols]
        return LayerStatistics(hessian=(x.T @ x).double(), count=x.shape[0])

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=gen)  # [64, 32]
    mix = torch.randn(32, 32, generator=gen)
    alike = tuple(stat(torch.randn(4000, 32, generator=gen) @ mix) for _ in range(2))
    excite = torch.cat([torch.ones(16), torch.full((16,), 0.01)])  # [32]: half A excites the first 16 channels
    unlike = (stat(torch.randn(4000, 32, generator=gen) * excite), stat(torch.randn(4000, 32, generator=gen) * excite.flip(0)))
    config = hf_vq.VQConfig(encoder="output-aware", permute=False, hessian_floor="auto")
    floor, errors = cross_validated_floor(weight, 2, 16, True, alike, config)
    assert floor == FLOOR and set(errors) == set(FLOOR_CANDIDATES), errors
    floor, errors = cross_validated_floor(weight, 2, 16, True, unlike, config)  # measured 0.123 -> 0.105
    assert floor == max(FLOOR_CANDIDATES) and errors[floor] < 0.9 * errors[FLOOR], errors

    name = "encoder.layer.5.attention.output.dense"
    x = _layer_inputs(minilm, name, real_sentences(64))  # [tokens, 384]
    half = x.shape[0] // 2
    layout = LayerLayout(kind="linear", shape=(384, 384), k=64, d=2, scales=True)
    *_, recorded = fit_layer(minilm, name, layout, stat(x), config, torch.device("cpu"), (stat(x[:half]), stat(x[half:])))
    assert recorded["hessian_floor"] in FLOOR_CANDIDATES and recorded["output_error"] > 0
    *_, fixed = fit_layer(minilm, name, layout, stat(x), config.replace(hessian_floor=0.3), torch.device("cpu"))
    assert "hessian_floor" not in fixed


def test_allocation_measures_every_output_the_model_returns():
    """BertModel's pooler only feeds `pooler_output`: measured on `last_hidden_state` alone it looked free to ruin."""
    model = _bert(hidden=64, layers=1)
    config = hf_vq.quantize_(copy.deepcopy(model), hf_vq.VQConfig(n_iter=5, permute=False, bits_per_weight=6),
                             calibration=_batches(2), progress=False)
    sens = {n: v["sensitivity"] for n, v in config.record.allocation["layers"].items()}
    assert sens["pooler.dense"] > 0.01 * max(sens.values()), sens


def test_allocation_protects_only_the_outputs_named():
    """A sentence-embedding model pools `last_hidden_state` and never reads BERT's pooler: with
    `allocation_outputs=["last_hidden_state"]` the pooler's sensitivity is 0 and it gets the fewest bits of the menu,
    which the layers that make the token states get instead."""
    from hf_vq.codec.allocate import option_bits
    from hf_vq.codec.pq import clamp_k
    from hf_vq.pipeline.allocation import MENU

    model = _bert(hidden=64, layers=1)
    bits, sens = {}, {}
    for outputs in (None, ["last_hidden_state"]):
        config = hf_vq.quantize_(copy.deepcopy(model), hf_vq.VQConfig(n_iter=5, permute=False, bits_per_weight=4,
                                                                      allocation_outputs=outputs),
                                 calibration=_batches(2), progress=False)
        assert config.record.allocation["outputs"] == (outputs or "all")
        sens[bool(outputs)] = {n: v["sensitivity"] for n, v in config.record.allocation["layers"].items()}
        bits[bool(outputs)] = {n: lay.bits / lay.d for n, lay in config.layouts.items()}
    assert sens[True]["pooler.dense"] == 0.0 and sens[False]["pooler.dense"] > 0, sens
    pooler = config.layouts["pooler.dense"]
    cheapest = min(option_bits(64, 64, d=d, k=clamp_k(k, 64 * 64 // d), scales=pooler.scales)
                   for d, k in MENU if 64 % d == 0)
    assert option_bits(64, 64, d=pooler.d, k=pooler.k, scales=pooler.scales) == cheapest, pooler
    assert bits[True]["pooler.dense"] < bits[False]["pooler.dense"], bits
    others = [n for n in bits[True] if n != "pooler.dense" and n != "embeddings.word_embeddings"]
    assert sum(bits[True][n] for n in others) > sum(bits[False][n] for n in others), bits
    with pytest.raises(ValueError, match="allocation_outputs.*no field 'sentence_embedding'.*last_hidden_state"):
        hf_vq.quantize_(copy.deepcopy(model), hf_vq.VQConfig(n_iter=5, permute=False, bits_per_weight=4,
                                                             allocation_outputs=["sentence_embedding"]),
                        calibration=_batches(2), progress=False)


def test_allocation_can_measure_a_token_average():
    """`field:mean` measures the field averaged over each sequence's real tokens: padding positions do not move it,
    a change that only reorders the tokens does not either, and any other name suffix is refused."""
    from hf_vq.pipeline.allocation import _final

    states = torch.randn(2, 5, 8)  # [batch, seq, features]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled, = _final({"last_hidden_state": states}, mask, ("last_hidden_state:mean",))
    torch.testing.assert_close(pooled, torch.stack([states[0, :3].mean(0), states[1].mean(0)]))
    moved = states.clone()
    moved[0, 3:] += 100  # padding
    moved[1] = moved[1].flip(0)  # the same tokens in another order
    torch.testing.assert_close(_final({"last_hidden_state": moved}, mask, ("last_hidden_state:mean",))[0], pooled)
    tokens, = _final({"last_hidden_state": states}, mask, ("last_hidden_state",))
    assert tokens.shape == (8, 8)  # every real token, padding dropped
    with pytest.raises(ValueError, match="allocation_outputs.*':mean'"):
        hf_vq.VQConfig(target_ratio=8, allocation_outputs=["last_hidden_state:max"])


def test_allocation_measures_the_embedding_table_in_the_model(monkeypatch):
    """The table's options are measured end to end: each coded table goes into the model, which is left exactly as
    it was; fewer bits change the outputs more, and a zero change costs nothing."""
    from hf_vq.calibrate import merge_statistics
    from hf_vq.pipeline import allocation as A
    from hf_vq.pipeline.parallel import Workers
    from hf_vq.pipeline.select import plan

    model = _bert(hidden=64, layers=1)
    batches = [((), b) for b in _batches(2)]
    config = hf_vq.VQConfig(permute=False, target_ratio=8, encoder="output-aware", scales=True)
    name = "embeddings.word_embeddings"
    layout, module = plan(model, config)[name], model.get_submodule(name)
    stats = {}
    for half in A._dense_statistics(model, {name: module}, [name], batches, Workers()):
        merge_statistics(stats, half)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = A._Probe(model, batches, ("last_hidden_state:mean",))
    assert probe.change(module, torch.zeros_like(module.weight)) == 0.0
    menu = {c: o for o, c in A._menu(layout, module.weight.detach(), stats[name], config, 1.0,
                                     change=lambda delta: probe.change(module, delta))}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert menu[(8, 256)].distortion > menu[(4, 256)].distortion > menu[(1, 256)].distortion > 0
    assert menu[None].distortion == 0.0
    whole = A._table_delta(module.weight.detach(), A._row_weights(stats[name]), 8, 256, config, layout.scales)
    assert probe.change(module, whole) == pytest.approx(menu[(8, 256)].distortion, rel=1e-5)  # only read rows count

    measured = []  # what allocate_layouts itself does: every table option goes through the probe
    real_change = A._Probe.change
    monkeypatch.setattr(A._Probe, "change", lambda self, m, delta: measured.append(m) or real_change(self, m, delta))
    config = hf_vq.VQConfig(permute=False, bits_per_weight=3, encoder="output-aware", scales=True)
    layouts = plan(model, config)
    A.allocate_layouts(model, layouts, config, batches)
    owners = {n: model.get_submodule(n) for n, lay in layouts.items() if lay.tied_to is None}
    calls = {n: sum(m is o for m in measured) for n, o in owners.items()}  # α, then (tables only) each option
    assert all(calls[n] > 2 if layouts[n].kind == "embedding" else calls[n] == 1 for n in owners), calls
    assert calls[name] > 2


def test_sentence_transformers_folders_are_allocated_for_their_token_states(tmp_path):
    from hf_vq.integrations.transformers.tools import sentence_embedding_outputs

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert sentence_embedding_outputs(tmp_path) == ("last_hidden_state",)  # pooling unknown: every token counts
    (tmp_path / "1_Pooling").mkdir()
    mode = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(mode))
    assert sentence_embedding_outputs(tmp_path) == ("last_hidden_state:mean",)  # what the embedding is made of
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(mode | {"pooling_mode_cls_token": True}))
    assert sentence_embedding_outputs(tmp_path) == ("last_hidden_state",)
    (tmp_path / "modules.json").write_text(json.dumps(modules[:1]))  # no pooling: the outputs are not known
    assert sentence_embedding_outputs(tmp_path) is None
    assert sentence_embedding_outputs(tmp_path / "missing") is None


def test_texts_are_truncated_to_the_positions_the_model_embeds():
    """Calibration and fidelity text go through one tokenizer helper; a 32-position model never sees 33 tokens."""
    from hf_vq.calibrate.sources import tokenize_batches
    from hf_vq.evaluate import embedding_cosine

    class Tokenizer:  # whitespace tokens, as a transformers tokenizer returns them (padding, truncation)
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            ids = [[1 + hash(w) % 100 for w in t.split()][:max_length] for t in texts]
            width = max(map(len, ids))
            return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in ids]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])}

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=64,
                                                           max_position_embeddings=32)).eval()
    texts = ["word " * 100, "a short one"]
    assert tokenize_batches(Tokenizer(), texts, model=model)[0]["input_ids"].shape[1] == 32
    assert embedding_cosine(model, model, Tokenizer(), texts)["mean_cosine"] > 0.999


def test_mixed_allocation_round_trips_through_from_pretrained(tmp_path):
    dense = _bert(hidden=128, vocab=2048)
    model = copy.deepcopy(dense)
    hf_vq.quantize_(model, hf_vq.VQConfig(n_iter=5, permute=False, target_ratio=8.0, encoder="output-aware",
                                          scales=True), calibration=_batches(3, vocab=2048), progress=False)
    model.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 2048, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
    assert len({(lay.k, lay.d) for lay in loaded.vq_config.layouts.values()}) > 1


def test_a_budget_between_4_and_8_bits_takes_5_and_6_bit_codes_that_round_trip(tmp_path):
    """At 6 bits per weight over three like layers the knapsack of the old menu split them between 4 and 8 bits; the
    menu's 5- and 6-bit scalar codes (d = 1, k = 32 / 64) fill that gap, and their packed codes load back bit for
    bit (that packing keeps 5- and 6-bit codes exactly: tests/codec/test_packing.py)."""
    from hf_vq.serialization import load_compressed_, save_weights

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128))

    model = mlp()
    config = hf_vq.quantize_(model, hf_vq.VQConfig(n_iter=5, permute=False, bits_per_weight=6, encoder="output-aware",
                                                   scales=True),
                             calibration=[torch.randn(64, 128) for _ in range(4)], progress=False)
    widths = {(lay.d, lay.k) for lay in config.layouts.values()}
    assert widths & {(1, 32), (1, 64)}, widths
    save_weights(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config.to_dict()}))
    loaded = load_compressed_(mlp(), tmp_path)
    x = torch.randn(8, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_embedding_menu_codes_the_real_table_better_at_equal_bits(minilm):
    """Only embedding tables get the large-codebook options, and on MiniLM's word embeddings (rows weighted by a
    skewed use) the held-out estimate ranks d = 8, k = 2048 (1.375 bits) below d = 6, k = 256 (1.33 bits), close to
    what the final encoder reaches on the whole table."""
    from hf_vq.config import LayerLayout
    from hf_vq.pipeline.allocation import EMBEDDING_MENU, _embedding_error, _menu
    from hf_vq.pipeline.calibrated import _encode_rows_by_use
    from hf_vq.pipeline.encode import use_weights
    from hf_vq.codec.pq import decode

    table = minilm.embeddings.word_embeddings.weight.detach().float()  # [30522, 384]
    counts = torch.zeros(table.shape[0], dtype=torch.float64)
    counts[1000:3000] = torch.arange(2000, 0, -1, dtype=torch.float64)  # a few thousand tokens in use, Zipf-like
    use = use_weights(counts)  # [rows]
    config = hf_vq.VQConfig(target_ratio=16)
    estimates = {(d, k): _embedding_error(table, use, d, k, config, True) for d, k in ((6, 256), (8, 2048))}
    assert estimates[8, 2048] < 0.95 * estimates[6, 256], estimates
    layout = LayerLayout(kind="embedding", shape=tuple(table.shape), k=2048, d=8, scales=True)
    codebooks, codes, scales = _encode_rows_by_use(table, counts, layout, config, seed=0)
    err = (decode(codes, codebooks) * scales[:, None] - table).pow(2).sum(1)  # [rows]
    final = float((err * use).sum() / (table.pow(2).sum(1) * use).sum())
    assert 0.8 * final < estimates[8, 2048] < 1.25 * final, (estimates, final)
    small = torch.randn(2048, 64)  # [rows, cols]
    options = {o.label: o.distortion for o, _ in _menu(
        LayerLayout(kind="embedding", shape=(2048, 64), k=256, d=4, scales=True), small, None, config, 1.0)}
    labels = set(options)
    # the menu measures an embedding's options with the estimate above (uniform use without statistics)
    assert options["d8k2048"] == pytest.approx(_embedding_error(small, None, 8, 2048, config, True))
    linear = {o.label for o, _ in _menu(LayerLayout(kind="linear", shape=(2048, 64), k=256, d=4, scales=True),
                                        small, None, hf_vq.VQConfig(target_ratio=16, encoder="kmeans"), 1.0)}
    assert "d8k2048" in labels and not any(f"d{d}k{k}" in linear for d, k in EMBEDDING_MENU), (labels, linear)


def test_embeddings_with_large_codebooks_round_trip(tmp_path):
    """An embedding coded with 4,096 codewords (12-bit codes, packed) loads bit-identically."""
    from safetensors import safe_open

    model = _bert(hidden=128, vocab=2048)
    config = hf_vq.quantize_(model, hf_vq.VQConfig(n_iter=3, permute=False, scales=True, overrides={
        "embeddings.word_embeddings": {"k": 4096, "d": 8}}), calibration=_batches(2, vocab=2048), progress=False)
    assert config.layouts["embeddings.word_embeddings"].bits == 12
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        codes = f.get_tensor("embeddings.word_embeddings.codes")
    assert codes.numel() == 2048 * (128 // 8) * 12 // 8, codes.shape  # 12 bits per code on disk
    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 2048, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_streaming_data_free_matches_in_memory_and_round_trips(tmp_path):
    from hf_vq.integrations.transformers.streaming import compress_streaming

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")  # several shards
    assert len(list((tmp_path / "dense").glob("*.safetensors"))) > 2
    scheme = hf_vq.VQConfig(k=16, n_iter=5, permute=False)
    streamed = compress_streaming(tmp_path / "dense", scheme, progress=False)
    in_memory = copy.deepcopy(dense)
    hf_vq.quantize_(in_memory, scheme, progress=False)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)
    streamed.save_pretrained(tmp_path / "vq")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "vq").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
    assert loaded.vq_config.record.recipe["streaming"] is True


def test_streaming_reads_the_layers_outside_the_blocks_one_at_a_time_when_needed(tmp_path):
    """The embedding and the head (the largest layers of a big model) are not held while the blocks are encoded:
    data-free they are read after the last block, each in its own read; with calibration data they are also read at
    the start (for the first block's inputs) and dropped until then."""
    from hf_vq.integrations.transformers.streaming import empty_model, folder_loader
    from hf_vq.pipeline.streaming import quantize_streaming_

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    outside = {"model.embed_tokens.weight", "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, 128, (4, 16), generator=gen)} for _ in range(2)]
    for data in (None, calibration):
        model = empty_model(tmp_path / "dense")
        load, reads = folder_loader(tmp_path / "dense", model), []
        embedding_during_blocks = []

        def recording(keys, load=load, reads=reads, model=model, seen=embedding_during_blocks):
            reads.append(set(keys))
            if any(".layers." in key for key in keys):
                seen.append(model.model.embed_tokens.weight.device.type)
            return load(keys)

        quantize_streaming_(model, hf_vq.VQConfig(k=16, n_iter=3, permute=False,
                                                  encoder="kmeans" if data is None else "output-aware"),
                            recording, calibration=data, progress=False)
        last_block = max(i for i, keys in enumerate(reads) if any(".layers." in key for key in keys))
        late = [keys & outside for keys in reads[last_block + 1:] if keys & outside]
        assert sorted(map(sorted, late)) == [["lm_head.weight"], ["model.embed_tokens.weight"]], reads
        early = set().union(*(keys & outside for keys in reads[:last_block]))
        assert early == (set() if data is None else {"model.embed_tokens.weight", "lm_head.weight"}), reads
        assert embedding_during_blocks == ["meta"] * 2, embedding_during_blocks  # dropped while the blocks encode
        assert isinstance(model.lm_head, hf_vq.nn.VQLinear)
        assert not any(p.device.type == "meta" for p in model.parameters())


def _llama_folder(folder: Path) -> tuple[nn.Module, list[dict], torch.Generator]:
    """A small random Llama saved to `folder`, 4 calibration batches of token ids `[8, 16]`, and the generator that
    drew them (for held-out ids)."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    dense.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, 128, (8, 16), generator=gen)} for _ in range(4)]
    return dense, calibration, gen


def test_streaming_output_aware_beats_data_free(tmp_path):
    from hf_vq.integrations.transformers.streaming import compress_streaming

    dense, calibration, gen = _llama_folder(tmp_path / "dense")
    held_out = torch.randint(0, 128, (8, 16), generator=gen)
    errors = {}
    for encoder in ("kmeans", "output-aware"):
        model = compress_streaming(tmp_path / "dense", hf_vq.VQConfig(k=16, n_iter=5, encoder=encoder),
                                   calibration=calibration if encoder != "kmeans" else None, progress=False)
        with torch.no_grad():
            ref = dense(held_out).logits
            errors[encoder] = float((model(held_out).logits - ref).pow(2).sum() / ref.pow(2).sum())
    assert errors["output-aware"] < errors["kmeans"], errors


def test_auto_floor_streams_and_is_recorded(tmp_path):
    """`hessian_floor="auto"` under `--stream` and in memory: every layer encoded for its outputs gets a floor chosen
    on the held-out half of the calibration batches, and the record (and so the card) says which."""
    from hf_vq.codec.output_aware import FLOOR_CANDIDATES
    from hf_vq.integrations.transformers.streaming import compress_streaming

    dense, calibration, _ = _llama_folder(tmp_path / "dense")
    scheme = hf_vq.VQConfig(k=16, n_iter=5, permute=False, encoder="output-aware", hessian_floor="auto")
    streamed = compress_streaming(tmp_path / "dense", scheme, calibration=calibration, progress=False)
    in_memory = copy.deepcopy(dense)
    hf_vq.quantize_(in_memory, scheme, calibration=calibration, progress=False)
    # 2 blocks x 7 linears; in memory the head too (streaming codes it on its weights: its inputs are not propagated)
    for model, layers in ((streamed, 14), (in_memory, 15)):
        text = model.vq_config.record.calibration["hessian floor"]
        counts = {float(f): int(n) for f, n in (part.split(" ×") for part in text.split(": ")[1].split(", "))}
        assert set(counts) <= set(FLOOR_CANDIDATES) and sum(counts.values()) == layers, text


# ---------------------------------------------------------------------------------------------- calibration data
def test_calibration_and_fidelity_data_are_disjoint():
    pytest.importorskip("gensim")
    pytest.importorskip("skimage")
    from hf_vq.data import (CALIBRATION_PHOTOS, EVAL_PHOTOS, EVAL_SENTENCES, calibration_texts, real_photos,
                            real_sentences, wikipedia_sentences)

    evaluated = set(real_sentences(EVAL_SENTENCES))
    assert not set(calibration_texts(2000)) & evaluated  # the default calibration corpus: Wikipedia
    assert calibration_texts(50) == wikipedia_sentences(50)
    assert not set(EVAL_PHOTOS) & set(CALIBRATION_PHOTOS)
    eval_pixels = {p.tobytes() for p in real_photos(EVAL_PHOTOS)}
    assert not {p.tobytes() for p in real_photos(CALIBRATION_PHOTOS)} & eval_pixels


def test_calibration_image_batches_hold_one_photo_each(tmp_path):
    """Image calibration batches hold one photo's crops each, photo by photo, so the contiguous halves the
    allocation and `hessian_floor="auto"` hold out are other photos; the crops are the ones `calibration_images`
    makes (the same pixels, regrouped)."""
    timm = pytest.importorskip("timm")
    from PIL import Image

    from hf_vq.data import calibration_batches, calibration_images, photo_batches
    from hf_vq.pipeline.stages import half_of

    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (64, 48), colour).save(tmp_path / f"{i}.png")
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    batches = calibration_batches(14, model=model, source=str(tmp_path), batch_size=3)
    crops = calibration_images(14, model, str(tmp_path))  # [14, 3, 224, 224], crop i of photo i mod 3
    assert [len(b) for b in batches] == [3, 2, 3, 2, 3, 1]  # photo 0: crops 0, 3, ..., 12; photo 1: 1, ..., 13
    assert torch.equal(torch.cat(batches), torch.cat([crops[0::3], crops[1::3], crops[2::3]]))
    means = [b.mean((0, 2, 3)) for b in batches]  # [3] each: one colour per photo
    assert all(torch.allclose(means[j], means[j + 1]) for j in (0, 2, 4))
    assert [half_of(i, len(batches)) for i in range(len(batches))] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="photos"):
        photo_batches(crops, 0)


def test_calibration_text_file_of_any_suffix(tmp_path):
    from hf_vq.data import calibration_texts

    path = tmp_path / "notes.cor"
    path.write_text("first line of text\n\n  \nsecond line\n")
    assert calibration_texts(10, str(path)) == ["first line of text", "second line"]
    binary = tmp_path / "x.dat"
    binary.write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a text file"):
        calibration_texts(10, str(binary))


def test_quantize_on_load_takes_a_dataset_and_tokenizer(tmp_path, minilm_path):
    pytest.importorskip("gensim")
    from transformers import AutoModel

    texts = ["The quick brown fox jumps over the lazy dog.", "Vector quantization stores codes and codebooks."] * 8
    config = hf_vq.VQConfig(k=64, n_iter=3, permute=False, encoder="output-aware", dataset=texts,
                            tokenizer=str(minilm_path), modules_to_not_convert=["embeddings.*"])
    model = AutoModel.from_pretrained(minilm_path, quantization_config=config)
    record = model.vq_config.record
    assert record.calibration["encoder"] == "output-aware" and record.calibration["batches"] == 1
    assert "dataset" not in json.loads(model.config.to_json_string())["quantization_config"]
