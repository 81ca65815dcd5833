"""The per-module layout of a compressed model: how each module was compressed, enough to rebuild it.

A layout is what loaders need (written into config.json under `quantization_config.modules`); everything that
only describes *how* the codes were computed lives in [`hf_vq.config.Recipe`] instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMAT_VERSION", "LayerLayout", "DEFAULT_BLOCK_SIZE", "LAYER_KINDS", "METHODS", "SHARE_SCOPES",
           "SHARED_CODEBOOKS", "MIN_K", "MAX_K", "block_size_key", "shared_codebooks_key", "check_k", "fits_kernel"]

#: Newest version of the on-disk format this release reads and writes. Loaders refuse newer versions.
#: 1: product quantization, one codebook set per module. 2: adds `method="aq"` (additive quantization,
#: `num_codebooks` > 1) and codebooks shared across modules (`share`, per-module `codebook_set`, stored once
#: as `vq_shared_codebooks_<set>`). 3: per-module schemes — each layout may name its own `method` (and so its own
#: M, k, d, as before) and carry per-output-channel `scales` (`<module>.scales`, fp16 `[rows]`). A config records
#: the oldest version that describes it (1 for per-layer PQ, so such checkpoints stay readable by older hf_vq
#: releases); version-1 and version-2 configs load unchanged.
FORMAT_VERSION = 3
#: The first format version that knows additive quantization and shared codebooks.
SHARING_VERSION = 2
#: The first format version with per-module methods and per-output-channel scales.
PER_LAYER_VERSION = 3

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
#: With bit allocation to a target size (`target_ratio` / `bits_per_weight`), the kinds dense by default are
#: candidates too: the allocator measures them like any layer and may still keep them dense. Their `d` here is only
#: the plan's starting point (1 divides every kernel); the allocation picks each layer's own.
ALLOCATION_BLOCK_SIZE: dict[str, int] = {"conv": 1, "depthwise": 1}
#: Every layer kind a layout may name; transformers' Conv1D (weight stored [in, out]) uses the linear block size.
LAYER_KINDS = (*DEFAULT_BLOCK_SIZE, "conv1d")

#: `"pq"`: product quantization (one k-means codebook, PQF). `"aq"`: additive quantization (sum of M codewords).
METHODS = ("pq", "aq")
#: Codebook sharing scopes: one set per module, per pool of modules with the same d, or for the whole network.
SHARE_SCOPES = ("layer", "pool", "global")
MIN_K, MAX_K = 2, 65_536
#: Name prefix of the parameters holding shared codebook sets in a compressed model (registered directly on
#: the model, not on a child module, so that containers such as `nn.Sequential` never see them), and so of
#: their keys in `model.safetensors`: `vq_shared_codebooks_<set>`, stored once.
SHARED_CODEBOOKS = "vq_shared_codebooks_"

_LAYOUT_KEYS = {"kind", "shape", "k", "d", "num_codebooks", "rel_error", "tied_to", "codebook_set", "method", "scales"}
_SET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def block_size_key(kind: str) -> str:
    """The `VQConfig.block_size` key that applies to a layer kind."""
    return "linear" if kind == "conv1d" else kind


def fits_kernel(d: int, area: int) -> bool:
    """Whether blocks of `d` values keep to kernels of `area` taps (a conv's `kh · kw`): whole kernels (`area`
    divides `d`) or parts of one (`d` divides `area`), never straddling two."""
    return d % area == 0 or area % d == 0


def shared_codebooks_key(codebook_set: str) -> str:
    """Parameter name (on `hf_vq.pipeline.shared_codebooks_owner`) of a shared codebook set `[M, k, d]`."""
    return f"{SHARED_CODEBOOKS}{codebook_set}"


def check_k(k: Any, field: str) -> None:
    """Raise `ValueError` naming `VQConfig.<field>` unless `k` is an integer number of codewords in range."""
    if isinstance(k, bool) or not isinstance(k, int) or not MIN_K <= k <= MAX_K:
        raise ValueError(
            f"VQConfig.{field}={k!r} is out of range: use an integer number of codewords from {MIN_K} to {MAX_K:,} "
            "(256 = 8 bits per code is the paper's default)."
        )


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
        method (`str`, defaults to `"pq"`): `"pq"` or `"aq"`, this module's own (format 3 lets modules differ).
        scales (`bool`, defaults to `False`): the module holds per-output-channel scales `[rows]` (fp16 on disk,
            `<module>.scales`): `Ŵ = diag(scales) · decode(codes)`.
    """

    kind: str
    shape: tuple[int, ...]
    k: int
    d: int
    num_codebooks: int = 1
    rel_error: float | None = None
    tied_to: str | None = None
    codebook_set: str | None = None
    method: str = "pq"
    scales: bool = False

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

    @property
    def n_subvectors(self) -> int:
        """Subvectors of the matrix view: `rows * cols / d`."""
        rows, cols = self.matrix_shape
        return rows * (cols // self.d)

    def code_bits(self) -> int:
        """Bits of the codes on disk: `ceil(log2 k)` per code, `num_codebooks` codes per subvector."""
        return self.n_subvectors * self.num_codebooks * self.bits

    def own_bits(self) -> int:
        """Bits this module alone stores: codes, its own fp16 codebooks (not a shared set's) and fp16 scales."""
        if self.tied_to is not None:
            return 0
        books = 0 if self.codebook_set is not None else self.num_codebooks * self.k * self.d * 16
        return self.code_bits() + books + (self.matrix_shape[0] * 16 if self.scales else 0)

    def needs_version(self, method: str) -> int:
        """The oldest format version that describes this layout in a config whose method is `method`."""
        if self.scales or self.method != method:
            return PER_LAYER_VERSION
        return SHARING_VERSION if self.codebook_set is not None or self.num_codebooks != 1 else 1

    def to_dict(self, method: str = "pq") -> dict[str, Any]:
        """JSON-ready dict; `method` is the config's: a layout names its own only when it differs (format 3)."""
        out = {"kind": self.kind, "shape": list(self.shape), "k": self.k, "d": self.d,
               "num_codebooks": self.num_codebooks}
        if self.rel_error is not None:
            out["rel_error"] = round(float(self.rel_error), 6)
        if self.tied_to is not None:
            out["tied_to"] = self.tied_to
        if self.codebook_set is not None:
            out["codebook_set"] = self.codebook_set
        if self.method != method:
            out["method"] = self.method
        if self.scales:
            out["scales"] = True
        return out

    @classmethod
    def from_dict(cls, name: str, data: Any, method: str = "pq") -> "LayerLayout":
        """Parse and validate `quantization_config.modules[name]`; `method` is the config's default method.

        Raises:
            `ValueError`: naming the module, the key and the fix.
        """
        where = f"quantization_config.modules[{name!r}]"
        if not isinstance(data, dict):
            raise ValueError(f"{where} is {type(data).__name__} {data!r}, expected a dict such as "
                             "{'kind': 'linear', 'shape': [384, 384], 'k': 256, 'd': 4}. The config.json is corrupted.")
        unknown = set(data) - _LAYOUT_KEYS
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}; expected a subset of {sorted(_LAYOUT_KEYS)}. "
                             "Was it written by a newer hf_vq?")
        missing = [key for key in ("kind", "shape", "k", "d") if key not in data]
        if missing:
            raise ValueError(f"{where} lacks the key {missing[0]!r}; every compressed module needs 'kind', 'shape', "
                             "'k' and 'd'. The config.json is incomplete or corrupted.")
        _check_types(where, data)
        layout = cls(kind=data["kind"], shape=tuple(int(s) for s in data["shape"]), k=int(data["k"]), d=int(data["d"]),
                     num_codebooks=int(data.get("num_codebooks", 1)), rel_error=data.get("rel_error"),
                     tied_to=data.get("tied_to"), codebook_set=data.get("codebook_set"),
                     method=data.get("method", method), scales=bool(data.get("scales", False)))
        layout._validate(where)
        return layout

    def _validate(self, where: str) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"{where}.kind={self.kind!r} is not one of {LAYER_KINDS}.")
        check_k(self.k, f"modules[{where.split('[', 1)[1]}.k")
        if self.d < 1:
            raise ValueError(f"{where}.d={self.d} must be a positive integer.")
        if self.num_codebooks < 1:
            raise ValueError(f"{where}.num_codebooks={self.num_codebooks} must be >= 1.")
        if self.method not in METHODS:
            raise ValueError(f"{where}.method={self.method!r} is not one of {METHODS}.")
        if self.method == "pq" and self.num_codebooks != 1:
            raise ValueError(f"{where}: method 'pq' has one codebook per subvector, not num_codebooks="
                             f"{self.num_codebooks}. The config.json is inconsistent.")
        if not self.shape or any(s < 1 for s in self.shape) or self.matrix_shape[1] % self.d:
            raise ValueError(f"{where}.d={self.d} does not divide the rows of weight {list(self.shape)}; the "
                             "config.json is corrupted.")
        if self.codebook_set is not None and not (isinstance(self.codebook_set, str) and _SET_NAME.match(self.codebook_set)):
            raise ValueError(f"{where}.codebook_set={self.codebook_set!r} must be an identifier such as 'global' or 'd4'.")
        if self.tied_to is not None and not isinstance(self.tied_to, str):
            raise ValueError(f"{where}.tied_to={self.tied_to!r} must be a module name.")


def _check_types(where: str, data: dict[str, Any]) -> None:
    """Types of the raw values, before they are converted (a string where a number belongs, ...)."""
    for key in ("k", "d", "num_codebooks"):
        value = data.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{key}={value!r} must be an integer.")
    shape = data["shape"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"{where}.shape={shape!r} must be a list of integers (the dense weight's shape).")
    if not isinstance(data["kind"], str):
        raise ValueError(f"{where}.kind={data['kind']!r} must be one of {LAYER_KINDS}.")
    rel = data.get("rel_error")
    if rel is not None and (isinstance(rel, bool) or not isinstance(rel, (int, float))):
        raise ValueError(f"{where}.rel_error={rel!r} must be a number.")
    if not isinstance(data.get("scales", False), bool):
        raise ValueError(f"{where}.scales={data['scales']!r} must be true or false.")
