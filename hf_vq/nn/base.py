"""`VQModuleMixin`: what every compressed module holds and how it turns codes back into a weight.

A VQ module is the float module (same class, same attributes, same `forward`) whose `weight`
parameter is replaced by

* `codes`: a frozen uint8 **buffer** `[rows, packed_bytes]` holding the bit-packed integer codes
  (`[rows, n_blocks, num_codebooks]` once unpacked), exactly as it is stored on disk;
* `codebooks`: a trainable **parameter** `[num_codebooks, k, d]`;
* optionally `scales`: a trainable **parameter** `[rows]`, one per output channel (`Ŵ = diag(scales)·decode`);

and `weight` becomes a property that decodes them (see [`VQModuleMixin.decode_weight`]). Keeping the
float class as a base means subclasses with their own `forward` (timm's `Conv2dSame`, transformers'
`Conv1D`) keep working unchanged, and `isinstance(m, nn.Linear)` stays true.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..codec.packing import bits_for, pack_codes, packed_row_bytes, unpack_codes
from ..kernels import PreparedDecode, decode_matrix, needs_grad, vq_linear, vq_matmul
from ..kernels import lut_codes as kernel_lut_codes

__all__ = ["VQModuleMixin", "CodesError"]


class CodesError(ValueError):
    """Codes that do not fit the module: out of range (>= k) or of the wrong shape."""


_MATRIX_SHAPES: dict[tuple, tuple[int, int]] = {}  # (_weight_to_matrix, weight shape) -> (rows, cols)


class VQModuleMixin:
    """Mixin placed before a float module class (`class VQLinear(VQModuleMixin, nn.Linear)`).

    Subclasses define how the dense weight maps to the `[rows, cols]` matrix that is cut into
    subvectors (`_weight_to_matrix` / `_matrix_to_weight`) and which float class they replace.
    """

    #: The float class this VQ class replaces (nn.Linear, nn.Conv2d, ...).
    float_class: type[nn.Module]

    # set by _init_vq
    vq_kind: str
    weight_shape: tuple[int, ...]
    k: int
    d: int
    num_codebooks: int
    codes: torch.Tensor  # uint8 [rows, packed_bytes]
    codebooks: nn.Parameter  # [num_codebooks, k, d]
    scales: nn.Parameter | None  # [rows], or None (no per-output-channel scales)
    codebook_set: str | None = None  # name of the shared codebook set `codebooks` is, None: the module's own

    # ------------------------------------------------------------------ layout of the weight
    @staticmethod
    def _weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
        """Dense weight (module layout) -> `[rows, cols]` matrix whose rows are cut into subvectors."""
        return weight.reshape(weight.shape[0], -1)

    def _matrix_to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """`[rows, cols]` matrix -> dense weight in the module's own layout."""
        return matrix.reshape(self.weight_shape)

    @classmethod
    def matrix_shape(cls, weight_shape: tuple[int, ...]) -> tuple[int, int]:
        """`(rows, cols)` of the matrix view of a weight of `weight_shape` (memoised per class and shape)."""
        key = (cls._weight_to_matrix, tuple(int(s) for s in weight_shape))
        shape = _MATRIX_SHAPES.get(key)
        if shape is None:
            rows, cols = cls._weight_to_matrix(torch.empty(key[1], device="meta")).shape
            shape = _MATRIX_SHAPES[key] = (int(rows), int(cols))
        return shape

    # ------------------------------------------------------------------ construction
    def _init_vq(self, *, kind: str, weight_shape: tuple[int, ...], k: int, d: int, num_codebooks: int,
                 dtype: torch.dtype, device: torch.device | str | None, scales: bool = False) -> None:
        rows, cols = self.matrix_shape(weight_shape)
        if cols % d:
            raise ValueError(f"block size d={d} does not divide the row length {cols} of a weight of shape {weight_shape}.")
        # plain attributes set at once: nn.Module.__setattr__ costs a few µs each, and a skeleton of a large
        # model builds thousands of these modules on every from_pretrained
        self.__dict__.update(
            vq_kind=kind, weight_shape=tuple(int(s) for s in weight_shape), k=int(k), d=int(d),
            num_codebooks=int(num_codebooks), cache_decoded=False,
            _codes_cache=None,  # (key, unpacked codes [rows, n_blocks, M]) or None
            _lut_codes_cache=None,  # (key, codes [n_blocks * M, rows] for the LUT kernel) or None
            _weight_cache=None,  # (key, decoded weight) or None
            _decode_plan=None,  # (key, kernels.PreparedDecode or None) for no-grad decodes on the CPU
        )
        n_codes = (cols // d) * num_codebooks
        self.register_buffer(
            "codes", torch.zeros(rows, packed_row_bytes(n_codes, bits_for(k)), dtype=torch.uint8, device=device)
        )  # uint8 [rows, packed_bytes]
        self.register_parameter(
            "codebooks", nn.Parameter(torch.zeros(num_codebooks, k, d, dtype=dtype, device=device)))  # [M, k, d]
        self.register_parameter(
            "scales", nn.Parameter(torch.ones(rows, dtype=dtype, device=device)) if scales else None)  # [rows]

    @classmethod
    def from_float(cls, module: nn.Module, *, kind: str, k: int, d: int, num_codebooks: int = 1,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   scales: bool = False) -> "VQModuleMixin":
        """An empty VQ module (zero codes and codebooks) with the attributes of the float `module`.

        `module` is not modified; its `weight` may live on the meta device. The VQ class is the
        registered one for `type(module)`, subclassed on the fly for subclasses (e.g. `Conv2dSame`).
        """
        weight = module._parameters["weight"]
        device = weight.device if device is None else device
        dtype = (weight.dtype if weight.dtype.is_floating_point else torch.float32) if dtype is None else dtype
        new = copy.copy(module)
        new.__class__ = cls
        new._parameters = {n: p for n, p in module._parameters.items() if n != "weight"}
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new._init_vq(kind=kind, weight_shape=tuple(weight.shape), k=k, d=d, num_codebooks=num_codebooks,
                     dtype=dtype, device=device, scales=scales)
        return new

    def set_codes_(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Fill the module from unpacked `codes` `[rows, n_blocks, M]`, `codebooks` `[M, k, d]` and, for a module
        with scales, `scales` `[rows]`."""
        rows, cols = self.matrix_shape(self.weight_shape)
        expected = (rows, cols // self.d, self.num_codebooks)
        if tuple(codes.shape) != expected:
            raise CodesError(f"codes of shape {tuple(codes.shape)} do not match the layout {expected}.")
        if tuple(codebooks.shape) != tuple(self.codebooks.shape):
            raise CodesError(f"codebooks of shape {tuple(codebooks.shape)}, expected {tuple(self.codebooks.shape)}.")
        if codes.numel() and int(codes.max()) >= self.k:
            raise CodesError(f"codes contain {int(codes.max())} >= k={self.k}.")
        if (scales is None) != (self.scales is None) or (scales is not None and tuple(scales.shape) != (rows,)):
            raise CodesError(f"scales {None if scales is None else tuple(scales.shape)} do not match the module "
                             f"({'[' + str(rows) + ']' if self.scales is not None else 'no scales'}).")
        packed = pack_codes(codes.reshape(rows, -1), bits_for(self.k))
        with torch.no_grad():
            self.codes = packed.to(self.codes.device)
            self.codebooks.data = codebooks.to(self.codebooks.device, self.codebooks.dtype).contiguous()
            if scales is not None:
                self.scales.data = scales.to(self.scales.device, self.scales.dtype).contiguous()

    def share_codebooks_(self, codebooks: nn.Parameter, codebook_set: str | None) -> None:
        """Decode with `codebooks` `[num_codebooks, k, d]`, a parameter other modules hold too (shared set).

        The module keeps a reference to the very same `nn.Parameter` object, so the set appears once in
        `model.parameters()` and trains as one tensor; `codebook_set` names it (`None`: the module's own).
        """
        if tuple(codebooks.shape) != (self.num_codebooks, self.k, self.d):
            raise CodesError(f"shared codebooks of shape {tuple(codebooks.shape)}, expected "
                             f"{(self.num_codebooks, self.k, self.d)}.")
        self._parameters["codebooks"] = codebooks  # [num_codebooks, k, d], the shared Parameter itself
        self.codebook_set = codebook_set
        self._weight_cache = None

    def tie_to_(self, owner: "VQModuleMixin") -> None:
        """Share `owner`'s codes buffer, codebooks and scales (a tied module: input embedding ↔ LM head)."""
        self._buffers["codes"] = owner._buffers["codes"]  # uint8 [rows, packed_bytes], the same tensor
        self.share_codebooks_(owner.codebooks, owner.codebook_set)
        if "scales" in owner._parameters:
            self._parameters["scales"] = owner._parameters["scales"]  # [rows], the same Parameter

    # ------------------------------------------------------------------ decoding
    @property
    def bits(self) -> int:
        return bits_for(self.k)

    def unpacked_codes(self) -> torch.Tensor:
        """Codes `[rows, n_blocks, M]` (uint8 or int32), unpacked once and cached until `codes` changes.

        Raises:
            `CodesError`: if the stored codes do not fit the layout or a code is >= k.
        """
        packed = self.codes
        key = (packed.data_ptr(), packed._version, packed.device, tuple(packed.shape))
        if self._codes_cache is not None and self._codes_cache[0] == key:
            return self._codes_cache[1]
        rows, cols = self.matrix_shape(self.weight_shape)
        n_blocks = cols // self.d
        expected = (rows, packed_row_bytes(n_blocks * self.num_codebooks, self.bits))
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise CodesError(
                f"stored codes are {packed.dtype} {tuple(packed.shape)}, expected uint8 {expected} "
                f"(k={self.k}, d={self.d}, weight {self.weight_shape})."
            )
        codes = unpack_codes(packed, self.bits, n_blocks * self.num_codebooks).reshape(rows, n_blocks, self.num_codebooks)
        if codes.numel() and int(codes.max()) >= self.k:
            raise CodesError(f"codes contain {int(codes.max())} >= k={self.k}; the checkpoint is corrupted.")
        self._codes_cache = (key, codes)
        return codes

    def _kernel_codes(self) -> torch.Tensor:
        """Unpacked codes `[rows, n_blocks, M]` for compiled graphs: no data-pointer checks, no host synchronisation.

        At 8 bits the stored bytes themselves (packing is the identity), else unpacked in the graph. Not validated:
        eager calls check the codes ([`unpacked_codes`]); a compiled graph trusts them.
        """
        packed = self.codes  # uint8 [rows, packed_bytes]
        rows = packed.shape[0]
        n_blocks = math.prod(self.weight_shape) // rows // self.d
        if self.bits == 8:
            return packed.view(rows, n_blocks, self.num_codebooks)
        codes = unpack_codes(packed, self.bits, n_blocks * self.num_codebooks)  # [rows, n_blocks * M]
        return codes.reshape(rows, n_blocks, self.num_codebooks)

    def lut_codes(self) -> torch.Tensor:
        """The unpacked codes transposed for the CPU LUT kernel, `[n_blocks * M, rows]`, cached like them."""
        codes = self.unpacked_codes()  # [rows, n_blocks, M]
        key = self._codes_cache[0]
        if self._lut_codes_cache is None or self._lut_codes_cache[0] != key:
            self._lut_codes_cache = (key, kernel_lut_codes(codes))
        return self._lut_codes_cache[1]

    def decode_weight(self) -> torch.Tensor:
        """The dense weight, in the float module's layout, decoded from codes and codebooks.

        With `cache_decoded = True` and no gradient needed, the decoded weight is kept until the
        codebooks or codes change (trades memory for speed at inference). Without autograd the decode
        runs in hf_vq's numba kernel (same values as [`hf_vq.codec.decode`], see `hf_vq.kernels`).
        """
        use_cache = self.cache_decoded and not (torch.is_grad_enabled() and self.codebooks.requires_grad)
        scales = self.scales  # [rows] or None
        if torch.compiler.is_compiling():  # traceable: no data-pointer keys, no cache writes
            if use_cache and self._weight_cache is not None:
                return self._weight_cache[1]
            return self._matrix_to_weight(decode_matrix(self._kernel_codes(), self.codebooks, scales=scales))
        if use_cache:
            key = (self.codebooks.data_ptr(), self.codebooks._version, self.codes._version, self.codebooks.dtype,
                   None if scales is None else (scales.data_ptr(), scales._version))
            if self._weight_cache is not None and self._weight_cache[0] == key:
                return self._weight_cache[1]
        prepared = None if needs_grad(self.codebooks, scales) else self._prepared_decode()
        if prepared is not None:  # inference on the CPU: the numba decode, prepared once
            matrix = prepared(scales)  # [rows, cols]
        else:
            matrix = decode_matrix(self.unpacked_codes(), self.codebooks, scales=scales)  # [rows, cols]
        weight = self._matrix_to_weight(self._with_code_delta(matrix))
        if use_cache:
            self._weight_cache = (key, weight)
        else:
            self._weight_cache = None
        return weight

    def _prepared_decode(self) -> PreparedDecode | None:
        """The CPU decode of the current codes and codebooks with its preparation done once (None where it cannot run:
        no numba, another device, a traced or subclassed codebook tensor)."""
        books = self.codebooks  # [M, k, d]
        codes = self.unpacked_codes()  # [rows, n_blocks, M]
        key = (self._codes_cache[0], books.data_ptr(), books._version, books.dtype, books.device)
        if self._decode_plan is None or self._decode_plan[0] != key:
            usable = type(books) in (nn.Parameter, torch.Tensor) and not torch.jit.is_tracing()
            self._decode_plan = (key, PreparedDecode(codes, books) if usable and PreparedDecode.supports(codes, books)
                                 else None)
        return self._decode_plan[1]

    def _with_code_delta(self, matrix: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`matrix` with the straight-through code delta of fine-tuning with code updates: the same values, and the
        gradient of the weight flows into `code_delta` `[rows, cols]` (see [`enable_code_updates_`]). `rows`:
        the matrix holds only these rows (an embedding's looked-up rows)."""
        delta = self._parameters.get("code_delta")
        if delta is None or not (torch.is_grad_enabled() and delta.requires_grad):
            return matrix
        delta = delta if rows is None else delta[rows]
        return matrix + (delta - delta.detach()).to(matrix.dtype)

    def enable_code_updates_(self) -> nn.Parameter:
        """Register `code_delta`, a trainable float32 `[rows, cols]` parameter of zeros that accumulates the weight's
        gradient steps (straight-through: the forward still uses the decoded weight). Codes are re-assigned from it
        by `hf_vq.finetune.codes.reassign_codes_`; [`disable_code_updates_`] removes it before saving."""
        rows, cols = self.matrix_shape(self.weight_shape)
        delta = nn.Parameter(torch.zeros(rows, cols, dtype=torch.float32, device=self.codes.device))  # [rows, cols]
        self.register_parameter("code_delta", delta)
        return delta

    def disable_code_updates_(self) -> None:
        """Remove `code_delta` (the codes keep their last assignment)."""
        self._parameters.pop("code_delta", None)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.decode_weight()

    def fast_matmul(self, input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`input @ matrix.T + bias` computed from the codes by a fast kernel, or `None` to decode instead.

        For modules whose forward is a matmul with the `[rows, cols]` matrix (linear, GPT-2 `Conv1D`).
        Inference only; the rule and the kernels are in `hf_vq.kernels` ([`hf_vq.kernels.vq_matmul`]). Under
        `torch.compile` it is the custom op `hf_vq::vq_linear`, so compiled graphs (and CUDA graphs) run the fast
        kernels; with gradients, `cache_decoded` or mismatched dtypes the float forward runs instead.

        Args:
            input (`torch.Tensor`): `[..., cols]`.
            bias (`torch.Tensor`, *optional*): `[rows]`.

        Returns:
            `torch.Tensor` or `None`: `[..., rows]`, or `None` when decode + the float forward is the better path.
        """
        scales = self.scales  # [rows] or None
        if torch.compiler.is_compiling():  # the custom op `hf_vq::vq_linear`: the fast kernel inside the graph
            books = self.codebooks
            if self.cache_decoded or input.dtype != books.dtype or needs_grad(input, books, bias, scales):
                return None  # the float forward on the (cached or in-graph decoded) weight
            return vq_linear(input, self._kernel_codes(), books, bias, scales=scales)
        if "code_delta" in self._parameters and torch.is_grad_enabled():
            return None  # fine-tuning with code updates: the straight-through weight
        cached = self.cache_decoded and self._weight_cache is not None
        return vq_matmul(input, self.unpacked_codes(), self.codebooks, bias, scales=scales, weight_is_cached=cached,
                         codes_t=self.lut_codes)

    # ------------------------------------------------------------------ conversion back
    def dequantize(self) -> nn.Module:
        """A dense module of the original class with the decoded weight (this module is untouched)."""
        dense = copy.copy(self)
        dense.__class__ = next(c for c in type(self).__mro__ if not issubclass(c, VQModuleMixin) and issubclass(c, nn.Module))
        with torch.no_grad():
            weight = nn.Parameter(self.decode_weight().detach().clone())
        dense._parameters = {"weight": weight, **{n: p for n, p in self._parameters.items()
                                                  if n not in ("codebooks", "scales")}}
        dense._buffers = {n: b for n, b in self._buffers.items() if n != "codes"}
        dense._modules = dict(self._modules)
        for attr in ("vq_kind", "weight_shape", "k", "d", "num_codebooks", "cache_decoded", "_codes_cache", "_lut_codes_cache", "_weight_cache",
                     "_decode_plan", "codebook_set"):
            dense.__dict__.pop(attr, None)
        return dense

    def compressed_bits(self) -> int:
        """Accounted size in bits: `ceil(log2 k)` per code plus fp16 codebooks (bias counted elsewhere).

        A shared codebook set (`codebook_set` not None) is not counted here: it belongs to the model once."""
        rows, cols = self.matrix_shape(self.weight_shape)
        own = 0 if self.codebook_set is not None else self.codebooks.numel() * 16
        own += 0 if self.scales is None else rows * 16
        return rows * (cols // self.d) * self.num_codebooks * self.bits + own

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vq={self.vq_kind} k={self.k} d={self.d} M={self.num_codebooks}"
