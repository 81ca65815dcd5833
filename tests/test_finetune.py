"""Fine-tuning compressed models (`hf_vq.finetune`, `scripts/finetune.py`).

Tiny random models show the mechanics: the loss to the teacher goes down, codes never change, a resumed run ends
exactly where an uninterrupted one does, two real CPU processes (`accelerate launch`, gloo) work, data comes from
image folders and text files, and bad arguments fail clearly. Quality on a real task is in
benchmarks/bench_finetune.py (Fashion-MNIST) and the MiniLM benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import hf_vq  # noqa: E402
from hf_vq.finetune import FinetuneArguments, default_teacher, finetune, mark_trainable_  # noqa: E402
from hf_vq.integrations.timm import save_compressed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
INPUT = (3, 32, 32)


def _codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(".codes")}


def _codebooks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state.items() if k.endswith(".codebooks")}


@pytest.fixture(scope="module")
def timm_folders(tmp_path_factory) -> dict[str, Path]:
    """A dense test_resnet (confident logits), its compressed copy (k=16) and an image folder of 3 classes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    dense = timm.create_model("test_resnet", num_classes=3, pretrained_cfg_overlay={"input_size": INPUT,
                                                                                      "crop_pct": 1.0}).eval()
    with torch.no_grad():
        dense.fc.weight.mul_(40)  # a random head is nearly uniform: make the teacher's logits worth distilling
    timm.models.save_for_hf(dense, str(root / "dense"), safe_serialization=True)
    student = timm.create_model(f"local-dir:{root / 'dense'}", pretrained=True).eval()
    hf_vq.quantize_(student, hf_vq.VQConfig(k=4, n_iter=5, permute=False), progress=False)
    save_compressed(student, root / "vq")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for c in range(3):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((36, 36, 3)) * 90 + c * 70).astype(np.uint8)).save(folder / f"{i}.png")
    return {"root": root, "dense": root / "dense", "vq": root / "vq", "train": root / "images" / "train",
            "val": root / "images" / "val"}


def _args(folders: dict[str, Path], out: Path | None, **kwargs) -> FinetuneArguments:
    base = dict(model_name_or_path=str(folders["vq"]), teacher_name_or_path=str(folders["dense"]),
                train_dir=str(folders["train"]), validation_dir=str(folders["val"]),
                output_dir=None if out is None else str(out), per_device_train_batch_size=8, learning_rate=1e-2,
                max_train_steps=6, task_weight=0.0, progress=False, seed=0,
                freeze_norm_stats=True)  # random BatchNorm statistics do not match the images: keep the teacher's
    return FinetuneArguments(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------- one process
def test_single_process_lowers_loss_and_writes_hub_folder(timm_folders, tmp_path):
    before = timm.create_model(f"local-dir:{timm_folders['vq']}", pretrained=True)
    result = finetune(_args(timm_folders, tmp_path / "out"))
    assert result.completed_steps == 6
    assert result.metrics["eval_kl"] < 0.7 * result.metrics_before["eval_kl"], (result.metrics_before, result.metrics)
    assert result.metrics["eval_samples"] == 24
    assert result.trainable["codebooks"] > 0 and result.trainable["dense"] == 0
    # The folder is a normal compressed timm folder whose card records the data and the metrics.
    out = tmp_path / "out"
    after = timm.create_model(f"local-dir:{out}", pretrained=True)
    for name, codes in _codes(before).items():
        assert torch.equal(codes, dict(after.named_buffers())[name]), f"{name}: codes changed"
    changed = [n for n, p in after.named_parameters() if n.endswith("codebooks")
               and not torch.equal(p, dict(before.named_parameters())[n])]
    assert changed, "no codebook was trained"
    card = (out / "README.md").read_text()
    assert str(timm_folders["train"]) in card and "before fine-tuning" in card and "agreement" in card
    assert json.loads((out / "finetune_results.json").read_text())["completed_steps"] == 6


@pytest.mark.parametrize("scale_parameter", [False, True], ids=["one-lr", "scale_parameter"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(timm_folders, tmp_path, scale_parameter):
    """With `scale_parameter`, the resumed run keeps the rates measured at the start (saved in the optimizer state),
    not rates of the weights at the checkpoint."""
    full = finetune(_args(timm_folders, tmp_path / "a", checkpointing_steps="2", evaluate_before=False,
                          num_train_epochs=1, max_train_steps=None, scale_parameter=scale_parameter))  # 6 steps
    assert (tmp_path / "a" / "checkpoints" / "step_4").is_dir()
    resumed = finetune(_args(timm_folders, tmp_path / "b", evaluate_before=False, num_train_epochs=1,
                             max_train_steps=None, scale_parameter=scale_parameter,
                             resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "step_4")))
    assert resumed.completed_steps == full.completed_steps == 6
    assert [h["step"] for h in resumed.history] == [5, 6]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[4:]], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (_codebooks(load_file(str(tmp_path / d / "model.safetensors"))) for d in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resume_mid_run_with_a_short_last_step_per_epoch(timm_folders, tmp_path):
    """6 batches per epoch with accumulation 4: steps of 4 then 2 batches; step_3 is one step into epoch 1."""
    common = dict(evaluate_before=False, num_train_epochs=2, max_train_steps=None, gradient_accumulation_steps=4)
    full = finetune(_args(timm_folders, tmp_path / "a", checkpointing_steps="1", **common))
    resumed = finetune(_args(timm_folders, tmp_path / "b", **common,
                             resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "step_3")))
    assert resumed.completed_steps == full.completed_steps == 4
    assert [h["step"] for h in resumed.history] == [4]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history[3:]], rel=1e-5)


def _teacher_student(config: hf_vq.VQConfig, *, sharpen: bool = False):
    """A dense timm test model and a compressed copy of it (`sharpen`: confident teacher logits)."""
    teacher = timm.create_model("test_resnet", num_classes=3).eval()
    if sharpen:
        with torch.no_grad():
            teacher.fc.weight.mul_(40)
    student = timm.create_model("test_resnet", num_classes=3)
    student.load_state_dict(teacher.state_dict())
    hf_vq.quantize_(student, config, progress=False)
    return teacher, student


def test_in_memory_models_and_torch_dataset():
    """The library API without folders: models and a torch dataset of dicts, as the benchmark uses it."""
    torch.manual_seed(0)
    teacher, student = _teacher_student(hf_vq.VQConfig(k=4, n_iter=5, permute=False), sharpen=True)
    x = torch.randn(32, 3, 32, 32)
    data = [{"pixel_values": x[i], "labels": torch.tensor(i % 3)} for i in range(32)]
    result = finetune(FinetuneArguments(max_train_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
                                        progress=False, task_weight=0.0),
                      student=student, teacher=teacher, train_dataset=data, eval_dataset=data)
    assert result.metrics["eval_kl"] < result.metrics_before["eval_kl"]
    assert 0 <= result.metrics["eval_accuracy"] <= 1 and "teacher_accuracy" in result.metrics


def test_trained_norms_and_biases_end_at_the_dtype_the_file_stores(tmp_path):
    """With `dense_dtype="float16"` what fine-tuning trained in fp32 beside the codebooks (BatchNorm affines, biases)
    is rounded to fp16 values at the end, so the saved file (written at 16 bits) is the evaluated model."""
    from hf_vq.serialization import read_header

    torch.manual_seed(0)
    teacher, student = _teacher_student(hf_vq.VQConfig(k=4, n_iter=5, permute=False, dense_dtype="float16"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(16)]
    finetune(FinetuneArguments(max_train_steps=4, per_device_train_batch_size=8, learning_rate=1e-2, progress=False),
             student=student, teacher=teacher, train_dataset=data)
    trained = [k for k, v in student.state_dict().items() if k.endswith((".bias", "bn1.weight"))
               and not torch.equal(v, before[k])]
    assert trained, "fine-tuning trained no norm or bias"
    for key in trained:
        value = student.state_dict()[key]
        assert value.dtype == torch.float32 and torch.equal(value.half().float(), value), key
    save_compressed(student, tmp_path / "out")
    header = read_header(tmp_path / "out" / "model.safetensors")
    assert all(header[key][0] == "F16" for key in trained)


def test_bf16_mixed_precision_on_cpu():
    torch.manual_seed(0)
    teacher, student = _teacher_student(hf_vq.VQConfig(k=4, n_iter=2, permute=False))
    data = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(8)]
    result = finetune(FinetuneArguments(max_train_steps=2, per_device_train_batch_size=4, mixed_precision="bf16",
                                        progress=False), student=student, teacher=teacher, train_dataset=data,
                      eval_dataset=data)
    assert result.completed_steps == 2 and np.isfinite(result.metrics["eval_kl"])
    assert all(m.codebooks.dtype == torch.float32 for m in hf_vq.vq_modules(student).values())  # fp32 master copy


@pytest.mark.parametrize("scale_parameter", [False, True])
def test_scale_parameter_gives_each_tensor_a_step_of_its_size(scale_parameter):
    """Adam's first step moves every value with a gradient by about its learning rate: `learning_rate` for every
    tensor, or `learning_rate × max(RMS, 0.02)` of each tensor with `scale_parameter`."""
    from hf_vq.finetune.loop import _RMS_FLOOR

    torch.manual_seed(0)
    teacher, student = _teacher_student(hf_vq.VQConfig(k=4, n_iter=2, permute=False, scales=True), sharpen=True)
    data = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(8)]
    before = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith(("codebooks", "scales"))}
    lr = 0.05  # steps far above fp16's rounding (trained codebooks and scales end rounded as they are stored)
    finetune(FinetuneArguments(max_train_steps=1, per_device_train_batch_size=8, learning_rate=lr,
                               lr_scheduler_type="constant", scale_parameter=scale_parameter, progress=False,
                               evaluate_before=False, eval_every_epoch=False),
             student=student, teacher=teacher, train_dataset=data)
    after = dict(student.named_parameters())
    rms = {n: b.pow(2).mean().sqrt().item() for n, b in before.items()}
    assert sum(abs(np.log(r)) > np.log(2) for r in rms.values()) >= 4  # sizes far from 1: the two cases differ
    checked = 0
    for name, b in before.items():
        step = (after[name].detach() - b).abs().flatten()
        step = step[step > 0]  # values with a gradient
        if step.numel() == 0:
            continue
        expected = lr * max(rms[name], _RMS_FLOOR) if scale_parameter else lr
        assert step.median().item() == pytest.approx(expected, rel=0.05), name
        checked += 1
    assert checked >= 4


def test_mark_trainable_groups():
    model = timm.create_model("test_resnet", num_classes=3)
    hf_vq.quantize_(model, hf_vq.VQConfig(k=4, n_iter=2, permute=False), progress=False)
    counts = mark_trainable_(model, norms=False, biases=True, dense=False)
    assert counts["norms"] == 0 and counts["codebooks"] > 0
    assert all(p.requires_grad == n.endswith(("codebooks", "fc.bias")) for n, p in model.named_parameters())
    assert all(not b.is_floating_point() for n, b in model.named_buffers() if n.endswith("codes"))
    dense = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match="not compressed|no hf_vq module"):
        mark_trainable_(dense)


def test_shared_codebooks_are_trained_once():
    """Additive quantization with codebooks shared across layers: the shared set is one trainable parameter."""
    torch.manual_seed(0)
    teacher, student = _teacher_student(hf_vq.VQConfig(method="aq", num_codebooks=2, k=4, share="pool", n_iter=3,
                                                       aq_iters=1, permute=False), sharpen=True)
    shared = {id(m.codebooks): m.codebooks for m in hf_vq.vq_modules(student).values()}
    assert len(shared) < len(hf_vq.vq_modules(student)), "codebooks are not shared"
    counts = mark_trainable_(student, norms=False, biases=False)
    assert all(p.requires_grad for p in shared.values())
    assert counts["codebooks"] == sum(p.numel() for p in shared.values())
    before = {k: p.detach().clone() for k, p in shared.items()}
    x = torch.randn(16, 3, 32, 32)
    data = [{"pixel_values": x[i]} for i in range(16)]
    result = finetune(FinetuneArguments(max_train_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                                        progress=False, freeze_norm_stats=True),
                      student=student, teacher=teacher, train_dataset=data, eval_dataset=data)
    assert result.metrics["eval_kl"] < result.metrics_before["eval_kl"]
    assert all(not torch.equal(before[k], p) for k, p in shared.items())


# ---------------------------------------------------------------------------------------------- text data
@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory, minilm_path) -> dict[str, Path]:
    """A tiny random BertModel with MiniLM's tokenizer, dense and compressed, and text files."""
    from transformers import BertConfig, BertModel

    from hf_vq.integrations.transformers import save_compressed as save_transformers

    root = tmp_path_factory.mktemp("finetune-text")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    dense = BertModel(config).eval()
    dense.save_pretrained(root / "dense")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, root / "dense" / name)
    student = BertModel.from_pretrained(root / "dense").eval()
    hf_vq.quantize_(student, hf_vq.VQConfig(k=4, n_iter=5, permute=False, quantize_embeddings=False),
                    progress=False)
    save_transformers(student, root / "vq", source_dir=root / "dense")
    from gensim.test.utils import datapath

    lines = [line.strip() for line in Path(datapath("lee_background.cor")).read_text().splitlines() if line.strip()]
    (root / "train.txt").write_text("\n".join(lines[:48]) + "\n\n")
    (root / "val.txt").write_text("\n".join(lines[48:64]) + "\n")
    import csv

    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows([[line[:200], i % 2] for i, line in enumerate(lines[:16])])
    return {"root": root, "dense": root / "dense", "vq": root / "vq"}


def test_text_file_hidden_state_distillation(bert_folders, tmp_path):
    root = bert_folders["root"]
    result = finetune(FinetuneArguments(
        model_name_or_path=str(bert_folders["vq"]), teacher_name_or_path=str(bert_folders["dense"]),
        train_file=str(root / "train.txt"), validation_file=str(root / "val.txt"), output_dir=str(tmp_path / "out"),
        max_train_steps=8, per_device_train_batch_size=8, learning_rate=3e-3, max_seq_length=64, progress=False,
        hidden_target="last", hidden_loss="mse"))
    # BertModel has no logits: the loss is on the last hidden state of every token; the pooler never reaches it.
    assert "eval_cosine" in result.metrics and result.metrics["eval_samples"] == 16
    assert result.metrics["eval_loss"] < 0.9 * result.metrics_before["eval_loss"], (result.metrics_before, result.metrics)
    assert result.metrics["eval_cosine"] > result.metrics_before["eval_cosine"] + 0.05
    assert result.trainable["unused_frozen"] >= 1
    from transformers import AutoModel, AutoTokenizer

    loaded = AutoModel.from_pretrained(tmp_path / "out")
    assert hf_vq.vq_modules(loaded)
    AutoTokenizer.from_pretrained(tmp_path / "out")  # the tokenizer travels with the model
    assert "embedding cosine to the dense model" in (tmp_path / "out" / "README.md").read_text()


def test_csv_with_labels_is_tokenized(bert_folders):
    from hf_vq.finetune.data import load_raw as _load_raw, preprocess as _preprocess

    args = FinetuneArguments(train_file=str(bert_folders["root"] / "train.csv"), validation_split_percentage=25)
    train, val = _load_raw(args)
    assert len(train) == 12 and len(val) == 4
    student = hf_vq.finetune.load_model(str(bert_folders["vq"]))[0]
    train, val, collate = _preprocess(args, train, val, student=student, library="transformers",
                                      tokenizer_dirs=[bert_folders["vq"]])
    batch = collate([train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == [int(train[i]["labels"]) for i in range(4)]


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"loss": "l2"}, "loss"),
    ({"checkpointing_steps": "often"}, "checkpointing_steps"),
    ({"train_file": "data.parquet"}, "unsupported file type"),
    ({"train_file": "missing.txt"}, "does not exist"),
    ({"push_to_hub": True, "output_dir": "x"}, "hub_model_id"),
    ({"dataset_name": "fashion_mnist", "train_dir": "."}, "not both"),
], ids=["lr", "batch", "loss", "checkpointing", "file-type", "missing-file", "push-without-repo", "two-sources"])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneArguments(**kwargs)


def test_missing_teacher_is_a_clear_error(timm_folders, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    code = script.main(["--model_name_or_path", str(timm_folders["vq"]), "--train_dir", str(timm_folders["train"])])
    assert code == 2
    assert "--teacher_name_or_path" in capsys.readouterr().err
    # A dense model is not a student.
    code = script.main(["--model_name_or_path", str(timm_folders["dense"]), "--teacher_name_or_path",
                        str(timm_folders["dense"]), "--train_dir", str(timm_folders["train"])])
    assert code == 2 and "not compressed" in capsys.readouterr().err
    code = script.main(["--model_name_or_path", str(timm_folders["vq"]), "--teacher_name_or_path",
                        str(timm_folders["dense"])])
    assert code == 2 and "No training data" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a state folder"):
        finetune(_args(timm_folders, tmp_path, resume_from_checkpoint=str(tmp_path)))


def test_default_teacher_is_the_recorded_base_model(tmp_path, timm_folders):
    folder = tmp_path / "vq"
    shutil.copytree(timm_folders["vq"], folder)
    assert default_teacher(folder) is None
    config = json.loads((folder / "config.json").read_text())
    config["base_model"] = str(timm_folders["dense"])
    (folder / "config.json").write_text(json.dumps(config))
    assert default_teacher(folder) == str(timm_folders["dense"])
    save_compressed(timm.create_model(f"local-dir:{timm_folders['vq']}", pretrained=True), tmp_path / "carded",
                    base_model="timm/test_resnet.r160_in1k")
    assert default_teacher(tmp_path / "carded") == "timm/test_resnet.r160_in1k"


def test_push_to_hub(timm_folders, tmp_path, hub):
    finetune(_args(timm_folders, tmp_path / "out", max_train_steps=1, evaluate_before=False, checkpointing_steps="1",
                   push_to_hub=True, hub_model_id="alice/test-resnet-vq-ft", hub_token="hf_alice_write_token"))
    files = set(hub.files("alice/test-resnet-vq-ft"))
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert not any(f.startswith("checkpoints") for f in files)


# ---------------------------------------------------------------------------------------------- accelerate launch
def _launch(args: list[str], *, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *args, "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch_and_resume(timm_folders, tmp_path):
    common = ["--model_name_or_path", str(timm_folders["vq"]), "--teacher_name_or_path", str(timm_folders["dense"]),
              "--train_dir", str(timm_folders["train"]), "--validation_dir", str(timm_folders["val"]),
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--task_weight", "0",
              "--num_train_epochs", "1", "--freeze_norm_stats"]  # 48 images / (2 processes x 4) = 6 steps
    full = _launch([*common, "--output_dir", str(tmp_path / "a"), "--checkpointing_steps", "2"])
    assert full.returncode == 0, full.stderr[-3000:]
    assert "2 process(es)" in full.stdout, full.stdout[-2000:]
    report = json.loads(full.stdout[full.stdout.index("{\n"):])
    assert report["completed_steps"] == 6
    assert report["metrics"]["eval_samples"] == 24  # gather_for_metrics dropped the padding of the last batch
    assert report["metrics"]["eval_kl"] < 0.7 * report["metrics_before"]["eval_kl"]
    resumed = _launch([*common, "--output_dir", str(tmp_path / "b"), "--no-evaluate_before",
                       "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoints" / "step_4")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    vq = load_file(str(timm_folders["vq"] / "model.safetensors"))
    for key in a:
        if key.endswith(".codes"):
            assert torch.equal(a[key], vq[key]), f"{key}: codes changed in DDP"
    for key, value in _codebooks(a).items():
        torch.testing.assert_close(value, _codebooks(b)[key], rtol=0, atol=1e-6)


def test_plain_text_of_any_suffix_is_training_data(tmp_path):
    """gensim's `lee_background.cor` (300 news documents, one per line) is plain text: accepted as train_file."""
    gensim_utils = pytest.importorskip("gensim.test.utils")
    from hf_vq.finetune.data import load_text_file

    path = gensim_utils.datapath("lee_background.cor")
    args = FinetuneArguments(train_file=path, validation_file=path)
    assert args.train_file == path
    data = load_text_file(path)
    assert len(data) == 300 and data.column_names == ["text"]
    empty = tmp_path / "blank.cor"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"FinetuneArguments\.train_file=.*holds no sample"):
        load_text_file(str(empty))
    with pytest.raises(ValueError, match=r"FinetuneArguments\.train_file=.*is empty"):
        FinetuneArguments(train_file=str(tmp_path / "none.txt") if (tmp_path / "none.txt").touch() is None else "")


@pytest.mark.parametrize("dropout", [True, False])
def test_dropout_false_trains_without_any_dropout(dropout):
    """`dropout=False` runs the student in eval mode: two forwards of a batch agree, attention dropout included
    (transformers applies it from the attention module's own `training` flag, not through `nn.Dropout`)."""
    from transformers import BertConfig, BertModel

    from hf_vq.finetune.loop import _train_mode_

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    model = BertModel(config)
    _train_mode_(model, freeze_norm_stats=False, dropout=dropout)
    ids = torch.randint(0, 50, (2, 7))
    a, b = (model(input_ids=ids).last_hidden_state for _ in range(2))
    assert torch.equal(a, b) is (not dropout)


@pytest.mark.parametrize("dropout", [True, False])
def test_the_training_loop_runs_the_student_in_eval_mode_without_dropout(dropout):
    """The loop itself honours `dropout`: the student's training forwards run in train mode only with dropout."""
    torch.manual_seed(0)
    teacher, student = _teacher_student(hf_vq.VQConfig(k=4, n_iter=2, permute=False))
    modes = []
    student.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    data = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(8)]
    finetune(FinetuneArguments(max_train_steps=2, per_device_train_batch_size=4, dropout=dropout, progress=False,
                               evaluate_before=False, eval_every_epoch=False),
             student=student, teacher=teacher, train_dataset=data)
    assert modes and any(modes) is dropout
