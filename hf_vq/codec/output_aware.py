"""Output-aware vector quantization of one weight matrix: the calibrated counterpart of [`quantize_matrix`].

Pure tensor code: no `nn.Module`, no Hugging Face. Deterministic per seed; runs where the tensors are.

Given a weight `W [rows, cols]` and the Hessian `H = XᵀX` of its calibration inputs (`[cols, cols]`, or
`[G, cols, cols]` for grouped/depthwise convolutions), [`encode_output_aware`] returns codebooks, codes and
optional per-row scales whose decoded weight `Ŵ = diag(s) · decode(codes, C)` has a small *output* error
`tr(ΔW H ΔWᵀ)` rather than a small weight error. The recipe follows GPTVQ (arXiv 2402.15319) and AQLM
(arXiv 2401.06118), written from their descriptions:

1. **Init**: k-means of the subvectors of `W / s`, each entry weighted by `diag H` of its column (times
   `s_r²`), which is the output error when columns do not interact. `M > 1`: residual weighted k-means.
2. **GPTQ-style encoding** ([`gptq_encode`]): subvectors visited column block by column block (act-order),
   each assigned under the block metric of the damped `H⁻¹`'s Cholesky factor, its error pushed onto the
   columns not yet quantized.
3. **Alternation**, `n_iter` times: codebooks by least squares under the output error
   ([`refit_codebooks`], conjugate gradients on the normal equations), scales in closed form (fp16-rounded),
   then codes again: another GPTQ pass with the new codebooks and/or exact coordinate descent
   ([`icm_reassign`]). Every step keeps, per row, whichever codes give the lower output error, so the
   recorded error never rises after step 2 (up to the fp16 rounding of scales).

Every step minimises the output error under `H + floor · mean(diag H) · I` ([`FLOOR`]): a small weight-space term,
so that weights whose inputs calibration never excited (dead channels, which other inputs may wake) are still coded
for their values instead of arbitrarily, and rows of zeros decode to zeros.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from .gptvq import gptq_encode, icm_reassign
from .hessian import as_grouped, output_energy, output_error, row_output_errors, with_isotropic
from .kmeans import kmeans
from .pq import decode, relative_error, split_blocks
from .refit import refit_codebooks, refit_scales

__all__ = ["FLOOR", "FLOOR_CANDIDATES", "OutputAwareResult", "encode_output_aware", "hessian_entry_weights", "weighted_residual_kmeans"]

_REASSIGN = ("gptq", "icm", "gptq+icm", "none")


class OutputAwareResult(NamedTuple):
    """What [`encode_output_aware`] returns (unpacks as a 4-tuple).

    Attributes:
        codebooks (`torch.Tensor`): `[M, k, d]` float32.
        codes (`torch.Tensor`): `[rows, cols / d, M]` int64, subvectors in the natural column order.
        scales (`torch.Tensor` or `None`): `[rows]` float32 holding fp16 values, or `None` without scales.
        stats (`dict`): relative output errors after each stage (`"output_error_init"`, `"output_error_gptq"`,
            `"history"`: one entry per refit and per re-assignment, `"output_error"`: final), the final relative
            weight error `"weight_error"`, and wall times in seconds (`"seconds_init"`, `"seconds_gptq"`,
            `"seconds_refit"`, `"seconds_reassign"`, `"seconds"`).
    """

    codebooks: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor | None
    stats: dict


def hessian_entry_weights(hessian: torch.Tensor, rows: int, d: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Per-entry weights of the subvectors of a `[rows, cols]` weight: `diag H` of each entry's column × `s_r²`.

    Args:
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`.
        rows (`int`): rows of the weight.
        d (`int`): subvector length.
        scales (`torch.Tensor`, *optional*): per-row scales `[rows]`.

    Returns:
        `torch.Tensor`: `[rows * cols / d, d]` float32, laid out like [`split_blocks`]'s subvectors.
    """
    h = hessian if hessian.ndim == 3 else hessian.unsqueeze(0)  # [G, cols, cols]
    diag = h.diagonal(dim1=1, dim2=2).float().clamp_min(0)  # [G, cols]
    w = diag.repeat_interleave(rows // h.shape[0], dim=0)  # [rows, cols]
    if scales is not None:
        w = w * scales.to(w.device, torch.float32).pow(2)[:, None]
    return split_blocks(w, d)


def weighted_residual_kmeans(
    weight: torch.Tensor, entry_weights: torch.Tensor, *, num_codebooks: int, k: int, d: int, n_iter: int = 50,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted (residual) k-means of the subvectors of `weight`: codebook `m` fits what codebooks `< m` leave.

    Args:
        weight (`torch.Tensor`): `[rows, cols]`.
        entry_weights (`torch.Tensor`): `[rows * cols / d, d]` (see [`hessian_entry_weights`]).
        num_codebooks (`int`): `M`.
        k (`int`): codewords per codebook.
        d (`int`): subvector length.
        n_iter (`int`, defaults to 50): annealed k-means iterations per codebook.
        seed (`int`, defaults to 0): codebook `m` uses `seed + m`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: codebooks `[M, k, d]` float32 and codes `[rows, cols / d, M]` int64.
    """
    rows, cols = weight.shape
    residual = split_blocks(weight.detach().float(), d)  # [rows * nb, d]
    books, codes = [], []
    for m in range(num_codebooks):
        book, code = kmeans(residual, k, n_iter=n_iter, seed=seed + m, weights=entry_weights)  # [k, d], [n]
        books.append(book)
        codes.append(code)
        residual = residual - book[code]
    return torch.stack(books), torch.stack(codes, 1).reshape(rows, cols // d, num_codebooks)


def _validate(weight: torch.Tensor, k: int, d: int, num_codebooks: int, n_iter: int, reassign: str,
              floor: float) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be [rows, cols]; got shape {tuple(weight.shape)} "
                         "(reshape a conv weight to [out_channels, in_channels/groups * kh * kw]).")
    if d < 1 or weight.shape[1] % d:
        raise ValueError(f"d={d} must be >= 1 and divide cols={weight.shape[1]}; pick a divisor of the row length.")
    if k < 2:
        raise ValueError(f"k={k} must be >= 2 codewords.")
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks={num_codebooks} must be >= 1 (1 is product quantization).")
    if n_iter < 0:
        raise ValueError(f"n_iter={n_iter} must be >= 0 (0 stops after the GPTQ pass and one refit).")
    if reassign not in _REASSIGN:
        raise ValueError(f"reassign={reassign!r} must be one of {_REASSIGN}.")
    if floor < 0:
        raise ValueError(f"floor={floor} must be >= 0 (0: the output error alone).")


def _safe(scales: torch.Tensor | None) -> torch.Tensor | None:
    """Scales usable as divisors `[rows, 1]` (a zero scale divides by 1: its row decodes to zero anyway)."""
    return None if scales is None else torch.where(scales == 0, torch.ones_like(scales), scales)[:, None]


class _State:
    """Codes, codebooks and scales of one run, with the output error of each row."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor | None) -> None:
        self.w, self.h, self.s = weight, hessian, scales  # [rows, cols], [G, cols, cols], [rows] or None
        self.den = max(output_energy(weight, hessian), 1e-300)
        self.codes: torch.Tensor | None = None  # [rows, nb, M]
        self.books: torch.Tensor | None = None  # [M, k, d]
        self.history: list[float] = []

    def approx(self, codes: torch.Tensor) -> torch.Tensor:
        dec = decode(codes, self.books)  # [rows, cols]
        return dec if self.s is None else dec * self.s[:, None]

    def normalized(self) -> torch.Tensor:
        s = _safe(self.s)
        return self.w if s is None else self.w / s  # [rows, cols]

    def take(self, codes: torch.Tensor) -> None:
        """Adopt `codes` row by row wherever they lower the output error."""
        if self.codes is None:
            self.codes = codes
            return
        old = row_output_errors(self.w, self.approx(self.codes), self.h)  # [rows]
        new = row_output_errors(self.w, self.approx(codes), self.h)  # [rows]
        self.codes = torch.where((new < old)[:, None, None], codes, self.codes)

    def record(self) -> float:
        err = float(row_output_errors(self.w, self.approx(self.codes), self.h).sum()) / self.den
        self.history.append(err)
        return err


#: The weight-space term every row's objective carries: `H + FLOOR · mean(diag H) · I`, the mean over all of a
#: layer's groups. Negligible where inputs were seen; where a group never saw any (a dead channel of a depthwise
#: conv, `H_g = 0`) or a column never varied (a pointwise conv reading that channel), the output error is zero
#: whatever the codes, and without the term k-means, error feedback and re-assignment all tie at code 0: those
#: weights decoded to one repeated codeword, nothing like their values, and other photos than the calibration's wake
#: some of those channels. EfficientNet-Lite0 at `--ratio 6`, seed 0: top-1 agreement 0.805 -> 0.836, KL 0.078 ->
#: 0.052 on held-out photos; larger floors lower the KL further (0.047 at 1e-2, 0.042 at 1e-1) but cost MiniLM's
#: 16x cosine (0.9077 at 0 -> 0.9063 / 0.9049): benchmarks/results/experiment_hessian_floor_*.md.
FLOOR = 1e-4

#: The floors `hessian_floor="auto"` chooses from, per layer, by their output error on a held-out half of the
#: calibration (hf_vq.pipeline.allocation.cross_validated_floor): from the default's negligible term to one as large
#: as the inputs' mean energy.
FLOOR_CANDIDATES = (FLOOR, 3e-2, 3e-1, 1.0)


def _init_scales(weight: torch.Tensor) -> torch.Tensor:
    """Row RMS, fp16-rounded (rows of zeros get 0: they decode to zeros). `[rows, cols]` -> `[rows]` float32."""
    rms = weight.double().pow(2).mean(1).sqrt()  # [rows]
    return torch.where(rms > 0, rms.clamp(6e-5, 65504.0), torch.zeros_like(rms)).half().float()


def encode_output_aware(
    weight: torch.Tensor, hessian: torch.Tensor, *, k: int = 256, d: int = 4, num_codebooks: int = 1,
    scales: bool = False, seed: int = 0, n_iter: int = 2, kmeans_iters: int = 50, damp: float = 0.01,
    act_order: bool = True, block_size: int = 128, reassign: str = "gptq+icm", refit_iters: int = 10,
    beam_size: int = 8, floor: float | None = None,
) -> OutputAwareResult:
    """Codebooks, codes (and per-row scales) of `weight` that minimise its output error `tr(ΔW H ΔWᵀ)`.

    Args:
        weight (`torch.Tensor`): `[rows, cols]` (a conv weight reshaped to `[out, in/groups * kh * kw]`).
        hessian (`torch.Tensor`): `XᵀX` of the calibration inputs, `[cols, cols]`, or `[G, cols, cols]` with
            rows split evenly into `G` groups (grouped/depthwise convolutions). float32 or float64.
        k (`int`, defaults to 256): codewords per codebook.
        d (`int`, defaults to 4): subvector length (must divide `cols`).
        num_codebooks (`int`, defaults to 1): `M`; a subvector is the sum of `M` codewords.
        scales (`bool`, defaults to `False`): also fit per-row scales, `Ŵ = diag(s) · decode(codes, C)`.
        seed (`int`, defaults to 0): seeds the k-means initialisation (the only random step).
        n_iter (`int`, defaults to 2): alternations of (refit, re-assign) after the GPTQ pass; a final
            refit always follows.
        kmeans_iters (`int`, defaults to 50): weighted k-means iterations of the initialisation.
        damp (`float`, defaults to 0.01): relative damping of `H` in the GPTQ pass.
        act_order (`bool`, defaults to `True`): GPTQ pass visits subvectors by decreasing `Σ diag H`.
        block_size (`int`, defaults to 128): lazy-update block of the GPTQ pass (speed only).
        reassign (`str`, defaults to `"gptq+icm"`): how codes are re-chosen in each alternation: `"gptq"`
            (another GPTQ pass), `"icm"` (one sweep of exact coordinate descent), both, or `"none"`.
        refit_iters (`int`, defaults to 10): conjugate-gradient iterations per codebook refit (measured on
            MiniLM: converged to 1e-5 after 4-5).
        beam_size (`int`, defaults to 8): beam of the additive search when `num_codebooks > 1`.
        floor (`float`, *optional*): the weight-space term of the objective, `H + floor · mean(diag H) · I`
            (default [`FLOOR`]); `stats["output_error"]` is measured under `H` itself.

    Returns:
        [`OutputAwareResult`]: `(codebooks [M, k, d], codes [rows, cols / d, M], scales [rows] or None, stats)`.

    Raises:
        `ValueError`: for inconsistent shapes or out-of-range settings (the message names the argument).
    """
    floor = FLOOR if floor is None else floor
    _validate(weight, k, d, num_codebooks, n_iter, reassign, floor)
    t_start = time.perf_counter()
    w = weight.detach().float()  # [rows, cols]
    h_out = as_grouped(w, hessian)[1].to(w.device, torch.float64)  # [G, cols, cols]
    h = with_isotropic(h_out, floor)  # [G, cols, cols]
    st = _State(w, h, _init_scales(w) if scales else None)
    st.books, codes = weighted_residual_kmeans(st.normalized(), hessian_entry_weights(h, w.shape[0], d, st.s),
                                               num_codebooks=num_codebooks, k=k, d=d, n_iter=kmeans_iters, seed=seed)
    st.take(codes)
    stats: dict = {"output_error_init": st.record(), "seconds_init": time.perf_counter() - t_start,
                   "seconds_refit": 0.0, "seconds_reassign": 0.0}
    t0 = time.perf_counter()
    st.take(gptq_encode(st.normalized(), h, st.books, damp=damp, block_size=block_size, act_order=act_order,
                        beam_size=beam_size))
    stats["output_error_gptq"] = st.record()
    stats["seconds_gptq"] = time.perf_counter() - t0
    for it in range(n_iter + 1):
        t0 = time.perf_counter()
        before = (st.books, st.s, st.history[-1])
        st.books = refit_codebooks(w, h, st.codes, st.books, st.s, iters=refit_iters)
        if scales:
            st.s = refit_scales(w, h, decode(st.codes, st.books))
        if st.record() > before[2]:  # float rounding or fp16 scales made it worse: keep the previous fit
            st.books, st.s = before[0], before[1]
            st.history[-1] = before[2]
        stats["seconds_refit"] += time.perf_counter() - t0
        if it == n_iter or reassign == "none":
            break
        t0 = time.perf_counter()
        if "gptq" in reassign:
            st.take(gptq_encode(st.normalized(), h, st.books, damp=damp, block_size=block_size,
                                act_order=act_order, beam_size=beam_size))
        if "icm" in reassign:
            st.take(icm_reassign(st.normalized(), h, st.codes, st.books))
        st.record()
        stats["seconds_reassign"] += time.perf_counter() - t0
    approx = st.approx(st.codes)  # [rows, cols]
    stats.update(history=st.history, output_error=output_error(w, approx, h_out),
                 weight_error=relative_error(w, approx), seconds=time.perf_counter() - t_start)
    return OutputAwareResult(st.books, st.codes, st.s, stats)
