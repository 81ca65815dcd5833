"""Hub-facing helpers: resolving a model reference to a local folder, telling its library, and uploading folders."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..serialization.folder import MANIFEST_NAME

logger = logging.getLogger(__name__)


class HubUploadError(RuntimeError):
    """An upload to the Hub that failed after its retries; the local folder is left intact."""

__all__ = ["resolve_model_dir", "detect_library", "upload_folder", "HubUploadError"]


def detect_library(folder: str | os.PathLike) -> str:
    """`"timm"` or `"transformers"` from a model folder's config.json (timm's `save_for_hf` writes `architecture`)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a timm or transformers model folder.")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or re-download it.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; fix or re-download it.")
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
                  endpoint: str | None = None, retries: int = 3, backoff_s: float = 1.0,
                  commit_description: str | None = None):
    """Create `repo_id` if needed and upload `folder` to it in one commit, retrying on network failures.

    A commit is all or nothing on the Hub, so retrying a dropped upload is safe. `folder` is only read; hf_vq's list
    of the files it wrote (`.hf_vq.json`) stays local.

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
                                     commit_message=commit_message, commit_description=commit_description,
                                     create_pr=create_pr, ignore_patterns=[MANIFEST_NAME])
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
