"""Compressed modules. They know nothing of the Hub or of checkpoints on disk."""

from .base import CodesError, VQModuleMixin
from .layers import VQConv1D, VQConv2d, VQEmbedding, VQLinear, layer_kind, vq_class_for

__all__ = ["CodesError", "VQModuleMixin", "VQConv1D", "VQConv2d", "VQEmbedding", "VQLinear", "layer_kind", "vq_class_for"]
