"""Hub round trips over real HTTP: the real `huggingface_hub` client against a loopback Hub server.

`tests/conftest.py` starts the server (tests/hub_server.py) and points `HF_ENDPOINT` at it before
huggingface_hub is imported; nothing in the client is patched.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

import hf_vq
from hf_vq.integrations.hub import HubUploadError, upload_folder

timm = pytest.importorskip("timm")
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError  # noqa: E402

from hf_vq.integrations.timm import fit_config, push_to_hub, save_compressed  # noqa: E402

ALICE, BOB = "hf_alice_write_token", "hf_bob_write_token"


def _repo(name: str) -> str:
    return f"alice/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    hf_vq.quantize_(model, fit_config(model, hf_vq.VQConfig(k=16, n_iter=2, permute=False)), progress=False)
    return model


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def test_timm_push_then_create_model_hf_hub(timm_model, x, hub):
    repo_id = _repo("resnet-vq")
    info = push_to_hub(timm_model, repo_id, token=ALICE, base_model="timm/test_resnet.r160_in1k", license="apache-2.0")
    assert info.oid == hub.repos[repo_id].commits[-1][0]
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files(repo_id))
    loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), timm_model(x))
    folder = Path(snapshot_download(repo_id))
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "hf_vq"
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x).equal(loaded(x))


def test_private_repo_needs_the_right_token(timm_model, x, hub, tmp_path):
    repo_id = _repo("private-vq")
    push_to_hub(timm_model, repo_id, token=ALICE, private=True)
    assert hub.repos[repo_id].private
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "config.json", token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(HfHubHTTPError, match="401|Invalid credentials"):
        hf_hub_download(repo_id, "config.json", token="hf_not_a_token", cache_dir=tmp_path / "wrong")
    with pytest.raises(RepositoryNotFoundError):  # another user's token does not see it either
        hf_hub_download(repo_id, "config.json", token=BOB, cache_dir=tmp_path / "bob")
    path = hf_hub_download(repo_id, "model.safetensors", token=ALICE, cache_dir=tmp_path / "alice")
    assert Path(path).stat().st_size == len(hub.files(repo_id)["model.safetensors"])


def test_wrong_token_cannot_push(timm_model, hub):
    repo_id = _repo("refused")
    with pytest.raises(HfHubHTTPError, match="401|Invalid credentials"):
        push_to_hub(timm_model, repo_id, token="hf_not_a_token")
    assert repo_id not in hub.repos
    push_to_hub(timm_model, repo_id, token=ALICE)
    with pytest.raises(HfHubHTTPError, match="403|rights"):  # bob cannot write to alice's repo
        upload_folder(Path(__file__).parent, repo_id, token=BOB, retries=1)


def test_dropped_upload_is_retried(timm_model, x, hub, caplog):
    repo_id = _repo("flaky")
    hub.drop_next_commits = 1  # the server closes the connection mid-commit once
    push_to_hub(timm_model, repo_id, token=ALICE)
    assert hub.drop_next_commits == 0
    assert "attempt 1/3" in caplog.text
    loaded = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), timm_model(x))


def test_upload_that_keeps_failing_is_a_clear_error_and_leaves_folder_intact(timm_model, hub, tmp_path):
    folder = save_compressed(timm_model, tmp_path / "vq")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    repo_id = _repo("down")
    hub.drop_next_commits = 3
    try:
        with pytest.raises(HubUploadError, match=rf"{repo_id}.*after 3 attempts.*local folder is intact"):
            upload_folder(folder, repo_id, token=ALICE, backoff_s=0.01)
    finally:
        hub.drop_next_commits = 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert set(hub.files(repo_id)) == {".gitattributes"}  # nothing half-committed


def test_connection_refused_is_a_clear_error(timm_model, tmp_path):
    from hub_server import HubServer

    dead = HubServer()  # bound, never started: connections are refused
    endpoint = dead.endpoint
    dead.stop()
    folder = save_compressed(timm_model, tmp_path / "vq")
    with pytest.raises(HubUploadError, match=rf"{endpoint}.*after 2 attempts"):
        upload_folder(folder, "alice/nowhere", token=ALICE, endpoint=endpoint, retries=2, backoff_s=0.01)
    assert (folder / "model.safetensors").is_file()


def test_model_card_on_the_hub(timm_model, hub):
    repo_id = _repo("card")
    push_to_hub(timm_model, repo_id, token=ALICE, base_model="timm/test_resnet.r160_in1k",
                fidelity={"top-1 agreement with the dense model": 0.5},
                metrics={"accuracy": 0.875}, eval_dataset={"name": "Fashion-MNIST", "type": "fashion_mnist", "split": "test"})
    card = ModelCard.load(repo_id)
    data = card.data.to_dict()
    assert data["base_model"] == "timm/test_resnet.r160_in1k"
    assert data["base_model_relation"] == "quantized"
    assert data["library_name"] == "timm"
    assert data["license"] == "apache-2.0"  # inherited: timm records the weights' licence in pretrained_cfg
    assert {"hf_vq", "vector-quantization"} <= set(data["tags"])
    (result,) = card.data.eval_results  # model-index from the metrics and their dataset
    assert (result.dataset_name, result.dataset_split, result.metric_type, result.metric_value) == \
        ("Fashion-MNIST", "test", "accuracy", 0.875)
    text = card.text
    assert f'timm.create_model("hf-hub:{repo_id}", pretrained=True)' in text
    assert "top-1 agreement with the dense model: 0.5" in text and "accuracy: 0.875" in text
    assert "| method | product quantization with k-means codebooks" in text
    assert "| codebook sharing | per layer |" in text and "| permutation | off |" in text
    assert "| k (codewords per codebook) | " in text and "| d (subvector length) | " in text
    assert "Permute, Quantize, and Fine-tune" in text and "2111.10320" in text
    size = hf_vq.size_report(timm_model)
    assert f"{size.ratio:.1f}×" in text
    bits = [line for line in text.splitlines() if line.startswith("| bits per weight")]
    assert bits and 0 < float(bits[0].split("|")[2]) < 32


def test_model_card_licence_from_the_dense_folder(tmp_path):
    from hf_vq.integrations.cards import render_model_card

    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "README.md").write_text("---\nlicense: mit\n---\n# a dense model\n")
    card = render_model_card(base_model="org/dense", library_name="transformers", size=hf_vq.SizeReport(),
                             source_dir=dense)
    assert card.data.license == "mit"
    explicit = render_model_card(base_model="org/dense", library_name="transformers", size=hf_vq.SizeReport(),
                                 source_dir=dense, license="apache-2.0")
    assert explicit.data.license == "apache-2.0"


def _push_files(repo_id: str, files: dict[str, bytes]) -> None:
    from huggingface_hub import CommitOperationAdd

    api = HfApi(token=ALICE)
    api.create_repo(repo_id, exist_ok=True)
    api.create_commit(repo_id, [CommitOperationAdd(name, data) for name, data in files.items()], commit_message="raw")


def test_corrupted_weights_on_the_hub_are_a_clear_error(timm_model, tmp_path):
    folder = save_compressed(timm_model, tmp_path / "vq")
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[8:40] = b"\x00" * 32  # smash the safetensors header
    repo_id = _repo("corrupted")
    _push_files(repo_id, {"config.json": (folder / "config.json").read_bytes(), "model.safetensors": bytes(weights)})
    with pytest.raises(hf_vq.CheckpointError, match=r"model\.safetensors is truncated or corrupted.*Re-download"):
        timm.create_model(f"hf-hub:{repo_id}", pretrained=True)


def test_newer_format_version_on_the_hub_is_refused(timm_model, tmp_path):
    folder = save_compressed(timm_model, tmp_path / "vq")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = hf_vq.FORMAT_VERSION + 1
    repo_id = _repo("future")
    _push_files(repo_id, {"config.json": json.dumps(config).encode(),
                          "model.safetensors": (folder / "model.safetensors").read_bytes()})
    with pytest.raises(ValueError, match=r"format_version.*upgrade hf_vq"):
        timm.create_model(f"hf-hub:{repo_id}", pretrained=True)


class _Boom:
    """Unpickling this runs `touch <marker>`: the test fails if any loader unpickles the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_weights_are_never_unpickled(timm_model, tmp_path):
    import io
    import pickle

    folder = save_compressed(timm_model, tmp_path / "vq")
    marker = tmp_path / "unpickled"
    buffer = io.BytesIO()
    pickle.dump(_Boom(str(marker)), buffer)
    repo_id = _repo("pickled")
    _push_files(repo_id, {"config.json": (folder / "config.json").read_bytes(), "pytorch_model.bin": buffer.getvalue()})
    with pytest.raises(Exception, match="safetensors"):
        timm.create_model(f"hf-hub:{repo_id}", pretrained=True)
    assert not marker.exists()
