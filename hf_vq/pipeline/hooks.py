"""Model hooks: how integrations learn that a model was compressed or restored, without the pipeline importing them.

An integration (transformers) registers a [`ModelHook`]; [`hf_vq.quantize_`] and [`hf_vq.dequantize_`] call
every registered hook. The pipeline never imports an integration.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from ..config import VQConfig

__all__ = ["ModelHook", "register_model_hook", "compressed", "restored"]


class ModelHook(Protocol):
    """What an integration does when a model it knows is compressed or restored (both no-ops for other models)."""

    def compressed(self, model: nn.Module, config: VQConfig) -> None: ...

    def restored(self, model: nn.Module) -> None: ...


_HOOKS: dict[str, ModelHook] = {}


def register_model_hook(name: str, hook: ModelHook) -> None:
    """Register (or replace) the hook of integration `name`."""
    _HOOKS[name] = hook


def compressed(model: nn.Module, config: VQConfig) -> None:
    """Tell every integration that `model` now holds VQ modules described by `config`."""
    for hook in _HOOKS.values():
        hook.compressed(model, config)


def restored(model: nn.Module) -> None:
    """Tell every integration that `model` is dense again."""
    for hook in _HOOKS.values():
        hook.restored(model)
