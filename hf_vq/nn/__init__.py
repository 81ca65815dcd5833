"""Compressed modules, their registry, and the model-level wiring of codebook sets and tied modules. They know
nothing of the Hub or of checkpoints on disk."""

from .base import CodesError, VQModuleMixin
from .layers import VQConv2d, VQEmbedding, VQLinear, layer_kind, register_vq_class, vq_class_for
from .model import build_skeleton_, register_shared_, shared_codebooks_owner, vq_modules
from .storage import dense_dtype_of, round_to_storage_, stored_bits, stored_form
from .trainable import mark_trainable_

__all__ = ["CodesError", "VQModuleMixin", "VQConv2d", "VQEmbedding", "VQLinear", "layer_kind", "register_vq_class",
           "vq_class_for", "build_skeleton_", "register_shared_", "shared_codebooks_owner", "vq_modules",
           "mark_trainable_", "dense_dtype_of", "round_to_storage_", "stored_bits", "stored_form"]
