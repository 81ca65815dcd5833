"""The model-level verbs: `quantize_` compresses any `nn.Module` in place; `dequantize_` undoes it.

Everything else — the CLI, `from_pretrained(..., quantization_config=...)`, timm loading, the
scripts — calls these. `build_skeleton_` rebuilds empty VQ modules from a config's layout so that a
loader can fill them from a checkpoint without recomputing anything.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .codec.pq import clamp_k, decode, quantize_matrix, relative_error
from .config import LayerLayout, VQConfig, block_size_key
from .nn import VQModuleMixin, layer_kind, vq_class_for

__all__ = ["plan", "quantize_", "build_skeleton_", "dequantize_", "vq_modules"]

logger = logging.getLogger(__name__)


def vq_modules(model: nn.Module) -> dict[str, VQModuleMixin]:
    """All compressed modules of `model` by name (tied duplicates included under each name)."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, VQModuleMixin)}


def _head_module(model: nn.Module) -> nn.Module | None:
    for getter in ("get_classifier", "get_output_embeddings"):  # timm, transformers
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                head = fn()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(head, nn.Module):
                return head
    return None


def _stem_module(model: nn.Module) -> nn.Module | None:
    """The first convolution that reads the input image (<= 4 input channels)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module if module.in_channels <= 4 else None
    return None


def plan(model: nn.Module, config: VQConfig) -> dict[str, LayerLayout]:
    """Decide which modules are compressed and how, without touching the model.

    Returns:
        `dict[str, LayerLayout]`: the layout of every module to compress (no `rel_error` yet).

    Raises:
        `ValueError`: if a block size does not divide a layer's rows, naming the module and the fix.
    """
    stem = _stem_module(model) if config.keep_stem_dense else None
    head = None if config.quantize_head else _head_module(model)
    layouts: dict[str, LayerLayout] = {}
    owners: dict[int, str] = {}  # id(weight) -> first module name holding it (tied weights)
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not name or not _keeps_forward(module):
            continue
        if module is stem or module is head or (kind == "embedding" and not config.quantize_embeddings):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.modules_to_not_convert):
            continue
        k, d, skip = config.k, config.block_size[block_size_key(kind)], False
        for pattern, override in config.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                k, d, skip = override.get("k", k), override.get("d", d), override.get("skip", skip)
        if skip or d == 0:
            continue
        weight = module._parameters["weight"]
        rows, cols = vq_class_for(type(module)).matrix_shape(tuple(weight.shape))
        if cols % d:
            divisors = [x for x in (2, 3, 4, 6, 8, 9, 12, 16, 18) if cols % x == 0]
            raise ValueError(
                f"VQConfig: block size d={d} (block_size[{kind!r}] or an override) does not divide the row length "
                f"{cols} of module {name!r} (weight {tuple(weight.shape)}). Use a d that divides {cols} "
                f"(e.g. {divisors[:4]}), set overrides={{{name!r}: {{'d': ...}}}}, or add {name!r} to "
                "modules_to_not_convert."
            )
        if kind in ("conv3x3", "conv", "depthwise") and d % (weight.shape[-1] * weight.shape[-2]):
            raise ValueError(
                f"VQConfig: block size d={d} for module {name!r} (kernel {tuple(weight.shape[-2:])}) must be a multiple "
                f"of the kernel area {weight.shape[-1] * weight.shape[-2]} so blocks never split a kernel."
            )
        tied_to = owners.get(id(weight))
        if tied_to is not None:
            owner = layouts.get(tied_to)
            if owner is None or owner.shape != tuple(weight.shape) or owner.d != d:
                raise ValueError(
                    f"Modules {tied_to!r} and {name!r} share one weight but would be compressed differently; "
                    f"compress both with the same d or list one in modules_to_not_convert."
                )
            layouts[name] = dataclasses.replace(owner, kind=kind, tied_to=tied_to, rel_error=None)
            continue
        owners[id(weight)] = name
        layouts[name] = LayerLayout(kind=kind, shape=tuple(weight.shape), k=clamp_k(k, rows * cols // d), d=d)
    return _whole_tied_groups(model, layouts)


def _keeps_forward(module: nn.Module) -> bool:
    """Whether swapping `module` for its VQ class keeps its own `forward`.

    A VQ class may override `forward` (VQEmbedding decodes only the looked-up rows); that is only
    right for modules whose forward is the registered float class's own. A subclass with its own
    forward (BART's scaled word / learned positional embeddings) would silently lose it: left dense.
    """
    cls = type(module)
    vq_cls = vq_class_for(cls)
    if vq_cls.forward is cls.forward:
        return True
    definer = next(c for c in vq_cls.__mro__ if "forward" in c.__dict__)
    return cls.forward is getattr(getattr(definer, "float_class", None), "forward", None)


def _whole_tied_groups(model: nn.Module, layouts: dict[str, LayerLayout]) -> dict[str, LayerLayout]:
    """Drop tied modules (one weight shared by several modules) unless all of them are compressed.

    Compressing only part of a tied group (e.g. the input embedding with `quantize_head=False`) would
    untie it and store the weight twice; the whole group stays dense instead.
    """
    groups: dict[int, dict[int, set[str]]] = {}  # id(weight) -> id(module) -> its names (a module may have several)
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if name else None
        if isinstance(weight, torch.Tensor):
            groups.setdefault(id(weight), {}).setdefault(id(module), set()).add(name)
    dropped: set[str] = set()
    for by_module in groups.values():
        compressed = [any(n in layouts for n in names) for names in by_module.values()]
        if len(by_module) > 1 and any(compressed) and not all(compressed):
            names = set().union(*by_module.values())
            logger.info("hf_vq: %s share one weight and not all of them can be compressed; left dense.", sorted(names))
            dropped |= names
    return {name: layout for name, layout in layouts.items() if name not in dropped}


def _default_device(model: nn.Module) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def quantize_(
    model: nn.Module,
    config: VQConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    example_inputs: Any = None,
) -> VQConfig:
    """Compress `model` in place with vector quantization: the one verb everything else calls.

    Every selected `nn.Linear`, `nn.Conv2d`, `nn.Embedding` and transformers `Conv1D` is replaced by
    its VQ counterpart (same class underneath, so `forward` is unchanged) holding packed codes and a
    codebook learnt by (annealed) k-means on the weight's subvectors.

    Args:
        model (`nn.Module`): any PyTorch model; its weights must be materialised (not on meta).
        config (`VQConfig`, *optional*): the scheme; defaults to `VQConfig()` (k=256, paper block sizes).
        device (`torch.device` or `str`, *optional*): where k-means runs; CUDA when available by default.
            Compressed modules stay on the device of the weights they replace.
        progress (`bool`, defaults to `True`): show a progress bar per layer.
        example_inputs (*optional*): inputs to trace the model with for PQF's permutation step
            (`config.permute`): a tensor, a tuple, a dict of keyword inputs or `(args, kwargs)`. By default
            timm's `pretrained_cfg` input size or transformers' main input is used; when the model cannot
            be traced the permutation is skipped (see `model.vq_permutation_report`, [`hf_vq.permute_`]).

    Returns:
        [`VQConfig`]: a copy of `config` whose `modules` holds the layout (k, d, shape, relative error)
        of every compressed module. It is also stored as `model.vq_config`.

    Raises:
        `ValueError`: if the model is already compressed or a block size does not fit a layer.

    Example:
        ```python
        >>> import timm, hf_vq
        >>> model = timm.create_model("resnet18")
        >>> cfg = hf_vq.quantize_(model, hf_vq.VQConfig(k=256))
        >>> hf_vq.size_report(model).ratio  # doctest: +SKIP
        28.9
        ```
    """
    config = VQConfig() if config is None else config
    if vq_modules(model):
        raise ValueError("The model is already compressed with hf_vq (it holds VQ modules); call dequantize_ first.")
    layouts = plan(model, config)
    if not layouts:
        logger.warning("hf_vq: no module of this model matched the config; nothing was compressed.")
    run_device = torch.device(device) if device is not None else _default_device(model)
    if config.permute and layouts:  # PQF's first step: permute coupled channels (same function, easier subvectors)
        from .permute import permute_

        model.vq_permutation_report = permute_(model, config, example_inputs=example_inputs, layouts=layouts,
                                               device=run_device)
    modules = dict(model.named_modules())
    done: dict[str, nn.Module] = {}
    bar = tqdm(layouts.items(), desc="hf_vq quantize", unit="layer", disable=not progress)
    for i, (name, layout) in enumerate(bar):
        module = modules[name]
        if layout.tied_to is not None:
            owner = done[layout.tied_to]
            vq = vq_class_for(type(module)).from_float(module, kind=layout.kind, k=layout.k, d=layout.d)
            vq._buffers["codes"] = owner._buffers["codes"]
            vq.codebooks = owner.codebooks
            layouts[name] = dataclasses.replace(layout, rel_error=layouts[layout.tied_to].rel_error)
        else:
            weight = module._parameters["weight"]
            cls = vq_class_for(type(module))
            matrix = cls._weight_to_matrix(weight.detach()).to(run_device, torch.float32)  # [rows, cols]
            codebooks, codes = quantize_matrix(matrix, d=layout.d, k=layout.k, n_iter=config.n_iter,
                                               anneal=config.anneal, seed=config.seed + i)
            codebooks = codebooks.half().float()  # fp16 on disk: the saved model is exactly this one
            rel = relative_error(matrix, decode(codes, codebooks))
            vq = cls.from_float(module, kind=layout.kind, k=layout.k, d=layout.d)
            vq.set_codes_(codes, codebooks)
            layouts[name] = dataclasses.replace(layout, rel_error=rel)
            bar.set_postfix_str(f"{name} err={rel:.4f}")
        done[name] = vq
    for name, vq in done.items():
        model.set_submodule(name, vq)
    filled = VQConfig(**{**config.to_dict(), "modules": {n: lay.to_dict() for n, lay in layouts.items()}})
    model.vq_config = filled
    _transformers_hook(model, "attach_", filled)  # save_pretrained / from_pretrained round trip
    return filled


def _transformers_hook(model: nn.Module, verb: str, *args) -> None:
    """Keep a transformers `PreTrainedModel` in sync with its VQ state (no-op for other models)."""
    if not callable(getattr(model, "save_pretrained", None)) or not hasattr(model, "config"):
        return
    from .integrations import transformers_quantizer

    getattr(transformers_quantizer, verb)(model, *args)


def build_skeleton_(model: nn.Module, config: VQConfig, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Replace the modules listed in `config.modules` by empty VQ modules, ready to load a checkpoint.

    Works on the meta device (nothing is allocated) and never runs k-means.

    Raises:
        `ValueError`: if the config names a module the model lacks, or whose class or shape differs.
    """
    layouts = config.layouts
    if not layouts:
        raise ValueError("quantization_config.modules is empty: this config describes no compressed module.")
    modules = dict(model.named_modules(remove_duplicate=False))
    built: dict[str, nn.Module] = {}
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
        vq = vq_class_for(type(module)).from_float(module, kind=layout.kind, k=layout.k, d=layout.d,
                                                    num_codebooks=layout.num_codebooks, dtype=dtype, device=device)
        if layout.tied_to is not None:
            owner = built[layout.tied_to]
            vq._buffers["codes"] = owner._buffers["codes"]
            vq.codebooks = owner.codebooks
        built[name] = vq
    for name, vq in built.items():
        model.set_submodule(name, vq)
    model.vq_config = config
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every VQ module by a dense module with the decoded weight (in place; returns `model`)."""
    dense: dict[int, nn.Module] = {}
    for name, module in vq_modules(model).items():
        new = module.dequantize()
        tied = dense.get(id(module.codebooks))
        if tied is not None and tied.weight.shape == new.weight.shape:
            new.weight = tied.weight  # keep tied modules tied
        dense.setdefault(id(module.codebooks), new)
        model.set_submodule(name, new)
    if hasattr(model, "vq_config"):
        del model.vq_config
    _transformers_hook(model, "detach_")
    return model
