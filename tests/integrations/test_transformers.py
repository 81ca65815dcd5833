"""transformers integration: `from_pretrained(..., quantization_config=VQConfig(...))`, `save_pretrained`,
loading compressed checkpoints with no extra argument, tied weights, dtypes, `device_map`, training,
`dequantize`, the Hub, and clear errors on bad checkpoints.

Small random configs show that loading preserves the saved model's function bit for bit; the
quality on real weights (all-MiniLM-L6-v2, real sentences) is in the slow tests and in
benchmarks/bench_transformers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import hf_vq
from hf_vq import CheckpointError, VQConfig
from hf_vq.integrations.transformers import GUARD_NOTE_KEY, HfVQQuantizer
from hf_vq.serialization import read_header

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128


def _cfg(**kwargs) -> VQConfig:
    return VQConfig(**{"k": 16, "n_iter": 3, "permute": False, **kwargs})


# name -> (config, model class); tiny random configs covering the layer types of each family
ARCHS = {
    "bert": lambda: (tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64), tf.BertForMaskedLM),
    "gpt2": lambda: (tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                   eos_token_id=0), tf.GPT2LMHeadModel),  # Conv1D, tied lm_head
    "llama": lambda: (tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True,
                                     bos_token_id=0, eos_token_id=0), tf.LlamaForCausalLM),  # RMSNorm, rotary, gated MLP
    "vit": lambda: (tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, num_labels=3), tf.ViTForImageClassification),
    "t5": lambda: (tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                               decoder_start_token_id=0), tf.T5ForConditionalGeneration),
    "bart": lambda: (tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=64), tf.BartForConditionalGeneration),
}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    if name in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model, name: str) -> torch.Tensor:
    return model(**_inputs(name)).logits


def _dense_dir(name: str, root: Path) -> tuple[Path, type]:
    config, cls = ARCHS[name]()
    torch.manual_seed(0)
    folder = root / f"{name}-dense"
    if not folder.exists():
        cls(config).save_pretrained(folder)
    return folder, cls


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """name -> (class, dense folder, compressed model, compressed folder); each built once per module."""
    root = tmp_path_factory.mktemp("transformers")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            dense_dir, cls = _dense_dir(name, root)
            model = cls.from_pretrained(dense_dir, quantization_config=_cfg())
            model.save_pretrained(root / f"{name}-vq")
            cache[name] = cls, dense_dir, model, root / f"{name}-vq"
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(ARCHS))
def test_quantize_on_load_save_reload_bit_identical(name, compressed):
    cls, dense_dir, model, folder = compressed(name)
    assert isinstance(model.hf_quantizer, HfVQQuantizer) and model.is_quantized
    vq = hf_vq.vq_modules(model)
    assert len(vq) >= 8, f"{name}: only {sorted(vq)} compressed"
    assert set(model.config.quantization_config.modules) == set(vq)

    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_vq" and saved["version"] == 1  # per-layer PQ: format 1 (older hf_vq reads it)
    assert set(saved["modules"]) == set(vq)
    card = (folder / "README.md").read_text()
    assert "base_model_relation: quantized" not in card or "base_model:" in card
    assert "hf_vq" in card and "| module |" in card and 'import hf_vq' in card

    loaded, info = cls.from_pretrained(folder, output_loading_info=True)
    assert type(loaded) is cls and isinstance(loaded.hf_quantizer, HfVQQuantizer)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(hf_vq.vq_modules(loaded)) == set(vq)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert torch.equal(_logits(loaded, name), _logits(model, name))


@pytest.mark.parametrize("name", list(ARCHS))
def test_dense_tensors_in_fp16_round_trip_bit_identical(name, compressed, tmp_path):
    """`dense_dtype="float16"`: `save_pretrained` writes every norm, bias and dense table at 16 bits (the model
    holds their rounded values), `from_pretrained` widens them back into the fp32 model, outputs equal."""
    cls, dense_dir, _, _ = compressed(name)
    model = cls.from_pretrained(dense_dir, quantization_config=_cfg(dense_dtype="float16"))
    model.save_pretrained(tmp_path / "vq")
    header = read_header(tmp_path / "vq" / "model.safetensors")
    wide = [key for key, (dtype, _) in header.items() if dtype in ("F32", "F64")]
    assert not wide, f"{name}: {wide} stored wider than 16 bits"
    loaded = cls.from_pretrained(tmp_path / "vq")
    assert all(p.dtype == torch.float32 for p in loaded.parameters() if p.is_floating_point())
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert torch.equal(_logits(loaded, name), _logits(model, name))


def test_quantize_on_load_is_lossy_but_close_to_dense(compressed):
    """k-means on the weights: every compressed layer reports its relative error, and it is far below 1."""
    _, _, model, _ = compressed("llama")
    errors = [m["rel_error"] for m in model.config.quantization_config.modules.values()]
    assert all(0 < e < 0.6 for e in errors), errors


def test_bart_keeps_subclassed_embeddings_dense(compressed):
    """BART's scaled word / learned positional embeddings have their own forward: left dense, still tied."""
    _, _, model, folder = compressed("bart")
    assert type(model.model.shared).__name__ == "BartScaledWordEmbedding"
    assert type(model.model.encoder.embed_positions).__name__ == "BartLearnedPositionalEmbedding"
    assert model.lm_head.weight is model.model.shared.weight  # the tied group stays dense and tied
    assert isinstance(model.model.encoder.layers[0].fc1, hf_vq.VQLinear)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bert"])
def test_tied_weights_stay_tied_and_are_stored_once(name, compressed):
    cls, _, model, folder = compressed(name)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    layout = model.config.quantization_config.layouts
    head_name = next(n for n, m in model.named_modules() if m is head)
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    assert layout[head_name].tied_to == emb_name
    stored = load_file(folder / "model.safetensors")
    assert f"{emb_name}.codes" in stored and f"{head_name}.codes" not in stored and f"{head_name}.codebooks" not in stored
    assert stored[f"{emb_name}.codebooks"].dtype == torch.float16

    loaded = cls.from_pretrained(folder)
    emb, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert head.codebooks is emb.codebooks and head.codes is emb.codes
    loaded.tie_weights()  # recomputing the tie mapping must work on the compressed model too
    assert head.codebooks is emb.codebooks


def test_quantize_directly_then_save_pretrained(tmp_path):
    """`hf_vq.quantize_` on a transformers model makes it save and load like one loaded with a VQConfig."""
    config, cls = ARCHS["gpt2"]()
    torch.manual_seed(0)
    model = cls(config).eval()
    hf_vq.quantize_(model, _cfg(), progress=False)
    assert isinstance(model.hf_quantizer, HfVQQuantizer)
    model.save_pretrained(tmp_path / "vq")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "vq")
    assert torch.equal(_logits(loaded, "gpt2"), _logits(model, "gpt2"))


def test_sharded_save_reloads(compressed, tmp_path):
    cls, _, model, _ = compressed("llama")
    model.save_pretrained(tmp_path / "vq", max_shard_size="4KB")
    shards = sorted(p.name for p in (tmp_path / "vq").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "vq" / "model.safetensors.index.json").is_file()
    loaded = cls.from_pretrained(tmp_path / "vq")
    assert torch.equal(_logits(loaded, "llama"), _logits(model, "llama"))
    report = hf_vq.checkpoint_size_report(tmp_path / "vq")
    assert report.ratio > 3 and report.file_bytes == sum((tmp_path / "vq" / s).stat().st_size for s in shards)


# ---------------------------------------------------------------------------------------------- dtype, device_map
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_compressed_in_dtype(dtype, compressed):
    cls, _, model, folder = compressed("llama")
    loaded = cls.from_pretrained(folder, dtype=dtype)
    vq = hf_vq.vq_modules(loaded)
    assert all(m.codebooks.dtype == dtype and m.codes.dtype == torch.uint8 for m in vq.values())
    assert loaded.model.norm.weight.dtype == dtype
    expected = _logits(model, "llama")
    got = _logits(loaded, "llama").float()
    if dtype == torch.float32:
        assert torch.equal(got, expected)
    else:  # codebooks are fp16 on disk: fp16 loads them exactly, bf16 rounds them
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def test_fp32_kept_modules_keep_fp32_codebooks(compressed):
    """T5 keeps `wo` in fp32 in a half-precision model (`_keep_in_fp32_modules`): compressed, its codebooks too."""
    cls, dense_dir, _, folder = compressed("t5")
    dense = cls.from_pretrained(dense_dir, dtype=torch.float16)
    loaded = cls.from_pretrained(folder, dtype=torch.float16)
    wo = loaded.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, hf_vq.VQModuleMixin)
    assert wo.codebooks.dtype == dense.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wi.codebooks.dtype == torch.float16


def test_quantize_on_load_in_bfloat16(compressed):
    _, dense_dir, _, _ = compressed("llama")
    model = tf.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16, quantization_config=_cfg())
    assert all(m.codebooks.dtype == torch.bfloat16 for m in hf_vq.vq_modules(model).values())
    assert torch.isfinite(_logits(model, "llama").float()).all()


def test_device_map_auto(compressed):
    cls, _, model, folder = compressed("gpt2")
    loaded = cls.from_pretrained(folder, device_map="auto")
    devices = {t.device for t in loaded.state_dict().values()}
    assert "meta" not in {d.type for d in devices}
    assert loaded.lm_head.codebooks is loaded.transformer.wte.codebooks
    assert torch.equal(_logits(loaded.cpu(), "gpt2"), _logits(model, "gpt2"))


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_who_loads_the_tensors(device_map, compressed, monkeypatch):
    """On one device hf_vq reads the checkpoint itself (transformers' per-key loader is left the tied weights);
    with a device_map it cannot settle up front ("auto") everything goes through transformers. Same model either
    way, nothing missing or unexpected, nothing left hidden."""
    import transformers.core_model_loading as cml

    cls, _, model, folder = compressed("gpt2")
    loaded_by_transformers = []
    set_param = cml.set_param_for_module

    def recording(model, target_name, *args, **kwargs):
        loaded_by_transformers.append(target_name)
        return set_param(model, target_name, *args, **kwargs)

    monkeypatch.setattr(cml, "set_param_for_module", recording)
    loaded, info = cls.from_pretrained(folder, device_map=device_map, output_loading_info=True)
    if device_map is None:
        assert not loaded_by_transformers, sorted(loaded_by_transformers)
    else:
        assert {"transformer.h.0.mlp.c_fc.codes", "transformer.h.0.mlp.c_fc.bias", "transformer.ln_f.weight",
                "transformer.wpe.codebooks"} <= set(loaded_by_transformers)
        assert "lm_head.codes" not in loaded_by_transformers  # tied: stored once, as the embedding's
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.state_dict().keys() == model.state_dict().keys()  # nothing left hidden after loading
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
        assert loaded.state_dict()[key].dtype == tensor.dtype, key
    assert loaded.lm_head.codebooks is loaded.transformer.wte.codebooks


def test_save_over_the_folder_it_was_loaded_from(compressed, tmp_path):
    """The one-device load maps the checkpoint file; saving into the same folder must neither crash nor corrupt."""
    cls, _, model, folder = compressed("gpt2")
    same = _copy(folder, tmp_path / "same")
    loaded = cls.from_pretrained(same)
    loaded.save_pretrained(same)
    expected = _logits(model, "gpt2")
    torch.testing.assert_close(_logits(loaded, "gpt2"), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(cls.from_pretrained(same), "gpt2"), expected, rtol=0, atol=0)


def test_one_device_load_reports_what_the_model_lacks(compressed, tmp_path):
    """hf_vq hides what it reads from transformers' report; a stored tensor the model has no place for is still
    reported as unexpected, and one the file lacks as missing (and initialised by transformers)."""
    from safetensors.torch import load_file, save_file

    cls, _, model, folder = compressed("gpt2")
    bad = _copy(folder, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["transformer.h.0.extra_head.weight"] = torch.zeros(3)
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    loaded, info = cls.from_pretrained(bad, output_loading_info=True)
    assert info["unexpected_keys"] == {"transformer.h.0.extra_head.weight"}, info
    assert info["missing_keys"] == {"transformer.ln_f.bias"}, info
    assert loaded.transformer.ln_f.bias.device.type == "cpu" and torch.equal(
        loaded.transformer.ln_f.bias, torch.zeros_like(loaded.transformer.ln_f.bias))  # LayerNorm bias init: zeros
    torch.testing.assert_close(loaded.transformer.ln_f.weight, model.transformer.ln_f.weight)
    # a tensor of the model stored under another shape is left to transformers, which reports it as for a dense model
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"][:5]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        cls.from_pretrained(bad)
    _, info = cls.from_pretrained(bad, output_loading_info=True, ignore_mismatched_sizes=True)
    assert [key for key, *_ in info["mismatched_keys"]] == ["transformer.ln_f.weight"], info


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device_map", ["cuda", "auto"])
def test_load_on_the_gpu(device_map, compressed):
    cls, _, model, folder = compressed("gpt2")
    loaded = cls.from_pretrained(folder, device_map=device_map)
    assert {t.device.type for t in loaded.state_dict().values()} == {"cuda"}
    assert loaded.lm_head.codebooks is loaded.transformer.wte.codebooks
    with torch.no_grad():
        got = loaded(**{k: v.cuda() for k, v in _inputs("gpt2").items()}).logits.cpu()
    torch.testing.assert_close(got, _logits(model, "gpt2"), rtol=1e-4, atol=1e-4)


def test_single_device_rule():
    from hf_vq.integrations.transformers.loading import single_device as _single_device

    assert _single_device(None) == torch.device("cpu")
    assert _single_device({"": torch.device("cpu")}) == torch.device("cpu")
    assert _single_device({"transformer": 0, "lm_head": 0}) == torch.device("cuda:0")
    assert _single_device({"": "cuda:1"}) == torch.device("cuda:1")
    for several in ("auto", {"transformer": "cpu", "lm_head": "disk"}, {"a": 0, "b": 1}, {"": "disk"}):
        assert _single_device(several) is None, several


# ---------------------------------------------------------------------------------------------- dequantize
def test_dequantize_returns_dense_model(compressed, tmp_path):
    cls, _, _, folder = compressed("gpt2")
    model = cls.from_pretrained(folder)
    expected = _logits(model, "gpt2")
    dense = model.dequantize()
    assert not hf_vq.vq_modules(dense) and getattr(dense, "hf_quantizer", None) is None
    assert not hasattr(dense.config, "quantization_config") and not dense.is_quantized
    assert type(dense.lm_head) is torch.nn.Linear and dense.lm_head.weight is dense.transformer.wte.weight
    torch.testing.assert_close(_logits(dense, "gpt2"), expected, atol=1e-5, rtol=1e-5)
    dense.save_pretrained(tmp_path / "dense")  # a plain dense checkpoint again
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    again = cls.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(_logits(again, "gpt2"), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- training
def test_plain_loop_trains_codebooks_codes_frozen(compressed):
    cls, _, _, folder = compressed("llama")
    model = cls.from_pretrained(folder).train()
    vq = hf_vq.vq_modules(model)
    codes = {n: m.codes.clone() for n, m in vq.items()}
    books = {n: m.codebooks.detach().clone() for n, m in vq.items()}
    assert all(m.codebooks.requires_grad and not m.codes.requires_grad for m in vq.values())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _inputs("llama")
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(m.codes, codes[n]) for n, m in vq.items())
    assert all(not torch.equal(m.codebooks.detach(), books[n]) for n, m in vq.items())
    assert model.lm_head.codebooks is model.model.embed_tokens.codebooks


def test_trainer_fine_tunes_codebooks(compressed, tmp_path):
    cls, _, _, folder = compressed("gpt2")
    model = cls.from_pretrained(folder)
    vq = hf_vq.vq_modules(model)
    codes = {n: m.codes.clone() for n, m in vq.items()}
    books = {n: m.codebooks.detach().clone() for n, m in vq.items()}
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                                learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                logging_strategy="no", disable_tqdm=True)
    tf.Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(m.codes, codes[n]) for n, m in vq.items())
    changed = [n for n, m in vq.items() if not torch.equal(m.codebooks.detach().cpu(), books[n])]
    assert len(changed) == len(vq), set(vq) - set(changed)
    # the fine-tuned codebooks round-trip; they train in fp32 and are stored in fp16 (the format's accounting)
    model.save_pretrained(tmp_path / "tuned")
    tuned = cls.from_pretrained(tmp_path / "tuned")
    with torch.no_grad():
        for m in vq.values():
            m.codebooks.copy_(m.codebooks.half())
    assert torch.equal(_logits(tuned, "gpt2"), _logits(model.eval(), "gpt2"))


# ---------------------------------------------------------------------------------------------- without hf_vq
def test_loading_without_import_hf_vq_fails_loudly(compressed):
    """A fresh interpreter that never imported hf_vq must not get random layers; `import hf_vq` fixes it."""
    _, _, _, folder = compressed("llama")
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM
        assert "hf_vq" not in sys.modules
        try:
            AutoModelForCausalLM.from_pretrained({str(folder)!r})
        except RuntimeError as err:
            print("FAILED:", err)
        else:
            print("LOADED WITHOUT HF_VQ")
        import hf_vq
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        print("LOADED", len(hf_vq.vq_modules(model)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILED:" in proc.stdout and "LOADED WITHOUT HF_VQ" not in proc.stdout
    assert GUARD_NOTE_KEY in proc.stderr and "pip install hf_vq" in proc.stderr  # the fix, in transformers' report
    assert "LOADED 16" in proc.stdout


# ---------------------------------------------------------------------------------------------- bad input
def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def _edit_config(folder: Path, fn) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    fn(data["quantization_config"])
    path.write_text(json.dumps(data))


def test_unknown_format_version(compressed, tmp_path):
    cls, _, _, folder = compressed("bert")
    bad = _copy(folder, tmp_path / "bad")
    _edit_config(bad, lambda q: q.update(version=hf_vq.FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=rf"VQConfig.version={hf_vq.FORMAT_VERSION + 1} is newer .* Upgrade hf_vq"):
        cls.from_pretrained(bad)


def test_missing_codes_tensor_names_it(compressed, tmp_path):
    cls, _, _, folder = compressed("bert")
    bad = _copy(folder, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["bert.encoder.layer.1.output.dense.codes"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks the tensor 'bert.encoder.layer.1.output.dense.codes' of "
                                              r"compressed module 'bert.encoder.layer.1.output.dense'"):
        cls.from_pretrained(bad)


def test_misshapen_codebooks_names_it(compressed, tmp_path):
    cls, _, _, folder = compressed("bert")
    bad = _copy(folder, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.codebooks"
    tensors[key] = tensors[key][:, :8]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is F16 \[1, 8, 4\], expected .*\[1, 16, 4\]"):
        cls.from_pretrained(bad)


def test_misshapen_bias_of_a_compressed_module_names_it(compressed, tmp_path):
    cls, _, _, folder = compressed("bert")
    bad = _copy(folder, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    key = "bert.encoder.layer.0.intermediate.dense.bias"
    tensors[key] = tensors[key][:10]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is F32 \[10\], expected a float tensor \[64\]"):
        cls.from_pretrained(bad)


def test_codes_out_of_range_name_the_tensor(tmp_path):
    dense_dir, cls = _dense_dir("llama", tmp_path)
    model = cls.from_pretrained(dense_dir, quantization_config=_cfg(k=12))  # 4-bit codes, values 12..15 invalid
    model.save_pretrained(tmp_path / "vq")
    tensors = load_file(tmp_path / "vq" / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.codes"
    tensors[key] = torch.full_like(tensors[key], 0xFF)
    save_file(tensors, tmp_path / "vq" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"Tensor '{key}' .* corrupted: codes contain 15 >= k=12"):
        cls.from_pretrained(tmp_path / "vq")


def test_block_size_not_dividing_a_layer_on_load(tmp_path):
    config, cls = ARCHS["t5"]()
    config.num_heads = 2  # relative_attention_bias: Embedding(32, 2), rows of length 2
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"d=4 .* does not divide the row length 2 of module "
                                         r"'encoder.block.0.layer.0.SelfAttention.relative_attention_bias'.*"
                                         r"modules_to_not_convert"):
        cls.from_pretrained(tmp_path / "dense", quantization_config=_cfg())
    ok = cls.from_pretrained(tmp_path / "dense", quantization_config=_cfg(modules_to_not_convert=["*relative_attention_bias"]))
    assert hf_vq.vq_modules(ok)


def test_corrupted_layout_in_config_json(compressed, tmp_path):
    cls, _, _, folder = compressed("bert")
    bad = _copy(folder, tmp_path / "bad")
    _edit_config(bad, lambda q: q["modules"]["bert.encoder.layer.0.intermediate.dense"].update(d=5))
    with pytest.raises(ValueError, match=r"modules\['bert.encoder.layer.0.intermediate.dense'\].d=5 does not divide"):
        cls.from_pretrained(bad)


def test_quantization_config_without_layout(compressed, tmp_path):
    cls, _, _, folder = compressed("bert")
    bad = _copy(folder, tmp_path / "bad")
    _edit_config(bad, lambda q: q.update(modules={}))
    with pytest.raises(CheckpointError, match="without 'modules'"):
        cls.from_pretrained(bad)


# ---------------------------------------------------------------------------------------------- the Hub
def test_push_to_hub_and_load_from_repo(compressed, hub):
    cls, _, model, _ = compressed("gpt2")
    token = "hf_alice_write_token"
    model.push_to_hub("alice/tiny-gpt2-vq", token=token, tags=["tiny"])
    files = hub.files("alice/tiny-gpt2-vq")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "hf_vq" in card and "tiny" in card and 'from_pretrained("alice/tiny-gpt2-vq")' in card
    loaded = cls.from_pretrained("alice/tiny-gpt2-vq", token=token)
    assert torch.equal(_logits(loaded, "gpt2"), _logits(model, "gpt2"))


def test_quantize_on_load_from_hub_repo_records_base_model(hub, tmp_path):
    token = "hf_alice_write_token"
    config, cls = ARCHS["llama"]()
    torch.manual_seed(0)
    cls(config).push_to_hub("alice/tiny-llama", token=token)  # a plain dense model on the Hub
    model = cls.from_pretrained("alice/tiny-llama", token=token, quantization_config=_cfg())
    assert model.hf_quantizer.base_model == "alice/tiny-llama"
    model.save_pretrained(tmp_path / "vq", push_to_hub=True, repo_id="alice/tiny-llama-vq", token=token)
    for card in ((tmp_path / "vq" / "README.md").read_text(), hub.files("alice/tiny-llama-vq")["README.md"].decode()):
        assert "base_model: alice/tiny-llama" in card and "base_model_relation: quantized" in card
        assert 'from_pretrained("alice/tiny-llama-vq")' in card and "| lm_head |" in card
    loaded = cls.from_pretrained("alice/tiny-llama-vq", token=token)
    assert torch.equal(_logits(loaded, "llama"), _logits(model, "llama"))


# ---------------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_minilm_quantize_on_load_roundtrip_and_fidelity(minilm_path, minilm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from hf_vq.evaluate import embedding_cosine, real_sentences
    from hf_vq.integrations.transformers import save_compressed

    model = AutoModel.from_pretrained(minilm_path, quantization_config=VQConfig(n_iter=20, permute=False))
    report = hf_vq.size_report(model)
    assert report.ratio > 12  # 2 bits per weight for every linear and the token embedding
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    sentences = real_sentences(64)
    fidelity = embedding_cosine(minilm, model, tokenizer, sentences)
    # 2 bits/weight without fine-tuning is lossy; the figure with 100 iterations is in benchmarks/
    assert 0.45 < fidelity["mean_cosine"] < 0.99 and fidelity["min_cosine"] > 0.2, fidelity

    model.save_pretrained(tmp_path / "vq")
    save_compressed(model, tmp_path / "cli", source_dir=minilm_path, fidelity={"mean cosine": fidelity["mean_cosine"]})
    for folder in (tmp_path / "vq", tmp_path / "cli"):
        loaded = AutoModel.from_pretrained(folder)
        batch = tokenizer(sentences[:8], padding=True, return_tensors="pt")
        with torch.no_grad():
            assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
        size = hf_vq.checkpoint_size_report(folder)
        assert size.file_over_accounted < 1.02, size.file_over_accounted
    assert (tmp_path / "cli" / "tokenizer.json").is_file()


def test_pickled_checkpoint_is_never_unpickled(compressed, hub, tmp_path):
    """A Hub repo whose config says hf_vq but whose weights are a pickle: refused, nothing executed."""
    import io
    import pickle

    from huggingface_hub import CommitOperationAdd, HfApi

    class Boom:  # unpickling it would create the marker file
        def __reduce__(self):
            return (Path.touch, (tmp_path / "unpickled",))

    cls, _, _, folder = compressed("gpt2")
    buffer = io.BytesIO()
    pickle.dump({"transformer.wte.weight": Boom()}, buffer)
    api = HfApi(token="hf_alice_write_token")
    api.create_repo("alice/pickled-gpt2-vq", exist_ok=True)
    api.create_commit("alice/pickled-gpt2-vq", [
        CommitOperationAdd("config.json", (folder / "config.json").read_bytes()),
        CommitOperationAdd("pytorch_model.bin", buffer.getvalue()),
    ], commit_message="pickle")
    with pytest.raises(hf_vq.CheckpointError, match=r"pytorch_model\.bin: hf_vq checkpoints are safetensors only"):
        cls.from_pretrained("alice/pickled-gpt2-vq", token="hf_alice_write_token")
    assert not (tmp_path / "unpickled").exists()
