"""Faults on the saving side: no save deletes or replaces a file hf_vq did not write, a save that cannot succeed says
so before any work, and an interrupted save (SIGINT, SIGTERM, SIGKILL) leaves the previous folder complete and no
debris once the next save has run. Every save path: transformers' `save_compressed` and `save_pretrained`, timm's
`save_compressed`, fine-tuning's output folder, `hf-vq compress`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch

import hf_vq
from fault_helpers import (compressed_gpt2, compressed_timm, dead_pid, gpt2_config, leftovers, logits, read_only,
                           tree, user_files)
from hf_vq.integrations import timm as vq_timm
from hf_vq.integrations.transformers import save_compressed as tf_save_compressed
from hf_vq.serialization import MANIFEST_NAME, SaveTargetError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return {"gpt2": compressed_gpt2(0), "gpt2-b": compressed_gpt2(1), "timm": compressed_timm(0),
            "timm-b": compressed_timm(1)}


def _save_pretrained(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)


def _timm_load(path):
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


# saver -> (model kind, save function, load function)
SAVERS = {
    "transformers.save_compressed": ("gpt2", lambda m, p: tf_save_compressed(m, p), None),
    "save_pretrained": ("gpt2", _save_pretrained, None),
    "timm.save_compressed": ("timm", lambda m, p: vq_timm.save_compressed(m, p), _timm_load),
}


def _same_outputs(kind: str, folder: Path, model) -> bool:
    with torch.no_grad():
        if kind == "timm":
            x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            return torch.equal(_timm_load(folder)(x), model(x))
        import transformers as tf

        return torch.equal(logits(tf.GPT2LMHeadModel.from_pretrained(folder)), logits(model))


# ---------------------------------------------------------------------------------------------- case 1: targets
@pytest.mark.parametrize("saver", ["transformers.save_compressed", "timm.save_compressed"])
def test_folder_of_other_files_is_refused(saver, models, tmp_path):
    kind, save, _ = SAVERS[saver]
    target = tmp_path / "work"
    user_files(target)
    before = tree(tmp_path)
    with pytest.raises(SaveTargetError, match=r"work is a folder that hf_vq did not write \(it holds results.csv, src\)"
                                              r".*new or empty folder"):
        save(models[kind], target)
    assert tree(tmp_path) == before


def test_current_directory_is_refused(models, tmp_path, monkeypatch):
    """The probe's case: `save_compressed(model, ".")` deleted the working folder's files."""
    user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    for save in (lambda: tf_save_compressed(models["gpt2"], "."), lambda: vq_timm.save_compressed(models["timm"], ".")):
        with pytest.raises(SaveTargetError, match="did not write"):
            save()
    assert tree(tmp_path) == before


@pytest.mark.parametrize("saver", list(SAVERS))
def test_saving_into_the_working_folder_keeps_it(saver, models, tmp_path, monkeypatch):
    """A model folder that is the working folder is updated file by file (swapping it would leave the process in a
    deleted folder); the user's files stay."""
    kind, save, _ = SAVERS[saver]
    target = tmp_path / "vq"
    save(models[kind], target)
    user_files(target)
    monkeypatch.chdir(target)
    save(models[kind + "-b"], ".")
    assert Path(os.getcwd()) == target and (target / "results.csv").is_file() and (target / "src" / "train.py").is_file()
    assert _same_outputs(kind, target, models[kind + "-b"]) and not leftovers(target)


@pytest.mark.parametrize("saver", list(SAVERS))
def test_file_is_never_replaced_by_a_folder(saver, models, tmp_path):
    kind, save, _ = SAVERS[saver]
    target = tmp_path / "model"
    target.write_text("a file the user keeps")
    before = tree(tmp_path)
    with pytest.raises(SaveTargetError, match=r"model is a file, not a folder.*never replaces a file"):
        save(models[kind], target)
    assert tree(tmp_path) == before and not leftovers(target)


@pytest.mark.parametrize("saver", list(SAVERS))
def test_unwritable_target_is_named_before_writing(saver, models, tmp_path):
    kind, save, _ = SAVERS[saver]
    (tmp_path / "notes").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"notes is a file, so nothing can be created under it"):
        save(models[kind], tmp_path / "notes" / "model")
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        with pytest.raises(PermissionError, match=r"locked is not writable .*writable location"):
            save(models[kind], locked / "model")
    assert list(locked.iterdir()) == []


def test_save_pretrained_adds_to_a_folder_of_other_files(models, tmp_path):
    """transformers' `save_pretrained` writes next to what a folder holds (a tokenizer saved first, Trainer's
    checkpoints): kept byte for byte; a name the model writes that the folder already has is refused."""
    target = tmp_path / "out"
    user_files(target)
    (target / "vocab.txt").write_text("[PAD]\n")
    before = tree(target)
    models["gpt2"].save_pretrained(target)
    after = tree(target)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {"config.json", "model.safetensors", "README.md", MANIFEST_NAME} <= set(after)
    assert _same_outputs("gpt2", target, models["gpt2"])
    clash = tmp_path / "clash"
    user_files(clash)
    (clash / "README.md").write_text("my notes")
    before = tree(clash)
    with pytest.raises(SaveTargetError, match=r"already holds README.md, which hf_vq did not write"):
        models["gpt2"].save_pretrained(clash)
    assert tree(clash) == before and not leftovers(clash)


def test_push_uploads_the_model_not_the_bookkeeping(models, tmp_path, hub):
    target = tmp_path / "vq"
    models["gpt2"].save_pretrained(target, push_to_hub=True, repo_id="alice/faults-gpt2-vq", token="hf_alice_write_token")
    files = hub.files("alice/faults-gpt2-vq")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files) and MANIFEST_NAME not in files
    assert (target / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("saver", list(SAVERS))
def test_resave_replaces_only_hf_vq_files(saver, models, tmp_path):
    kind, save, _ = SAVERS[saver]
    target = tmp_path / "vq"
    save(models[kind], target)
    user_files(target)
    (target / "cache").mkdir()
    (target / "cache" / "blob.bin").write_bytes(os.urandom(64))
    mine = {k: v for k, v in tree(target).items() if k.startswith(("src", "results", "cache"))}
    save(models[kind + "-b"], target)
    assert {k: v for k, v in tree(target).items() if k.startswith(("src", "results", "cache"))} == mine
    assert _same_outputs(kind, target, models[kind + "-b"]) and not leftovers(target)


def test_stale_shards_go_user_files_stay(models, tmp_path):
    target = tmp_path / "vq"
    models["gpt2"].save_pretrained(target, max_shard_size="8KB")
    assert len(list(target.glob("model-*-of-*.safetensors"))) > 1
    user_files(target)
    models["gpt2-b"].save_pretrained(target)
    assert not list(target.glob("model-*")) and not (target / "model.safetensors.index.json").exists()
    assert (target / "results.csv").is_file() and (target / "src" / "train.py").is_file()
    assert _same_outputs("gpt2", target, models["gpt2-b"])


def test_older_hf_vq_folder_without_manifest_is_replaced(models, tmp_path):
    """Folders written before the manifest are recognised by their quantization_config; their files are hf_vq's."""
    target = tmp_path / "vq"
    tf_save_compressed(models["gpt2"], target)
    (target / MANIFEST_NAME).unlink()
    (target / "notes.txt").write_text("mine")
    tf_save_compressed(models["gpt2-b"], target)
    assert (target / "notes.txt").read_text() == "mine" and _same_outputs("gpt2", target, models["gpt2-b"])


# ---------------------------------------------------------------------------------------------- case 9: empty layout
def test_config_matching_no_layer_fails_before_any_work(tmp_path):
    torch.manual_seed(0)
    import transformers as tf

    model = tf.GPT2LMHeadModel(gpt2_config())
    for config in (hf_vq.VQConfig(modules_to_not_convert=["*"]), hf_vq.VQConfig.from_spec("pq-1x8-l0p0c0e0")):
        with pytest.raises(ValueError, match=r"No module of this GPT2LMHeadModel matches the config .*"
                                             r"modules_to_not_convert.*nothing would be compressed.*block_size"):
            hf_vq.quantize_(model, config, progress=False)
    assert not hf_vq.vq_modules(model)


def test_model_without_compressed_modules_is_not_saved(models, tmp_path):
    model = compressed_timm(2)
    hf_vq.dequantize_(model)
    with pytest.raises(ValueError, match="holds no compressed module.*Nothing was written"):
        vq_timm.save_compressed(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_unmatched_patterns_are_named(caplog):
    model = timm.create_model("test_efficientnet", num_classes=10)
    with caplog.at_level("WARNING"):
        hf_vq.quantize_(model, hf_vq.VQConfig(k=16, n_iter=1, permute=False, modules_to_not_convert=["no_such_layer*"],
                                              overrides={"blocks.99.*": {"k": 8}}), progress=False)
    assert "'no_such_layer*'" in caplog.text and "'blocks.99.*'" in caplog.text and "matches no module" in caplog.text


# ---------------------------------------------------------------------------------------------- fine-tuning output
def test_finetune_output_dir_checked_before_training(tmp_path):
    from hf_vq.finetune import FinetuneArguments, finetune

    user_files(tmp_path / "out")
    before = tree(tmp_path)
    args = FinetuneArguments(model_name_or_path=str(tmp_path / "missing-model"), output_dir=str(tmp_path / "out"),
                             dataset_name="unused/never-loaded")
    with pytest.raises(SaveTargetError, match="out is a folder that hf_vq did not write"):
        finetune(args)
    assert tree(tmp_path) == before
    (tmp_path / "ok" / "checkpoints" / "step_1").mkdir(parents=True)  # resuming: only checkpoints/ there
    from hf_vq.finetune.output import check_output_dir

    check_output_dir(FinetuneArguments(output_dir=str(tmp_path / "ok")))


# ---------------------------------------------------------------------------------------------- case 3: interrupts
_SAVE_LOOP = textwrap.dedent("""
    import signal, sys, timm, torch, hf_vq
    # Ctrl-C as in a terminal: a process started in the background by a non-interactive shell (`pytest &`, nohup)
    # inherits SIGINT ignored, and Python then keeps ignoring it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from hf_vq.integrations.timm import save_compressed
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = timm.create_model("test_efficientnet", num_classes=10).eval()
        hf_vq.quantize_(m, hf_vq.VQConfig(k=16, n_iter=2, permute=False, block_size={"depthwise": 9}), progress=False)
        models.append(m)
    target = sys.argv[1]
    save_compressed(models[0], sys.argv[2])  # references: what either version loads as
    save_compressed(models[1], sys.argv[3])
    save_compressed(models[0], target)
    print("READY", flush=True)
    i = 1
    while True:
        save_compressed(models[i % 2], target)
        i += 1
""")


@pytest.mark.slow
def test_interrupted_saves_leave_the_previous_folder(models, tmp_path):
    """SIGINT and SIGTERM mid-save: the temporary folder is removed, the folder is complete. SIGKILL: the folder is
    complete (swapped in one step) and the next save removes what the killed one left."""
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        target = tmp_path / sig.name / "vq"
        target.parent.mkdir()
        refs = [str(tmp_path / sig.name / "a"), str(tmp_path / sig.name / "b")]
        procs[sig] = (target, subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(target), *refs], cwd=ROOT,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for sig, (target, proc) in procs.items():
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()[-2000:]
        user_files(target)
    time.sleep(1.0)
    for sig, (target, proc) in procs.items():
        proc.send_signal(sig)
    x = torch.randn(1, 3, 32, 32)
    try:
        codes = {sig: proc.wait(timeout=60) for sig, (_, proc) in procs.items()}
    finally:  # a save loop that ignored its signal must not outlive the test
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for sig, (target, proc) in procs.items():
        with torch.no_grad():
            expected = [_timm_load(target.parent / "a")(x), _timm_load(target.parent / "b")(x)]
        code = codes[sig]
        assert code != 0, sig
        if sig != signal.SIGKILL:
            assert leftovers(target) == [], (sig, leftovers(target), proc.stderr.read()[-2000:])
        with torch.no_grad():
            got = _timm_load(target)(x)
        assert any(torch.equal(got, e) for e in expected), sig
        assert (target / "results.csv").is_file() and (target / "src" / "train.py").is_file(), sig
        vq_timm.save_compressed(models["timm"], target)  # the next save cleans up after a killed one
        assert leftovers(target) == [] and (target / "results.csv").is_file(), sig


def test_kill_between_the_renames_is_recovered(models, tmp_path):
    """Where folders cannot be exchanged in one step, a save renames the old folder aside, then the new one in: a
    SIGKILL in between leaves the target missing. The next save puts the old folder back first (with its user
    files), so nothing is lost."""
    target = tmp_path / "vq"
    vq_timm.save_compressed(models["timm"], target)
    user_files(target)
    aside = tmp_path / f".vq.hf_vq-old-{dead_pid()}-0badf00d"
    target.rename(aside)
    vq_timm.save_compressed(models["timm-b"], target)
    assert leftovers(target) == [] and (target / "results.csv").is_file() and (target / "src" / "train.py").is_file()
    assert _same_outputs("timm", target, models["timm-b"])


def test_files_left_aside_by_older_releases_come_back(models, tmp_path):
    """hf_vq before this change moved a whole target aside as `.NAME.old-PID` (user files included) and could be
    killed before deleting it: the next save moves the user's files back into the folder."""
    target = tmp_path / "vq"
    vq_timm.save_compressed(models["timm"], target)
    legacy = tmp_path / f".vq.old-{dead_pid()}"
    shutil.copytree(target, legacy)
    user_files(legacy)
    vq_timm.save_compressed(models["timm-b"], target)
    assert leftovers(target) == []
    assert (target / "results.csv").read_text() == "step,loss\n1,0.5\n" and (target / "src" / "train.py").is_file()


def test_failure_mid_save_leaves_everything_as_it_was(models, tmp_path):
    target = tmp_path / "vq"
    tf_save_compressed(models["gpt2"], target)
    user_files(target)
    source = tmp_path / "dense"
    source.mkdir()
    (source / "vocab.txt").symlink_to(tmp_path / "gone")  # copying the dense folder's files fails midway
    before = tree(tmp_path)
    with pytest.raises(FileNotFoundError):
        tf_save_compressed(models["gpt2-b"], target, source_dir=source)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- case 2, 10: the CLI
def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hf_vq.cli", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def _main(capsys, *args) -> tuple[int, str, str]:
    """`hf-vq ...` run in this process (the same `main` the console script calls)."""
    from hf_vq.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    import transformers as tf

    folder = tmp_path_factory.mktemp("dense") / "tiny-bert"
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def test_cli_refuses_bad_outputs_before_loading(dense_folder, tmp_path, capsys):
    """Each refused before the model is even loaded (no "compressing" line), nothing changed."""
    user_files(tmp_path / "work")
    (tmp_path / "afile").write_text("x")
    before, dense_before = tree(tmp_path), tree(dense_folder)
    cases = [
        (["--out", str(tmp_path / "work"), "--overwrite"], r"work is a folder that hf_vq did not write"),
        (["--out", str(dense_folder), "--overwrite"], r"is MODEL itself"),
        (["--out", str(tmp_path / "afile" / "vq")], r"afile is a file, so nothing can be created under it"),
        (["--out", str(tmp_path / "afile"), "--overwrite"], r"afile is a file, not a folder"),
        (["--out", str(tmp_path / "new"), "--json", str(tmp_path / "afile" / "r.json")], r"afile is a file"),
    ]
    for args, message in cases:
        code, out, err = _main(capsys, "compress", str(dense_folder), *args, "--no-eval")
        assert code == 2 and "compressing" not in out and err.startswith("hf-vq compress: error:"), (args, out, err)
        assert re.search(message, err), (args, err)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        code, out, err = _main(capsys, "compress", str(dense_folder), "--out", str(locked / "vq"), "--no-eval")
    assert code == 2 and "locked is not writable" in err and "compressing" not in out
    locked.rmdir()
    assert tree(tmp_path) == before and tree(dense_folder) == dense_before


def test_cli_names_a_broken_model_config(dense_folder, tmp_path, capsys):
    broken = tmp_path / "dense"
    shutil.copytree(dense_folder, broken)
    (broken / "config.json").write_text("{not json")
    code, out, err = _main(capsys, "compress", str(broken), "--out", str(tmp_path / "vq"), "--no-eval")
    assert code == 2 and "config.json is not valid JSON" in err and "re-download" in err, err
    assert not (tmp_path / "vq").exists()


def test_cli_spec_matching_nothing_writes_nothing(dense_folder, tmp_path, capsys):
    code, _, err = _main(capsys, "compress", str(dense_folder), "--out", str(tmp_path / "vq"), "--spec",
                         "pq-1x8-l0p0c0e0", "--no-eval", "--quiet")
    assert code == 2 and "No module of this BertModel matches the config" in err, err
    code, _, err = _main(capsys, "compress", str(dense_folder), "--out", str(tmp_path / "vq"), "--skip", "*",
                         "--no-eval", "--quiet")
    assert code == 2 and "modules_to_not_convert=['*']" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_overwrite_keeps_other_files_and_warns_on_unmatched_skip(dense_folder, tmp_path):
    out = tmp_path / "vq"
    args = ["compress", str(dense_folder), "--out", str(out), "--no-eval", "--no-permute", "--n-iter", "2", "-k", "16",
            "--quiet"]
    assert _cli(*args).returncode == 0
    user_files(out)
    mine = {k: v for k, v in tree(out).items() if k.startswith(("src", "results"))}
    proc = _cli(*args, "--overwrite", "--skip", "no_such_layer*")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'no_such_layer*'" in proc.stderr and "matches no module" in proc.stderr
    assert {k: v for k, v in tree(out).items() if k.startswith(("src", "results"))} == mine and not leftovers(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
