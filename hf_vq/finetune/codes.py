"""Codes that move during fine-tuning: straight-through deltas and bounded re-assignment (opt-in).

A compressed weight is `Ŵ = diag(s) · decode(codes, codebooks)`. Codebooks and scales get gradients; codes are
integers and do not. With code updates on, every compressed module carries `code_delta` `[rows, cols]` (float32,
zeros at the start): the forward still uses `Ŵ`, but the weight's gradient flows into the delta (straight-through),
so the optimizer moves a continuous target `T = Ŵ + delta` the way it would move a dense weight. Every
`code_update_every` steps, [`reassign_codes_`] moves the codes towards `T`: each block's nearest codeword to its
target (one pass of coordinate descent over the `M` codebooks of additive quantization), keeping only the changes
that reduce `‖T − Ŵ‖²` most — at most `fraction` of the blocks per update — and the delta becomes the part of the
target the new codes do not reach (`T − Ŵ_new`). This is the "straight-through estimation with bounded
re-assignment" reading of PV-tuning (Malinovskii et al., 2024): the discrete step is a projection of a continuous
step, limited in size so that the loss changes gradually.

Every process computes the same re-assignment from the same (all-reduced) deltas, so codes stay identical across
processes of a DDP run without being communicated. The deltas are parameters: checkpoints of the training state
hold them (with the codes), so a resumed run re-assigns exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..codec.pq import decode
from ..nn import VQModuleMixin

__all__ = ["enable_code_updates_", "disable_code_updates_", "reassign_codes_", "code_deltas"]

def enable_code_updates_(model: nn.Module) -> int:
    """Give every compressed module of `model` a trainable `code_delta`; returns the number of delta values."""
    modules = [m for m in model.modules() if isinstance(m, VQModuleMixin)]
    return sum(m.enable_code_updates_().numel() for m in modules)


def disable_code_updates_(model: nn.Module) -> None:
    """Remove every `code_delta` (before saving: the format has codes, codebooks and scales only)."""
    for module in model.modules():
        if isinstance(module, VQModuleMixin):
            module.disable_code_updates_()


def code_deltas(model: nn.Module) -> list[nn.Parameter]:
    """The `code_delta` parameters of `model` (empty without code updates)."""
    return [m._parameters["code_delta"] for m in model.modules()
            if isinstance(m, VQModuleMixin) and m._parameters.get("code_delta") is not None]


@torch.no_grad()
def reassign_codes_(model: nn.Module, fraction: float) -> dict[str, float]:
    """Move the codes of every module with a `code_delta` towards `Ŵ + delta`, at most `fraction` of each module's
    blocks per codebook; returns `{"changed": blocks re-assigned, "blocks": blocks considered}`."""
    changed = total = 0
    for module in model.modules():
        if isinstance(module, VQModuleMixin) and module._parameters.get("code_delta") is not None:
            n, blocks = _reassign_module_(module, fraction)
            changed, total = changed + n, total + blocks
    return {"changed": float(changed), "blocks": float(total)}


def _reassign_module_(module: VQModuleMixin, fraction: float) -> tuple[int, int]:
    from ..codec.kmeans import assign
    from ..codec.packing import pack_codes

    delta = module._parameters["code_delta"]  # [rows, cols]
    codes = module.unpacked_codes().to(torch.int64, copy=True)  # [rows, n_blocks, M], changed in place below
    rows, n_blocks, n_books = codes.shape
    books = module.codebooks.detach().float()  # [M, k, d]
    d = books.shape[-1]
    scale = (module.scales.detach().float()[:, None, None] if module.scales is not None
             else books.new_ones(rows, 1, 1))  # [rows, 1, 1]
    safe = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)  # a zero scale: no division by 0
    weight = (scale ** 2).expand(rows, n_blocks, 1).reshape(-1)  # [rows * n_blocks]: codebook units -> weight units
    current = decode(codes, books).reshape(rows, n_blocks, d) * scale  # [rows, n_blocks, d]: Ŵ, kept up to date
    target = current + delta.detach().reshape(rows, n_blocks, d)  # [rows, n_blocks, d]: T
    budget = int(fraction * rows * n_blocks)
    changed = 0
    for m in range(n_books):
        if budget <= 0:
            break
        book, now = books[m], codes[..., m].reshape(-1)  # [k, d], [rows * n_blocks]
        words = book[now].reshape(rows, n_blocks, d) * scale  # [rows, n_blocks, d]: codebook m's share of Ŵ
        # what codebook m must supply, in codebook units: the target less the other codebooks' codewords
        wanted = ((target - current + words) / safe).reshape(-1, d)  # [rows * n_blocks, d]
        best = assign(wanted, book)  # [rows * n_blocks]
        gain = weight * ((wanted - book[now]).pow(2).sum(1) - (wanted - book[best]).pow(2).sum(1))
        take = _top_gains(gain, budget // (n_books - m))
        if take.numel():
            now = now.clone()
            now[take] = best[take]
            codes[..., m] = now.reshape(rows, n_blocks)
            current += book[now].reshape(rows, n_blocks, d) * scale - words
            changed += int(take.numel())
            budget -= int(take.numel())
    if changed:
        module.codes.copy_(pack_codes(codes.reshape(rows, -1).to(torch.int32), module.bits))
        delta.copy_((target - current).reshape(rows, -1))  # the part of the target the codes do not reach
    return changed, rows * n_blocks * n_books


def _top_gains(gain: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the (at most `budget`) largest positive gains."""
    positive = int((gain > 0).sum())
    if positive == 0 or budget <= 0:
        return gain.new_zeros(0, dtype=torch.long)
    return gain.topk(min(budget, positive)).indices
