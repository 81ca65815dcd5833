"""The model-level verbs: `quantize_` compresses any `nn.Module` in place; `dequantize_` undoes it.

Everything else — the CLI, `from_pretrained(..., quantization_config=...)`, timm loading, the
scripts — calls these. `build_skeleton_` rebuilds empty VQ modules from a config's layout so that a
loader can fill them from a checkpoint without recomputing anything.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .codec.aq import aq_quantize
from .codec.kmeans import kmeans
from .codec.pq import clamp_k, decode, relative_error, split_blocks
from .config import SHARED_CODEBOOKS, LayerLayout, VQConfig, block_size_key, shared_codebooks_key
from .nn import VQModuleMixin, layer_kind, vq_class_for

__all__ = ["plan", "quantize_", "build_skeleton_", "dequantize_", "vq_modules", "shared_codebooks_owner"]

logger = logging.getLogger(__name__)


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
        `dict[str, LayerLayout]`: the layout of every module to compress (no `rel_error` yet). With
        `config.share` `"pool"` or `"global"`, each layout names its `codebook_set` and k is clamped on the
        set's total number of subvectors.

    Raises:
        `ValueError`: if a block size does not divide a layer's rows, or a shared set would mix block sizes
            (`share="global"`) or k (overrides), naming the modules and the fix.
    """
    stem = _stem_module(model) if config.keep_stem_dense else None
    head = None if config.quantize_head else _head_module(model)
    layouts: dict[str, LayerLayout] = {}
    requested_k: dict[str, int] = {}  # module -> k before clamping (shared sets clamp on their total)
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
        requested_k[name] = k
        layouts[name] = LayerLayout(kind=kind, shape=tuple(weight.shape), k=clamp_k(k, rows * cols // d), d=d,
                                    num_codebooks=config.num_codebooks)
    layouts = _whole_tied_groups(model, layouts)
    return _assign_codebook_sets(layouts, requested_k, config.share) if config.share != "layer" else layouts


def _assign_codebook_sets(layouts: dict[str, LayerLayout], requested_k: dict[str, int],
                          share: str) -> dict[str, LayerLayout]:
    """Group modules into shared codebook sets (`"global"`, or `"d<d>"` per block size) and clamp k per set."""
    members: dict[str, list[str]] = {}
    for name, layout in layouts.items():
        if layout.tied_to is None:
            members.setdefault("global" if share == "global" else f"d{layout.d}", []).append(name)
    if share == "global":
        by_d: dict[int, list[str]] = {}
        for name in members.get("global", []):
            by_d.setdefault(layouts[name].d, []).append(name)
        if len(by_d) > 1:
            found = "; ".join(f"d={d}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                              for d, names in sorted(by_d.items()))
            raise ValueError(
                f"VQConfig.share='global' needs one block size for every compressed module, but this model would "
                f"use several ({found}). Use share='pool' (one codebook set per block size), give every layer kind "
                "the same block_size (or leave the odd ones dense with 0 / modules_to_not_convert), or use "
                "share='layer'."
            )
    out = dict(layouts)
    for set_name, names in members.items():
        ks = {requested_k[name] for name in names}
        if len(ks) > 1:
            raise ValueError(
                f"VQConfig.share={share!r}: the modules of codebook set {set_name!r} ask for different k {sorted(ks)} "
                "(per-module overrides); a shared set has one k. Drop the k overrides, or use share='layer'."
            )
        total = sum(math.prod(layouts[n].matrix_shape) // layouts[n].d for n in names)  # subvectors in the set
        k = clamp_k(ks.pop(), total)
        for name in names:
            out[name] = dataclasses.replace(layouts[name], k=k, codebook_set=set_name)
    for name, layout in layouts.items():
        if layout.tied_to is not None:
            owner = out[layout.tied_to]
            out[name] = dataclasses.replace(layout, k=owner.k, codebook_set=owner.codebook_set)
    return out


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
    calibration: Any = None,
) -> VQConfig:
    """Compress `model` in place with vector quantization: the one verb everything else calls.

    Every selected `nn.Linear`, `nn.Conv2d`, `nn.Embedding` and transformers `Conv1D` is replaced by
    its VQ counterpart (same class underneath, so `forward` is unchanged) holding packed codes and
    codebooks learnt on the weight's subvectors: by (annealed) k-means (`method="pq"`) or additive
    quantization (`method="aq"`). With `config.share` `"pool"`/`"global"` the subvectors of every module of
    a codebook set are quantized together and the modules hold one shared `nn.Parameter`, registered as
    `vq_shared_codebooks_<set>` (on the base model of a transformers model).

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
        calibration (*optional*): a few batches of real inputs (a tensor, a dict of model inputs, or a list of
            them). When given, the error is measured as the layers' outputs see it: the permutation search uses
            the activation-aware objective (each weight column scaled by the RMS of its input channel on these
            batches) and, with `method="pq"`, k-means is weighted (each weight entry by the second moment of its
            input channel, measured again after the permutation; see [`hf_vq.codec.kmeans.kmeans`]). The
            checkpoint format is the same. Without it: the paper's weight-only objective and plain k-means.

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
                                               device=run_device, calibration=calibration)
    modules = dict(model.named_modules())
    moments: dict[str, torch.Tensor] = {}  # module -> E[x_c^2] per input channel, measured after the permutation
    if calibration is not None and config.method == "pq" and layouts:
        from .permute import input_moments

        moments = input_moments(model, [n for n, lay in layouts.items() if lay.tied_to is None], calibration)
    model.vq_kmeans_weighted = bool(moments)  # for the model card: k-means weighted by the calibration data
    done: dict[str, nn.Module] = {}
    shared: dict[str, nn.Parameter] = {}  # codebook set -> the one Parameter [M, k, d] its modules hold
    units = _encoding_units(layouts)
    bar = tqdm(units, desc="hf_vq quantize", unit="layer" if config.share == "layer" else "set", disable=not progress)
    for first, set_name, names in bar:
        classes = [vq_class_for(type(modules[name])) for name in names]
        matrices = [cls._weight_to_matrix(modules[name]._parameters["weight"].detach()).to(run_device, torch.float32)
                    for cls, name in zip(classes, names)]  # [rows_j, cols_j] each
        weights = [_entry_weights(modules[name], cls, layouts[name].kind, moments.get(name))
                   for cls, name in zip(classes, names)]
        codebooks, codes = _encode(matrices, layouts[names[0]], config, seed=config.seed + first,
                                   weights=weights if any(w is not None for w in weights) else None)
        codebooks = codebooks.half().float()  # [M, k, d]; fp16 on disk: the saved model is exactly this one
        if set_name is not None:
            device = modules[names[0]]._parameters["weight"].device
            shared[set_name] = nn.Parameter(codebooks.to(device))
        for cls, name, matrix, code in zip(classes, names, matrices, codes):
            layout = layouts[name]
            rel = relative_error(matrix, decode(code, codebooks))
            vq = cls.from_float(modules[name], kind=layout.kind, k=layout.k, d=layout.d,
                                num_codebooks=layout.num_codebooks)
            vq.set_codes_(code, codebooks)
            if set_name is not None:
                vq.share_codebooks_(shared[set_name], set_name)
            layouts[name] = dataclasses.replace(layout, rel_error=rel)
            done[name] = vq
        bar.set_postfix_str(f"{set_name or names[0]} err={layouts[names[0]].rel_error:.4f}")
    for name, layout in layouts.items():  # tied modules: the owner's codes buffer and codebooks parameter
        if layout.tied_to is None:
            continue
        owner = done[layout.tied_to]
        vq = vq_class_for(type(modules[name])).from_float(modules[name], kind=layout.kind, k=layout.k, d=layout.d,
                                                          num_codebooks=layout.num_codebooks)
        vq._buffers["codes"] = owner._buffers["codes"]
        vq.share_codebooks_(owner.codebooks, owner.codebook_set)
        layouts[name] = dataclasses.replace(layout, rel_error=layouts[layout.tied_to].rel_error)
        done[name] = vq
    for name, vq in done.items():
        model.set_submodule(name, vq)
    _register_shared(model, shared)
    filled = VQConfig(**{**config.to_dict(), "modules": {n: lay.to_dict() for n, lay in layouts.items()}})
    model.vq_config = filled
    _transformers_hook(model, "attach_", filled)  # save_pretrained / from_pretrained round trip
    return filled


def _register_shared(model: nn.Module, shared: dict[str, nn.Parameter]) -> None:
    """Register each shared set as parameter `vq_shared_codebooks_<set>` of [`shared_codebooks_owner`]."""
    owner = shared_codebooks_owner(model)
    for set_name, param in shared.items():
        owner.register_parameter(shared_codebooks_key(set_name), param)


def _encoding_units(layouts: dict[str, LayerLayout]) -> list[tuple[int, str | None, list[str]]]:
    """What is encoded together: `(index of the first module in the plan, codebook set or None, module names)`.

    One unit per module without a shared set, one per shared set (all its modules' subvectors together);
    tied modules are left out (they reuse their owner's codes)."""
    units: list[tuple[int, str | None, list[str]]] = []
    by_set: dict[str, list[str]] = {}
    for i, (name, layout) in enumerate(layouts.items()):
        if layout.tied_to is not None:
            continue
        if layout.codebook_set is None:
            units.append((i, None, [name]))
        elif layout.codebook_set in by_set:
            by_set[layout.codebook_set].append(name)
        else:
            by_set[layout.codebook_set] = [name]
            units.append((i, layout.codebook_set, by_set[layout.codebook_set]))
    return units


def _entry_weights(module: nn.Module, cls: type[VQModuleMixin], kind: str,
                   second: torch.Tensor | None) -> torch.Tensor | None:
    """Weight of every entry of `module`'s matrix view for weighted k-means: the second moment `second`
    (`[in_channels]`) of the input channel the entry multiplies, normalised to mean 1 over the matrix and
    floored at 1e-3 (so dead channels still get a nearest codeword). -> `[rows, cols]` float32, or None
    without moments (embeddings, modules the calibration data did not reach)."""
    from .permute import _entry_moments

    full = _entry_moments(module._parameters["weight"], kind, second)  # like the weight
    if full is None:
        return None
    matrix = cls._weight_to_matrix(full).float()  # [rows, cols]
    mean = matrix.mean()
    return (matrix / mean).clamp_min(1e-3) if mean > 0 else None


def _encode(matrices: list[torch.Tensor], layout: LayerLayout, config: VQConfig, *, seed: int,
            weights: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Learn one codebook set for the subvectors of `matrices` (`[rows_j, cols_j]` each) and encode them.

    `weights` (per matrix `[rows_j, cols_j]` or None for uniform) makes product quantization run weighted
    k-means (see [`_entry_weights`]). Returns codebooks `[M, k, d]` (float32) and per matrix its codes
    `[rows_j, cols_j / d, M]` (int64).
    """
    d, k = layout.d, layout.k
    x = torch.cat([split_blocks(m, d) for m in matrices])  # [n, d], every module's subvectors
    if config.method == "pq":
        w = None if weights is None else torch.cat([  # [n, d] like x
            split_blocks(torch.ones_like(m) if wj is None else wj.to(m.device), d) for m, wj in zip(matrices, weights)])
        codebook, flat = kmeans(x, k, n_iter=config.n_iter, anneal=config.anneal, seed=seed, weights=w)  # [k, d], [n]
        codebooks, flat = codebook[None], flat[:, None]  # [1, k, d], [n, 1]
    else:
        codebooks, flat = aq_quantize(x, layout.num_codebooks, k, n_iter=config.n_iter, aq_iters=config.aq_iters,
                                      beam_size=config.beam_size, anneal=config.anneal, seed=seed)  # [M,k,d], [n,M]
    out, start = [], 0
    for m in matrices:
        rows, cols = m.shape
        n = rows * (cols // d)
        out.append(flat[start:start + n].reshape(rows, cols // d, -1))
        start += n
    return codebooks, out


def _transformers_hook(model: nn.Module, verb: str, *args) -> None:
    """Keep a transformers `PreTrainedModel` in sync with its VQ state (no-op for other models)."""
    if not callable(getattr(model, "save_pretrained", None)) or not hasattr(model, "config"):
        return
    from .integrations import transformers_quantizer

    getattr(transformers_quantizer, verb)(model, *args)


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
        vq = vq_class_for(type(module)).from_float(module, kind=layout.kind, k=layout.k, d=layout.d,
                                                    num_codebooks=layout.num_codebooks, dtype=dtype, device=device)
        if layout.tied_to is not None:
            owner = built[layout.tied_to]
            vq._buffers["codes"] = owner._buffers["codes"]
            vq.share_codebooks_(owner.codebooks, owner.codebook_set)
        elif layout.codebook_set is not None:  # one Parameter per shared set, made by its first module
            if layout.codebook_set not in shared:
                shared[layout.codebook_set] = vq.codebooks
            vq.share_codebooks_(shared[layout.codebook_set], layout.codebook_set)
        built[name] = vq
    for name, vq in built.items():
        parent, _, child = name.rpartition(".")
        modules[parent]._modules[child] = vq  # what set_submodule does, without walking the path again
    _register_shared(model, shared)
    model.vq_config = config
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every VQ module by a dense module with the decoded weight (in place; returns `model`)."""
    dense: dict[int, nn.Module] = {}
    for name, module in vq_modules(model).items():
        new = module.dequantize()
        tied = dense.get(id(module.codes))  # tied modules share their codes buffer (not only a codebook set)
        if tied is not None and tied.weight.shape == new.weight.shape:
            new.weight = tied.weight  # keep tied modules tied
        dense.setdefault(id(module.codes), new)
        model.set_submodule(name, new)
    for holder in (model, shared_codebooks_owner(model)):
        for key in [k for k in holder._parameters if k.startswith(SHARED_CODEBOOKS)]:
            del holder._parameters[key]
    if hasattr(model, "vq_config"):
        del model.vq_config
    _transformers_hook(model, "detach_")
    return model
