"""Which modules are compressed, and how: one walk over the model that `plan` and `fit_config` share.

[`select_modules`] applies the config's rules (stem, head, embeddings, `modules_to_not_convert`, `overrides`,
block sizes per layer kind) in one pass; [`plan`] turns the selection into layouts (raising on misfits), and
[`fit_config`] turns it into explicit overrides that make a config fit an architecture (whole kernels for
depthwise convs, misfit layers dense).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..codec.pq import clamp_k
from ..config import LayerLayout, VQConfig, block_size_key, fits_kernel
from ..nn import layer_kind, vq_class_for

__all__ = ["Candidate", "select_modules", "plan", "fit_config", "head_module", "stem_module", "unmatched_patterns"]

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A module the config compresses (before fitting): its kind, the k and d asked for, and whether `d` came
    from a user override (then it is never adjusted)."""

    name: str
    module: nn.Module
    kind: str
    k: int
    d: int
    user_d: bool
    cols: int  # row length of the matrix view
    method: str = "pq"
    num_codebooks: int = 1
    scales: bool = False


def head_module(model: nn.Module) -> nn.Module | None:
    """The classifier / output embedding of a timm or transformers model (duck-typed), or None."""
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


def stem_module(model: nn.Module) -> nn.Module | None:
    """The first convolution that reads the input image (<= 4 input channels)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module if module.in_channels <= 4 else None
    return None


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


def select_modules(model: nn.Module, config: VQConfig) -> list[Candidate]:
    """Every module `config` asks to compress, in model order, with the k and d its rules give it."""
    stem = stem_module(model) if config.keep_stem_dense else None
    head = None if config.quantize_head else head_module(model)
    out: list[Candidate] = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not name or not _keeps_forward(module):
            continue
        if module is stem or module is head or (kind == "embedding" and not config.quantize_embeddings):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.modules_to_not_convert):
            continue
        k, d, skip, user_d = config.k, config.block_size[block_size_key(kind)], False, False
        method, books, scales = config.method, config.num_codebooks, config.scales
        for pattern, override in config.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                k, skip, scales = override.get("k", k), override.get("skip", skip), override.get("scales", scales)
                if "d" in override:
                    d, user_d = override["d"], True
                if "method" in override:
                    method = override["method"]
                    books = override.get("num_codebooks", 2 if method == "aq" else 1)
                books = override.get("num_codebooks", books)
        if skip or d == 0:
            continue
        cols = vq_class_for(type(module)).matrix_shape(tuple(module._parameters["weight"].shape))[1]
        out.append(Candidate(name, module, kind, k, d, user_d, cols, method, books, scales))
    return out


def unmatched_patterns(model: nn.Module, config: VQConfig) -> list[str]:
    """Globs of `modules_to_not_convert` and `overrides` that name no module of `model` (likely typos)."""
    names = [name for name, _ in model.named_modules() if name]
    patterns = list(config.modules_to_not_convert) + list(config.overrides)
    return [p for p in dict.fromkeys(patterns) if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def fit_config(model: nn.Module, config: VQConfig | None = None) -> VQConfig:
    """`config` made to fit every layer of `model`, the way timm architectures need it.

    Returns a copy of `config` (default `VQConfig()`) with explicit per-module `overrides` appended:

    * depthwise convs (and convs of other kernel sizes, kind `"conv"`) whose configured block size
      is > 0 but neither a multiple nor a divisor of their kernel area get `d` = the smallest multiple
      of the kernel area that is >= the configured d (one whole kernel per subvector: `depthwise=9`
      compresses 3x3 depthwise convs with d = 9 and 5x5 ones with d = 25; `depthwise=1` stays 1);
    * layers whose row length that block size does not divide (squeeze-excite convs reading 6
      channels, ...) are left dense (`{"skip": True}`) instead of failing.

    Modules with a user override that sets `d` are left alone ([`plan`] reports a misfit).
    The result is written into config.json with the model, so loading never needs this function.
    """
    config = VQConfig() if config is None else config
    added: dict[str, dict[str, Any]] = {}
    for c in select_modules(model, config):
        if c.user_d:
            continue
        new_d = c.d
        if c.kind in ("depthwise", "conv"):
            area = int(math.prod(c.module.kernel_size))
            # within one kernel (d divides the area) or whole kernels: the smallest multiple of the area >= d
            new_d = c.d if fits_kernel(c.d, area) else -(-c.d // area) * area
        if c.cols % new_d:
            added[c.name] = {"skip": True}
            logger.info("hf_vq: %s (%s, row length %d) stays dense: block size %d does not divide it.",
                        c.name, c.kind, c.cols, new_d)
        elif new_d != c.d:
            added[c.name] = {"d": new_d}
    if not added:
        return config
    return config.replace(overrides={**config.overrides, **added})


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
    layouts: dict[str, LayerLayout] = {}
    requested_k: dict[str, int] = {}  # module -> k before clamping (shared sets clamp on their total)
    owners: dict[int, str] = {}  # id(weight) -> first module name holding it (tied weights)
    for c in select_modules(model, config):
        weight = c.module._parameters["weight"]
        _check_fits(c, weight)
        tied_to = owners.get(id(weight))
        if tied_to is not None:
            owner = layouts.get(tied_to)
            if owner is None or owner.shape != tuple(weight.shape) or owner.d != c.d:
                raise ValueError(
                    f"Modules {tied_to!r} and {c.name!r} share one weight but would be compressed differently; "
                    f"compress both with the same d or list one in modules_to_not_convert."
                )
            layouts[c.name] = dataclasses.replace(owner, kind=c.kind, tied_to=tied_to, rel_error=None)
            continue
        owners[id(weight)] = c.name
        requested_k[c.name] = c.k
        rows = vq_class_for(type(c.module)).matrix_shape(tuple(weight.shape))[0]
        layouts[c.name] = LayerLayout(kind=c.kind, shape=tuple(weight.shape), k=clamp_k(c.k, rows * c.cols // c.d),
                                      d=c.d, num_codebooks=c.num_codebooks, method=c.method, scales=c.scales)
    layouts = _whole_tied_groups(model, layouts)
    return _assign_codebook_sets(layouts, requested_k, config.share) if config.share != "layer" else layouts


def _check_fits(c: Candidate, weight: torch.Tensor) -> None:
    if c.cols % c.d:
        divisors = [x for x in (2, 3, 4, 6, 8, 9, 12, 16, 18) if c.cols % x == 0]
        raise ValueError(
            f"VQConfig: block size d={c.d} (block_size[{c.kind!r}] or an override) does not divide the row length "
            f"{c.cols} of module {c.name!r} (weight {tuple(weight.shape)}). Use a d that divides {c.cols} "
            f"(e.g. {divisors[:4]}), set overrides={{{c.name!r}: {{'d': ...}}}}, or add {c.name!r} to "
            "modules_to_not_convert."
        )
    area = weight.shape[-1] * weight.shape[-2]
    if c.kind in ("conv3x3", "conv", "depthwise") and not fits_kernel(c.d, area):
        raise ValueError(
            f"VQConfig: block size d={c.d} for module {c.name!r} (kernel {tuple(weight.shape[-2:])}) must be a "
            f"multiple or a divisor of the kernel area {area} so that no block straddles two kernels."
        )


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
        schemes = {(layouts[n].method, layouts[n].num_codebooks) for n in names}
        if len(schemes) > 1:
            raise ValueError(
                f"VQConfig.share={share!r}: the modules of codebook set {set_name!r} would use different methods or "
                f"numbers of codebooks {sorted(schemes)} (per-module overrides); a shared set has one shape. Drop "
                "the method / num_codebooks overrides, or use share='layer'."
            )
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
