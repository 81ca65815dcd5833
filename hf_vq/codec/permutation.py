"""PQF's permutation search as a pure tensor algorithm (knows nothing of modules).

A *channel space* of `P` channels is read by one or more weight matrices. Each is given as a tensor
`x [N, P, g]`: `N` rows, the `P` channels of the space, and `g` consecutive matrix columns per channel
(1 for a linear layer, `kh*kw` for a convolution). Its subvectors are `n = d / g` consecutive channels
of one row, so a permutation `perm [P]` (position -> channel) decides which channels share a subvector.

The objective of PQF (Martinez et al., CVPR 2021) is the log-determinant of the covariance of the
subvectors, summed over the matrices: for a Gaussian source the distortion at a given rate grows as
`det(Σ)^(1/d)`, so a permutation that lowers it makes the matrices easier to quantize. The search is

1. a greedy start: channels sorted by variance are dealt into the `n` subvector slots ("buckets")
   so that each slot gets a similar total variance, and the slots are interleaved;
2. a stochastic local search that proposes random swaps of two channels and keeps one only if the
   objective drops. Proposals are evaluated in batches (`batch` swaps per step, each scored exactly
   and incrementally from precomputed channel Gram blocks with one batched `slogdet`); the best
   improving swap of a batch is applied. This runs on CUDA when available and on the CPU otherwise.

The result is never worse than the identity permutation (it is discarded if it would be).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

__all__ = ["ObjectiveTerm", "PermutationResult", "term_logdet", "permutation_objective", "greedy_permutation",
           "search_permutation", "apply_index"]

# Above this many Gram entries (P*P*g*g) per term, block second moments are computed from the rows instead.
_MAX_GRAM_ENTRIES = 1 << 25


class ObjectiveTerm(NamedTuple):
    """One matrix reading a channel space.

    Args:
        x (`torch.Tensor`): `[N, P, g]`: rows, channels of the space, columns per channel.
        n (`int`): channels per subvector (`d / g`); `P` must be a multiple of `n`.
        weight (`float`, defaults to 1.0): factor of this term's log-determinant in the objective.
    """

    x: torch.Tensor
    n: int
    weight: float = 1.0


@dataclass
class PermutationResult:
    """What [`search_permutation`] found for one channel space.

    Attributes:
        perm (`torch.Tensor`): int64 `[P]`, position -> channel (apply with `x[:, perm]`).
        objective_identity (`float`): objective of the identity permutation.
        objective_greedy (`float`): objective of the greedy bucketing start.
        objective (`float`): objective of `perm` (<= `objective_identity`).
        steps (`int`): search steps run (each evaluates `batch` swap proposals).
        proposals (`int`): swap proposals evaluated.
        accepted (`int`): swaps kept.
        seconds (`float`): wall time of the search.
    """

    perm: torch.Tensor
    objective_identity: float
    objective_greedy: float
    objective: float
    steps: int = 0
    proposals: int = 0
    accepted: int = 0
    seconds: float = 0.0


def _check_terms(terms: Sequence[ObjectiveTerm]) -> int:
    if not terms:
        raise ValueError("a permutation search needs at least one objective term (a matrix reading the space).")
    p = terms[0].x.shape[1]
    for t in terms:
        if t.x.dim() != 3 or t.x.shape[1] != p:
            raise ValueError(f"every term must be [N, P={p}, g]; got {tuple(t.x.shape)}.")
        if t.n < 1 or p % t.n:
            raise ValueError(f"channels per subvector n={t.n} must divide the space size P={p}.")
    return p


def _logdet(cov: torch.Tensor) -> torch.Tensor:
    """Log-determinant of covariance matrices `[..., d, d]` with a tiny relative ridge (finite for singular ones)."""
    d = cov.shape[-1]
    ridge = cov.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(1e-300) * 1e-9  # [...]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return torch.linalg.slogdet(cov + ridge[..., None, None] * eye).logabsdet


def term_logdet(x: torch.Tensor, n: int, perm: torch.Tensor | None = None) -> float:
    """`log det` of the covariance of the subvectors of `x [N, P, g]` under `perm` (`n` channels per subvector)."""
    if perm is not None:
        x = x[:, perm.to(x.device)]
    rows, p, g = x.shape
    sub = x.reshape(rows * (p // n), n * g).double()  # [N * P/n, d]
    sub = sub - sub.mean(0)
    cov = sub.T @ sub / sub.shape[0]  # [d, d]
    return float(_logdet(cov))


def permutation_objective(terms: Sequence[ObjectiveTerm], perm: torch.Tensor | None = None) -> float:
    """PQF's objective: `Σ weight · log det Σ_subvectors` over the terms, under `perm` (identity if None)."""
    _check_terms(terms)
    return sum(t.weight * term_logdet(t.x, t.n, perm) for t in terms)


def _channel_scores(terms: Sequence[ObjectiveTerm]) -> torch.Tensor:
    """Per channel a positive spread: geometric mean over terms of `det(cov of the channel's g columns)^(1/g)`."""
    logs = []
    for t in terms:
        x = t.x.double()
        x = x - x.mean(0)
        cov = torch.einsum("npa,npb->pab", x, x) / x.shape[0]  # [P, g, g]
        logs.append(_logdet(cov) / x.shape[2])  # [P]
    return torch.stack(logs).mean(0).exp()  # [P]


def greedy_permutation(terms: Sequence[ObjectiveTerm], n: int | None = None) -> torch.Tensor:
    """PQF's greedy bucketing start.

    Channels sorted by decreasing variance (for `g > 1`: `det` of the channel's column covariance) are
    put one by one into the non-full bucket of lowest running variance; there are `n` buckets of
    `P / n` channels. Interleaving the buckets gives each subvector one channel per bucket.

    Args:
        terms: the objective terms (see [`ObjectiveTerm`]).
        n (`int`, *optional*): buckets; defaults to the `n` of the term with the most entries.

    Returns:
        `torch.Tensor`: int64 `[P]`, position -> channel (on the CPU).
    """
    p = _check_terms(terms)
    if n is None:
        n = max(terms, key=lambda t: t.x.numel()).n
    scores = _channel_scores(terms).cpu()  # [P]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    cap = p // n
    buckets: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    for c in order:
        b = min((i for i in range(n) if len(buckets[i]) < cap), key=lambda i: (load[i], i))
        buckets[b].append(c)
        load[b] += float(scores[c])
    return torch.tensor([buckets[a][j] for j in range(cap) for a in range(n)], dtype=torch.long)


class _TermState:
    """Incremental state of one term: channel Gram blocks, second moment and mean of the subvectors."""

    def __init__(self, term: ObjectiveTerm, perm: torch.Tensor, device: torch.device) -> None:
        x = term.x.to(device=device, dtype=torch.float64)  # [N, P, g]
        self.rows, self.p, self.g = x.shape
        self.n, self.weight = term.n, float(term.weight)
        self.d = self.n * self.g
        self.count = self.rows * (self.p // self.n)  # number of subvectors
        self.m = x.sum(0)  # [P, g]: column sums per channel
        if self.p * self.p * self.g * self.g <= _MAX_GRAM_ENTRIES:
            self.gram = torch.einsum("npa,nqb->pqab", x, x)  # [P, P, g, g]
            self.x = None
        else:
            self.gram, self.x = None, x
        self.reset(perm)

    def block_moment(self, idx: torch.Tensor) -> torch.Tensor:
        """Second moments `[B, d, d]` of subvector blocks with channels `idx [B, n]` (summed over rows)."""
        b = idx.shape[0]
        if self.gram is not None:
            blk = self.gram[idx[:, :, None], idx[:, None, :]]  # [B, n, n, g, g]
            return blk.permute(0, 1, 3, 2, 4).reshape(b, self.d, self.d)
        sub = self.x[:, idx].permute(1, 0, 2, 3).reshape(b, self.rows, self.d)  # [B, N, d]
        return sub.transpose(1, 2) @ sub

    def reset(self, perm: torch.Tensor) -> None:
        blocks = perm.view(self.p // self.n, self.n)  # [P/n, n]
        self.second = self.block_moment(blocks).sum(0)  # [d, d]
        self.mean_sum = self.m[blocks].sum(0).reshape(self.d)  # [d]
        self.value = float(self._logdet(self.second[None], self.mean_sum[None])[0])

    def _logdet(self, second: torch.Tensor, mean_sum: torch.Tensor) -> torch.Tensor:
        mu = mean_sum / self.count  # [B, d]
        cov = second / self.count - mu[:, :, None] * mu[:, None, :]  # [B, d, d]
        return _logdet(cov)

    def propose(self, perm: torch.Tensor, p: torch.Tensor, q: torch.Tensor):
        """Objectives `[B]` after swapping positions `p [B]` and `q [B]`, and the updates that realise them."""
        n = self.n
        jp, jq, ap, aq = p // n, q // n, p % n, q % n
        blocks = perm.view(self.p // n, n)
        cp, cq = perm[p], perm[q]  # [B]
        rows = torch.arange(len(p), device=p.device)
        old_p, old_q = blocks[jp], blocks[jq]  # [B, n]
        new_p = old_p.clone()
        new_p[rows, ap] = cq
        same = jp == jq
        new_p[rows[same], aq[same]] = cp[same]
        new_q = old_q.clone()
        new_q[rows, aq] = cp
        delta = self.block_moment(new_p) - self.block_moment(old_p)  # [B, d, d]
        other = self.block_moment(new_q) - self.block_moment(old_q)
        delta = delta + other * (~same).to(delta.dtype)[:, None, None]
        dm = torch.zeros(len(p), n, self.g, dtype=delta.dtype, device=delta.device)  # [B, n, g]
        diff = self.m[cq] - self.m[cp]  # [B, g]
        dm[rows, ap] += diff
        dm[rows, aq] -= diff
        dm = dm.reshape(len(p), self.d)
        values = self._logdet(self.second[None] + delta, self.mean_sum[None] + dm)  # [B]
        return values, delta, dm

    def accept(self, delta: torch.Tensor, dm: torch.Tensor, value: float) -> None:
        self.second += delta
        self.mean_sum += dm
        self.value = value


def _total(states: list[_TermState]) -> float:
    return sum(s.weight * s.value for s in states)


@torch.no_grad()
def search_permutation(
    terms: Sequence[ObjectiveTerm],
    *,
    iters: int = 10_000,
    batch: int = 256,
    patience: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    greedy: bool = True,
) -> PermutationResult:
    """Find a permutation of the channels that lowers PQF's objective (greedy start + stochastic local search).

    Args:
        terms (`Sequence[ObjectiveTerm]`): the matrices reading the space, each `[N, P, g]` with its `n`.
        iters (`int`, defaults to 10,000): maximum search steps; 0 keeps the best of identity and greedy start.
        batch (`int`, defaults to 256): swap proposals scored per step; the best one is kept if it lowers
            the objective. When `P(P-1)/2 <= batch` every pair is scored each step (exhaustive local search).
        patience (`int`, defaults to 64): stop after this many consecutive steps without an improving swap
            (at once for an exhaustive step: the permutation is then a local optimum).
        seed (`int`, defaults to 0): seed of the proposals; results are deterministic per device.
        device (`torch.device` or `str`, *optional*): where to search; CUDA when available by default.
        greedy (`bool`, defaults to `True`): start from the greedy bucketing (if it beats the identity).

    Returns:
        [`PermutationResult`]: the permutation (CPU, int64 `[P]`) and the objective before / after.

    Example:
        ```python
        >>> import torch
        >>> from hf_vq.codec.permutation import ObjectiveTerm, search_permutation
        >>> w = torch.randn(64, 32) * torch.rand(32) * 3  # [rows, channels]: columns of different scales
        >>> res = search_permutation([ObjectiveTerm(w[:, :, None], n=4)], iters=200)
        >>> res.objective <= res.objective_identity
        True
        ```
    """
    start = time.perf_counter()
    p = _check_terms(terms)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ident = torch.arange(p, device=dev)
    states = [_TermState(t, ident, dev) for t in terms]
    obj_identity = _total(states)
    perm, obj_greedy = ident, obj_identity
    if greedy and p > 1:
        cand = greedy_permutation(terms).to(dev)
        for s in states:
            s.reset(cand)
        obj_greedy = _total(states)
        if obj_greedy < obj_identity:
            perm = cand
        else:
            for s in states:
                s.reset(ident)
    obj = min(obj_identity, obj_greedy)
    gen = torch.Generator().manual_seed(seed)
    exhaustive = p * (p - 1) // 2 <= batch
    if exhaustive:
        pairs = torch.triu_indices(p, p, offset=1)  # [2, P(P-1)/2]
        all_p, all_q = pairs[0].to(dev), pairs[1].to(dev)
    steps = proposals = accepted = idle = 0
    tol = 1e-12 * max(1.0, abs(obj))
    while steps < iters and p > 1:
        steps += 1
        if exhaustive:
            pp, qq = all_p, all_q
        else:
            pp = torch.randint(0, p, (batch,), generator=gen)
            qq = (pp + torch.randint(1, p, (batch,), generator=gen)) % p
            pp, qq = pp.to(dev), qq.to(dev)
        proposals += len(pp)
        total = torch.zeros(len(pp), dtype=torch.float64, device=dev)
        updates = []
        for s in states:
            values, delta, dm = s.propose(perm, pp, qq)
            total += s.weight * values
            updates.append((values, delta, dm))
        best = int(torch.argmin(total))
        new_obj = float(total[best])
        if not new_obj < obj - tol or not math.isfinite(new_obj):
            idle += 1
            if exhaustive or idle >= patience:
                break
            continue
        idle = 0
        accepted += 1
        perm = perm.clone()
        a, b = int(pp[best]), int(qq[best])
        perm[a], perm[b] = perm[b].clone(), perm[a].clone()
        for s, (values, delta, dm) in zip(states, updates):
            s.accept(delta[best], dm[best], float(values[best]))
        obj = new_obj
        if accepted % 512 == 0:  # re-anchor the incremental sums (no drift)
            for s in states:
                s.reset(perm)
            obj = _total(states)
    if accepted:
        for s in states:
            s.reset(perm)
        obj = _total(states)
    if obj > obj_identity:  # never worse than doing nothing
        perm, obj = ident, obj_identity
    return PermutationResult(perm=perm.cpu(), objective_identity=obj_identity, objective_greedy=obj_greedy,
                             objective=obj, steps=steps, proposals=proposals, accepted=accepted,
                             seconds=time.perf_counter() - start)


def apply_index(size: int, perm: torch.Tensor, inner: int) -> torch.Tensor:
    """Index `[size]` that permutes a dimension laid out as `(r, p, i)` (index `(r*P + p)*inner + i`) by `perm [P]`.

    `x.index_select(dim, apply_index(x.shape[dim], perm, inner))` puts channel `perm[p]` at position `p` in
    every one of the `size / (P*inner)` repeats.
    """
    p = perm.numel()
    if size % (p * inner):
        raise ValueError(f"a dimension of size {size} is not made of repeats of {p} channels x {inner}.")
    reps = size // (p * inner)
    r = torch.arange(reps)[:, None, None]
    i = torch.arange(inner)[None, None, :]
    return ((r * p + perm.cpu()[None, :, None]) * inner + i).reshape(-1)
