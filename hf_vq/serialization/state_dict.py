"""The one builder of what a compressed model writes: its state dict as stored, and how tied tensors group."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VQConfig
from ..nn import dense_dtype_of, stored_form
from .format import CODEBOOKS, CODES, SCALES, is_shared_codebooks_key

__all__ = ["storage_groups", "disk_state_dict"]


def _identity(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def storage_groups(state_dict: dict[str, torch.Tensor]) -> list[list[str]]:
    """Keys that hold the very same tensor (same storage, offset and shape: tied weights), grouped in key order."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state_dict.items():
        groups.setdefault(_identity(tensor), []).append(key)
    return list(groups.values())


def disk_state_dict(model: nn.Module, config: VQConfig | None = None, *, dedupe: bool = True,
                    to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The tensors a compressed model writes: codebooks and scales in fp16, the tensors left dense in the recipe's
    `dense_dtype` where they hold its values exactly ([`hf_vq.nn.storage.stored_form`]), each tied or shared tensor
    once.

    Args:
        model (`nn.Module`): the compressed model.
        config ([`VQConfig`], *optional*): its layout (default `model.vq_config`): tied modules and members of a
            shared codebook set write none of their own codes / codebooks (the owner's or the set's key holds them).
        dedupe (`bool`, defaults to `True`): also keep other tied tensors (same storage) once, under their first
            key; transformers does this itself (its tied-weights keys), so its saver passes `False`.
        to_cpu (`bool`, defaults to `True`): detached contiguous CPU tensors (what safetensors writes).

    Returns:
        `dict[str, torch.Tensor]`: in the model's own key order.
    """
    config = getattr(model, "vq_config", None) if config is None else config
    dense = dense_dtype_of(config) or dense_dtype_of(getattr(model, "vq_config", None))
    layouts = config.layouts if config is not None else {}
    skip = {f"{name}.{suffix}" for name, layout in layouts.items() if layout.tied_to is not None
            for suffix in (CODES, CODEBOOKS, SCALES)}
    skip |= {f"{name}.{CODEBOOKS}" for name, layout in layouts.items() if layout.codebook_set is not None}
    state = model.state_dict()
    seen: set[tuple] = set()
    narrowed: dict[tuple, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    ordered = sorted(state.items(), key=lambda item: not is_shared_codebooks_key(item[0]))  # shared sets win
    for key, tensor in ordered:
        if key in skip:
            continue
        if dedupe:
            ident = _identity(tensor)
            if ident in seen:
                continue
            seen.add(ident)
        if tensor.is_floating_point() and (key.endswith((f".{CODEBOOKS}", f".{SCALES}")) or is_shared_codebooks_key(key)):
            tensor = tensor.to(torch.float16)  # [M, k, d] / [rows]; quantize_ already rounded them to fp16
        else:  # 16 bits where exact (Recipe.dense_dtype), else as held; tied keys keep one tensor
            ident = _identity(tensor)
            if ident not in narrowed:
                narrowed[ident] = stored_form(tensor, dense)
            tensor = narrowed[ident]
        out[key] = tensor.detach().to("cpu").contiguous() if to_cpu else tensor
    return {key: out[key] for key in state if key in out}
