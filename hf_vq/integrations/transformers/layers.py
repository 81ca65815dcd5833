"""transformers' own layers that hf_vq compresses: GPT-2's `Conv1D` (weight stored `[in, out]`)."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from ...nn import VQModuleMixin, register_vq_class

__all__ = ["VQConv1D", "register_layers"]


class VQConv1D(VQModuleMixin, Conv1D):
    """transformers' `Conv1D` (GPT-2) with a vector-quantized weight `[in, out]`; blocks run along `in`."""

    float_class = Conv1D
    default_kind = "conv1d"

    @staticmethod
    def _weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # [out, in]

    def _matrix_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t()  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fast_matmul(x, self.bias)  # [..., out] (x @ W + b with W = matrix.T) or None
        return super().forward(x) if out is None else out


def register_layers() -> None:
    """Compress `Conv1D` modules with [`VQConv1D`] (idempotent)."""
    register_vq_class(Conv1D, VQConv1D, fast_matmul=True)
