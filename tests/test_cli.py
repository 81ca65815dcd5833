"""`hf-vq compress` / `hf-vq info` as a user runs them: a real subprocess on the real default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HF_VQ = [sys.executable, "-m", "hf_vq.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, cwd=None):
    return subprocess.run([*HF_VQ, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, minilm_path):
    out = tmp_path_factory.mktemp("cli") / "minilm-vq"
    report = out.parent / "report.json"
    proc = run("compress", "--out", str(out), "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, json.loads(report.read_text())


@pytest.mark.slow
def test_default_compress_is_10x_smaller_and_faithful(default_run, minilm_path):
    out, proc, report = default_run
    dense_bytes = (minilm_path / "model.safetensors").stat().st_size
    vq_bytes = (out / "model.safetensors").stat().st_size
    assert dense_bytes / vq_bytes >= 10, (dense_bytes, vq_bytes)
    # the report: sizes, per-layer error, fidelity on real sentences
    assert "x smaller" in proc.stdout and "encoder.layer.0.attention.self.query" in proc.stdout
    assert "sentence embedding cosine (mean)" in proc.stdout
    cosine = report["fidelity"]["sentence embedding cosine (mean)"]
    # the calibrated engine at 10x, no fine-tuning: 0.98 measured on these held-out sentences (benchmarks/results/engine.md)
    assert 0.95 < cosine <= 1.0
    # a sentence-transformers folder: bits are allocated for the mean-pooled token states, BERT's pooler is never read
    allocation = report["record"]["allocation"]
    assert allocation["outputs"] == ["last_hidden_state:mean"]
    assert allocation["layers"]["pooler.dense"]["sensitivity"] == 0
    assert "for its last_hidden_state:mean" in proc.stdout
    # every layer that makes the embeddings is encoded closely; the pooler, which none reads, gets the fewest bits
    unread = {name for name, layer in allocation["layers"].items() if layer["sensitivity"] == 0}
    assert unread == {"pooler.dense"}
    assert all(0 < layer["rel_error"] < 0.3 for layer in report["layers"] if layer["name"] not in unread)
    # the weights file is within 2% of the accounted size
    assert abs(report["file_over_accounted"] - 1) <= 0.02
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "base_model_relation: quantized" in card


@pytest.mark.slow
def test_info_prints_table(default_run):
    out, _, report = default_run
    proc = run("info", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "embeddings.word_embeddings" in proc.stdout and f"{report['ratio']:.1f}x smaller" in proc.stdout
    as_json = json.loads(run("info", str(out), "--json").stdout)
    assert as_json["ratio"] == report["ratio"]


def test_missing_model_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    proc = run("compress", str(tmp_path / "nope"), "--out", str(out))
    assert proc.returncode == 2 and "error" in proc.stderr and "nope" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run("compress", "--out", str(out))
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_config_flag_is_a_clear_error(tmp_path):
    proc = run("compress", "--out", str(tmp_path / "o"), "--k", "1")
    assert proc.returncode == 2 and "VQConfig.k=1" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_allocation_outputs_need_an_allocation(tmp_path):
    proc = run("compress", "--out", str(tmp_path / "o"), "--data-free", "--allocation-outputs", "last_hidden_state")
    assert proc.returncode == 2 and "--allocation-outputs" in proc.stderr and "--ratio" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_info_on_corrupt_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "quantization_config": {
        "quant_method": "hf_vq", "version": 1, "modules": {}}}))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    proc = run("info", str(tmp_path))
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "re-download" in proc.stderr
