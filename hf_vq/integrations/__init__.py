"""Thin integrations with transformers, timm, the Hub and accelerate — the only part of hf_vq that imports them.

[`install`] (called by `import hf_vq`) registers hf_vq with transformers and timm as soon as each is imported,
without importing either itself.
"""

from __future__ import annotations

import importlib

from ._import_hook import when_imported

__all__ = ["install"]


def _register(name: str) -> None:
    """Register the integration `name`: its package registers itself at the end of its own import, so a package
    still being imported (the library was imported by it) is left to do so."""
    module = importlib.import_module(f"{__name__}.{name}")
    register = getattr(module, "register", None)
    if register is not None:
        register()


def _register_transformers() -> None:
    _register("transformers")


def _register_timm() -> None:
    _register("timm")


def install() -> None:
    """Make transformers' `from_pretrained` and timm's `create_model` understand hf_vq checkpoints (idempotent)."""
    when_imported("transformers", _register_transformers)
    when_imported("timm", _register_timm)
