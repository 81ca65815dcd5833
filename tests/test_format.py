"""The checkpoint format: older versions load unchanged, per-module schemes (format 3) round-trip, the recipe stays
out of config.json, and the compression record (provenance) survives loading, saving and publishing."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import hf_vq
from hf_vq.serialization import read_header

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from huggingface_hub import ModelCard  # noqa: E402

from hf_vq.integrations.timm import fit_config  # noqa: E402
from hf_vq.integrations.timm import save_compressed as save_timm  # noqa: E402
from hf_vq.integrations.transformers import save_compressed as save_transformers  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "format_v2"
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
ALICE = "hf_alice_write_token"


def _bert_config():
    return transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32)


# ---------------------------------------------------------------------------------------------- older formats
def _assert_same_outputs(out: torch.Tensor, expected: torch.Tensor) -> None:
    """The outputs the fixture's writer computed, up to the float rounding of this CPU's matrix kernels: they were
    computed on another machine, and a Zen 3 CPU without AVX-512 differs from it by up to 9e-8 on logits of ~0.3
    (the sums run in another order). One wrong code or codebook value moves them by orders of magnitude more."""
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, version", [("bert_pq_v1", 1), ("bert_aq_pool_v2", 2)])
def test_checkpoints_of_format_1_and_2_load_with_the_same_outputs(name, version):
    """Written by hf_vq a6ddc07 (tests/fixtures/format_v2/make_v2.py): the same outputs (to the float rounding of
    the machine's kernels)."""
    folder = FIXTURES / name
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["version"] == version
    model = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    expected = load_file(FIXTURES / f"{name}.expected.safetensors")["output"]
    with torch.no_grad():
        _assert_same_outputs(model(IDS).logits, expected)
        layer = model.bert.encoder.layer[1].output.dense
        codes = layer.codes.view(-1)  # one code of one layer off by one
        codes[0] = (codes[0] + 1) % layer.codebooks.shape[-2]  # codebooks [M, k, d]
        with pytest.raises(AssertionError):  # the tolerance tells a decoding error apart
            _assert_same_outputs(model(IDS).logits, expected)
    assert model.vq_config.version == version and model.vq_config.record is None  # no record in old files


def test_timm_checkpoint_of_format_1_loads_with_the_same_outputs():
    model = timm.create_model(f"local-dir:{FIXTURES / 'timm_resnet_v1'}", pretrained=True).eval()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_same_outputs(model(x), load_file(FIXTURES / "timm_resnet_v1.expected.safetensors")["output"])


def test_resaving_an_old_checkpoint_keeps_its_version(tmp_path):
    model = transformers.BertForMaskedLM.from_pretrained(FIXTURES / "bert_aq_pool_v2").eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["version"] == 2
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


# ---------------------------------------------------------------------------------------------- format 3
MIXED = dict(k=16, n_iter=3, permute=False, scales=True,
             overrides={"*.intermediate.dense": {"method": "aq", "num_codebooks": 2, "d": 8, "scales": False},
                        "*.attention.self.query": {"k": 8}})


def test_mixed_scheme_checkpoint_round_trips_through_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(_bert_config()).eval()
    config = hf_vq.quantize_(model, hf_vq.VQConfig(**MIXED), progress=False)
    layouts = config.layouts
    assert config.version == hf_vq.FORMAT_VERSION == 3
    assert {(lay.method, lay.num_codebooks, lay.scales) for lay in layouts.values()} == {("pq", 1, True),
                                                                                          ("aq", 2, False)}
    assert layouts["bert.encoder.layer.0.attention.self.query"].k == 8
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["modules"]["bert.encoder.layer.0.intermediate.dense"]["method"] == "aq"
    assert saved["modules"]["bert.encoder.layer.0.output.dense"]["scales"] is True
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        scales = f.get_tensor("bert.encoder.layer.0.output.dense.scales")
    assert scales.dtype == torch.float16 and scales.shape == (32,)
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
    assert loaded.vq_config.layouts == layouts


def test_mixed_scheme_checkpoint_round_trips_through_create_model(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10).eval()
    config = fit_config(model, hf_vq.VQConfig(k=16, n_iter=2, permute=False, scales=True,
                                              overrides={"fc": {"method": "aq", "num_codebooks": 2, "d": 8}}))
    hf_vq.quantize_(model, config, progress=False)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    save_timm(model, tmp_path / "vq")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert loaded.vq_config.layouts["fc"].method == "aq" and loaded.vq_config.layouts["fc"].scales


def test_scales_lower_the_weight_error_of_rows_with_different_norms():
    """Rows of very different norms share one codebook better once normalised (data-free)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 256)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 1, 256)[:, None])  # row norms over three decades
    errors = {}
    for scales in (False, True):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), layer)
        config = hf_vq.quantize_(model, hf_vq.VQConfig(k=64, n_iter=20, permute=False, scales=scales), progress=False)
        errors[scales] = config.layouts["2"].rel_error
    assert errors[True] < 0.8 * errors[False]  # measured 0.118 vs 0.168


# ---------------------------------------------------------------------------------------------- recipe and record
def test_recipe_is_recorded_not_configured(tmp_path):
    model = transformers.BertModel(_bert_config()).eval()
    hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=7, permute=False), progress=False, base_model="org/tiny-bert")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert not {"n_iter", "anneal", "seed", "permute", "permute_iters", "aq_iters", "beam_size"} & set(saved)
    record = json.loads(read_header(tmp_path / "model.safetensors").metadata["hf_vq_record"])
    assert record["recipe"]["n_iter"] == 7 and record["base_model"] == "org/tiny-bert"
    assert record["permutation"] is None and record["calibration"] is None
    assert "n_iter" not in transformers.BertModel.from_pretrained(tmp_path).config.to_dict()["quantization_config"]


@pytest.fixture
def published(tmp_path):
    """A dense folder with a licence, compressed as `hf-vq compress` does (base model recorded, card written)."""
    dense = tmp_path / "dense"
    transformers.BertModel(_bert_config()).save_pretrained(dense)
    (dense / "README.md").write_text("---\nlicense: mit\n---\n# tiny bert\n")
    model = transformers.BertModel.from_pretrained(dense).eval()
    hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=3, permute_iters=10), progress=False,
                    base_model="org/tiny-bert")
    save_transformers(model, tmp_path / "vq", source_dir=dense, fidelity={"cosine": 0.5})
    return tmp_path / "vq"


def _pushed_card(model, token=ALICE) -> ModelCard:
    repo_id = f"alice/tiny-bert-vq-{uuid.uuid4().hex[:8]}"
    model.push_to_hub(repo_id, token=token)
    return ModelCard.load(repo_id, token=token)


def test_provenance_survives_load_then_push(published, hub):
    model = transformers.BertModel.from_pretrained(published)
    card = _pushed_card(model)
    assert card.data.base_model == "org/tiny-bert" and card.data.base_model_relation == "quantized"
    assert card.data.license == "mit"
    assert "channel spaces permuted" in card.text and "cosine: 0.5" in card.text

    hf_vq.dequantize_(model)
    hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=3, permute=False), progress=False)
    card = _pushed_card(model)
    assert card.data.base_model == "org/tiny-bert" and card.data.base_model_relation == "quantized"
    assert card.data.license == "mit"
    assert "| permutation | off |" in card.text and "channel spaces permuted" not in card.text
    assert "cosine: 0.5" not in card.text  # fidelity of the earlier compression is not claimed for this one


def test_provenance_survives_save_pretrained_and_upload_folder(published, tmp_path, hub):
    from hf_vq.integrations.hub import upload_folder

    model = transformers.BertModel.from_pretrained(published)
    model.save_pretrained(tmp_path / "again")
    repo_id = f"alice/again-{uuid.uuid4().hex[:8]}"
    upload_folder(tmp_path / "again", repo_id, token=ALICE)
    card = ModelCard.load(repo_id, token=ALICE)
    assert (card.data.base_model, card.data.base_model_relation, card.data.license) == ("org/tiny-bert", "quantized",
                                                                                          "mit")


def test_info_counts_codebooks_once_under_legacy_names(tmp_path):
    """transformers saves ViT under its legacy key names (`encoder.layer.0.attention.attention.query`), which differ
    from the modules' names in the layout: the file's accounting must still count every codebook once."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    model = transformers.ViTForImageClassification(cfg).eval()
    config = hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=2, permute=False), progress=False)
    model.save_pretrained(tmp_path)
    stored = set(read_header(tmp_path / "model.safetensors"))
    assert {f"{name}.codebooks" for name in config.modules} - stored  # legacy names are stored for most modules
    on_disk, in_memory = hf_vq.checkpoint_size_report(tmp_path), hf_vq.size_report(model)
    assert on_disk.compressed_bits == in_memory.compressed_bits and on_disk.dense_bits == in_memory.dense_bits
    breakdown = on_disk.file_breakdown
    assert sum(breakdown.values()) == on_disk.file_bytes and breakdown["safetensors header and metadata"] > 0
