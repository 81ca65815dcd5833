"""The pushed repos read back through `olah`, a self-hosted Hub mirror this project did not write.

Both kinds of checkpoint (a timm model and a transformers model, compressed with hf_vq) are pushed to the
loopback Hub (tests/hub_server.py) with the real client, downloaded back, and laid out as olah expects a
local mirror: a git repository per Hub repo under `<mirrors-path>/models/<org>/<name>`, the large files as
git-LFS pointers with their objects in `.git/lfs/objects` (what `git clone` of a Hub repo with git-lfs
gives). olah runs as its own server process, offline, and a fresh Python process with `HF_ENDPOINT` at it
loads both models the ordinary way (`timm.create_model("hf-hub:…")`, `AutoModel.from_pretrained`, and
`snapshot_download`), without a token. Outputs must equal the in-process models' bit for bit.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("olah")
timm = pytest.importorskip("timm")
import transformers as tf  # noqa: E402
from huggingface_hub import snapshot_download  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import hf_vq  # noqa: E402
from hf_vq.integrations.timm import fit_config, push_to_hub  # noqa: E402

ALICE = "hf_alice_write_token"
SUFFIX = uuid.uuid4().hex[:8]
TIMM_REPO = f"alice/olah-resnet-vq-{SUFFIX}"
TF_REPO = f"alice/olah-gpt2-vq-{SUFFIX}"
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"

if shutil.which("git") is None:
    pytest.skip("olah's local mirrors are git repositories; the git CLI is not installed", allow_module_level=True)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _lfs_patterns(gitattributes: bytes) -> list[str]:
    return [line.split()[0] for line in gitattributes.decode().splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line.split()[1:]]


def _mirror_as_git(snapshot: Path, repo: Path) -> None:
    """Lay out a downloaded Hub repo the way a git-lfs clone of it looks: files matching an LFS rule in its
    .gitattributes are committed as LFS pointers, their contents stored under .git/lfs/objects."""
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.name", "hf_vq tests")
    _git(repo, "config", "user.email", "hf-vq-tests@example.invalid")
    files = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*")
             if p.is_file() and ".cache" not in p.relative_to(snapshot).parts}
    lfs = _lfs_patterns(files.get(".gitattributes", b""))
    for name, data in files.items():
        dest = repo / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if any(fnmatch.fnmatch(Path(name).name, pat) or fnmatch.fnmatch(name, pat) for pat in lfs):
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            dest.write_text(LFS_POINTER.format(oid=oid, size=len(data)))
        else:
            dest.write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "mirror of the loopback Hub repo")


@pytest.fixture(scope="module")
def mirrored(hub, tmp_path_factory):
    """Push a compressed timm and a compressed transformers model, mirror both as git repos; return the
    mirrors folder, the expected outputs (a .safetensors file) and each repo's files as the Hub has them."""
    root = tmp_path_factory.mktemp("olah")
    expected: dict[str, torch.Tensor] = {}

    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    hf_vq.quantize_(model, fit_config(model, hf_vq.VQConfig(k=16, n_iter=2, permute=False)), progress=False)
    push_to_hub(model, TIMM_REPO, token=ALICE)
    expected["timm_x"] = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected["timm_out"] = model(expected["timm_x"])

    config = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                           eos_token_id=0)
    torch.manual_seed(0)
    tf.GPT2Model(config).save_pretrained(root / "gpt2-dense")
    tmodel = tf.AutoModel.from_pretrained(root / "gpt2-dense",
                                          quantization_config=hf_vq.VQConfig(k=16, n_iter=2, permute=False)).eval()
    assert hf_vq.vq_modules(tmodel)
    tmodel.push_to_hub(TF_REPO, token=ALICE)
    expected["tf_ids"] = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected["tf_out"] = tmodel(input_ids=expected["tf_ids"]).last_hidden_state

    save_file({k: v.contiguous() for k, v in expected.items()}, root / "expected.safetensors")
    mirrors = root / "mirrors"
    hub_files = {}
    for repo_id in (TIMM_REPO, TF_REPO):
        snapshot = Path(snapshot_download(repo_id, token=ALICE, cache_dir=root / "hf-cache"))
        hub_files[repo_id] = {name: hashlib.sha256(data).hexdigest() for name, data in hub.files(repo_id).items()}
        _mirror_as_git(snapshot, mirrors / "models" / repo_id)
    return mirrors, root / "expected.safetensors", hub_files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def olah_url(mirrored, tmp_path_factory):
    """An olah server process (offline, serving only the local mirrors) on a free loopback port."""
    mirrors = mirrored[0]
    root = tmp_path_factory.mktemp("olah-server")
    port = _free_port()
    cfg = root / "olah.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = {json.dumps(str(root / "repos"))}
        mirror-scheme = "http"
        mirror-netloc = "127.0.0.1:{port}"
        mirror-lfs-netloc = "127.0.0.1:{port}"
        mirrors-path = [{json.dumps(str(mirrors))}]

        [accessibility]
        offline = true
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(root / "hf-home")
    log = open(root / "olah.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "olah.server", "--config", str(cfg), "--log-path",
                             str(root / "logs")], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"olah exited with {proc.returncode}:\n{(root / 'olah.log').read_text()[-3000:]}")
            try:  # offline, olah knows its local mirrors only by revision: /api/models/<id> alone is a 401
                with urllib.request.urlopen(f"{url}/api/models/{TIMM_REPO}/revision/main", timeout=2) as r:
                    assert json.load(r)["id"] == TIMM_REPO
                break
            except urllib.error.HTTPError as e:
                pytest.fail(f"olah answered {e.code}: {e.read()[:500]!r}\n{(root / 'olah.log').read_text()[-3000:]}")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"olah did not answer in 60 s:\n{(root / 'olah.log').read_text()[-3000:]}")
                time.sleep(0.2)
        yield url, root / "olah.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


CHILD = """
import hashlib, json, sys
from pathlib import Path

import torch
import hf_vq, timm, transformers
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file

timm_repo, tf_repo, expected_path, out_path = sys.argv[1:]
exp = load_file(expected_path)
out, report = {}, {}
with torch.no_grad():
    m = timm.create_model(f"hf-hub:{timm_repo}", pretrained=True).eval()
    out["timm_out"] = m(exp["timm_x"])
    report["timm_vq_modules"] = len(hf_vq.vq_modules(m))
    t = transformers.AutoModel.from_pretrained(tf_repo).eval()
    out["tf_out"] = t(input_ids=exp["tf_ids"]).last_hidden_state
    report["tf_vq_modules"] = len(hf_vq.vq_modules(t))
    report["tf_class"] = type(t).__name__
for repo in (timm_repo, tf_repo):
    folder = Path(snapshot_download(repo))
    report[repo] = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in folder.rglob("*") if p.is_file()}
    report[repo + "@"] = folder.name  # the commit the files were served at
save_file({k: v.contiguous() for k, v in out.items()}, out_path)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def via_olah(mirrored, olah_url, tmp_path_factory):
    """Load both repos through olah in a fresh process: no token, a fresh HF_HOME, HF_ENDPOINT = olah."""
    _, expected_path, _ = mirrored
    olah_url, _ = olah_url
    root = tmp_path_factory.mktemp("olah-client")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=olah_url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(root / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", CHILD, TIMM_REPO, TF_REPO, str(expected_path),
                             str(root / "out.safetensors")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), load_file(root / "out.safetensors"), \
        load_file(expected_path)


def test_timm_model_through_olah_is_bit_identical(via_olah):
    report, out, expected = via_olah
    assert report["timm_vq_modules"] > 0
    assert torch.equal(out["timm_out"], expected["timm_out"])


def test_transformers_model_through_olah_is_bit_identical(via_olah):
    report, out, expected = via_olah
    assert report["tf_class"] == "GPT2Model" and report["tf_vq_modules"] > 0
    assert torch.equal(out["tf_out"], expected["tf_out"])


def test_snapshot_through_olah_has_the_pushed_bytes(mirrored, olah_url, via_olah, hub):
    mirrors, _, hub_files = mirrored
    report = via_olah[0]
    for repo_id in (TIMM_REPO, TF_REPO):
        assert {"config.json", "model.safetensors", "README.md"} <= set(report[repo_id])
        assert report[repo_id] == hub_files[repo_id], repo_id
        # served by olah from the mirror's git commit, not by the loopback Hub (whose commit ids differ)
        mirror_head = _git(mirrors / "models" / repo_id, "rev-parse", "HEAD").strip()
        assert report[repo_id + "@"] == mirror_head != hub.repos[repo_id].commits[-1][0]
    log = olah_url[1].read_text()
    assert f'"GET /{TIMM_REPO}/resolve/' in log and f'"GET /{TF_REPO}/resolve/' in log
    assert " 500 " not in log, log
