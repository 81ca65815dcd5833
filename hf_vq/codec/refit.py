"""Codebooks and per-row scales that minimise the layer-output error for fixed codes.

Pure tensor code: no `nn.Module`, no Hugging Face.

The approximation of a weight `W [rows, cols]` is `Ŵ = diag(s) · decode(codes, C)` with codebooks
`C [M, k, d]` and per-row scales `s [rows]` (all ones without scales). Its output error
`f(C, s) = Σ_r (w_r − s_r d_r) H_r (w_r − s_r d_r)ᵀ` (see [`hf_vq.codec.hessian`]) is quadratic in `C` for
fixed `s` and in each `s_r` for fixed `C`.

Codebooks: `decode` is linear in `C`, `d_r = S_r vec(C)` with `S_r` the one-hot selection of row `r`'s
codewords, so the minimiser solves the normal equations `A vec(C) = b` with
`A = Σ_r s_r² S_rᵀ H_r S_r` and `b = Σ_r s_r S_rᵀ H_r w_rᵀ`. `A` has `(M·k·d)²` entries (2 GB for
`k = 4096, d = 4`) and assembling it touches `rows · cols²` entries, so it is never formed: a
preconditioned conjugate-gradient solve applies it as `decode → ·H (one GEMM) → scatter onto the
codewords`, with the exact `d × d` diagonal blocks of `A` (each codeword's own curvature) as block-Jacobi
preconditioner. Started at the current codebooks, every CG iterate lowers `f` (CG minimises the quadratic
over growing Krylov subspaces); a tiny ridge towards the current codebooks keeps unused codewords where they
are and fixes the directions additive codebooks leave free (a constant moved between two codebooks).
[`refit_codebooks_adam`] is the first-order alternative (GPTVQ's ~25 Adam steps), kept for comparison.

Scales: for fixed `C` the best `s_r = (w_r H_r d_rᵀ) / (d_r H_r d_rᵀ)`; they are stored in fp16, so the
returned values are rounded to fp16 (the objective is evaluated with what will be stored).
"""

from __future__ import annotations

import torch

from .hessian import as_grouped
from .pq import decode

__all__ = ["refit_codebooks", "refit_codebooks_adam", "refit_scales", "fit_scales"]


class _Problem:
    """The quadratic `f(C)` of one layer, for fixed codes and scales, with its matrix-free operator."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, n_books: int, k: int,
                 scales: torch.Tensor | None, dtype: torch.dtype) -> None:
        wg, h = as_grouped(weight, hessian)  # [G, R, cols], [G, cols, cols]
        self.groups, self.rows, self.cols = wg.shape
        dev = weight.device
        self.h = h.to(dev, dtype)  # [G, cols, cols]
        self.n_books, self.k = n_books, k
        self.codes = codes.to(dev, torch.int64)  # [rows, nb, M]
        if self.codes.ndim != 3 or self.codes.shape[0] != weight.shape[0] or self.codes.shape[2] != n_books:
            raise ValueError(f"codes must be [rows={weight.shape[0]}, cols/d, M={n_books}]; got {tuple(codes.shape)}.")
        self.d = self.cols // self.codes.shape[1]
        s = torch.ones(weight.shape[0], device=dev) if scales is None else scales.to(dev)
        self.s = s.to(dtype).reshape(self.groups, self.rows, 1)  # [G, R, 1]
        self.w = wg.to(dtype)  # [G, R, cols]
        self.offsets = (torch.arange(n_books, device=dev) * k).reshape(1, 1, n_books)  # [1, 1, M]
        self.flat = (self.codes + self.offsets).reshape(-1, n_books)  # [rows * nb, M] into M·k codewords

    def decode(self, books: torch.Tensor) -> torch.Tensor:
        """`[M, k, d]` -> decoded weight `[G, R, cols]` (without scales)."""
        return decode(self.codes, books).reshape(self.groups, self.rows, self.cols)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """Adjoint of `decode`: `y [G, R, cols]` -> `[M, k, d]` (sum of the entries each codeword produced)."""
        yr = y.reshape(-1, self.d)  # [rows * nb, d]
        out = sum(_segment_sum(self.flat[:, m], yr, self.n_books * self.k) for m in range(self.n_books))  # [M·k, d]
        return out.reshape(self.n_books, self.k, self.d)

    def apply(self, books: torch.Tensor) -> torch.Tensor:
        """`A vec(C)` as `[M, k, d]`."""
        return self.scatter(self.s.pow(2) * (self.decode(books) @ self.h))

    def rhs(self) -> torch.Tensor:
        """`b` as `[M, k, d]`."""
        return self.scatter(self.s * (self.w @ self.h))

    def objective(self, books: torch.Tensor) -> float:
        """`f(C)` (absolute output error)."""
        delta = self.w - self.s * self.decode(books)  # [G, R, cols]
        return float(((delta @ self.h) * delta).sum())

    def block_preconditioner(self, ridge: float) -> tuple[torch.Tensor, float]:
        """Inverses of the `d × d` diagonal blocks of `A + μI` `[M·k, d, d]`, and the ridge `μ`."""
        d = self.d
        blocks = torch.stack([self.h[:, j:j + d, j:j + d] for j in range(0, self.cols, d)], 1)  # [G, nb, d, d]
        src = self.s.pow(2)[..., None, None] * blocks[:, None]  # [G, R, nb, d, d]
        src = src.reshape(-1, d * d)  # [rows * nb, d·d]
        pre = sum(_segment_sum(self.flat[:, m], src, self.n_books * self.k) for m in range(self.n_books))
        pre = pre.reshape(-1, d, d)  # [M·k, d, d]
        trace = pre.diagonal(dim1=1, dim2=2).sum(-1)  # [M·k]
        used = trace > 0
        mu = ridge * float(trace[used].mean() / d) if bool(used.any()) else ridge
        pre = pre + max(mu, 1e-300) * torch.eye(d, dtype=pre.dtype, device=pre.device)
        return torch.linalg.inv(pre), mu


# Elements of one `[size, chunk]` one-hot block of the GPU segment sum.
_ONEHOT_BLOCK = 1 << 24


def _segment_sum(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """`out[i] = Σ_{j: index[j] = i} values[j]`: index `[n]` int64, values `[n, c]` -> `[size, c]` (values' dtype).

    Bit-reproducible on every device: `index_add_` on CPU, a chunked one-hot GEMM in float64 elsewhere (CUDA's
    `index_add_` adds floats atomically, in a different order on every run)."""
    if values.device.type == "cpu":
        return torch.zeros(size, values.shape[1], dtype=values.dtype).index_add_(0, index, values)
    out = torch.zeros(size, values.shape[1], dtype=torch.float64, device=values.device)  # [size, c]
    ids = torch.arange(size, device=values.device)[:, None]  # [size, 1]
    chunk = max(1, _ONEHOT_BLOCK // size)
    for s in range(0, index.shape[0], chunk):
        onehot = (index[None, s:s + chunk] == ids).to(torch.float64)  # [size, chunk]
        out += onehot @ values[s:s + chunk].double()
    return out.to(values.dtype)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum()


@torch.no_grad()
def refit_codebooks(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
    scales: torch.Tensor | None = None, *, iters: int = 10, tol: float = 1e-4, ridge: float = 1e-6,
    dtype: torch.dtype = torch.float32, history: list[float] | None = None,
) -> torch.Tensor:
    """Least-squares codebooks under the output error, by preconditioned conjugate gradients.

    Args:
        weight (`torch.Tensor`): `[rows, cols]`, the original weight (not divided by the scales).
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`.
        codes (`torch.Tensor`): `[rows, cols / d, M]` integer codes.
        codebooks (`torch.Tensor`): current codebooks `[M, k, d]` (the starting point).
        scales (`torch.Tensor`, *optional*): per-row scales `[rows]` (`Ŵ = diag(s) · decode`).
        iters (`int`, defaults to 10): most CG iterations (one `[rows, cols] × [cols, cols]` GEMM each; on
            MiniLM's linears the objective settles to 6 digits after 4-5).
        tol (`float`, defaults to 1e-4): stop once the residual norm is below `tol` times its start.
        ridge (`float`, defaults to 1e-6): pull towards `codebooks`, relative to the mean curvature.
        dtype (`torch.dtype`, defaults to `torch.float32`): arithmetic of the solve (float64 gave the same
            objective to 6 digits on MiniLM, 1.7x slower on CPU).
        history (`list[float]`, *optional*): receives `f(C)` at the start and after every iteration.

    Returns:
        `torch.Tensor`: codebooks `[M, k, d]`, float32, on `weight.device`.
    """
    n_books, k, _ = codebooks.shape
    prob = _Problem(weight, hessian, codes, n_books, k, scales, dtype)
    x = codebooks.detach().to(weight.device, dtype).clone()  # [M, k, d]
    pinv, mu = prob.block_preconditioner(ridge)  # [M·k, d, d]

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return (pinv @ r.reshape(-1, prob.d, 1)).reshape(r.shape)

    r = prob.rhs() - prob.apply(x)  # [M, k, d] = (b + μ x0) − (A + μI) x0 at the start
    z = precondition(r)
    p = z.clone()
    rz = _dot(r, z)
    r0 = float(r.norm())
    if history is not None:
        history.append(prob.objective(x))
    for _ in range(iters):
        if float(r.norm()) <= tol * max(r0, 1e-300):
            break
        ap = prob.apply(p) + mu * p  # [M, k, d]
        curv = _dot(p, ap)
        if not float(curv) > 0:
            break
        alpha = rz / curv
        x += alpha * p
        r -= alpha * ap
        z = precondition(r)
        rz, rz_old = _dot(r, z), rz
        p = z + (rz / rz_old) * p
        if history is not None:
            history.append(prob.objective(x))
    return x.float()


def refit_codebooks_adam(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
    scales: torch.Tensor | None = None, *, steps: int = 25, lr: float = 1e-2, history: list[float] | None = None,
) -> torch.Tensor:
    """Codebooks by Adam steps on the output error (GPTVQ's update), for comparison with [`refit_codebooks`].

    Args:
        weight, hessian, codes, codebooks, scales: as in [`refit_codebooks`].
        steps (`int`, defaults to 25): Adam steps (one forward and backward GEMM each).
        lr (`float`, defaults to 1e-2): learning rate relative to the mean absolute codeword entry.
        history (`list[float]`, *optional*): receives `f(C)` before every step and at the end.

    Returns:
        `torch.Tensor`: codebooks `[M, k, d]`, float32.
    """
    n_books, k, _ = codebooks.shape
    prob = _Problem(weight, hessian, codes, n_books, k, scales, torch.float32)
    books = codebooks.detach().to(weight.device, torch.float32).clone().requires_grad_(True)  # [M, k, d]
    opt = torch.optim.Adam([books], lr=lr * float(books.detach().abs().mean().clamp_min(1e-12)))
    norm = 1.0 / max(float(((prob.w @ prob.h) * prob.w).sum()), 1e-300)
    for _ in range(steps):
        with torch.enable_grad():
            delta = prob.w - prob.s * prob.decode(books)  # [G, R, cols]
            loss = ((delta @ prob.h) * delta).sum() * norm
            opt.zero_grad()
            loss.backward()
        if history is not None:
            history.append(float(loss.detach()) / norm)
        opt.step()
    if history is not None:
        history.append(prob.objective(books.detach()))
    return books.detach()


@torch.no_grad()
def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """Best per-row scales for a fixed decoded weight, rounded to fp16 values.

    Args:
        weight (`torch.Tensor`): `[rows, cols]`.
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`.
        decoded (`torch.Tensor`): `decode(codes, C)` `[rows, cols]` (before scaling).

    A row whose decoded vector has no output energy (`d_r H d_rᵀ = 0`: its inputs were never active in the
    calibration data, e.g. a dead channel of a depthwise conv) gets its weights' own least-squares scale
    ([`fit_scales`]), so a row of zeros decodes to zeros.

    Returns:
        `torch.Tensor`: scales `[rows]`, float32 holding fp16-representable values.
    """
    wg, h = as_grouped(weight.double(), hessian)  # [G, R, cols], [G, cols, cols]
    dg = decoded.to(weight.device, torch.float64).reshape(wg.shape)  # [G, R, cols]
    dh = dg @ h.to(weight.device, torch.float64)  # [G, R, cols]
    num = (wg * dh).sum(-1).reshape(-1)  # [rows]
    den = (dg * dh).sum(-1).reshape(-1)  # [rows]
    plain = fit_scales(weight.double(), decoded.to(weight.device, torch.float64))  # [rows]
    best = torch.where(den > 0, num / den.clamp_min(1e-300), plain.double())  # [rows]
    return best.clamp(-65504.0, 65504.0).half().float()


def fit_scales(matrix: torch.Tensor, decoded: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row least-squares scales `s [rows]` minimising `Σ w (W − diag(s)·Q)²`, rounded to fp16 values.

    Args:
        matrix (`torch.Tensor`): the dense `W [rows, cols]`.
        decoded (`torch.Tensor`): the decoded unscaled `Q [rows, cols]`.
        weights (`torch.Tensor`, *optional*): entry weights `[rows, cols]` (uniform when None).
    """
    w = torch.ones_like(matrix) if weights is None else weights.to(matrix.device, matrix.dtype)
    num = (w * matrix * decoded).sum(1)  # [rows]
    den = (w * decoded * decoded).sum(1)  # [rows]
    scales = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))
    return scales.half().float()
