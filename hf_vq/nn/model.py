"""Model-level wiring of VQ modules: find them, rebuild them from layouts, share codebook sets and tied tensors.

[`build_skeleton_`] swaps empty VQ modules in for the modules a config's layout lists (on the meta device when
loading), the one place where shared codebook sets become one `nn.Parameter` and tied modules share codes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LayerLayout, VQConfig, shared_codebooks_key
from .base import VQModuleMixin
from .layers import layer_kind, vq_class_for

__all__ = ["vq_modules", "shared_codebooks_owner", "register_shared_", "build_skeleton_", "vq_from_layout"]


def vq_modules(model: nn.Module) -> dict[str, VQModuleMixin]:
    """All compressed modules of `model` by name (tied duplicates included under each name)."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, VQModuleMixin)}


def shared_codebooks_owner(model: nn.Module) -> nn.Module:
    """The module on which shared codebook sets are registered (parameters `vq_shared_codebooks_<set>`).

    The model itself, except for a transformers model, where it is the base model (`model.bert`, ...)
    so that the key follows transformers' `base_model_prefix` rule like every other weight: a
    checkpoint saved from `BertModel` loads into `BertForMaskedLM` and the other way round.
    """
    base = getattr(model, "base_model", None) if getattr(model, "base_model_prefix", None) else None
    return base if isinstance(base, nn.Module) else model


def register_shared_(model: nn.Module, shared: dict[str, nn.Parameter]) -> None:
    """Register each shared set as parameter `vq_shared_codebooks_<set>` of [`shared_codebooks_owner`]."""
    owner = shared_codebooks_owner(model)
    for set_name, param in shared.items():
        owner.register_parameter(shared_codebooks_key(set_name), param)


def build_skeleton_(model: nn.Module, config: VQConfig, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Replace the modules listed in `config.modules` by empty VQ modules, ready to load a checkpoint.

    Works on the meta device (nothing is allocated) and never runs k-means. Shared codebook sets become
    one `nn.Parameter` each, registered under `vq_shared_codebooks_<set>` (see [`shared_codebooks_owner`])
    and held by every module of the set.

    Raises:
        `ValueError`: if the config names a module the model lacks, or whose class or shape differs.
    """
    layouts = config.layouts
    if not layouts:
        raise ValueError("quantization_config.modules is empty: this config describes no compressed module.")
    modules = dict(model.named_modules(remove_duplicate=False))
    built: dict[str, nn.Module] = {}
    shared: dict[str, nn.Parameter] = {}  # codebook set -> the one Parameter [M, k, d] its modules hold
    # owners before the modules tied to them (config.json may list modules in any order, e.g. sorted)
    for name, layout in sorted(layouts.items(), key=lambda item: item[1].tied_to is not None):
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"quantization_config.modules names {name!r}, which this model does not have. The checkpoint was "
                "made for another architecture or a differently configured model; check config.json."
            )
        if isinstance(module, VQModuleMixin):
            built[name] = module
            continue
        kind = layer_kind(module)
        weight = module._parameters.get("weight")
        if kind != layout.kind or weight is None or tuple(weight.shape) != layout.shape:
            raise ValueError(
                f"quantization_config.modules[{name!r}] describes a {layout.kind} weight {list(layout.shape)}, but the "
                f"model has {type(module).__name__} with weight {None if weight is None else list(weight.shape)}. "
                "The config.json does not match the model; re-create the checkpoint."
            )
        if layout.d < 1 or vq_class_for(type(module)).matrix_shape(layout.shape)[1] % layout.d:
            raise ValueError(
                f"quantization_config.modules[{name!r}].d={layout.d} does not divide the rows of weight "
                f"{list(layout.shape)}; the config.json is corrupted."
            )
        vq = vq_from_layout(module, layout, dtype=dtype, device=device)
        if layout.tied_to is not None:
            vq.tie_to_(built[layout.tied_to])
        elif layout.codebook_set is not None:  # one Parameter per shared set, made by its first module
            if layout.codebook_set not in shared:
                shared[layout.codebook_set] = vq.codebooks
            vq.share_codebooks_(shared[layout.codebook_set], layout.codebook_set)
        built[name] = vq
    for name, vq in built.items():
        parent, _, child = name.rpartition(".")
        modules[parent]._modules[child] = vq  # what set_submodule does, without walking the path again
    register_shared_(model, shared)
    model.vq_config = config
    return model


def vq_from_layout(module: nn.Module, layout: LayerLayout, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> VQModuleMixin:
    """An empty VQ module (zero codes and codebooks, unit scales) replacing the float `module` as `layout` says."""
    return vq_class_for(type(module)).from_float(module, kind=layout.kind, k=layout.k, d=layout.d,
                                                 num_codebooks=layout.num_codebooks, scales=layout.scales,
                                                 dtype=dtype, device=device)
