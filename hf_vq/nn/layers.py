"""The compressed layers: `VQLinear`, `VQConv2d`, `VQConv1D` (GPT-2) and `VQEmbedding`.

Each is its float class with the [`VQModuleMixin`] in front; only the weight layout (and, for the
embedding, a forward that decodes just the looked-up rows) is specific.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..codec.pq import decode
from .base import VQModuleMixin

__all__ = ["VQLinear", "VQConv2d", "VQConv1D", "VQEmbedding", "vq_class_for", "layer_kind"]


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
        return rows.reshape(*input.shape, self.embedding_dim)


_REGISTRY: dict[type[nn.Module], type[VQModuleMixin]] = {
    nn.Linear: VQLinear,
    nn.Conv2d: VQConv2d,
    nn.Embedding: VQEmbedding,
}

try:  # transformers' GPT-2 style Conv1D: weight [in, out], y = x @ W + b
    from transformers.pytorch_utils import Conv1D

    class VQConv1D(VQModuleMixin, Conv1D):
        """transformers' `Conv1D` (GPT-2) with a vector-quantized weight `[in, out]`; blocks run along `in`."""

        float_class = Conv1D

        @staticmethod
        def _weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
            return weight.t()  # [out, in]

        def _matrix_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
            return matrix.t()  # [in, out]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fast_matmul(x, self.bias)  # [..., out] (x @ W + b with W = matrix.T) or None
            return super().forward(x) if out is None else out

    _REGISTRY[Conv1D] = VQConv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    VQConv1D = None  # type: ignore[assignment,misc]

_SUBCLASSES: dict[type[nn.Module], type[VQModuleMixin]] = {}
#: VQ classes whose `forward` is the fast matmul (`VQModuleMixin.fast_matmul`) rather than a float forward.
_FAST_MATMUL = {cls for cls in (VQLinear, VQConv1D) if cls is not None}


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
    return "conv1d" if VQConv1D is not None and isinstance(module, VQConv1D.float_class) else "linear"
