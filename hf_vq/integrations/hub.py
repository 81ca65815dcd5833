"""Hub-facing helpers: resolving a model reference to a local folder, and rendering model cards."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..checkpoint import SizeReport
from ..config import VQConfig

logger = logging.getLogger(__name__)


class HubUploadError(RuntimeError):
    """An upload to the Hub that failed after its retries; the local folder is left intact."""

__all__ = ["resolve_model_dir", "detect_library", "render_model_card", "base_model_license", "compression_summary", "upload_folder", "HubUploadError"]

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


def base_model_license(base_model: str | None, source_dir: str | os.PathLike | None = None) -> str | None:
    """The `license` in the dense model's card metadata, or None when it cannot be read.

    Looks at `source_dir/README.md` first, then the Hub cache, then the Hub (unless offline). Never raises:
    a card without a licence is better than no card.
    """
    candidates: list[Path] = []
    if source_dir is not None:
        candidates.append(Path(source_dir) / "README.md")
    if base_model and os.path.isdir(base_model):
        candidates.append(Path(base_model) / "README.md")
    elif base_model:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "README.md")
        if isinstance(cached, str):
            candidates.append(Path(cached))
        elif not constants.HF_HUB_OFFLINE:
            from huggingface_hub import HfApi

            try:  # one metadata request, no retries: offline or unknown repos fail fast
                license = getattr(HfApi().model_info(base_model, timeout=5).card_data, "license", None)
            except Exception as err:  # unknown repo, no network, gated...: no licence to inherit
                logger.debug("hf_vq: no model card for %s (%s)", base_model, err)
                license = None
            if license:
                return str(license)
    for path in candidates:
        if path.is_file():
            try:
                license = ModelCard.load(path).data.to_dict().get("license")
            except Exception:  # a malformed card: ignore it
                continue
            if license:
                return str(license)
    return None


def compression_record(model: Any) -> dict[str, Any]:
    """What `quantize_` recorded on `model` about how it ran, as [`render_model_card`] arguments: the permutation
    report and whether k-means was weighted by calibration data (both absent on a reloaded model)."""
    return {"permutation": getattr(model, "vq_permutation_report", None),
            "kmeans_weighted": getattr(model, "vq_kmeans_weighted", None)}


def compression_summary(config: VQConfig | None, size: SizeReport, permutation: Any = None,
                        kmeans_weighted: bool | None = None) -> list[tuple[str, str]]:
    """Rows (field, value) describing how a model was compressed, for cards and reports."""
    layers = [layer for layer in size.layers if layer.compressed_bits]
    compressed_weights = sum(math.prod(layer.shape) for layer in layers)
    rows: list[tuple[str, str]] = []
    method = getattr(config, "method", "pq") if config is not None else "pq"
    codebooks = sorted({layer.num_codebooks for layer in size.layers}) or [1]
    if method == "aq":
        rows.append(("method", f"additive quantization, {'/'.join(map(str, codebooks))} codebooks per subvector "
                               "(Sun et al. 2021)"))
    else:
        rows.append(("method", "product quantization with k-means codebooks (PQF, Martinez et al. 2021)"))
    share = getattr(config, "share", None) if config is not None else None
    rows.append(("codebook sharing", {None: "per layer", "layer": "per layer", "pool": "per pool of layers with the same d",
                                      "global": "one set for the whole network"}.get(share, str(share))))
    rows.append(("k (codewords per codebook)", _values(layer.k for layer in size.layers)))
    rows.append(("d (subvector length)", _values(layer.d for layer in size.layers)))
    rows.append(("compressed layers", f"{len(size.layers)}"))
    if compressed_weights:
        bits = sum(layer.compressed_bits for layer in layers) / compressed_weights
        rows.append(("bits per weight (compressed layers)", f"{bits:.3f}"))
    if permutation is not None and getattr(permutation, "traced", False):
        rows.append(("permutation", f"{len(permutation.permuted)} of {len(permutation.spaces)} channel spaces permuted "
                                    f"({len(permutation.refused)} refused; "
                                    f"{getattr(permutation, 'objective', 'weights')} objective)"))
    elif permutation is not None:
        rows.append(("permutation", f"skipped ({permutation.reason})"))
    elif config is not None:
        rows.append(("permutation", "on" if getattr(config, "permute", False) else "off"))
    if config is not None:
        weighted = kmeans_weighted  # recorded by quantize_; else (a reloaded model) read off the permutation step
        if weighted is None:
            weighted = getattr(permutation, "objective", None) == "activation-aware" and method == "pq"
        rows.append(("k-means", f"{'annealed' if config.anneal else 'Lloyd'}, {config.n_iter} iterations"
                                + (", weighted by the input channels' second moments (calibration data)" if weighted else "")))
    return rows


def _values(values) -> str:
    unique = sorted(set(values))
    return ", ".join(map(str, unique)) if unique else "-"


def render_model_card(
    *,
    base_model: str | None,
    library_name: str,
    size: SizeReport,
    config: VQConfig | None = None,
    config_spec: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    metrics: dict[str, Any] | None = None,
    fidelity: dict[str, Any] | None = None,
    extra_tags: list[str] | None = None,
    permutation: Any = None,
    kmeans_weighted: bool | None = None,
    eval_dataset: dict[str, str] | None = None,
    task_type: str | None = None,
    source_dir: str | os.PathLike | None = None,
    finetuning: dict[str, Any] | None = None,
) -> ModelCard:
    """Render the model card of a compressed model from the Jinja template in `model_cards/`.

    Args:
        base_model (`str`, *optional*): Hub id (or folder) of the dense model; recorded as `base_model`
            with `base_model_relation: quantized`.
        library_name (`str`): `"transformers"` or `"timm"`; picks the loading snippet.
        size ([`SizeReport`]): the accounted sizes (per-layer table and totals).
        config ([`VQConfig`], *optional*): the filled config; gives the method, sharing, k-means settings.
        config_spec (`str`, *optional*): the scheme name; defaults to `config.spec`.
        repo_id (`str`, *optional*): the Hub repo, for the title and the loading snippet.
        license (`str`, *optional*): licence of the weights; by default inherited from the base model's card
            (see [`base_model_license`]).
        metrics (`dict`, *optional*): task metrics (e.g. `{"accuracy": 0.91}`); with `eval_dataset` they also go
            into the `model-index` metadata.
        fidelity (`dict`, *optional*): agreement with the dense model (cosine, top-1 agreement, KL...).
        extra_tags (`list[str]`, *optional*): more tags.
        permutation ([`~hf_vq.PermutationReport`], *optional*): what the permutation step did.
        kmeans_weighted (`bool`, *optional*): whether k-means was weighted by calibration data (`quantize_` records
            it as `model.vq_kmeans_weighted`); when unknown, inferred from the permutation's objective.
        eval_dataset (`dict`, *optional*): `{"name": ..., "type": ..., "split": ...}` of the data the metrics
            were measured on.
        task_type (`str`, *optional*): task of the `model-index` entry (default: image-classification for timm,
            feature-extraction for transformers).
        source_dir (`str` or `os.PathLike`, *optional*): the dense model's local folder (licence lookup).
        finetuning (`dict`, *optional*): how the codebooks were fine-tuned (data, steps, ...), listed in the card.

    Returns:
        `huggingface_hub.ModelCard`: the card; `.save(folder / "README.md")` writes it.
    """
    if license is None:
        license = base_model_license(base_model, source_dir)
    repo_id = repo_id or "<your-org>/<this-repo>"
    task_type = task_type or ("image-classification" if library_name == "timm" else "feature-extraction")
    eval_results = None
    numeric = {key: value for key, value in (metrics or {}).items() if isinstance(value, (int, float))}
    if eval_dataset and numeric:
        from huggingface_hub import EvalResult

        eval_results = [
            EvalResult(task_type=task_type, dataset_type=eval_dataset.get("type", eval_dataset["name"]),
                       dataset_name=eval_dataset["name"], dataset_split=eval_dataset.get("split"),
                       metric_type=key, metric_value=value)
            for key, value in numeric.items()
        ]
    hub_base = base_model if base_model and not os.path.isdir(base_model) else None  # a local folder is no Hub id
    card_data = ModelCardData(
        base_model=hub_base,
        base_model_relation="quantized" if hub_base else None,
        library_name=library_name,
        license=license,
        tags=["hf_vq", "vector-quantization", "pqf", "compressed", *(extra_tags or [])],
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
        pipeline_tag=task_type if library_name == "timm" else None,
    )
    template = _template_text(TEMPLATE)
    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        base_model=hub_base,
        library_name=library_name,
        spec=config_spec or (config.spec if config is not None else "?"),
        size=size,
        summary=compression_summary(config, size, permutation, kmeans_weighted),
        metrics=metrics or {},
        fidelity=fidelity or {},
        finetuning=finetuning or {},
        eval_dataset=eval_dataset,
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
