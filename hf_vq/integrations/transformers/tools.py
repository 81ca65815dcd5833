"""The transformers objects hf_vq's applications (CLI, fine-tuning, evaluation) need, so that only this package
imports transformers: tokenizers, image processors, collators, schedulers."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ...calibrate.sources import calibration_texts, tokenize_batches

__all__ = ["is_transformers_model", "load_tokenizer", "load_image_processor", "padding_collator", "get_scheduler",
           "calibration_from_config", "sentence_embedding_outputs"]


def sentence_embedding_outputs(folder: str | os.PathLike) -> tuple[str, ...] | None:
    """The model outputs a sentence-transformers folder uses: `("last_hidden_state:mean",)` when its `modules.json`
    mean-pools the token states of the transformers model at the folder's root (its `Pooling` config has only
    `pooling_mode_mean_tokens`), `("last_hidden_state",)` for another pooling (BERT's `pooler_output` is then never
    read), else None (not a sentence-transformers folder, or one whose first module is elsewhere)."""
    import json
    from pathlib import Path

    try:
        modules = json.loads((Path(folder) / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(modules, list):
        return None
    root = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("models.Transformer")
            and m.get("path", "") in ("", ".")]
    pooling = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("models.Pooling")]
    if not (root and pooling):
        return None
    try:
        mode = json.loads((Path(folder) / str(pooling[0].get("path", "")) / "config.json").read_text())
    except (OSError, ValueError):
        mode = {}
    mean_only = isinstance(mode, dict) and mode.get("pooling_mode_mean_tokens") is True and not any(
        mode.get(key) for key in mode if key.startswith("pooling_mode_") and key != "pooling_mode_mean_tokens")
    return ("last_hidden_state:mean",) if mean_only else ("last_hidden_state",)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel`."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """`AutoTokenizer.from_pretrained(folder)`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_image_processor(folder: str | os.PathLike) -> Any:
    """`AutoImageProcessor.from_pretrained(folder)`."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def padding_collator(tokenizer: Any) -> Any:
    """transformers' `DataCollatorWithPadding` for `tokenizer`."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def get_scheduler(name: str, *, optimizer: Any, num_warmup_steps: int, num_training_steps: int) -> Any:
    """transformers' learning-rate scheduler `name` (`"cosine"`, `"linear"`, ...)."""
    from transformers import get_scheduler as _get_scheduler

    return _get_scheduler(name, optimizer=optimizer, num_warmup_steps=num_warmup_steps,
                          num_training_steps=num_training_steps)


def calibration_from_config(config: Any, model_ref: str | None, *, model: Any = None, batch_size: int = 32,
                            max_length: int = 128, samples: int = 256) -> list[dict] | None:
    """Calibration batches for quantize-on-load from `VQConfig(dataset=..., tokenizer=...)`, as transformers'
    `GPTQConfig` takes them: `dataset` a list of texts, a text file (any suffix) or a 🤗 Datasets name; `tokenizer`
    an object, or a folder / Hub id (default: the model being loaded). None when no dataset is given.

    Raises:
        `ValueError`: if a tokenizer cannot be found for a dataset, naming the field and the fix.
    """
    dataset = getattr(config, "dataset", None)
    if dataset is None:
        return None
    tokenizer = getattr(config, "tokenizer", None) or model_ref
    if tokenizer is None:
        raise ValueError("VQConfig(dataset=...) needs a tokenizer: pass VQConfig(tokenizer=...) (an object, folder "
                         "or Hub id).")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(dataset, str):
        texts = calibration_texts(samples, dataset)
    elif isinstance(dataset, (list, tuple)) and all(isinstance(t, str) for t in dataset):
        texts = list(dataset)
    else:
        raise ValueError(f"VQConfig.dataset must be a list of texts, a text file or a 🤗 Datasets name; got "
                         f"{type(dataset).__name__}.")
    return tokenize_batches(tokenizer, texts, model=model, batch_size=batch_size, max_length=max_length)
