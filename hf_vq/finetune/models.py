"""Resolving the models of a fine-tuning run: the compressed student, its dense teacher, where their assets are."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..integrations.cards import card_base_model
from ..integrations.hub import detect_library, resolve_model_dir
from ..serialization import CheckpointError, record_of, weight_files

__all__ = ["load_model", "default_teacher", "library_of", "asset_dirs"]


def load_model(ref: str, *, revision: str | None = None) -> tuple[nn.Module, str, Path]:
    """Load a model (compressed or dense, timm or transformers) from a folder or a Hub repo id.

    Returns:
        `(model, library, folder)`: `library` is `"timm"` or `"transformers"`, `folder` the local copy.

    Raises:
        `FileNotFoundError`: `ref` is neither a folder nor a reachable Hub repo.
    """
    folder = resolve_model_dir(ref, revision=revision)
    library = detect_library(folder)
    if library == "timm":
        from ..integrations.timm import load_dense as load_timm

        model = load_timm(str(folder))
    else:
        from ..integrations.transformers import load_dense

        model = load_dense(folder)  # compressed folders load through hf_vq's registered quantizer
    return model, library, Path(folder)


def default_teacher(folder: str | os.PathLike) -> str | None:
    """The dense model a compressed folder records as its origin, or `None`.

    Looked up in order: `config.json` (`base_model`, `quantization_config.base_model`, transformers'
    `_name_or_path`), the compression record in the weights' metadata, and the model card's `base_model` metadata. Only a reference that exists (a folder) or
    looks like a Hub repo id (`org/name`) is returned.
    """
    folder = Path(folder)
    candidates: list[Any] = []
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        candidates += [config.get("base_model"), (config.get("quantization_config") or {}).get("base_model"),
                       config.get("_name_or_path")]
    try:
        record = record_of(weight_files(folder)[0])
    except CheckpointError:
        record = None
    if record is not None:
        candidates.append(record.base_model)
    card_base = card_base_model(folder / "README.md")
    candidates += card_base if isinstance(card_base, list) else [card_base]
    for ref in candidates:
        if not isinstance(ref, str) or not ref:
            continue
        if Path(ref).is_dir() and Path(ref).resolve() != folder.resolve():
            return ref
        if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith((".", "/")):
            return ref
    return None


def asset_dirs(student_dir: Path | None, teacher_dir: Path | None, *models: nn.Module) -> list[Path]:
    """Folders that may hold the tokenizer / image processor: the models' own, then where in-memory transformers
    models were loaded from (`name_or_path`)."""
    dirs = [d for d in (student_dir, teacher_dir) if d is not None]
    for model in models:
        path = getattr(model, "name_or_path", None)
        if isinstance(path, str) and path and Path(path).is_dir():
            dirs.append(Path(path))
    return dirs


def library_of(model: nn.Module) -> str:
    """`"transformers"` for a transformers `PreTrainedModel`, else `"timm"`."""
    from ..integrations.transformers.tools import is_transformers_model

    return "transformers" if is_transformers_model(model) else "timm"
