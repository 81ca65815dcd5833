"""Shared pieces of the fault suites (tests/test_faults*.py, tests/test_concurrency.py): tiny real models, folder
fingerprints, and a folder nobody (not even root) can write into."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
import transformers as tf

import hf_vq

VOCAB = 96


def gpt2_config() -> tf.GPT2Config:
    return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                         eos_token_id=0)


def vq_config(**kwargs) -> hf_vq.VQConfig:
    """k = 16: a power of two, so every byte of the codes is a valid code (only a checksum can catch a flip)."""
    return hf_vq.VQConfig(**{"k": 16, "n_iter": 2, "permute": False, **kwargs})


def compressed_gpt2(seed: int = 0, **kwargs) -> tf.GPT2LMHeadModel:
    """A tiny GPT-2 (Conv1D layers, tied lm_head), compressed with hf_vq (seeded, so two calls give one model)."""
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(gpt2_config()).eval()
    hf_vq.quantize_(model, vq_config(**kwargs), progress=False)
    return model


def compressed_timm(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    hf_vq.quantize_(model, vq_config(block_size={"depthwise": 9}), progress=False)
    return model


def gpt2_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**gpt2_inputs()).logits


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too) -> its kind and content hash: equal trees, unchanged files."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(target: Path) -> list[str]:
    """Hidden siblings a save into `target` may leave (temporary or replaced versions)."""
    return sorted(p.name for p in Path(target).parent.glob(f".{Path(target).name}.*"))


def user_files(folder: Path) -> None:
    """A user's files: a source tree and a results table."""
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "src" / "train.py").write_text("print('mine')\n")
    (folder / "results.csv").write_text("step,loss\n1,0.5\n")


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable for the duration (`chattr +i` as root, whom permission bits do not stop)."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            import pytest

            pytest.skip("running as root without a working chattr: cannot make a folder read-only")
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)])
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(mode)


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
