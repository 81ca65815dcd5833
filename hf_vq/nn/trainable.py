"""Which parameters of a compressed model train: codebooks (and scales) always, norms, biases and the rest on
request. Codes are buffers and never train. Shared by fine-tuning and block-wise tuning."""

from __future__ import annotations

from torch import nn

from .base import VQModuleMixin

__all__ = ["mark_trainable_"]


_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                            *( (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def mark_trainable_(model: nn.Module, *, norms: bool = True, biases: bool = True, dense: bool = False,
                    scales: bool = True) -> dict[str, int]:
    """Set `requires_grad` for fine-tuning a compressed model: codebooks always, the rest as asked (in place).

    Codes are buffers and never train here (see `hf_vq.finetune.codes` for code updates). Returns the number of
    trainable values per group (`codebooks`, `scales` — the per-output-channel scales of modules that have them —,
    `norms`, `biases`, `dense`) and `frozen` (values that stay fixed).

    Raises:
        `ValueError`: if the model has no VQ module (it is not compressed).
    """
    vq = [m for m in model.modules() if isinstance(m, VQModuleMixin)]
    # Codebooks may be shared by several modules and registered on another one (additive quantization with
    # `share="pool"/"global"`): recognise them by identity, wherever they are registered.
    codebooks = {id(m.codebooks) for m in vq}
    scale_ids = {id(m.scales) for m in vq if m.scales is not None}  # per-output-channel scales
    if not vq:
        raise ValueError("The model has no hf_vq module: fine-tune a compressed model (hf_vq.quantize_ or `hf-vq "
                         "compress` first), or load it from a folder written by hf_vq.")
    counts = {"codebooks": 0, "scales": 0, "norms": 0, "biases": 0, "dense": 0, "frozen": 0}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in codebooks:
                group = "codebooks"
            elif id(param) in scale_ids:
                group = "scales" if scales else "frozen"
            elif _is_norm(module):
                group = "norms" if norms else "frozen"
            elif name == "bias" or name.endswith("bias"):
                group = "biases" if biases else "frozen"
            else:
                group = "dense" if dense else "frozen"
            param.requires_grad_(group != "frozen")
            counts[group] += param.numel()
    return counts
