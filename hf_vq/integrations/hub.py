"""Hub-facing helpers: resolving a model reference to a local folder, and rendering model cards."""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..checkpoint import SizeReport

logger = logging.getLogger(__name__)


class HubUploadError(RuntimeError):
    """An upload to the Hub that failed after its retries; the local folder is left intact."""

__all__ = ["resolve_model_dir", "detect_library", "render_model_card", "upload_folder", "HubUploadError"]

TEMPLATE = "hf_vq_model_card.md.j2"


def detect_library(folder: str | os.PathLike) -> str:
    """`"timm"` or `"transformers"` from a model folder's config.json (timm's `save_for_hf` writes `architecture`)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a timm or transformers model folder.")
    config = json.loads(path.read_text())
    if "architecture" in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    raise ValueError(
        f"{path} has neither 'architecture' (timm) nor 'model_type' (transformers); hf-vq cannot tell which "
        "library the model belongs to."
    )


def resolve_model_dir(ref: str, *, revision: str | None = None) -> Path:
    """A local folder for `ref`: the folder itself, or a snapshot of the Hub repo `ref` (`org/name`)."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(ref, revision=revision))
    except HFValidationError:
        raise FileNotFoundError(f"{ref!r} is neither a folder nor a valid Hub repo id (org/name).") from None
    except Exception as err:  # offline, unknown repo, auth...
        raise FileNotFoundError(f"Could not find a folder or download the Hub repo {ref!r}: {err}") from None


def _template_text(name: str) -> str:
    """A template of `model_cards/`: installed as the `hf_vq.model_cards` package data, or the source tree's."""
    try:
        return resources.files("hf_vq.model_cards").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[2] / "model_cards" / name).read_text()


def render_model_card(
    *,
    base_model: str | None,
    library_name: str,
    config_spec: str,
    size: SizeReport,
    repo_id: str | None = None,
    license: str | None = None,
    metrics: dict[str, Any] | None = None,
    fidelity: dict[str, Any] | None = None,
    extra_tags: list[str] | None = None,
) -> ModelCard:
    """Render the model card of a compressed model from the Jinja template in `model_cards/`."""
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        library_name=library_name,
        license=license,
        tags=["hf_vq", "vector-quantization", "pqf", "compressed", *(extra_tags or [])],
    )
    template = _template_text(TEMPLATE)
    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id or "<your-org>/<this-repo>",
        base_model=base_model,
        library_name=library_name,
        spec=config_spec,
        size=size,
        metrics=metrics or {},
        fidelity=fidelity or {},
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of huggingface_hub's HTTP client (httpx2 in hub 2.x, httpx before)."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def upload_folder(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None,
                  private: bool | None = None, revision: str | None = None,
                  commit_message: str = "Add hf_vq-compressed model", create_pr: bool = False,
                  endpoint: str | None = None, retries: int = 3, backoff_s: float = 1.0):
    """Create `repo_id` if needed and upload `folder` to it in one commit, retrying on network failures.

    A commit is all or nothing on the Hub, so retrying a dropped upload is safe. `folder` is only read.

    Args:
        folder: the local model folder to upload (e.g. one written by `save_compressed`).
        repo_id: `org/name` on the Hub (or the server at `endpoint`).
        token: a Hub token; `None` uses the logged-in one.
        private: create the repo private (ignored if it exists).
        retries: attempts before giving up on connection errors (refused, dropped mid-upload, timeout).

    Returns:
        `huggingface_hub.CommitInfo` of the upload.

    Raises:
        [`HubUploadError`]: the server could not be reached or dropped every attempt; names the
            endpoint, the repo and the local folder (intact), and how to retry.
        `huggingface_hub.errors.HfHubHTTPError`: the server refused the request (e.g. a wrong token).
    """
    from huggingface_hub import HfApi

    from .. import __version__

    api = HfApi(endpoint=endpoint, token=token, library_name="hf_vq", library_version=__version__)
    last: Exception | None = None
    for attempt in range(1, max(1, retries) + 1):
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=commit_message, create_pr=create_pr)
        except _transport_errors() as err:  # refused, reset, dropped mid-upload, timeout
            last = err
            logger.warning("hf_vq: upload of %s to %s failed (attempt %d/%d): %s", folder, repo_id, attempt,
                           retries, err)
            if attempt < retries:
                time.sleep(backoff_s * 2 ** (attempt - 1))
    raise HubUploadError(
        f"Could not upload {folder} to {api.endpoint}/{repo_id} after {retries} attempts ({type(last).__name__}: "
        f"{last}). Nothing was committed and the local folder is intact; check the network or HF_ENDPOINT and run "
        f"the upload again (e.g. `hf upload {repo_id} {folder}`)."
    ) from last
