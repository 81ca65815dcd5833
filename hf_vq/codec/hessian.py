"""Layer-output error of a compressed weight, measured through the Hessian `H = XᵀX` of its inputs.

Pure tensor code: no `nn.Module`, no Hugging Face.

For a weight `W [rows, cols]` (rows = output channels) fed with inputs `X [n, cols]`, the output error of
an approximation `Ŵ` is `‖X Wᵀ − X Ŵᵀ‖² = tr(ΔW H ΔWᵀ)` with `ΔW = W − Ŵ` and `H = XᵀX [cols, cols]`. It is
a sum over rows, `Σ_r Δw_r H Δw_rᵀ`, so rows can use different Hessians: a grouped (or depthwise)
convolution passes `H [G, cols, cols]` and row `r` belongs to group `r // (rows // G)`.

Everything here takes `H` as `[cols, cols]` or `[G, cols, cols]` and works internally on the batched view
`W [G, rows / G, cols]`, `H [G, cols, cols]`.
"""

from __future__ import annotations

import torch

__all__ = ["as_grouped", "output_energy", "output_error", "row_output_errors", "with_isotropic",
           "damped_inverse_factor", "act_order"]


def as_grouped(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a weight and its Hessian and view them per row group.

    Args:
        weight (`torch.Tensor`): `[rows, cols]`.
        hessian (`torch.Tensor`): `[cols, cols]` (one for all rows) or `[G, cols, cols]` (rows split evenly
            into `G` consecutive groups).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the weight as `[G, rows / G, cols]` (a view) and the Hessian as
        `[G, cols, cols]` (a view), dtypes unchanged.

    Raises:
        `ValueError`: if the shapes do not match, `G` does not divide `rows`, or `H` is not finite.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix [rows, cols]; got shape {tuple(weight.shape)} "
                         "(reshape a conv weight to [out_channels, in_channels/groups * kh * kw]).")
    rows, cols = weight.shape
    h = hessian if hessian.ndim == 3 else hessian.unsqueeze(0)  # [G, cols, cols]
    if h.ndim != 3 or tuple(h.shape[1:]) != (cols, cols):
        raise ValueError(f"hessian must be [cols, cols] or [G, cols, cols] with cols={cols}; got {tuple(hessian.shape)}.")
    groups = h.shape[0]
    if groups < 1 or rows % groups:
        raise ValueError(f"hessian has G={groups} groups, which must divide rows={rows} evenly "
                         "(row r uses H[r // (rows // G)]).")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hessian has non-finite entries; accumulate XᵀX in float64 and check the calibration inputs.")
    return weight.reshape(groups, rows // groups, cols), h


def row_output_errors(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Output error of every row, `Δw_r H Δw_rᵀ`, in float64.

    Args:
        weight (`torch.Tensor`): `[rows, cols]`.
        approx (`torch.Tensor`): `[rows, cols]`, the approximation `Ŵ`.
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]` (see [`as_grouped`]).

    Returns:
        `torch.Tensor`: `[rows]` float64.
    """
    if approx.shape != weight.shape:
        raise ValueError(f"approx must have the weight's shape {tuple(weight.shape)}; got {tuple(approx.shape)}.")
    delta, h = as_grouped(weight.double() - approx.to(weight.device).double(), hessian)  # [G, R, cols], [G, cols, cols]
    h = h.to(delta.device, torch.float64)
    return ((delta @ h) * delta).sum(-1).reshape(-1)  # [rows]


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer's (bias-free) output energy `tr(W H Wᵀ)` (float64 sum): with `H = XᵀX`, `‖XWᵀ‖²`.

    Args:
        weight (`torch.Tensor`): `[rows, cols]`.
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`.
    """
    return float(row_output_errors(weight, torch.zeros_like(weight), hessian).sum())


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` (float64 sums).

    With `H = XᵀX` this is `‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖²`: the share of the layer's (bias-free) output energy lost
    by the approximation. Compare with [`hf_vq.codec.relative_error`], its weight-space counterpart.

    Args:
        weight (`torch.Tensor`): `[rows, cols]`.
        approx (`torch.Tensor`): `[rows, cols]`.
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`.

    Returns:
        `float`: the relative output error (0 for an exact approximation).
    """
    return float(row_output_errors(weight, approx, hessian).sum()) / max(output_energy(weight, hessian), 1e-300)


def with_isotropic(hessian: torch.Tensor, fraction: float) -> torch.Tensor:
    """`H + fraction · mean(diag H) · I`, the mean over every group's diagonal: an isotropic term in proportion to the
    inputs' mean energy (a weight-space term in the objective, or a prior on inputs calibration did not show).

    Args:
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`.
        fraction (`float`): the term's size relative to the mean diagonal entry.

    Returns:
        `torch.Tensor`: the same shape and dtype as `hessian`.
    """
    mean = hessian.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-30)
    return hessian + fraction * mean * torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)


def damped_inverse_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor `U` of `(H + λ·mean(diag H)·I)⁻¹ = UᵀU`, per group, in float64.

    GPTQ's key fact: quantizing the columns in order, row `j` of `U` carries the error of column `j` onto the
    columns after it, and for a block `b` of columns the loss of an error `δ [d]` (with the later columns
    compensating optimally) is `‖δ U_bb⁻¹‖²`. Columns never seen in the calibration data (`diag H = 0`)
    get the damping as their only curvature.

    Args:
        hessian (`torch.Tensor`): `[G, cols, cols]`.
        damp (`float`, defaults to 0.01): relative damping `λ` (GPTQ's `percdamp`). Larger values trust the
            calibration data less (closer to plain weight error).

    Returns:
        `torch.Tensor`: `U [G, cols, cols]`, float64, upper triangular.

    Raises:
        `ValueError`: if `damp` is negative or the damped Hessian is not positive definite.
    """
    if damp < 0:
        raise ValueError(f"damp={damp} must be >= 0 (GPTQ uses 0.01).")
    h = hessian.to(torch.float64).clone()  # [G, cols, cols]
    diag = h.diagonal(dim1=1, dim2=2)  # [G, cols] (a view)
    mean = diag.mean(1, keepdim=True).clamp_min(1e-12)  # [G, 1]
    diag.add_(damp * mean + (diag <= 0) * mean)  # dead columns get curvature mean(diag H)
    chol, info = torch.linalg.cholesky_ex(h)  # [G, cols, cols] lower
    if bool((info != 0).any()):
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp}); increase damp "
                         "or collect more calibration samples.")
    inv = torch.cholesky_inverse(chol)  # [G, cols, cols]
    return torch.linalg.cholesky(inv, upper=True)  # [G, cols, cols]


def act_order(hessian: torch.Tensor, d: int) -> torch.Tensor:
    """GPTQ's "act-order" for vector quantization: blocks of `d` columns by decreasing `Σ diag H` over the block.

    Subvectors stay whole (a block's columns stay contiguous and in order), so codes can be stored in the
    natural order afterwards.

    Args:
        hessian (`torch.Tensor`): `[G, cols, cols]` (diagonals summed over groups).
        d (`int`): subvector length.

    Returns:
        `torch.Tensor`: block order `[cols / d]` int64 (position -> block index).
    """
    diag = hessian.diagonal(dim1=1, dim2=2).double().sum(0)  # [cols]
    return diag.reshape(-1, d).sum(1).argsort(descending=True, stable=True)  # [cols / d]
