"""Saves are atomic for readers: one process saves into a folder over and over (two models in turn) while this one
loads it in a loop. Every load must give exactly one of the two saved models' outputs (none torn, none mixing old
and new shards) and no load may fail. Bounded in time and in loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
import transformers as tf

from fault_helpers import compressed_gpt2, compressed_timm, logits

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SAVE_SECONDS = 4.0
MAX_LOADS = 400

_SAVER = textwrap.dedent("""
    import sys, time
    folder, mode, seconds, ref_a, ref_b = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
    import hf_vq
    if mode == "timm":
        import timm
        from hf_vq.integrations.timm import save_compressed
        models = [timm.create_model(f"local-dir:{ref}", pretrained=True) for ref in (ref_a, ref_b)]
        save = lambda model: save_compressed(model, folder)
    else:
        import transformers as tf
        models = [tf.GPT2LMHeadModel.from_pretrained(ref) for ref in (ref_a, ref_b)]
        kwargs = {"max_shard_size": "8KB"} if mode == "sharded" else {}
        save = lambda model: model.save_pretrained(folder, **kwargs)
    print("READY", flush=True)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        save(models[n % 2])
        n += 1
    print(n, flush=True)
""")


def _versions(mode: str, root: Path):
    """Two versions of one model (same layout, different weights) saved as references, their outputs, and a load."""
    if mode == "timm":
        models = [compressed_timm(0), compressed_timm(1)]
        from hf_vq.integrations.timm import save_compressed

        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        load = lambda folder: timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # noqa: E731
        run = lambda model: model(x)  # noqa: E731
        for model, name in zip(models, "ab"):
            save_compressed(model, root / name)
    else:
        models = [compressed_gpt2(0), compressed_gpt2(1)]
        load, run = tf.GPT2LMHeadModel.from_pretrained, logits
        for model, name in zip(models, "ab"):
            model.save_pretrained(root / name)
    with torch.no_grad():
        expected = [run(load(root / name)) for name in "ab"]
    assert not torch.equal(*expected)
    return expected, load, run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "sharded", "timm"])
def test_loads_during_repeated_saves_are_never_torn(mode, tmp_path):
    expected, load, run = _versions(mode, tmp_path)
    folder = tmp_path / "live"
    import shutil

    shutil.copytree(tmp_path / "a", folder)
    saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder), mode, str(SAVE_SECONDS), str(tmp_path / "a"),
                              str(tmp_path / "b")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "READY", saver.stderr.read()[-3000:]
    loads, torn, errors = 0, 0, []
    seen = [0, 0]
    deadline = time.monotonic() + SAVE_SECONDS + 30
    while saver.poll() is None and loads < MAX_LOADS and time.monotonic() < deadline:
        try:
            with torch.no_grad():
                got = run(load(folder))
        except Exception as err:  # noqa: BLE001 - any failure of a load is what this test counts
            errors.append(f"{type(err).__name__}: {err}")
            continue
        finally:
            loads += 1
        match = [i for i, e in enumerate(expected) if torch.equal(got, e)]
        torn += not match
        for i in match:
            seen[i] += 1
    out, err = saver.communicate(timeout=120)
    saves = int(out.split()[-1]) if out.split() else 0
    assert saver.returncode == 0, err[-3000:]
    assert errors == [] and torn == 0, (errors[:3], torn, loads)
    assert loads >= 10 and saves >= 10 and min(seen) > 0, (loads, saves, seen)
    assert sorted(p.name for p in tmp_path.glob(".live.*")) == []
