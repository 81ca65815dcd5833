"""Hub-facing helpers: resolving a model reference to a local folder, and rendering model cards."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..checkpoint import SizeReport

__all__ = ["resolve_model_dir", "detect_library", "render_model_card"]

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
