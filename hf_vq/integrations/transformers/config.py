"""transformers' view of [`hf_vq.VQConfig`]: the `QuantizationConfigMixin` subclass registered as `"hf_vq"`.

`hf_vq.VQConfig` itself has the mixin's interface but does not import transformers; transformers' registry wants a
subclass of its mixin, so configs it reads from config.json are built as this class (which is a `VQConfig`).
"""

from __future__ import annotations

from transformers.utils.quantization_config import QuantizationConfigMixin

from ...config import VQConfig

__all__ = ["TransformersVQConfig"]


class TransformersVQConfig(VQConfig, QuantizationConfigMixin):
    """A [`VQConfig`] that is also a transformers `QuantizationConfigMixin` (what config.json loads as)."""

    quant_method = "hf_vq"
