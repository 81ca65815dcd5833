"""Codes for fixed codebooks under the layer-output objective: GPTQ-style error feedback, and exact re-assignment.

Pure tensor code: no `nn.Module`, no Hugging Face. Runs on any device (faiss serves CPU nearest-codeword
searches with one row group; batched torch searches elsewhere).

Both functions minimise the output error `Σ_r Δw_r H_r Δw_rᵀ` of [`hf_vq.codec.hessian`] over the codes of a
weight `W [rows, cols]`, cut into `cols / d` subvectors per row exactly as [`split_blocks`] does, given
codebooks `[M, k, d]` (a subvector is the sum of `M` codewords; `M = 1` is product quantization).

GPTQ-style encoding (GPTVQ, arXiv 2402.15319)
----------------------------------------------
Columns are visited in blocks of `d` (optionally in "act-order": blocks by decreasing `Σ diag H`). With
`U` the upper Cholesky factor of the damped `H⁻¹` (of the permuted `H`) and `b` the block's columns, the
loss of an error `δ = w_b − q` when the later columns compensate optimally is `‖δ U_bb⁻¹‖²`: each row's
subvector goes to the nearest codeword after the linear map `A = U_bb⁻¹` (the nearest sum of codewords,
by [`aq_encode`]'s beam search, when `M > 1`). The scaled error `E = δ A` then moves the later columns,
`W_rest −= E U_b,rest` — within the current block of `block_size` columns at once, beyond it lazily
once per block (GPTQ's batched updates; the two are the same arithmetic in another order).

Exact re-assignment (iterated conditional modes)
------------------------------------------------
Given all other codes of a row, the best code for subvector `g` minimises
`(t − c) H_gg (t − c)ᵀ` with target `t = w_g + b_g H_gg⁻¹`, where `b_g` collects the cross terms
`Σ_{g'≠g} H_gg' e_g'`. With `H_gg = L Lᵀ` that is a nearest-codeword search of `w_g L + b_g L⁻ᵀ` among
`c L`. One sweep visits every subvector (and every codebook of it) once and keeps `R = E H` up to date
with a rank-`d` update; no step can raise the (undamped) objective.
"""

from __future__ import annotations

import torch

from .aq import _single_threaded_faiss, aq_encode
from .hessian import act_order as _act_order
from .hessian import as_grouped, damped_inverse_factor
from .kmeans import assign

__all__ = ["gptq_encode", "icm_reassign"]

# Elements of one `[G, chunk, k]` distance block of the batched torch search.
_SEARCH_BLOCK = 1 << 24


def _nearest_transformed(x: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Nearest codeword, per row group. `x [G, R, d]`, `books [G, k, d]` float32 -> codes `[G, R]` int64."""
    groups, rows, _ = x.shape
    if groups == 1 and x.device.type == "cpu":
        return assign(x[0], books[0]).unsqueeze(0)  # faiss's exact search
    norms = books.pow(2).sum(-1)  # [G, k]
    chunk = max(1, _SEARCH_BLOCK // max(1, groups * books.shape[1]))
    out = torch.empty(groups, rows, dtype=torch.int64, device=x.device)  # [G, R]
    for s in range(0, rows, chunk):
        xc = x[:, s:s + chunk]  # [G, c, d]
        dist = torch.baddbmm(norms[:, None, :], xc, books.transpose(1, 2), alpha=-2.0)  # [G, c, k]
        out[:, s:s + chunk] = dist.argmin(-1)
    return out


def _encode_group(x: torch.Tensor, books: torch.Tensor, beam_size: int) -> torch.Tensor:
    """Codes `[G, R, M]` of transformed subvectors `x [G, R, d]` under transformed codebooks `[G, M, k, d]`."""
    if books.shape[1] == 1:
        return _nearest_transformed(x, books[:, 0]).unsqueeze(-1)
    return torch.stack([aq_encode(x[g], books[g], beam_size=beam_size) for g in range(x.shape[0])])


def _group_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of selected codewords: `codes [..., M]`, `codebooks [M, k, d]` -> `[..., d]`."""
    out = codebooks[0][codes[..., 0]]
    for m in range(1, codebooks.shape[0]):
        out = out + codebooks[m][codes[..., m]]
    return out


def _check_codebooks(weight: torch.Tensor, codebooks: torch.Tensor) -> int:
    if codebooks.ndim != 3:
        raise ValueError(f"codebooks must be [M, k, d]; got shape {tuple(codebooks.shape)}.")
    d = codebooks.shape[2]
    if weight.shape[-1] % d:
        raise ValueError(f"subvector length d={d} (codebooks.shape[2]) must divide cols={weight.shape[-1]}.")
    return d


@torch.no_grad()
def gptq_encode(
    weight: torch.Tensor, hessian: torch.Tensor, codebooks: torch.Tensor, *, damp: float = 0.01,
    block_size: int = 128, act_order: bool = True, beam_size: int = 8,
) -> torch.Tensor:
    """Codes of `weight` for fixed codebooks, chosen column block by column block with GPTQ error feedback.

    Args:
        weight (`torch.Tensor`): `[rows, cols]` (divide by per-row scales first if the model uses them).
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]` (row `r` uses `H[r // (rows // G)]`).
        codebooks (`torch.Tensor`): `[M, k, d]`; `d` must divide `cols`.
        damp (`float`, defaults to 0.01): relative damping of `H` before inversion (see
            [`damped_inverse_factor`]).
        block_size (`int`, defaults to 128): columns per lazy-update block (rounded down to a multiple
            of `d`, at least `d`); changes the speed, not the result (up to float rounding).
        act_order (`bool`, defaults to `True`): visit subvector columns by decreasing `Σ diag H`. Codes are
            returned in the natural order either way.
        beam_size (`int`, defaults to 8): beam of the additive search when `M > 1`.

    Returns:
        `torch.Tensor`: codes `[rows, cols / d, M]`, int64, on `weight.device`.
    """
    d = _check_codebooks(weight, codebooks)
    wg, h = as_grouped(weight, hessian)  # [G, R, cols], [G, cols, cols]
    groups, rows, cols = wg.shape
    nb = cols // d
    dev = weight.device
    h = h.to(dev)
    order = _act_order(h, d).to(dev) if act_order else torch.arange(nb, device=dev)  # [nb] position -> block
    colperm = (order[:, None] * d + torch.arange(d, device=dev)).reshape(-1)  # [cols]
    u = damped_inverse_factor(h[:, colperm][:, :, colperm], damp)  # [G, cols, cols] float64
    diag = torch.stack([u[:, j:j + d, j:j + d] for j in range(0, cols, d)], 1)  # [G, nb, d, d]
    eye = torch.eye(d, dtype=u.dtype, device=dev).expand_as(diag)
    amap = torch.linalg.solve_triangular(diag, eye, upper=True).float()  # [G, nb, d, d] = U_bb⁻¹
    u = u.float()
    w = wg[:, :, colperm].float().clone()  # [G, R, cols] in visiting order
    cb = codebooks.detach().to(dev, torch.float32)  # [M, k, d]
    codes = torch.empty(groups, rows, nb, cb.shape[0], dtype=torch.int64, device=dev)  # [G, R, nb, M]
    step = max(d, block_size - block_size % d)
    with _single_threaded_faiss():
        for b0 in range(0, cols, step):
            b1 = min(b0 + step, cols)
            err = torch.empty(groups, rows, b1 - b0, dtype=torch.float32, device=dev)  # [G, R, B]
            for j in range(b0, b1, d):
                a = amap[:, j // d]  # [G, d, d]
                books = torch.einsum("mkd,gde->gmke", cb, a)  # [G, M, k, d]
                sub = w[:, :, j:j + d]  # [G, R, d]
                code = _encode_group(sub @ a, books, beam_size)  # [G, R, M]
                codes[:, :, order[j // d]] = code
                e = (sub - _group_decode(code, cb)) @ a  # [G, R, d] scaled error δ U_bb⁻¹
                err[:, :, j - b0:j - b0 + d] = e
                w[:, :, j + d:b1] -= e @ u[:, j:j + d, j + d:b1]
            w[:, :, b1:] -= err @ u[:, b0:b1, b1:]
    return codes.reshape(groups * rows, nb, cb.shape[0])


def _block_factors(h: torch.Tensor, d: int, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factors of the diagonal `d × d` blocks of `H [G, cols, cols]`: `L` and `L⁻ᵀ`, each `[G, nb, d, d]`."""
    groups, cols, _ = h.shape
    blocks = torch.stack([h[:, j:j + d, j:j + d] for j in range(0, cols, d)], 1).double()  # [G, nb, d, d]
    scale = h.diagonal(dim1=1, dim2=2).double().mean(1).clamp_min(1e-12)  # [G]
    blocks = blocks + jitter * scale[:, None, None, None] * torch.eye(d, dtype=blocks.dtype, device=h.device)
    low = torch.linalg.cholesky(blocks)  # [G, nb, d, d]
    eye = torch.eye(d, dtype=blocks.dtype, device=h.device).expand_as(low)
    inv_t = torch.linalg.solve_triangular(low, eye, upper=False).transpose(-1, -2)  # L⁻ᵀ
    return low, inv_t


@torch.no_grad()
def icm_reassign(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, *, sweeps: int = 1,
    jitter: float = 1e-6,
) -> torch.Tensor:
    """Improve codes by exact coordinate descent on the output error (iterated conditional modes).

    Args:
        weight (`torch.Tensor`): `[rows, cols]` (already divided by per-row scales, if any).
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`, undamped.
        codes (`torch.Tensor`): current codes `[rows, cols / d, M]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.
        sweeps (`int`, defaults to 1): passes over all subvectors.
        jitter (`float`, defaults to 1e-6): relative ridge on each `H_gg` so that subvectors of unseen
            columns still factorise (affects only which codeword ties win).

    Returns:
        `torch.Tensor`: codes `[rows, cols / d, M]` int64 with output error no higher than `codes`'.
    """
    d = _check_codebooks(weight, codebooks)
    wg, h = as_grouped(weight, hessian)  # [G, R, cols], [G, cols, cols]
    groups, rows, cols = wg.shape
    nb, n_books = cols // d, codebooks.shape[0]
    if tuple(codes.shape) != (groups * rows, nb, n_books):
        raise ValueError(f"codes must be [{groups * rows}, {nb}, {n_books}]; got {tuple(codes.shape)}.")
    dev = weight.device
    h = h.to(dev, torch.float32)
    low, inv_t = (t.float() for t in _block_factors(h, d, jitter))  # [G, nb, d, d] each
    cb = codebooks.detach().to(dev, torch.float32)  # [M, k, d]
    w = wg.float()  # [G, R, cols]
    c = codes.to(dev, torch.int64).reshape(groups, rows, nb, n_books).clone()  # [G, R, nb, M]
    q = _group_decode(c, cb).reshape(groups, rows, cols)  # [G, R, cols]
    with _single_threaded_faiss():
        for _ in range(sweeps):
            resid = (w - q) @ h  # [G, R, cols] = E H, refreshed each sweep (float32 drift)
            for g in range(nb):
                sl = slice(g * d, (g + 1) * d)
                e = w[:, :, sl] - q[:, :, sl]  # [G, R, d]
                cross = resid[:, :, sl] - e @ h[:, sl, sl]  # [G, R, d] = b_g
                target = w[:, :, sl] @ low[:, g] + cross @ inv_t[:, g]  # [G, R, d] = t L
                new_q = q[:, :, sl].clone()  # [G, R, d]
                books = torch.einsum("mkd,gde->gmke", cb, low[:, g])  # [G, M, k, d]
                for m in range(n_books):
                    others = new_q - cb[m][c[:, :, g, m]]  # [G, R, d]
                    c[:, :, g, m] = _nearest_transformed(target - others @ low[:, g], books[:, m])
                    new_q = others + cb[m][c[:, :, g, m]]
                resid -= (new_q - q[:, :, sl]) @ h[:, sl, :]
                q[:, :, sl] = new_q
    return c.reshape(groups * rows, nb, n_books)
