"""Faults on the loading side: no loader returns a model whose outputs differ from the saved one without an error.
Every loader: transformers on one device (hf_vq reads the file) and with a `device_map` (transformers reads it),
timm's `create_model("local-dir:...")`, `hf_vq.load_compressed_`, and `hf-vq info`. Each fault is a real damaged
file or config.json; each error names the file, tensor or field and the fix."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file

import hf_vq
from fault_helpers import compressed_gpt2, compressed_timm, logits, tree
from hf_vq import CheckpointError
from hf_vq.integrations import timm as vq_timm
from hf_vq.integrations.transformers import GUARD_NOTE_KEY
from hf_vq.serialization import CHECKSUMS_KEY, ChecksumError

ROOT = Path(__file__).resolve().parents[1]
CODES_KEY = "transformer.h.0.mlp.c_fc.codes"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (model, folder): a tiny GPT-2 (single file and sharded) and a tiny timm model, as hf_vq saves them."""
    root = tmp_path_factory.mktemp("faults-load")
    gpt2, timm_model = compressed_gpt2(0), compressed_timm(0)
    gpt2.save_pretrained(root / "gpt2")
    gpt2.save_pretrained(root / "gpt2-sharded", max_shard_size="8KB")
    vq_timm.save_compressed(timm_model, root / "timm")
    return {"gpt2": (gpt2, root / "gpt2"), "gpt2-sharded": (gpt2, root / "gpt2-sharded"),
            "timm": (timm_model, root / "timm")}


def _timm_fresh():
    return timm.create_model("test_efficientnet", num_classes=10).eval()


# loader -> (which saved folder, load function)
LOADERS = {
    "transformers": ("gpt2", lambda folder: tf.GPT2LMHeadModel.from_pretrained(folder)),
    "transformers-device_map": ("gpt2", lambda folder: tf.GPT2LMHeadModel.from_pretrained(folder, device_map="auto")),
    "transformers-sharded": ("gpt2-sharded", lambda folder: tf.GPT2LMHeadModel.from_pretrained(folder)),
    "timm": ("timm", lambda folder: timm.create_model(f"local-dir:{folder}", pretrained=True)),
    "load_compressed_": ("timm", lambda folder: hf_vq.load_compressed_(_timm_fresh(), folder)),
}


def _copy(saved, kind: str, dest: Path) -> Path:
    shutil.copytree(saved[kind][1], dest)
    return dest


def _file_of(folder: Path, key: str) -> Path:
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if key in f.keys():
                return path
    raise KeyError(key)


def _poke(folder: Path, key: str, data: bytes, offset: int = 0) -> None:
    """Overwrite bytes of tensor `key` in place (header and metadata, checksums included, untouched)."""
    path = _file_of(folder, key)
    raw = bytearray(path.read_bytes())
    size = struct.unpack("<Q", raw[:8])[0]
    start = json.loads(raw[8:8 + size])[key]["data_offsets"][0] + 8 + size + offset
    raw[start:start + len(data)] = data
    path.write_bytes(bytes(raw))


def _flip(folder: Path, key: str) -> None:
    path = _file_of(folder, key)
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + size])[key]["data_offsets"]
    at = 8 + size + (start + end) // 2
    _poke(folder, key, bytes([raw[at] ^ 0x01]), at - (8 + size + start))


def _rewrite(folder: Path, edit) -> None:
    """Re-save the file holding the edited tensors, keeping its metadata (so checksums still match the rest)."""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        edit(tensors)
        save_file(tensors, str(path), metadata=metadata)


def _some_key(kind: str, suffix: str) -> str:
    return {"gpt2": CODES_KEY.replace("codes", suffix), "gpt2-sharded": CODES_KEY.replace("codes", suffix),
            "timm": f"classifier.{suffix}"}[kind]


# ---------------------------------------------------------------------------------------------- case 7: integrity
@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("what", ["codes", "codebooks", "bias"])
def test_flipped_byte_is_caught_by_the_checksum(loader, what, saved, tmp_path):
    kind, load = LOADERS[loader]
    bad = _copy(saved, kind, tmp_path / "bad")
    key = _some_key(kind, what)
    _flip(bad, key)
    before = tree(bad)
    with pytest.raises(ChecksumError, match=rf"tensor '{key}' does not match the checksum recorded when it was saved "
                                            r".*Re-download.*HF_VQ_VERIFY=0"):
        load(bad)
    assert tree(bad) == before  # a refused load changes nothing


def test_every_tensor_is_covered(saved, tmp_path):
    """A flip anywhere in the payload, in any tensor (codes, codebooks, biases, norms, embeddings), is an error."""
    model, folder = saved["gpt2"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if f.get_slice(k).get_shape() != [1]]  # the one-element guards hold nothing
    assert len(keys) > 20
    for key in keys:
        bad = tmp_path / key
        shutil.copytree(folder, bad)
        _flip(bad, key)
        with pytest.raises(ChecksumError, match=key.replace(".", r"\.")):
            tf.GPT2LMHeadModel.from_pretrained(bad)
        shutil.rmtree(bad)


def test_checksums_cover_names_transformers_changes_on_save(tmp_path):
    """transformers saves ViT under legacy key names: the checksums are recorded under the names on disk."""
    torch.manual_seed(0)
    model = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=64, image_size=32, patch_size=8)).eval()
    hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=2, permute=False), progress=False)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        stored, sums = set(f.keys()), json.loads(f.metadata()[CHECKSUMS_KEY])["crc32"]
    assert stored <= set(sums)
    key = next(k for k in stored if k.endswith(".codes") and "attention.attention" in k)  # a legacy name
    _flip(tmp_path, key)
    with pytest.raises(ChecksumError, match=key):
        tf.ViTForImageClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("loader", ["transformers", "timm", "load_compressed_"])
def test_nan_codebook_is_caught_even_unverified(loader, saved, tmp_path, monkeypatch):
    kind, load = LOADERS[loader]
    bad = _copy(saved, kind, tmp_path / "bad")
    key = _some_key(kind, "codebooks")
    _poke(bad, key, struct.pack("<e", float("nan")))
    with pytest.raises(ChecksumError, match=key):
        load(bad)
    monkeypatch.setenv("HF_VQ_VERIFY", "0")
    with pytest.raises(CheckpointError, match=rf"'{key}' .*holds NaN or infinite values.*Re-download"):
        load(bad)


def test_verification_can_be_turned_off(saved, tmp_path, monkeypatch):
    """`HF_VQ_VERIFY=0` (or `verify=False`) loads a damaged file as it is: the documented escape hatch."""
    model, _ = saved["gpt2"]
    bad = _copy(saved, "gpt2", tmp_path / "bad")
    _flip(bad, CODES_KEY)
    monkeypatch.setenv("HF_VQ_VERIFY", "0")
    assert not torch.equal(logits(tf.GPT2LMHeadModel.from_pretrained(bad)), logits(model))
    monkeypatch.delenv("HF_VQ_VERIFY")
    timm_bad = _copy(saved, "timm", tmp_path / "timm-bad")
    _flip(timm_bad, "classifier.codes")
    hf_vq.load_compressed_(_timm_fresh(), timm_bad, verify=False)
    timm.create_model(f"local-dir:{timm_bad}", pretrained=True, verify=False)
    with pytest.raises(ChecksumError):
        hf_vq.load_compressed_(_timm_fresh(), timm_bad)


@pytest.mark.parametrize("loader", ["transformers-sharded", "transformers-sharded-device_map"])
def test_shards_of_two_saves_are_refused(loader, saved, tmp_path):
    """The probe saw loads that silently mixed old and new shards; a folder that does mix them is refused."""
    _, folder = saved["gpt2-sharded"]
    compressed_gpt2(1).save_pretrained(tmp_path / "other", max_shard_size="8KB")
    mixed = _copy(saved, "gpt2-sharded", tmp_path / "mixed")
    shards = sorted(mixed.glob("model-*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "other").glob("model-*.safetensors")) == [p.name for p in shards]
    shutil.copy(tmp_path / "other" / shards[-1].name, shards[-1])
    kwargs = {"device_map": "auto"} if loader.endswith("device_map") else {}
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name} and .*{shards[0].name} come from different saves"
                                              r".*Save the model again"):
        tf.GPT2LMHeadModel.from_pretrained(mixed, **kwargs)


# ---------------------------------------------------------------------------------------------- case 5: biases
@pytest.mark.parametrize("loader", ["transformers", "transformers-device_map", "timm", "load_compressed_"])
def test_missing_bias_of_a_compressed_module_is_an_error(loader, saved, tmp_path):
    """transformers left it uninitialised (NaN in 3 of 4 loads) while its report said "newly initialized"."""
    kind, load = LOADERS[loader]
    bad = _copy(saved, kind, tmp_path / "bad")
    key = _some_key(kind, "bias")
    _rewrite(bad, lambda t: t.pop(key, None))
    with pytest.raises(CheckpointError,
                       match=rf"'{key}' is missing, expected a float tensor|missing tensors \[.*'{key}'"):
        load(bad)


# ---------------------------------------------------------------------------------------------- case 6: config.json
@pytest.mark.parametrize("loader", list(LOADERS))
def test_module_missing_from_config_json_is_an_error(loader, saved, tmp_path):
    """Loading that layer as a random dense one (with only a warning) is refused, naming the module."""
    kind, load = LOADERS[loader]
    bad = _copy(saved, kind, tmp_path / "bad")
    name = _some_key(kind, "codes")[: -len(".codes")]
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]["modules"][name]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"stores the codes of compressed module '{name}', but config.json's "
                                              r"quantization_config.modules has no entry for it.*randomly initialised"):
        load(bad)


@pytest.mark.parametrize("loader", ["transformers", "transformers-device_map"])
def test_tied_module_whose_owner_entry_is_missing(loader, saved, tmp_path):
    """GPT-2's lm_head shares the token embedding's codes: without the embedding's entry it has nothing to load."""
    bad = _copy(saved, "gpt2", tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]["modules"]["transformer.wte"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"modules\['lm_head'\].tied_to='transformer.wte' names no compressed module.*"
                                         r"config.json is incomplete"):
        LOADERS[loader][1](bad)


BAD_VALUES = [  # (edit of quantization_config, what the message names)
    (lambda q: q.update(k="16"), r"VQConfig.k='16' is out of range"),
    (lambda q: q.update(k=2.5), r"VQConfig.k=2.5"),
    (lambda q: q.update(block_size="linear=8"), r"VQConfig.block_size='linear=8' \(str\) must be a dict"),
    (lambda q: q.update(block_size={"linear": "8"}), r"block_size\['linear'\]='8' must be a non-negative integer"),
    (lambda q: q.update(modules="all"), r"VQConfig.modules='all' \(str\) must be a dict"),
    (lambda q: q.update(modules_to_not_convert="head"), r"modules_to_not_convert='head' \(str\) must be a list"),
    (lambda q: q.update(overrides={"fc": 5}), r"overrides\['fc'\]=5 must be a dict"),
    (lambda q: q.update(share=3), r"VQConfig.share=3"),
    (lambda q: q.update(version="1"), r"VQConfig.version='1' must be a positive integer"),
    (lambda q: q.update(quantize_head="no"), r"VQConfig.quantize_head='no' must be True or False"),
    (lambda q: q.update(n_iter="5"), r"VQConfig.n_iter='5' must be an integer"),
    (lambda q: q.update(colour="blue"), r"unknown keys \['colour'\]"),
    (lambda q: q["modules"].update({next(iter(q["modules"])): "x"}), r"modules\['.+'\] is str 'x', expected a dict"),
    (lambda q: next(iter(q["modules"].values())).update(shape="32x128"),
     r"\.shape='32x128' must be a list of integers"),
    (lambda q: next(iter(q["modules"].values())).update(d=0), r"\.d=0 must be a positive integer"),
    (lambda q: next(iter(q["modules"].values())).update(k=[16]), r"\.k=\[16\] must be an integer"),
    (lambda q: next(iter(q["modules"].values())).update(tied_to=3), r"\.tied_to=3 must be a module name"),
]


@pytest.mark.parametrize("loader", ["transformers", "timm", "load_compressed_", "info"])
@pytest.mark.parametrize("edit,message", BAD_VALUES)
def test_malformed_quantization_config_names_the_field(loader, edit, message, saved, tmp_path, capsys):
    kind = "timm" if loader in ("timm", "load_compressed_") else "gpt2"
    bad = _copy(saved, kind, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    edit(config["quantization_config"])
    (bad / "config.json").write_text(json.dumps(config))
    if loader == "info":
        from hf_vq.cli import main

        assert main(["info", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "hf-vq info: error:" in err and "config.json" in err and __import__("re").search(message, err), err
        return
    with pytest.raises(ValueError, match=message):
        LOADERS[loader][1](bad)


@pytest.mark.parametrize("loader", ["timm", "load_compressed_", "info"])
def test_quantization_config_that_is_not_an_object(loader, saved, tmp_path, capsys):
    bad = _copy(saved, "timm", tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = "hf_vq"
    (bad / "config.json").write_text(json.dumps(config))
    if loader == "info":
        from hf_vq.cli import main

        assert main(["info", str(bad)]) == 2
        assert "has no hf_vq quantization_config" in capsys.readouterr().err
        return
    with pytest.raises(CheckpointError, match="no hf_vq quantization_config"):
        LOADERS[loader][1](bad)


# ---------------------------------------------------------------------------------------------- case 11: hf-vq info
@pytest.mark.parametrize("kind", ["gpt2", "gpt2-sharded", "timm"])
def test_info_refuses_a_checkpoint_missing_a_tensor(kind, saved, tmp_path, capsys):
    from hf_vq.cli import main

    bad = _copy(saved, kind, tmp_path / "bad")
    key = _some_key(kind, "codebooks")
    _rewrite(bad, lambda t: t.pop(key, None))
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"lacks the tensor '{key}'" in err and "re-save the model" in err, err
    assert main(["info", str(saved[kind][1])]) == 0


def test_quantize_on_meta_names_the_parameter():
    with torch.device("meta"):
        model = timm.create_model("test_efficientnet", num_classes=10)
    with pytest.raises(ValueError, match=r"parameter '.+' is on the meta device.*Load the weights first"):
        hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=1), progress=False)


@pytest.mark.parametrize("content,suffix", [("", ".txt"), ("\n\n  \n", ".txt"), ("", ".csv")])
def test_empty_training_file_names_the_field(content, suffix, tmp_path):
    from hf_vq.finetune import FinetuneArguments
    from hf_vq.finetune.data import load_text_file

    path = tmp_path / f"train{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"FinetuneArguments.train_file=.*train{suffix}.* (is empty|holds no sample)"):
        FinetuneArguments(model_name_or_path="m", train_file=str(path))
        load_text_file(str(path))


# ---------------------------------------------------------------------------------------------- case 4: without hf_vq
def test_loading_without_hf_vq_names_the_fix_even_when_sizes_are_ignored(saved):
    """Without `import hf_vq`, `from_pretrained` raises and transformers' report names the fix (tests/integrations).
    Its hint `ignore_mismatched_sizes=True` turns that error off in transformers itself, before any code of hf_vq could
    run: the report still lists the guard whose name is the fix, and says the layers were re-initialised."""
    _, folder = saved["gpt2"]
    script = textwrap.dedent(f"""
        import sys
        from transformers import GPT2LMHeadModel
        assert "hf_vq" not in sys.modules
        GPT2LMHeadModel.from_pretrained({str(folder)!r}, ignore_mismatched_sizes=True)
        assert "hf_vq" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert GUARD_NOTE_KEY in proc.stderr and "Unknown quantization type, got hf_vq" in proc.stderr
