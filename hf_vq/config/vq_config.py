"""`VQConfig`: the quantization config of hf_vq, validated at construction.

The config has three parts:

* the **scheme** chosen by the user (method, codewords per codebook `k`, block sizes per layer
  kind, which modules stay dense, per-module overrides);
* the **recipe** ([`Recipe`]: k-means iterations, annealing, seed, permutation search steps), which is
  not written into config.json (loading never needs it; the model card and the weights' metadata record it);
* the **layout** filled in by [`hf_vq.quantize_`]: for every compressed module its [`LayerLayout`] (kind,
  weight shape, method, `k`, `d`, number of codebooks, scales, shared codebook set). The layout is what lets a
  loader rebuild every VQ module (on the meta device) without recomputing anything.

After [`hf_vq.quantize_`], `config.record` is the [`CompressionRecord`]: base model, licence, calibration,
permutation, fidelity.

`VQConfig` has the interface of transformers' `QuantizationConfigMixin` (`from_dict`, `to_dict`,
`to_json_string`, `to_json_file`, `update`), so it is passed as
`from_pretrained(..., quantization_config=VQConfig(...))` and written into config.json; the transformers
integration registers a `QuantizationConfigMixin` subclass of it, so this module does not import transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from typing import Any

from .layout import (ALLOCATION_BLOCK_SIZE, DEFAULT_BLOCK_SIZE, FORMAT_VERSION, METHODS, SHARE_SCOPES, SHARING_VERSION,
                     LayerLayout, check_k, fits_kernel)
from .record import AUTO_TUNE_BITS, AUTO_TUNE_STEPS, RECIPE_FIELDS, CompressionRecord, Recipe

__all__ = ["VQConfig"]


def _budget_bits(recipe_kwargs: dict[str, Any]) -> float:
    """Bits per weight of an allocation's budget (`target_ratio` of the fp32 file, or `bits_per_weight`); inf when
    the value is not a positive number (the [`Recipe`] then refuses it with the field's name)."""
    ratio, bits = recipe_kwargs.get("target_ratio"), recipe_kwargs.get("bits_per_weight")
    value = bits if bits is not None else ratio
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return float("inf")
    return float(value) if bits is not None else 32.0 / value


# Keys accepted in a per-module override.
_OVERRIDE_KEYS = {"k", "d", "skip", "method", "num_codebooks", "scales"}


class VQConfig:
    """Configuration of hf_vq's vector quantization.

    Args:
        method (`str`, defaults to `"pq"`):
            `"pq"`: product quantization, each subvector replaced by the nearest codeword of one k-means
            codebook (PQF, Martinez et al. 2021). `"aq"`: additive quantization, each subvector the sum of
            `num_codebooks` codewords, one per codebook (Sun et al. 2021); encoded by beam search, codebooks
            fitted by least squares, starting from residual k-means (see `hf_vq/codec/aq.py`).
        num_codebooks (`int`, *optional*):
            M, the codebooks summed per subvector: 1 for `"pq"` (the only value), default 2 for `"aq"`.
            A subvector costs `M * ceil(log2(k))` bits: AQ with M = 2, k = 256, d = 8 takes the same 2 bits
            per weight as PQ with k = 256, d = 4.
        share (`str`, defaults to `"layer"`):
            Which modules share one codebook set. `"layer"`: every module has its own (the PQF paper).
            `"pool"`: one set per pool of modules with the same block size d (named `"d4"`, `"d9"`, ...).
            `"global"`: one set for the whole network (Sun et al.); every compressed module must then use
            the same d. A shared set is stored once (`vq_shared_codebooks_<set>` in model.safetensors), held
            as one `nn.Parameter` by all its modules (trained once when fine-tuning), counted once in the
            size report, and k is clamped on the pool's total number of subvectors.
        k (`int`, defaults to 256):
            Codewords per codebook, from 2 to 65,536. Codes take `ceil(log2(k))` bits on disk. Per layer (per
            codebook set when shared), k is clamped to `2**floor(log2(n_subvectors / 4))` so that each
            codeword has ~4 subvectors.
        block_size (`dict[str, int]`, *optional*):
            Subvector length `d` per layer kind, merged into the defaults
            `{"linear": 4, "conv1x1": 4, "conv3x3": 9, "conv": 0, "depthwise": 0, "embedding": 4}`.
            0 leaves that kind dense. 3x3 convs take a multiple of 9 (9 or 18 in the paper) or a divisor of 9.
            With `target_ratio` / `bits_per_weight`, `"conv"` and `"depthwise"` default to 1 instead of 0: the
            allocation decides whether they get bits (pass 0 to keep them dense).
        n_iter (`int`, defaults to 100):
            k-means iterations (the paper used 1000 for ResNet-50; ~100 gives decent results). For `"aq"`,
            the iterations of each k-means of the residual initialisation.
        aq_iters (`int`, defaults to 4):
            `"aq"` only: alternations of beam-search encoding and least-squares codebook update after the
            initialisation (each never increases the error).
        beam_size (`int`, defaults to 8):
            `"aq"` only: partial sums kept per subvector by the beam search.
        anneal (`bool`, defaults to `True`):
            Annealed k-means (noise on the centroid update, shrinking over iterations) instead of Lloyd's.
        seed (`int`, defaults to 0):
            Seed of the k-means initialisation and annealing noise; results are deterministic per device.
        permute (`bool`, defaults to `True`):
            PQF's first step: before quantizing, permute the channels of coupled layers (which leaves the
            function unchanged) so that subvectors are easier to quantize.
        permute_iters (`int`, defaults to 1000):
            Steps of the stochastic local search per channel group; each step scores a batch of 256 random
            swaps and keeps the best one if it lowers the objective, and the search stops early once no
            improving swap turns up (0 keeps the better of the identity and the greedy start). 1000 steps
            score 256,000 proposals, more than the paper's 10,000 single-swap iterations, and reach a lower
            objective (benchmarks/results/permute.md).
        modules_to_not_convert (`list[str]`, *optional*):
            Glob patterns (`fnmatch`) of module names left dense, e.g. `["classifier", "*.attention.*"]`.
            Norms and biases are never converted.
        keep_stem_dense (`bool`, defaults to `True`):
            Leave the first convolution reading the input image (<= 4 input channels) dense, as the paper does.
        quantize_embeddings (`bool`, defaults to `True`):
            Compress `nn.Embedding` layers (in small transformers the token embedding is about half the weights).
        quantize_head (`bool`, defaults to `True`):
            Compress the classifier / LM head (found with `get_classifier()` or `get_output_embeddings()`).
        overrides (`dict[str, dict]`, *optional*):
            Per-module settings by glob pattern, e.g. `{"fc": {"k": 1024}, "layer4.*": {"d": 18}, "x": {"skip": True}}`.
            Later patterns win. Each module may also take its own `method` (`"pq"` / `"aq"`), `num_codebooks` and
            `scales` (format 3): `{"*.attention.*": {"method": "aq", "num_codebooks": 2, "d": 8}}`.
        scales (`bool`, defaults to `False`):
            Per-output-channel scales for every compressed module (`Ŵ = diag(s)·decode(codes)`, `s` fp16 `[rows]`,
            format 3): rows are normalised before their subvectors are quantized and the scales fitted after, so
            rows of very different norms share one codebook well. Costs 16 bits per output channel.
        modules (`dict[str, dict]`, *optional*):
            The layout written by [`hf_vq.quantize_`]: per compressed module its kind, shape, k, d and
            num_codebooks. Empty before quantization.
        version (`int`, *optional*):
            Version of the checkpoint format; by default 1 for per-layer product quantization (readable by every
            hf_vq release) and [`FORMAT_VERSION`] for anything newer (AQ and shared codebooks came with 2, per-module
            methods and scales with 3). Configs from a format newer than [`FORMAT_VERSION`] are refused; older ones
            load unchanged (version 1 as per-layer product quantization).
        n_iter, aq_iters, beam_size, anneal, seed, permute, permute_iters, encoder, refit_rounds, tune_steps,
        tune_lr, max_rows, target_ratio, bits_per_weight, allocation_outputs, dense_dtype, hessian_floor:
            The [`Recipe`] (see there): how codes are computed — including the calibrated engine
            (`encoder="output-aware"`), bit allocation to a target size (`target_ratio` / `bits_per_weight`) and the
            16-bit storage of what stays dense (`dense_dtype`, on by default with allocation).
            Kept in `config.recipe`, recorded in the model card and the weights' metadata, never written into
            config.json (loading does not need it).
        dataset (*optional*), tokenizer (*optional*):
            Calibration data for quantize-on-load, as transformers' `GPTQConfig`: a list of texts or a 🤗 Datasets
            name / local text file, and the tokenizer (object, folder or Hub id; default: the model's own folder).
            Used by `from_pretrained(..., quantization_config=VQConfig(...))`; never written to config.json.

    Raises:
        `ValueError`: for an unknown key, an out-of-range value or an unsupported version, naming the field.

    Example:
        ```python
        >>> from hf_vq import VQConfig
        >>> VQConfig(k=256, block_size={"linear": 8}).spec
        'pq-1x8-l8p4c9e4'
        >>> VQConfig.from_spec("pq-1x8-l8p4c9e4").block_size["linear"]
        8
        >>> VQConfig(method="aq", num_codebooks=2, block_size={"linear": 8}, share="global").spec
        'aq-2x8-l8p4c9e4-global'
        ```
    """

    quant_method = "hf_vq"

    def __init__(
        self,
        method: str = "pq",
        k: int = 256,
        num_codebooks: int | None = None,
        share: str = "layer",
        block_size: dict[str, int] | None = None,
        n_iter: int = 100,
        aq_iters: int = 4,
        beam_size: int = 8,
        anneal: bool = True,
        seed: int = 0,
        permute: bool = True,
        permute_iters: int = 1000,
        modules_to_not_convert: list[str] | None = None,
        keep_stem_dense: bool = True,
        quantize_embeddings: bool = True,
        quantize_head: bool = True,
        overrides: dict[str, dict[str, Any]] | None = None,
        scales: bool = False,
        modules: dict[str, dict[str, Any]] | None = None,
        version: int | None = None,
        quant_method: str = "hf_vq",
        dataset: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        # transformers' QuantizationConfigMixin.from_dict calls cls(**d): quant_method is accepted, the rest refused.
        recipe_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in RECIPE_FIELDS}
        if kwargs:
            raise ValueError(
                f"VQConfig got unknown keys {sorted(kwargs)}; valid keys are {sorted(self._valid_keys())}. "
                "Check the spelling, or upgrade hf_vq if the config was written by a newer release."
            )
        if quant_method != "hf_vq":
            raise ValueError(f"VQConfig.quant_method={quant_method!r}; hf_vq configs have quant_method='hf_vq'.")
        self.quant_method = "hf_vq"
        self.method = method
        self.k = k
        self.num_codebooks = (2 if method == "aq" else 1) if num_codebooks is None else num_codebooks
        self.share = share
        allocating = recipe_kwargs.get("target_ratio") is not None or recipe_kwargs.get("bits_per_weight") is not None
        if allocating:
            recipe_kwargs.setdefault("dense_dtype", "float16")  # a whole-file budget: 16-bit norms and biases
            if recipe_kwargs.get("encoder") == "output-aware" and _budget_bits(recipe_kwargs) <= AUTO_TUNE_BITS:
                recipe_kwargs.setdefault("tune_steps", AUTO_TUNE_STEPS)  # low budgets: block-wise tuning pays
        defaults = {**DEFAULT_BLOCK_SIZE, **ALLOCATION_BLOCK_SIZE} if allocating else DEFAULT_BLOCK_SIZE
        self.block_size = {**defaults, **(block_size or {})} if isinstance(block_size, (dict, type(None))) \
            else block_size
        self.recipe = Recipe(n_iter=n_iter, aq_iters=aq_iters, beam_size=beam_size, anneal=anneal, seed=seed,
                             permute=permute, permute_iters=permute_iters, **recipe_kwargs)
        #: quantize-on-load calibration (as transformers' `GPTQConfig(dataset=, tokenizer=)`): a list of texts or a
        #: 🤗 Datasets name, and the tokenizer (or its folder / Hub id). Never written to config.json.
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.modules_to_not_convert = list(modules_to_not_convert or []) if isinstance(
            modules_to_not_convert, (list, tuple, type(None))) else modules_to_not_convert
        self.keep_stem_dense = keep_stem_dense
        self.quantize_embeddings = quantize_embeddings
        self.quantize_head = quantize_head
        self.overrides = copy.deepcopy(dict(overrides or {})) if isinstance(overrides, (dict, type(None))) else overrides
        self.scales = scales
        self.modules = copy.deepcopy(dict(modules or {})) if isinstance(modules, (dict, type(None))) else modules
        #: What the compression did (set by `quantize_`, restored by loaders); not part of config.json.
        self.record: CompressionRecord | None = None
        self._version = version
        self.post_init()

    # ------------------------------------------------------------------ recipe fields (not written to config.json)
    def __getattr__(self, name: str) -> Any:
        recipe = self.__dict__.get("recipe")
        if name in RECIPE_FIELDS and recipe is not None:
            return getattr(recipe, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RECIPE_FIELDS:
            self.recipe = dataclasses.replace(self.recipe, **{name: value})
        else:
            super().__setattr__(name, value)

    @property
    def version(self) -> int:
        """The format version this config is written as: the one given (e.g. read from an older config.json), else
        1 for per-layer product quantization (readable by every hf_vq release) and the newest, [`FORMAT_VERSION`],
        for anything that needs a later format (AQ, shared codebooks, per-module methods, scales)."""
        if self._version is not None:
            return self._version
        if self.method != "pq" or self.share != "layer" or self.scales:
            return FORMAT_VERSION
        if isinstance(self.overrides, dict) and any(isinstance(o, dict) and {"method", "num_codebooks", "scales"} & set(o)
                                                     for o in self.overrides.values()):
            return FORMAT_VERSION
        if isinstance(self.modules, dict):
            for data in self.modules.values():
                if isinstance(data, dict) and ("method" in data or data.get("scales")):
                    return FORMAT_VERSION
        return 1

    @version.setter
    def version(self, value: int | None) -> None:
        self._version = value

    def replace(self, **changes: Any) -> "VQConfig":
        """A copy with `changes` applied (scheme, recipe or `modules` fields); recipe and record are kept."""
        data = {**self.to_dict(), **self.recipe.to_dict(), "dataset": self.dataset, "tokenizer": self.tokenizer, **changes}
        if self._version is None and "version" not in changes:
            data.pop("version")
        new = type(self)(**data)
        new.record = copy.deepcopy(self.record)
        return new

    # ------------------------------------------------------------------ validation
    @classmethod
    def _valid_keys(cls) -> set[str]:
        return set(RECIPE_FIELDS) | {"dataset", "tokenizer", "method", "k", "num_codebooks", "share", "aq_iters", "beam_size", "block_size", "n_iter", "anneal", "seed", "permute", "permute_iters", "modules_to_not_convert", "keep_stem_dense",
                "quantize_embeddings", "quantize_head", "overrides", "scales", "modules", "version", "quant_method"}

    def post_init(self) -> None:
        """Validate every field; raise `ValueError` naming the field, the value and the fix."""
        if self._version is not None and (isinstance(self._version, bool) or not isinstance(self._version, int)):
            raise ValueError(f"VQConfig.version={self._version!r} must be a positive integer (this release writes "
                             f"{FORMAT_VERSION}).")
        self._check_types()
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"VQConfig.version={self.version!r} must be a positive integer (this release writes {FORMAT_VERSION}).")
        if self.version > FORMAT_VERSION:
            raise ValueError(
                f"VQConfig.version={self.version} is newer than the format this hf_vq understands ({FORMAT_VERSION}). "
                "Upgrade hf_vq (`pip install -U hf_vq`) to load this checkpoint."
            )
        if self.method not in METHODS:
            raise ValueError(
                f"VQConfig.method={self.method!r} is not supported; use 'pq' (product quantization, one codebook) "
                "or 'aq' (additive quantization, a sum of num_codebooks codewords)."
            )
        check_k(self.k, "k")
        m = self.num_codebooks
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(
                f"VQConfig.num_codebooks={m!r} must be an integer >= 1 (codebooks summed per subvector; "
                "2 is the usual choice for method='aq')."
            )
        if self.method == "pq" and m != 1:
            raise ValueError(
                f"VQConfig.num_codebooks={m} needs method='aq': product quantization uses one codebook per "
                "subvector. Pass method='aq' for a sum of codewords, or num_codebooks=1."
            )
        if self.share not in SHARE_SCOPES:
            raise ValueError(
                f"VQConfig.share={self.share!r} is not a sharing scope; use 'layer' (one codebook set per module), "
                "'pool' (one per block size d) or 'global' (one for the whole network)."
            )
        if (self.method != "pq" or self.share != "layer") and self.version < SHARING_VERSION:
            raise ValueError(
                f"VQConfig.version={self.version} predates method='aq' and shared codebooks (format "
                f"{SHARING_VERSION}); omit version or pass version={FORMAT_VERSION}."
            )
        for kind, d in self.block_size.items():
            if kind not in DEFAULT_BLOCK_SIZE:
                raise ValueError(
                    f"VQConfig.block_size has an unknown layer kind {kind!r}; use keys from {sorted(DEFAULT_BLOCK_SIZE)}."
                )
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                raise ValueError(
                    f"VQConfig.block_size[{kind!r}]={d!r} must be a non-negative integer (0 leaves {kind} layers dense)."
                )
        if not fits_kernel(self.block_size["conv3x3"], 9):
            raise ValueError(
                f"VQConfig.block_size['conv3x3']={self.block_size['conv3x3']} must divide 9 or be a multiple of 9 (one "
                "3x3 kernel per block = 9, two adjacent input channels = 18; 1 or 3 within a kernel) so that blocks "
                "never straddle two kernels."
            )
        self._check_selection()
        self._check_modules()

    def _check_selection(self) -> None:
        """Which modules are compressed: flags, globs and per-module overrides."""
        for field in ("keep_stem_dense", "quantize_embeddings", "quantize_head", "scales"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"VQConfig.{field}={getattr(self, field)!r} must be True or False.")
        if not all(isinstance(p, str) and p for p in self.modules_to_not_convert):
            raise ValueError(f"VQConfig.modules_to_not_convert={self.modules_to_not_convert!r} must be a list of glob patterns.")
        for pattern, override in self.overrides.items():
            if not isinstance(override, dict):
                raise ValueError(f"VQConfig.overrides[{pattern!r}]={override!r} must be a dict such as {{'k': 1024}}.")
            unknown = set(override) - _OVERRIDE_KEYS
            if unknown:
                raise ValueError(
                    f"VQConfig.overrides[{pattern!r}] has unknown keys {sorted(unknown)}; use {sorted(_OVERRIDE_KEYS)}."
                )
            if "k" in override:
                check_k(override["k"], f"overrides[{pattern!r}].k")
            if "d" in override and (isinstance(override["d"], bool) or not isinstance(override["d"], int) or override["d"] < 1):
                raise ValueError(f"VQConfig.overrides[{pattern!r}].d={override['d']!r} must be a positive integer.")
            for flag in ("skip", "scales"):
                if flag in override and not isinstance(override[flag], bool):
                    raise ValueError(f"VQConfig.overrides[{pattern!r}].{flag}={override[flag]!r} must be True or False.")
            if "method" in override and override["method"] not in METHODS:
                raise ValueError(f"VQConfig.overrides[{pattern!r}].method={override['method']!r} is not one of {METHODS}.")
            m = override.get("num_codebooks", 2 if override.get("method") == "aq" else None)
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1
                                  or (override.get("method", self.method) == "pq" and m != 1)):
                raise ValueError(f"VQConfig.overrides[{pattern!r}].num_codebooks={m!r} must be an integer >= 1, and 1 "
                                 "for method 'pq'.")

    def _check_modules(self) -> None:
        """The layouts (`modules`), each valid for this format version, tied to a listed module, shared sets of one
        shape."""
        sets: dict[str, tuple[int, int, int]] = {}
        for name, data in self.modules.items():
            layout = LayerLayout.from_dict(name, data, self.method)
            owner = self.modules.get(layout.tied_to) if layout.tied_to is not None else None
            if layout.tied_to is not None and (not isinstance(owner, dict) or owner.get("tied_to") is not None):
                raise ValueError(
                    f"quantization_config.modules[{name!r}].tied_to={layout.tied_to!r} names no compressed module of "
                    "quantization_config.modules that holds its own codes (the entry of the module it shares them with "
                    "is missing). The config.json is incomplete: restore it (re-download it, or save the model again)."
                )
            if layout.needs_version(self.method) > self.version:
                raise ValueError(f"quantization_config.modules[{name!r}] uses a per-module method or scales, which "
                                 f"format version {self.version} does not have; omit version or pass "
                                 f"version={FORMAT_VERSION}.")
            if layout.codebook_set is None:
                continue
            if self.version < SHARING_VERSION:
                raise ValueError(f"quantization_config.modules[{name!r}] names a codebook_set, which format version "
                                 f"{self.version} does not have; the config.json is inconsistent.")
            shape = (layout.num_codebooks, layout.k, layout.d)
            if sets.setdefault(layout.codebook_set, shape) != shape:
                raise ValueError(
                    f"quantization_config.modules[{name!r}] uses codebook set {layout.codebook_set!r} with "
                    f"[num_codebooks, k, d] = {list(shape)}, but other modules of that set use "
                    f"{list(sets[layout.codebook_set])}; a shared set has one shape. The config.json is corrupted."
                )

    def _check_types(self) -> None:
        """Container fields have the right type (a string where a dict belongs is named, not a raw TypeError)."""
        expected = {"block_size": (dict, "a dict such as {'linear': 8}"),
                    "modules": (dict, "a dict of module name -> layout (written by hf_vq.quantize_)"),
                    "overrides": (dict, "a dict of glob pattern -> {'k': ..., 'd': ..., 'skip': ...}"),
                    "modules_to_not_convert": (list, "a list of glob patterns such as ['classifier']"),
                    "method": (str, "'pq' or 'aq'"), "share": (str, "'layer', 'pool' or 'global'")}
        for field, (kind, fix) in expected.items():
            value = getattr(self, field)
            if not isinstance(value, kind):
                raise ValueError(f"VQConfig.{field}={value!r} ({type(value).__name__}) must be {fix}.")

    # ------------------------------------------------------------------ layout
    @property
    def layouts(self) -> dict[str, LayerLayout]:
        """The per-module layout as [`LayerLayout`] objects (empty before quantization).

        Parsed once and reused while `modules` compares equal to what was parsed (loading asks often).
        """
        cached = self.__dict__.get("_layouts_cache")
        if cached is not None and cached[0] == self.modules:
            return dict(cached[1])
        layouts = {name: LayerLayout.from_dict(name, data, self.method) for name, data in self.modules.items()}
        self.__dict__["_layouts_cache"] = (copy.deepcopy(self.modules), layouts)
        return dict(layouts)

    @property
    def is_quantized(self) -> bool:
        return bool(self.modules)

    @property
    def codebook_sets(self) -> dict[str, list[str]]:
        """Shared codebook sets and the modules decoding with each (empty with `share="layer"`)."""
        sets: dict[str, list[str]] = {}
        for name, layout in self.layouts.items():
            if layout.codebook_set is not None:
                sets.setdefault(layout.codebook_set, []).append(name)
        return sets

    # ------------------------------------------------------------------ spec strings
    @property
    def spec(self) -> str:
        """Short name of the scheme, `{method}-{M}x{bits}-l{linear}p{conv1x1}c{conv3x3}e{embedding}[-{share}]`.

        `M` is the number of codebooks summed per subvector and `bits = ceil(log2(k))`, as in AQLM's
        "1x16", followed by the block sizes of linear, pointwise, 3x3 conv and embedding layers
        (0 = dense), then the sharing scope unless it is per layer. Examples: `pq-1x8-l4p4c9e4` (the
        default), `aq-2x8-l8p8c18e8-global`.
        """
        bits = max(1, (self.k - 1).bit_length())
        b = self.block_size
        m = self.num_codebooks
        head = f"{self.method}-{m}x{bits}" if self.k == 2**bits else f"{self.method}-{m}xk{self.k}"
        tail = "" if self.share == "layer" else f"-{self.share}"
        return f"{head}-l{b['linear']}p{b['conv1x1']}c{b['conv3x3']}e{b['embedding']}{tail}"

    _SPEC_RE = re.compile(r"^(?P<method>[a-z]+)-(?P<m>\d+)x(?:(?P<bits>\d+)|k(?P<k>\d+))(?P<blocks>(?:-[lpce]\d+|[lpce]\d+)*)"
                          r"(?:-(?P<share>layer|pool|global))?$")

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> "VQConfig":
        """Build a config from a spec string such as `"pq-1x8-l8p8c18"` or `"aq-2x8-l8p8c18-global"` (see [`VQConfig.spec`]).

        Block sizes that the spec leaves out keep their defaults; `kwargs` set the other fields.
        """
        match = cls._SPEC_RE.match(spec.strip().lower())
        if match is None:
            raise ValueError(
                f"Spec string {spec!r} is not of the form 'pq-1x8-l4p4c9e4' (method-Mxbits then optional "
                "l<linear>p<conv1x1>c<conv3x3>e<embedding> block sizes, then optional -pool or -global)."
            )
        if int(match["m"]) != 1 and match["method"] != "aq":
            raise ValueError(f"Spec string {spec!r}: product quantization uses one codebook per subvector ('1x...'); "
                             "use 'aq-Mx...' for additive quantization with M codebooks.")
        if match["share"]:
            kwargs["share"] = match["share"]
        k = 2 ** int(match["bits"]) if match["bits"] else int(match["k"])
        keys = {"l": "linear", "p": "conv1x1", "c": "conv3x3", "e": "embedding"}
        blocks = {keys[key]: int(value) for key, value in re.findall(r"([lpce])(\d+)", match["blocks"] or "")}
        block_size = {**kwargs.pop("block_size", {}), **blocks}
        return cls(method=match["method"], k=k, num_codebooks=int(match["m"]), block_size=block_size, **kwargs)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """What config.json holds under `quantization_config`: the scheme and the layouts, not the recipe."""
        out = {
            "quant_method": self.quant_method,
            "version": self.version,
            "method": self.method,
            "k": self.k,
            "num_codebooks": self.num_codebooks,
            "share": self.share,
            "block_size": dict(self.block_size),
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "keep_stem_dense": self.keep_stem_dense,
            "quantize_embeddings": self.quantize_embeddings,
            "quantize_head": self.quantize_head,
            "overrides": copy.deepcopy(self.overrides),
            "modules": copy.deepcopy(self.modules),
        }
        if self.scales:  # format 3 only: older configs keep exactly the keys older releases accept
            out["scales"] = True
        if self.version < SHARING_VERSION:  # a format-1 config: exactly the keys older hf_vq releases accept
            for key in ("num_codebooks", "share"):
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """A config from its dict (config.json's `quantization_config`), as transformers' mixin does.

        Recipe keys written by older releases (`n_iter`, `anneal`, ...) are accepted and kept as the recipe.

        Raises:
            `ValueError`: if `config_dict` is not a dict, or a field is invalid (named).
        """
        if not isinstance(config_dict, dict):
            raise ValueError(f"quantization_config is {type(config_dict).__name__} {config_dict!r}, expected a dict "
                             "(the 'quantization_config' object of config.json). The config.json is corrupted.")
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key) and key != "record":
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:  # noqa: ARG002 - same signature as the mixin
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given fields that exist (transformers' mixin API); returns those that do not."""
        unused = {}
        for key, value in kwargs.items():
            if key in self._valid_keys() - {"quant_method", "version"}:
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused

    def __iter__(self):
        """`dict(config)`: the serialised fields (not internal caches such as the parsed layouts)."""
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VQConfig) and self.to_dict() == other.to_dict()

    def __deepcopy__(self, memo: dict) -> "VQConfig":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        shallow = ("dataset", "tokenizer")  # calibration objects are shared, never copied
        new.__dict__.update({key: value if key in shallow else copy.deepcopy(value, memo)
                             for key, value in self.__dict__.items() if key != "_layouts_cache"})
        return new

    def __repr__(self) -> str:
        return f"VQConfig(spec={self.spec!r}, n_iter={self.n_iter}, anneal={self.anneal}, modules={len(self.modules)})"
