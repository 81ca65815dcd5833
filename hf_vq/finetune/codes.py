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

from ..nn import VQModuleMixin

__all__ = ["enable_code_updates_", "disable_code_updates_", "reassign_codes_", "code_deltas"]

_CHUNK = 1 << 16  # blocks per distance computation


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
    from ..codec.packing import pack_codes
    from ..codec.pq import decode

    delta = module._parameters["code_delta"]  # [rows, cols]
    codes = module.unpacked_codes().long()  # [rows, n_blocks, M]
    rows, n_blocks, n_books = codes.shape
    books = module.codebooks.detach().float()  # [M, k, d]
    d = books.shape[-1]
    scale = (module.scales.detach().float()[:, None, None] if module.scales is not None
             else books.new_ones(rows, 1, 1))  # [rows, 1, 1]
    old = decode(codes, books).reshape(rows, n_blocks, d) * scale  # [rows, n_blocks, d]: Ŵ
    target = old + delta.detach().reshape(rows, n_blocks, d)  # [rows, n_blocks, d]: T
    budget = int(fraction * rows * n_blocks)
    new_codes = codes.clone()
    changed = 0
    for m in range(n_books):
        if budget <= 0:
            break
        current = _decode_scaled(new_codes, books, scale)  # [rows, n_blocks, d]
        # what codebook m must supply, in codebook units: the target less the other codebooks' codewords
        others = current - books[m][new_codes[..., m]] * scale
        safe = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)  # a zero scale: no division by 0
        wanted = ((target - others) / safe).reshape(-1, d)  # [rows * n_blocks, d]
        best, gain = _nearest(wanted, books[m], new_codes[..., m].reshape(-1), (scale ** 2).expand(rows, n_blocks, 1).reshape(-1))
        take = _top_gains(gain, budget // max(1, n_books - m))
        if take.numel():
            flat = new_codes[..., m].reshape(-1)
            flat[take] = best[take]
            new_codes[..., m] = flat.reshape(rows, n_blocks)
            changed += int(take.numel())
            budget -= int(take.numel())
    if changed:
        module.codes.copy_(pack_codes(new_codes.reshape(rows, -1).to(torch.int32), module.bits))
        new = _decode_scaled(new_codes, books, scale)
        delta.copy_((target - new).reshape(rows, -1))  # the part of the target the codes do not reach
    return changed, rows * n_blocks * n_books


def _decode_scaled(codes: torch.Tensor, books: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from ..codec.pq import decode

    rows, n_blocks, _ = codes.shape
    return decode(codes, books).reshape(rows, n_blocks, -1) * scale  # [rows, n_blocks, d]


def _nearest(wanted: torch.Tensor, book: torch.Tensor, current: torch.Tensor, weight: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `wanted` `[N, d]`: the nearest codeword of `book` `[k, d]` and the weighted gain
    `weight · (‖wanted − book[current]‖² − ‖wanted − book[best]‖²)` (`[N]` each)."""
    best = torch.empty_like(current)
    gain = torch.empty(wanted.shape[0], dtype=wanted.dtype, device=wanted.device)
    norms = book.pow(2).sum(1)  # [k]
    for start in range(0, wanted.shape[0], _CHUNK):
        w = wanted[start:start + _CHUNK]  # [n, d]
        dist = norms[None, :] - 2 * (w @ book.t())  # [n, k]: ‖w − c‖² less ‖w‖²
        value, index = dist.min(1)
        now = dist.gather(1, current[start:start + _CHUNK, None]).squeeze(1)
        best[start:start + _CHUNK] = index
        gain[start:start + _CHUNK] = (now - value) * weight[start:start + _CHUNK]
    return best, gain


def _top_gains(gain: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the (at most `budget`) largest positive gains."""
    positive = int((gain > 0).sum())
    if positive == 0 or budget <= 0:
        return gain.new_zeros(0, dtype=torch.long)
    return gain.topk(min(budget, positive)).indices
