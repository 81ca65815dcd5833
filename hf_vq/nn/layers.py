"""The compressed layers: `VQLinear`, `VQConv2d` and `VQEmbedding`, and the registry float class -> VQ class.

Each is its float class with the [`VQModuleMixin`] in front; only the weight layout (and, for the
embedding, a forward that decodes just the looked-up rows) is specific. Integrations register VQ classes for
their libraries' own layers ([`register_vq_class`]; transformers' GPT-2 `Conv1D` -> `VQConv1D`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..codec.pq import decode
from .base import VQModuleMixin

__all__ = ["VQLinear", "VQConv2d", "VQEmbedding", "vq_class_for", "layer_kind", "register_vq_class"]


class VQLinear(VQModuleMixin, nn.Linear):
    """`nn.Linear` with a vector-quantized weight `[out_features, in_features]` (rows = output features).

    `forward` runs a fast kernel straight from the codes when it pays (small batches at inference, see
    `hf_vq.kernels`), else decodes the weight and calls `nn.Linear.forward`.
    """

    float_class = nn.Linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.fast_matmul(input, self.bias)  # [..., out_features] or None
        return super().forward(input) if out is None else out


class VQConv2d(VQModuleMixin, nn.Conv2d):
    """`nn.Conv2d` with a vector-quantized weight `[out, in/groups, kh, kw]`, viewed as `[out, in/groups*kh*kw]`.

    Blocks are contiguous along (input channel, kh, kw): with d = 9 a 3x3 block is one kernel, with
    d = 18 two adjacent input channels. Stride, padding, dilation, groups and padding mode are the
    float module's own.
    """

    float_class = nn.Conv2d


class VQEmbedding(VQModuleMixin, nn.Embedding):
    """`nn.Embedding` with a vector-quantized table `[num_embeddings, embedding_dim]`.

    `forward` decodes only the looked-up rows, never the whole table.
    """

    float_class = nn.Embedding

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None:  # renormalisation needs the table: fall back to the dense path
            return super().forward(input)
        table = self._kernel_codes() if torch.compiler.is_compiling() else self.unpacked_codes()  # [rows, n_blocks, M]
        codes = table[input]  # [*input.shape, n_blocks, M]
        rows = decode(codes.reshape(-1, *codes.shape[-2:]), self.codebooks)  # [input.numel(), embedding_dim]
        if self.scales is not None:
            rows = rows * self.scales[input.reshape(-1)].to(rows.dtype)[:, None]
        rows = self._with_code_delta(rows, input.reshape(-1))
        return rows.reshape(*input.shape, self.embedding_dim)


_REGISTRY: dict[type[nn.Module], type[VQModuleMixin]] = {
    nn.Linear: VQLinear,
    nn.Conv2d: VQConv2d,
    nn.Embedding: VQEmbedding,
}

_SUBCLASSES: dict[type[nn.Module], type[VQModuleMixin]] = {}
#: VQ classes whose `forward` is the fast matmul (`VQModuleMixin.fast_matmul`) rather than a float forward.
_FAST_MATMUL: set[type[VQModuleMixin]] = {VQLinear}


def register_vq_class(float_cls: type[nn.Module], vq_cls: type[VQModuleMixin], *, fast_matmul: bool = False) -> None:
    """Compress modules of `float_cls` (and its subclasses) with `vq_cls` (idempotent).

    Args:
        float_cls: the float module class (e.g. transformers' `Conv1D`).
        vq_cls: its VQ class, `class VQX(VQModuleMixin, float_cls)` with `float_class = float_cls` and `default_kind` (its layer kind, e.g. "conv1d").
        fast_matmul: `vq_cls.forward` is the fast matmul from codes (then subclasses with their own forward keep it).
    """
    _REGISTRY[float_cls] = vq_cls
    if fast_matmul:
        _FAST_MATMUL.add(vq_cls)
    for cls in [c for c in _SUBCLASSES if issubclass(c, float_cls)]:
        del _SUBCLASSES[cls]  # rebuilt on next use with the new base


def vq_class_for(float_cls: type[nn.Module]) -> type[VQModuleMixin] | None:
    """The VQ class replacing `float_cls`, or None if hf_vq cannot compress it.

    Subclasses of a registered class (timm's `Conv2dSame`, ...) get a VQ subclass built once, so
    their own `forward` keeps running on the decoded weight.
    """
    if issubclass(float_cls, VQModuleMixin):
        return None
    if float_cls in _REGISTRY:
        return _REGISTRY[float_cls]
    if float_cls not in _SUBCLASSES:
        base = next((vq for cls in float_cls.__mro__ if (vq := _REGISTRY.get(cls)) is not None), None)
        if base is None:
            return None
        namespace = {"float_class": float_cls, "__module__": __name__}
        if base in _FAST_MATMUL and float_cls.forward is not base.float_class.forward:
            namespace["forward"] = float_cls.forward  # a subclass's own forward wins over the fast-matmul forward
        _SUBCLASSES[float_cls] = type(f"VQ{float_cls.__name__}", (base, float_cls), namespace)
    return _SUBCLASSES[float_cls]


def layer_kind(module: nn.Module) -> str | None:
    """The layer kind of a float module (a key of `VQConfig.block_size`), or None if not compressible."""
    if vq_class_for(type(module)) is None or not isinstance(module._parameters.get("weight"), torch.Tensor):
        return None
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        if module.groups > 1 and module.in_channels // module.groups == 1:
            return "depthwise"
        if (kh, kw) == (1, 1):
            return "conv1x1"
        return "conv3x3" if (kh, kw) == (3, 3) else "conv"
    return getattr(vq_class_for(type(module)), "default_kind", "linear")
