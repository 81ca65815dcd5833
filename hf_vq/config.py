"""`VQConfig`: the quantization config of hf_vq, validated at construction.

The config has two halves:

* the **scheme** chosen by the user (method, codewords per codebook `k`, block sizes per layer
  kind, k-means settings, which modules stay dense, per-module overrides);
* the **layout** filled in by [`hf_vq.quantize_`]: for every compressed module its kind, weight
  shape, `k`, `d`, number of codebooks and, when codebooks are shared across layers, the name of its
  codebook set. The layout is what lets a loader rebuild every VQ
  module (on the meta device) without recomputing anything.

It subclasses transformers' `QuantizationConfigMixin` so that it can be passed as
`from_pretrained(..., quantization_config=VQConfig(...))` and is written into config.json.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["FORMAT_VERSION", "LayerLayout", "VQConfig", "DEFAULT_BLOCK_SIZE", "LAYER_KINDS", "METHODS", "SHARE_SCOPES",
           "block_size_key", "shared_codebooks_key"]

#: Newest version of the on-disk format this release reads and writes. Loaders refuse newer versions.
#: 1: product quantization, one codebook set per module. 2: adds `method="aq"` (additive quantization,
#: `num_codebooks` > 1) and codebooks shared across modules (`share`, per-module `codebook_set`, stored once
#: as `vq_shared_codebooks_<set>`). A config records the oldest version that describes it (1 for per-layer
#: PQ, so such checkpoints stay readable by older hf_vq releases); version-1 configs load unchanged.
FORMAT_VERSION = 2
#: The first format version that knows additive quantization and shared codebooks.
_SHARING_VERSION = 2

#: Layer kinds that hf_vq knows how to compress, with the paper's default block size `d`.
#: A block size of 0 leaves that kind dense.
DEFAULT_BLOCK_SIZE: dict[str, int] = {
    "linear": 4,  # nn.Linear and transformers' Conv1D (GPT-2); paper: 4 (small) or 8 (large blocks)
    "conv1x1": 4,  # pointwise convolutions; paper: 4 or 8
    "conv3x3": 9,  # 3x3 convolutions; paper: 9 (one kernel) or 18 (two adjacent input channels)
    "conv": 0,  # other kernel sizes (5x5, 7x7, ...): 0 = dense; otherwise a multiple of kh*kw
    "depthwise": 0,  # depthwise / grouped convs with one input channel per group: dense by default
    "embedding": 4,  # nn.Embedding rows
}
#: Every layer kind a layout may name; transformers' Conv1D (weight stored [in, out]) uses the linear block size.
LAYER_KINDS = (*DEFAULT_BLOCK_SIZE, "conv1d")


def block_size_key(kind: str) -> str:
    """The `VQConfig.block_size` key that applies to a layer kind."""
    return "linear" if kind == "conv1d" else kind

#: `"pq"`: product quantization (one k-means codebook, PQF). `"aq"`: additive quantization (sum of M codewords).
METHODS = ("pq", "aq")
#: Codebook sharing scopes: one set per module, per pool of modules with the same d, or for the whole network.
SHARE_SCOPES = ("layer", "pool", "global")
MIN_K, MAX_K = 2, 65_536
#: Name prefix of the parameters holding shared codebook sets in a compressed model (registered directly on
#: the model, not on a child module, so that containers such as `nn.Sequential` never see them), and so of
#: their keys in `model.safetensors`: `vq_shared_codebooks_<set>`, stored once.
SHARED_CODEBOOKS = "vq_shared_codebooks_"


def shared_codebooks_key(codebook_set: str) -> str:
    """Parameter name (on [`hf_vq.quantize.shared_codebooks_owner`]) of a shared codebook set `[M, k, d]`."""
    return f"{SHARED_CODEBOOKS}{codebook_set}"


# Keys accepted in a per-module override.
_OVERRIDE_KEYS = {"k", "d", "skip"}
_LAYOUT_KEYS = {"kind", "shape", "k", "d", "num_codebooks", "rel_error", "tied_to", "codebook_set"}
_SET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LayerLayout:
    """How one module was compressed: enough to rebuild it without recomputing anything.

    Args:
        kind (`str`): one of [`LAYER_KINDS`] (`"conv3x3"`, `"linear"`, ...).
        shape (`tuple[int, ...]`): shape of the dense weight, in the module's own layout.
        k (`int`): codewords per codebook (after clamping).
        d (`int`): block size, the length of a subvector.
        num_codebooks (`int`): codebooks summed per subvector (1 for product quantization).
        rel_error (`float`, *optional*): relative weight error `‖W−Ŵ‖²/‖W‖²` measured at quantization.
        tied_to (`str`, *optional*): name of the module whose codes and codebooks this one shares
            (tied input/output embeddings); stored once on disk.
        codebook_set (`str`, *optional*): name of the shared codebook set this module decodes with
            (`"global"`, or `"d4"` for the pool of modules with d = 4); stored once on disk as
            `vq_shared_codebooks_<codebook_set>`. `None`: the module has its own codebooks.
    """

    kind: str
    shape: tuple[int, ...]
    k: int
    d: int
    num_codebooks: int = 1
    rel_error: float | None = None
    tied_to: str | None = None
    codebook_set: str | None = None

    @property
    def bits(self) -> int:
        """Bits per code on disk: `ceil(log2(k))`."""
        return max(1, (self.k - 1).bit_length())

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """`(rows, cols)` of the matrix whose rows are cut into subvectors (Conv1D weights are stored transposed)."""
        if self.kind == "conv1d":
            return self.shape[1], self.shape[0]
        return self.shape[0], math.prod(self.shape) // self.shape[0]

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "shape": list(self.shape), "k": self.k, "d": self.d,
               "num_codebooks": self.num_codebooks}
        if self.rel_error is not None:
            out["rel_error"] = round(float(self.rel_error), 6)
        if self.tied_to is not None:
            out["tied_to"] = self.tied_to
        if self.codebook_set is not None:
            out["codebook_set"] = self.codebook_set
        return out

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> "LayerLayout":
        unknown = set(data) - _LAYOUT_KEYS
        if unknown:
            raise ValueError(
                f"quantization_config.modules[{name!r}] has unknown keys {sorted(unknown)}; "
                f"expected a subset of {sorted(_LAYOUT_KEYS)}. Was it written by a newer hf_vq?"
            )
        try:
            layout = cls(kind=data["kind"], shape=tuple(int(s) for s in data["shape"]), k=int(data["k"]),
                         d=int(data["d"]), num_codebooks=int(data.get("num_codebooks", 1)),
                         rel_error=data.get("rel_error"), tied_to=data.get("tied_to"),
                         codebook_set=data.get("codebook_set"))
        except KeyError as err:
            raise ValueError(
                f"quantization_config.modules[{name!r}] lacks the key {err.args[0]!r}; every compressed "
                "module needs 'kind', 'shape', 'k' and 'd'. The config.json is incomplete or corrupted."
            ) from None
        if layout.kind not in LAYER_KINDS:
            raise ValueError(f"quantization_config.modules[{name!r}].kind={layout.kind!r} is not one of {LAYER_KINDS}.")
        _check_k(layout.k, f"modules[{name!r}].k")
        if layout.d < 1:
            raise ValueError(f"quantization_config.modules[{name!r}].d={layout.d} must be a positive integer.")
        if layout.num_codebooks < 1:
            raise ValueError(f"quantization_config.modules[{name!r}].num_codebooks={layout.num_codebooks} must be >= 1.")
        if layout.codebook_set is not None and not (isinstance(layout.codebook_set, str)
                                                    and _SET_NAME.match(layout.codebook_set)):
            raise ValueError(f"quantization_config.modules[{name!r}].codebook_set={layout.codebook_set!r} must be an "
                             "identifier such as 'global' or 'd4'.")
        return layout


def _check_k(k: Any, field: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not MIN_K <= k <= MAX_K:
        raise ValueError(
            f"VQConfig.{field}={k!r} is out of range: use an integer number of codewords from {MIN_K} to {MAX_K:,} "
            "(256 = 8 bits per code is the paper's default)."
        )


class VQConfig(QuantizationConfigMixin):
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
            0 leaves that kind dense. 3x3 convs take a multiple of 9 (9 or 18 in the paper).
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
            Later patterns win.
        modules (`dict[str, dict]`, *optional*):
            The layout written by [`hf_vq.quantize_`]: per compressed module its kind, shape, k, d and
            num_codebooks. Empty before quantization.
        version (`int`, *optional*):
            Version of the checkpoint format; by default the oldest that describes the config: 1 for
            per-layer product quantization (readable by every hf_vq release), 2 for `method="aq"` or shared
            codebooks. Configs from a format newer than [`FORMAT_VERSION`] are refused; version-1 configs
            (written before `method="aq"` and `share` existed) load as per-layer product quantization.

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
        modules: dict[str, dict[str, Any]] | None = None,
        version: int | None = None,
        quant_method: str = "hf_vq",
        **kwargs: Any,
    ) -> None:
        # transformers' QuantizationConfigMixin.from_dict calls cls(**d): quant_method is accepted, the rest refused.
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
        self.block_size = {**DEFAULT_BLOCK_SIZE, **(block_size or {})}
        self.n_iter = n_iter
        self.aq_iters = aq_iters
        self.beam_size = beam_size
        self.anneal = anneal
        self.seed = seed
        self.permute = permute
        self.permute_iters = permute_iters
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.keep_stem_dense = keep_stem_dense
        self.quantize_embeddings = quantize_embeddings
        self.quantize_head = quantize_head
        self.overrides = copy.deepcopy(dict(overrides or {}))
        self.modules = copy.deepcopy(dict(modules or {}))
        # the oldest format that can describe this config (older readers keep loading plain PQ checkpoints)
        new_features = method != "pq" or share != "layer"
        self.version = (_SHARING_VERSION if new_features else 1) if version is None else version
        self.post_init()

    # ------------------------------------------------------------------ validation
    @classmethod
    def _valid_keys(cls) -> set[str]:
        return {"method", "k", "num_codebooks", "share", "aq_iters", "beam_size", "block_size", "n_iter", "anneal", "seed", "permute", "permute_iters", "modules_to_not_convert", "keep_stem_dense",
                "quantize_embeddings", "quantize_head", "overrides", "modules", "version", "quant_method"}

    def post_init(self) -> None:
        """Validate every field; raise `ValueError` naming the field, the value and the fix."""
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
        _check_k(self.k, "k")
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
        if (self.method != "pq" or self.share != "layer") and self.version < _SHARING_VERSION:
            raise ValueError(
                f"VQConfig.version={self.version} predates method='aq' and shared codebooks (format "
                f"{_SHARING_VERSION}); omit version or pass version={FORMAT_VERSION}."
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
        if self.block_size["conv3x3"] % 9:
            raise ValueError(
                f"VQConfig.block_size['conv3x3']={self.block_size['conv3x3']} must be a multiple of 9 (one 3x3 kernel "
                "per block = 9, two adjacent input channels = 18) so that blocks never split a kernel."
            )
        for field, low in (("n_iter", 1), ("seed", 0), ("permute_iters", 0), ("aq_iters", 0), ("beam_size", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"VQConfig.{field}={value!r} must be an integer >= {low}.")
        for field in ("anneal", "permute", "keep_stem_dense", "quantize_embeddings", "quantize_head"):
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
                _check_k(override["k"], f"overrides[{pattern!r}].k")
            if "d" in override and (isinstance(override["d"], bool) or not isinstance(override["d"], int) or override["d"] < 1):
                raise ValueError(f"VQConfig.overrides[{pattern!r}].d={override['d']!r} must be a positive integer.")
        sets: dict[str, tuple[int, int, int]] = {}
        for name, data in self.modules.items():
            layout = LayerLayout.from_dict(name, data)
            if layout.codebook_set is None:
                continue
            if self.version < _SHARING_VERSION:
                raise ValueError(f"quantization_config.modules[{name!r}] names a codebook_set, which format version "
                                 f"{self.version} does not have; the config.json is inconsistent.")
            shape = (layout.num_codebooks, layout.k, layout.d)
            if sets.setdefault(layout.codebook_set, shape) != shape:
                raise ValueError(
                    f"quantization_config.modules[{name!r}] uses codebook set {layout.codebook_set!r} with "
                    f"[num_codebooks, k, d] = {list(shape)}, but other modules of that set use "
                    f"{list(sets[layout.codebook_set])}; a shared set has one shape. The config.json is corrupted."
                )

    # ------------------------------------------------------------------ layout
    @property
    def layouts(self) -> dict[str, LayerLayout]:
        """The per-module layout as [`LayerLayout`] objects (empty before quantization).

        Parsed once and reused while `modules` compares equal to what was parsed (loading asks often).
        """
        cached = self.__dict__.get("_layouts_cache")
        if cached is not None and cached[0] == self.modules:
            return dict(cached[1])
        layouts = {name: LayerLayout.from_dict(name, data) for name, data in self.modules.items()}
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
        out = {
            "quant_method": self.quant_method,
            "version": self.version,
            "method": self.method,
            "k": self.k,
            "num_codebooks": self.num_codebooks,
            "share": self.share,
            "block_size": dict(self.block_size),
            "n_iter": self.n_iter,
            "aq_iters": self.aq_iters,
            "beam_size": self.beam_size,
            "anneal": self.anneal,
            "seed": self.seed,
            "permute": self.permute,
            "permute_iters": self.permute_iters,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "keep_stem_dense": self.keep_stem_dense,
            "quantize_embeddings": self.quantize_embeddings,
            "quantize_head": self.quantize_head,
            "overrides": copy.deepcopy(self.overrides),
            "modules": copy.deepcopy(self.modules),
        }
        if self.version < _SHARING_VERSION:  # a format-1 config: exactly the keys older hf_vq releases accept
            for key in ("num_codebooks", "share", "aq_iters", "beam_size"):
                out.pop(key)
        return out

    def to_json_string(self, use_diff: bool = True) -> str:  # noqa: ARG002 - same signature as the mixin
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def __iter__(self):
        """`dict(config)`: the serialised fields (not internal caches such as the parsed layouts)."""
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VQConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"VQConfig(spec={self.spec!r}, n_iter={self.n_iter}, anneal={self.anneal}, modules={len(self.modules)})"
