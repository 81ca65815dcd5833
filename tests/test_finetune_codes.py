"""Fine-tuning with more freedom: the training decode, codes that move (bounded re-assignment), held-out early
stopping, and PQF's third step inside `hf-vq compress` (`--finetune-steps`).

Random weights only show the mechanics (gradients equal the reference's, the re-assignment reduces the distance to
its target within its budget, a resumed run equals an uninterrupted one); what the options buy on real weights is
measured in benchmarks/bench_finetune_minilm.py and bench_finetune.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import hf_vq
from hf_vq.codec.pq import decode
from hf_vq.finetune import FinetuneArguments, finetune
from hf_vq.finetune.codes import disable_code_updates_, enable_code_updates_, reassign_codes_
from hf_vq.kernels import decode_matrix
from hf_vq.nn import VQLinear

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-backward", "index_add-backward"])
@pytest.mark.parametrize("books, d, scaled", [(1, 4, True), (2, 8, True), (1, 2, False)])
def test_training_decode_matches_the_reference_gradients(books, d, scaled, sparse, monkeypatch):
    from hf_vq.kernels import train

    monkeypatch.setattr(train, "SPARSE_BACKWARD", sparse)
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (24, 32 // d, books), dtype=torch.uint8)  # [rows, n_blocks, M]
    book = torch.randn(books, 16, d, requires_grad=True)  # [M, k, d]
    scales = torch.rand(24, requires_grad=True) if scaled else None  # [rows]
    upstream = torch.randn(24, 32)  # dL/dW
    fast = decode_matrix(codes, book, scales=scales)
    assert type(fast.grad_fn).__name__ == "_TrainDecodeBackward"  # the training decode ran, not the reference
    (fast * upstream).sum().backward()
    grads = [book.grad.clone()] + ([scales.grad.clone()] if scaled else [])
    book.grad = None
    if scaled:
        scales.grad = None
    reference = decode(codes, book) * (scales[:, None] if scaled else 1)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], book.grad, rtol=1e-5, atol=1e-5)
    if scaled:
        torch.testing.assert_close(grads[1], scales.grad, rtol=1e-5, atol=1e-5)


def test_training_decode_follows_codes_changed_in_place():
    """The CPU backward caches a sparse assignment matrix per codes tensor: a changed code must not reuse it."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 4, 1), dtype=torch.uint8)  # [rows, n_blocks, M]
    book = torch.randn(1, 16, 2, requires_grad=True)  # [M, k, d]
    decode_matrix(codes, book).sum().backward()
    codes[0, 0, 0] = (int(codes[0, 0, 0]) + 1) % 16
    book.grad = None
    decode_matrix(codes, book).sum().backward()
    counts = torch.bincount(codes.reshape(-1).long(), minlength=16).float()  # [k]: each codeword's uses
    torch.testing.assert_close(book.grad[0], counts[:, None].expand(16, 2))


def _vq_linear(books: int = 1, scales: bool = True) -> VQLinear:
    torch.manual_seed(0)
    module = VQLinear.from_float(nn.Linear(32, 16), kind="pq", k=8, d=4, num_codebooks=books, scales=scales)
    module.set_codes_(torch.randint(0, 8, (16, 8, books)), torch.randn(books, 8, 4),
                      torch.rand(16) + 0.5 if scales else None)
    return module


@pytest.mark.parametrize("books", [1, 2])
def test_reassignment_moves_towards_the_target_within_its_budget(books):
    module = _vq_linear(books)
    delta = module.enable_code_updates_()
    codes_before = module.unpacked_codes().clone()  # [16, 8, M]
    with torch.no_grad():
        old = module.decode_weight().clone()  # [16, 32]
        delta.copy_(torch.randn_like(delta) * old.abs().mean())
        target = old + delta
    blocks = 16 * 8 * books
    moved = reassign_codes_(module, 0.1)
    assert moved["blocks"] == blocks and 0 < moved["changed"] <= int(0.1 * 16 * 8 * books)
    with torch.no_grad():
        new = module.decode_weight()
    assert (target - new).pow(2).sum() < (target - old).pow(2).sum()  # closer to the target
    torch.testing.assert_close(new + delta, target, rtol=0, atol=1e-5)  # the delta keeps what the codes do not reach
    # the repacked codes differ from the old ones in exactly the re-assigned entries
    assert int((module.unpacked_codes() != codes_before).sum()) == moved["changed"]
    module.disable_code_updates_()
    assert "code_delta" not in dict(module.named_parameters())


def test_zero_delta_moves_nothing():
    module = _vq_linear()
    module.enable_code_updates_()
    codes = module.codes.clone()
    assert reassign_codes_(module, 1.0)["changed"] == 0
    assert torch.equal(module.codes, codes)


def test_straight_through_forward_keeps_the_decoded_weight():
    module = _vq_linear()
    x = torch.randn(5, 32)
    expected = module(x).detach()
    delta = module.enable_code_updates_()
    with torch.no_grad():
        delta.add_(1.0)  # the delta never changes the forward value
    out = module(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0  # the weight's gradient reaches the delta


def _models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = timm.create_model("test_resnet", num_classes=3).eval()
    with torch.no_grad():
        teacher.fc.weight.mul_(40)
    student = timm.create_model("test_resnet", num_classes=3)
    student.load_state_dict(teacher.state_dict())
    hf_vq.quantize_(student, hf_vq.VQConfig(k=4, n_iter=5, permute=False), progress=False)
    return teacher, student


def _data(n: int = 32):
    gen = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=gen)} for _ in range(n)]


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("codes")}


def test_code_updates_change_a_bounded_share_of_codes_and_save_plainly(tmp_path):
    teacher, student = _models()
    before = _codes(student)
    data = _data()
    args = FinetuneArguments(max_train_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, progress=False,
                             code_update_fraction=0.05, code_update_every=2, code_learning_rate=0.1,
                             freeze_norm_stats=True)
    result = finetune(args, student=student, teacher=teacher, train_dataset=data, eval_dataset=data)
    shares = [h["codes_changed"] for h in result.history if "codes_changed" in h]
    assert len(shares) == 3 and all(0 <= s <= 0.05 for s in shares) and sum(shares) > 0
    assert result.trainable["code_deltas"] > 0
    after = _codes(student)
    assert any(not torch.equal(after[n], before[n]) for n in before), "no code moved"
    assert not any(n.endswith("code_delta") for n, _ in student.named_parameters())  # removed before saving
    assert result.metrics["eval_kl"] < result.metrics_before["eval_kl"]
    from hf_vq.integrations.timm import save_compressed

    save_compressed(student, tmp_path / "vq")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True)
    for name, codes in after.items():
        assert torch.equal(dict(loaded.named_buffers())[name], codes)


def test_resume_with_code_updates_equals_an_uninterrupted_run(tmp_path):
    data = _data()
    common = dict(per_device_train_batch_size=8, learning_rate=1e-2, progress=False, evaluate_before=False,
                  num_train_epochs=1, code_update_fraction=0.05, code_update_every=1, code_learning_rate=0.1,
                  freeze_norm_stats=True)
    teacher, student = _models()
    finetune(FinetuneArguments(output_dir=str(tmp_path / "a"), checkpointing_steps="2", **common),
             student=student, teacher=teacher, train_dataset=data)
    full = _codes(student) | {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher, student = _models()
    finetune(FinetuneArguments(output_dir=str(tmp_path / "b"), **common,
                               resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "step_2")),
             student=student, teacher=teacher, train_dataset=data)
    resumed = _codes(student) | {n: p.detach().clone() for n, p in student.named_parameters()}
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6, msg=name)


def test_early_stopping_keeps_the_best_evaluated_weights():
    teacher, student = _models()
    data = _data(16)
    args = FinetuneArguments(max_train_steps=12, per_device_train_batch_size=8, learning_rate=0.5,  # overshoots
                             lr_scheduler_type="constant", progress=False, eval_steps=1, early_stopping_patience=2,
                             freeze_norm_stats=True)
    result = finetune(args, student=student, teacher=teacher, train_dataset=data, eval_dataset=data)
    losses = {0: result.metrics_before["eval_kl"]} | {e["step"]: e["eval_kl"] for e in result.evaluations}
    assert result.best_step == min(losses, key=losses.get)
    assert result.completed_steps < 12 or len(result.evaluations) == 12
    assert result.metrics["eval_kl"] == pytest.approx(losses[result.best_step], rel=2e-2)  # fp16-rounded codebooks


def test_a_run_that_only_hurts_ends_where_it_started():
    """Early stopping counts the weights before training as step 0: if every evaluation is worse, they come back."""
    teacher, student = _models()
    data = _data(16)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = FinetuneArguments(max_train_steps=4, per_device_train_batch_size=8, learning_rate=50.0,  # diverges
                             lr_scheduler_type="constant", progress=False, eval_steps=1, early_stopping_patience=10,
                             freeze_norm_stats=True)
    result = finetune(args, student=student, teacher=teacher, train_dataset=data, eval_dataset=data)
    assert all(e["eval_kl"] > result.metrics_before["eval_kl"] for e in result.evaluations)
    assert result.best_step == 0
    for name, param in student.named_parameters():  # codebooks come back rounded to fp16, as saved
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=2e-3 * (1 + before[name].abs().max()))


def test_bad_code_update_arguments():
    with pytest.raises(ValueError, match="code_update_fraction"):
        FinetuneArguments(code_update_fraction=1.5)
    with pytest.raises(ValueError, match="early_stopping_patience.*eval_steps"):
        FinetuneArguments(early_stopping_patience=2)
    with pytest.raises(ValueError, match="code_update_every"):
        FinetuneArguments(code_update_every=0)


def test_enable_and_disable_on_a_model():
    _, student = _models()
    n = enable_code_updates_(student)
    assert n == sum(m.weight.numel() for m in hf_vq.vq_modules(student).values())
    disable_code_updates_(student)
    assert not any("code_delta" in n for n, _ in student.named_parameters())


# ---------------------------------------------------------------------------------------------- hf-vq compress
def test_compress_with_finetune_steps_records_before_and_after(tmp_path):
    """`hf-vq compress --finetune-steps` on a tiny timm model: distilled on crops of the calibration photos,
    fidelity before and after on the held-out photos in the report, the card and the record."""
    pytest.importorskip("skimage")
    from hf_vq.cli import main

    torch.manual_seed(0)
    dense = timm.create_model("test_resnet", num_classes=10, pretrained_cfg_overlay={"input_size": (3, 64, 64),
                                                                                       "crop_pct": 1.0}).eval()
    timm.models.save_for_hf(dense, str(tmp_path / "dense"), safe_serialization=True)
    code = main(["compress", str(tmp_path / "dense"), "--out", str(tmp_path / "vq"), "-d", "4", "-k", "16",
                 "--calibration-samples", "32", "--finetune-steps", "6", "--finetune-codes", "0.01", "--quiet",
                 "--json", str(tmp_path / "report.json"), "--no-permute", "--n-iter", "5"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    fidelity = report["fidelity"]
    assert "top-1 agreement with the dense model before fine-tuning" in fidelity
    assert "top-1 agreement with the dense model" in fidelity
    finetuning = report["record"]["finetuning"]
    assert "crops of the calibration photos" in finetuning["data"] and "codes re-assigned" in finetuning["trained"]
    card = (tmp_path / "vq" / "README.md").read_text()
    assert "before fine-tuning" in card and "held-out loss" in card
    loaded = timm.create_model(f"local-dir:{tmp_path / 'vq'}", pretrained=True)  # an ordinary compressed folder
    assert any(isinstance(m, hf_vq.VQModuleMixin) for m in loaded.modules())


def test_compress_refuses_bad_finetuning_flags_before_any_work(tmp_path, capsys):
    from hf_vq.cli import main

    with pytest.raises(SystemExit, match="--finetune-steps -1"):
        main(["compress", str(tmp_path), "--out", str(tmp_path / "o"), "--finetune-steps", "-1"])
    assert main(["compress", str(tmp_path), "--out", str(tmp_path / "o"), "--stream", "-d", "4",
                 "--finetune-steps", "5"]) == 2
    assert "--finetune-steps needs the whole dense model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- data sources
def test_save_to_disk_folder_and_flat_image_folder_are_training_data(tmp_path):
    """`dataset_name` takes a folder written by `save_to_disk`; `train_dir` a flat folder of images (no classes)."""
    import datasets
    import numpy as np
    from PIL import Image

    from hf_vq.calibrate.sources import calibration_texts
    from hf_vq.finetune.data import load_raw

    datasets.Dataset.from_dict({"text": ["one sentence here", "another one"]}).save_to_disk(str(tmp_path / "saved"))
    train, val = load_raw(FinetuneArguments(dataset_name=str(tmp_path / "saved")))
    assert train["text"] == ["one sentence here", "another one"] and val is None
    assert calibration_texts(5, str(tmp_path / "saved")) == ["one sentence here", "another one"]
    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    train, _ = load_raw(FinetuneArguments(train_dir=str(tmp_path / "flat")))
    assert len(train) == 3 and "image" in train.column_names


@pytest.mark.parametrize("native, launched", [(True, False), (True, True), (False, False)])
def test_finetune_compressed_on_text_with_early_stopping(minilm_path, monkeypatch, native, launched):
    """The call behind `hf-vq compress --finetune-steps` on a text model: Wikipedia sentences after those calibration
    used, a held-out part for early stopping, every layer's hidden states as the target when asked; bf16 autocast
    where the device computes it natively (forced either way here), unless `accelerate launch` chose a precision."""
    pytest.importorskip("gensim")
    from transformers import BertConfig, BertModel

    from hf_vq.finetune import finetune_compressed, recipe
    from hf_vq.integrations.transformers.tools import load_tokenizer

    monkeypatch.setattr(recipe, "native_bf16", lambda: native)
    if launched:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)

    torch.manual_seed(0)
    dense = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    model = BertModel(dense.config).eval()
    model.load_state_dict(dense.state_dict())
    hf_vq.quantize_(model, hf_vq.VQConfig(k=4, n_iter=5, permute=False, quantize_embeddings=False), progress=False)
    result = finetune_compressed(model, dense, steps=6, tokenizer=load_tokenizer(minilm_path), skip=32, batch_size=8,
                                 learning_rate=3e-3, held_out=16, eval_every=2, patience=5, progress=False,
                                 hidden_target="layers")
    assert result.completed_steps == 6 and [e["step"] for e in result.evaluations] == [2, 4, 6]
    assert result.metrics["eval_samples"] == 16 and result.best_step in (0, 2, 4, 6)
    assert result.metrics["eval_loss"] < result.metrics_before["eval_loss"]
    assert not model.training and not dense.config.output_hidden_states  # the run's settings are restored
    assert result.arguments.mixed_precision == ("bf16" if native and not launched else None)
    with pytest.raises(ValueError, match="tokenizer .* or photos"):
        finetune_compressed(model, dense, steps=2)
