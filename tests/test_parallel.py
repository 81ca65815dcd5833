"""Compression under `accelerate launch`: two real CPU processes (gloo) write the same checkpoint as one process.

The model is a small BERT with MiniLM's real tokenizer, so that `hf-vq compress` runs its default as a user runs it
(gensim calibration text, bit allocation, permutation, the output-aware engine); both runs use one thread per
process, as `accelerate launch` sets it on CPUs (results of PyTorch's CPU reductions depend on the thread count).
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_vq.pipeline.parallel import Workers, split_by_cost

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 128, random weights) with a character-level WordPiece vocabulary (so that its blocks, not
    its embedding, hold most weights): a folder `hf-vq compress` takes, tokenizer included."""
    import transformers

    folder = tmp_path_factory.mktemp("parallel") / "bert"
    folder.mkdir()
    chars = [chr(c) for c in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _compress(folder: Path, out: Path, *flags: str, processes: int) -> dict:
    args = ["compress", str(folder), "--out", str(out), "--json", str(out.parent / f"{out.name}.json"), "--quiet",
            "--calibration-samples", "64", "--permute-iters", "50", *flags]
    if processes == 1:
        cmd = [sys.executable, "-m", "hf_vq.cli", *args]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_vq.cli", *args]
    proc = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out.parent / f"{out.name}.json").read_text())


def _safetensors(path: Path) -> tuple[dict, bytes]:
    """(header, data bytes): safetensors writes its metadata map in hash order, which varies from run to run, so the
    header is compared parsed; every tensor's bytes are compared as written."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8: 8 + size]), raw[8 + size:]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--ratio", "6", "--tune-steps", "3"), ("--data-free", "-k", "64"),
                                   ("--stream", "-k", "64")],
                         ids=["calibrated-allocated-tuned", "data-free", "streamed-calibrated"])
def test_two_processes_write_the_same_checkpoint_as_one(small_bert, tmp_path, flags):
    one = _compress(small_bert, tmp_path / "one", *flags, processes=1)
    two = _compress(small_bert, tmp_path / "two", *flags, processes=2)
    assert one["processes"] == 1 and two["processes"] == 2
    assert _safetensors(tmp_path / "one" / "model.safetensors") == _safetensors(tmp_path / "two" / "model.safetensors")
    assert (tmp_path / "one" / "config.json").read_bytes() == (tmp_path / "two" / "config.json").read_bytes()
    assert one["fidelity"] == two["fidelity"]
    record = two["record"]
    if "--stream" in flags:  # block by block, each block's layers split between the processes
        assert record["recipe"]["streaming"] is True and record["calibration"]["batches"] == 2
        assert not two["fidelity"]
    else:
        assert record["permutation"]["permuted"] > 0  # the permutation search ran (split between the processes)
    if "--ratio" in flags:
        assert record["allocation"]["target_ratio"] == 6.0
        assert record["calibration"]["block tuning steps"] == 3
    assert set(two["phases"]) >= {"encoding", "exchange", "saving"}
    assert not list((tmp_path / "two").glob("*.tmp*"))  # the main process alone wrote the folder


@pytest.mark.slow
def test_finetune_steps_under_two_processes(small_bert, tmp_path):
    """`hf-vq compress --finetune-steps` under `accelerate launch`: the distillation runs as DDP over the launch's
    processes (the process group outlives it: the CLI still needs it to finish), and the report gives the fidelity
    before and after."""
    two = _compress(small_bert, tmp_path / "two", "-k", "64", "--no-permute", "--finetune-steps", "4", processes=2)
    assert two["processes"] == 2
    assert "sentence embedding cosine (mean) before fine-tuning" in two["fidelity"]
    assert two["record"]["finetuning"]["steps"].startswith("4 of 4") and "finetuning" in two["phases"]


def test_shares_cover_every_item_once_and_balance_cost():
    costs = [5, 1, 1, 1, 1, 1, 3, 2]
    assert split_by_cost(costs, 1) == [0] * len(costs) and Workers().share(costs) == list(range(len(costs)))
    owners = split_by_cost(costs, 3)
    shares = [[i for i, p in enumerate(owners) if p == rank] for rank in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs) and max(loads) <= 6  # greedy by cost: 5 | 3+2 | 1+1+1+1+1


def test_several_workers_need_a_process_group():
    with pytest.raises(ValueError, match="accelerate launch"):
        Workers(0, 2)
    with pytest.raises(ValueError, match="index"):
        Workers(2, 2)


def test_phases_are_exclusive_and_add_up():
    import time

    workers = Workers()
    start = time.perf_counter()
    with workers.phase("encoding"):
        time.sleep(0.05)
        with workers.phase("exchange"):
            time.sleep(0.05)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    assert 0.09 < workers.seconds["encoding"] < 0.2 and 0.04 < workers.seconds["exchange"] < 0.1
    assert abs(workers.seconds["encoding"] + workers.seconds["exchange"] - wall) < 0.01


def test_layers_reading_one_tensor_share_its_statistic():
    """q, k and v read the same hidden states: `XᵀX` is computed once and is the same for the three."""
    from hf_vq.calibrate import HessianCollector

    layers = torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "k": torch.nn.Linear(8, 4), "o": torch.nn.Linear(8, 8)})
    x = torch.randn(5, 8)
    collector = HessianCollector(dict(layers.items()))
    with collector.collecting():
        layers["q"](x), layers["k"](x), layers["o"](x.clone())
    stats = collector.result()
    expected = x.double().t() @ x.double()
    assert stats["q"].hessian.data_ptr() == stats["k"].hessian.data_ptr() != stats["o"].hessian.data_ptr()
    for name in "qko":
        torch.testing.assert_close(stats[name].hessian, expected, rtol=0, atol=1e-12)
        assert stats[name].count == 5
