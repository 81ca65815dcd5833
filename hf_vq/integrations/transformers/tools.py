"""The transformers objects hf_vq's applications (CLI, fine-tuning, evaluation) need, so that only this package
imports transformers: tokenizers, image processors, collators, schedulers."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

__all__ = ["is_transformers_model", "load_tokenizer", "load_image_processor", "padding_collator", "get_scheduler"]


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
