"""Calibration inputs as `(args, kwargs)` batches, whatever form the user gave them in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["as_args_kwargs", "calibration_batches", "to_device"]


def as_args_kwargs(inputs: Any) -> tuple[tuple, dict]:
    """Model inputs as `(args, kwargs)`: a tensor, a mapping (a dict, transformers' `BatchEncoding`), a tuple or
    list of positional inputs, or `(args, kwargs)` itself.

    Raises:
        `TypeError`: naming the type that is none of these.
    """
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):  # a dict or transformers' BatchEncoding
        return (), dict(inputs)
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple) and isinstance(inputs[1], dict):
        return inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"model inputs must be a tensor, a tuple of positional inputs, a dict of keyword inputs, "
                    f"or (args, kwargs); got {type(inputs).__name__}.")


def calibration_batches(calibration: Any) -> list[tuple[tuple, dict]]:
    """`(args, kwargs)` per batch: one tensor or mapping is one batch; a list or tuple holds several.

    Raises:
        `TypeError`: if `calibration` is empty or of another type.
    """
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [as_args_kwargs(calibration)]
    if isinstance(calibration, (list, tuple)) and calibration:
        return [as_args_kwargs(batch) for batch in calibration]
    raise TypeError("calibration must be a batch (a tensor or a dict of model inputs) or a non-empty list of batches.")


def token_mask(kwargs: dict) -> torch.Tensor | None:
    """Which tokens of a text batch are real: its `attention_mask` `[batch, seq]` as booleans (padding False), or
    None when the batch has no 2-D mask (images, unpadded inputs)."""
    mask = kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings `[batch, hidden]`: mean of `last_hidden_state [batch, seq, hidden]` over the mask
    `[batch, seq]` (over every token when it is None)."""
    if attention_mask is None:
        return last_hidden_state.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # [batch, seq, 1]
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def to_device(value: Any, device: torch.device) -> Any:
    """`value` on `device` when it is a tensor, else unchanged."""
    return value.to(device) if isinstance(value, torch.Tensor) else value
