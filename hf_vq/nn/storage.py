"""The 16-bit values a compressed model holds so that its weights file can store them at 16 bits, bit for bit.

Codebooks and per-channel scales are always stored in fp16; the floating-point tensors that stay dense (norms,
biases, BatchNorm statistics, position tables, layers left uncompressed) are stored in `Recipe.dense_dtype` when it
is set. The model keeps computing in its own dtype, so each of these tensors is *rounded* to the narrower dtype's
values in place ([`round_to_storage_`]: after compression, after block tuning, after fine-tuning), and the saver casts
a tensor only when that cast is exact ([`stored_form`]), so no save ever loses a bit of what the model computes with.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

import torch
from torch import nn

from ..config import SHARED_CODEBOOKS, VQConfig
from .base import VQModuleMixin

__all__ = ["DENSE_STORAGE", "dense_dtype_of", "fits_dtype", "stored_bits", "stored_form", "round_to_storage_"]

#: `Recipe.dense_dtype` names -> torch dtypes.
DENSE_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def dense_dtype_of(config: VQConfig | None) -> torch.dtype | None:
    """The dtype `config`'s compression stores the tensors left dense in: its record's recipe (a reloaded model: the
    recipe that made the file) or else its own recipe; None: as the model holds them."""
    if config is None:
        return None
    recipe = config.record.recipe if config.record is not None and config.record.recipe else None
    name = recipe.get("dense_dtype") if recipe is not None else config.recipe.dense_dtype
    return DENSE_STORAGE.get(name) if isinstance(name, str) else None


def fits_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """Whether `tensor` would be stored narrower in `dtype`: floating point, wider than `dtype`, every value finite
    and inside `dtype`'s range."""
    if dtype is None or not tensor.is_floating_point() or torch.finfo(tensor.dtype).bits <= torch.finfo(dtype).bits:
        return False
    if tensor.is_meta:
        return False  # no values to check
    if tensor.numel() == 0:
        return True
    peak = tensor.detach().abs().amax()
    return bool(torch.isfinite(peak)) and float(peak) <= torch.finfo(dtype).max


def stored_bits(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bits one value of `tensor` takes in the file when the tensors left dense are stored in `dtype`."""
    return torch.finfo(dtype).bits if fits_dtype(tensor, dtype) else tensor.element_size() * 8


def stored_form(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` as the file stores it: in `dtype` when that is exact (it was rounded by [`round_to_storage_`]),
    else unchanged — a tensor that was never rounded keeps its width, so saving loses nothing."""
    if not fits_dtype(tensor, dtype):
        return tensor
    narrow = tensor.detach().to(dtype)
    return narrow if torch.equal(narrow.to(tensor.dtype), tensor.detach()) else tensor


def _stored_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    """`(state-dict key, owning module, tensor)` of every floating-point parameter and persistent buffer, once."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        tensors = [*module._parameters.items(), *((n, b) for n, b in module._buffers.items() if n not in skip)]
        for name, tensor in tensors:
            if tensor is None or not tensor.is_floating_point() or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield (f"{prefix}.{name}" if prefix else name), module, tensor


@torch.no_grad()
def round_to_storage_(model: nn.Module, dense_dtype: torch.dtype | None, *, skip: Container[str] = ()) -> int:
    """Round, in place, what the weights file stores at 16 bits to the values it will store: the codebooks and
    scales of compressed modules (and shared codebook sets) to fp16, and, with `dense_dtype`, every other
    floating-point parameter and persistent buffer that [`fits_dtype`] to `dense_dtype` (the tensors keep their
    dtype). `skip`: state-dict keys to leave alone (the weights about to be compressed).

    Returns:
        `int`: how many values were rounded to `dense_dtype` (codebooks and scales not counted).
    """
    rounded = 0
    for key, module, tensor in _stored_tensors(model):
        if key in skip or (isinstance(module, VQModuleMixin) and tensor is module._parameters.get("code_delta")):
            continue  # fine-tuning's code deltas are no stored tensor
        vq_own = isinstance(module, VQModuleMixin) and (tensor is module.codebooks or tensor is module.scales)
        if vq_own or key.rpartition(".")[2].startswith(SHARED_CODEBOOKS):
            tensor.copy_(tensor.half().to(tensor.dtype))
        elif fits_dtype(tensor, dense_dtype):
            tensor.copy_(tensor.to(dense_dtype).to(tensor.dtype))
            rounded += tensor.numel()
    return rounded
