"""Annealed k-means ("SR-C", Martinez et al., CVPR 2021) and nearest-codeword assignment.

Pure tensor code: no `nn.Module`, no Hugging Face. Works on any device; on CPU tensors the
nearest-codeword search is handed to faiss (`faiss-cpu`) when it can be imported, elsewhere it is a
chunked pure-torch search.

The method
----------
Lloyd's algorithm alternates *assign every subvector to its nearest codeword* and *move every codeword
to the mean of its members*. SR-C ("stochastic relaxation, clustering") keeps the assignment on the
clean data but computes the update on noisy data `X + sqrt(1 - i/T) * N(0, 1) * std(X)` (per-dimension
std), so the codebook is shaken less and less as iteration `i` goes to `T`, which lets it leave poor
local minima early and settle at the end.

Two facts make that cheap without changing its distribution:

1. *O(k·d) noise.* The mean of the `n_c` noisy members of cluster `c` is the clean mean plus Gaussian
   noise of per-dimension variance `sigma_dim**2 * (1 - i/T) / n_c`. We draw that `[k, d]` noise
   directly instead of perturbing all `n` subvectors.
2. *Variance-matched subsampling.* While that annealing noise is large, the update does not need every
   point: the mean of a uniform random subsample holding a fraction `f` of the data differs from the
   full mean by noise of variance `s_c**2 * (1 - f) / m_c` (`s_c**2` the within-cluster variance,
   `m_c` the sampled members). We pick `f` so that this sampling noise stays below the prescribed
   annealing noise and inject only the *missing* variance, `max(0, target - sampling)`. The codeword
   update then has the prescribed variance, and early iterations touch only ~10-30% of the data. The
   fraction grows as the noise shrinks; the last iterations use every point. Pass `subsample=False`
   for the textbook full-data iteration.

Empty clusters (which the paper's code left alone) are re-seeded, on full-data iterations, farthest-first:
each takes the point farthest from every codeword placed so far. `anneal=False` is plain Lloyd (full data, no noise), stopped
early once the assignment no longer changes (its fixed point, so the result is the same).

Weighted k-means
----------------
With `weights` (one non-negative weight per subvector entry, `[n, d]` like the data) the objective is
`sum_i sum_t w_it (x_it - c_t)^2`: e.g. the weight of an entry of a layer's weight matrix is the second
moment of the input channel it multiplies, so the error is measured as the layer's outputs see it. The
distance is `-2 (w*x) c^T + w (c*c)^T` plus a per-point constant: one inner-product search of the
queries `[w*x, w]` `[n, 2d]` against `[2c, -c*c]` `[k, 2d]` (a chunked torch GEMM; a calibrated
compression's k-means takes 2.7-4.2x as long, "k-means s" in benchmarks/results/permute.md).
A codeword's coordinate `t` moves to the weighted mean of its members' coordinate `t` (the plain mean
where all their weights are zero). Annealing and subsampling keep their unweighted statistics.

Memory
------
Besides the caller's data (and weights), a run keeps only its shuffle (int32: 4 bytes per subvector, a quarter of
the data at d = 4). Each iteration reads its window (a subsample gathered from the shuffled order, or all the data in
place) in pieces of 2^20 subvectors, holding the codes, distances and float64 sums of one piece at a time; no float64
copy of the data is made. The codes returned are int64 (2x the data at d = 4).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["assign", "kmeans", "kmeans_many"]

try:  # faiss-cpu: fast exact nearest-neighbour search for CPU tensors
    import faiss as _faiss
except ImportError:  # pragma: no cover - faiss is a dependency, but keep the pure-torch path usable
    _faiss = None

# Below this many points a subsample is not worth it (and per-cluster statistics get too thin).
_MIN_POINTS_PER_CENTROID = 32
# Sampling fraction safety factor: f = beta * r / (r + 1 - t), see `_sample_fraction`.
_SAMPLE_SAFETY = 1.5
# k-means++ seeding runs on this many (random) points per centroid.
_KPP_POINTS_PER_CENTROID = 16
# Points assigned and summed per piece of an iteration (bounds the codes, distances and float64 sums held at once).
_CHUNK_POINTS = 1 << 20
# Elements of the [chunk, k] (or [chunk, k, d]) distance block in the pure-torch search.
_TORCH_BLOCK = 1 << 24


def _faiss_ok(x: torch.Tensor, use_faiss: bool | None) -> bool:
    if use_faiss is False or _faiss is None or x.device.type != "cpu":
        if use_faiss and _faiss is None:
            raise ImportError("use_faiss=True but faiss is not installed (pip install faiss-cpu).")
        return False
    return True


def _nearest_faiss(
    x: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, dist: torch.Tensor
) -> None:
    """faiss exact L2 search of `x [n, d]` (float32, contiguous, CPU) in `codebook [k, d]`; fills
    `codes [n]` (int64) and `dist [n]` (float32, squared distances) in place."""
    index = _faiss.IndexFlatL2(x.shape[1])
    index.add(codebook.contiguous().numpy())
    # faiss falls back to a ~15x slower scalar loop when n * d < distance_compute_blas_threshold
    # (128000 by default); the blocked/fused path is exact too and faster at every size.
    saved = _faiss.cvar.distance_compute_blas_threshold
    _faiss.cvar.distance_compute_blas_threshold = 0
    try:
        index.search(x.numpy(), 1, D=dist.numpy()[:, None], I=codes.numpy()[:, None])
    finally:
        _faiss.cvar.distance_compute_blas_threshold = saved


def _nearest_torch(
    x: torch.Tensor, codebook: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked brute-force search. Returns codes `[n]` (int64) and squared distances `[n]` (float32)."""
    n, d = x.shape
    k = codebook.shape[0]
    # On GPUs the [chunk, k, d] difference form is exact whatever the TF32 settings; on CPU the
    # expanded ||c||^2 - 2 x.c form (a GEMM) is faster.
    direct = x.device.type != "cpu" and d <= 64
    if chunk_size is None:
        chunk_size = max(1, _TORCH_BLOCK // (k * (d if direct else 1)))
    codes = torch.empty(n, dtype=torch.int64, device=x.device)  # [n]
    dist = torch.empty(n, dtype=torch.float32, device=x.device)  # [n]
    c_sq = codebook.pow(2).sum(1)  # [k]
    for s in range(0, n, chunk_size):
        xc = x[s : s + chunk_size]  # [c, d]
        if direct:
            dc = (xc[:, None, :] - codebook[None, :, :]).pow(2).sum(-1)  # [c, k]
            v, i = dc.min(1)
        else:
            dc = torch.addmm(c_sq[None, :], xc, codebook.t(), alpha=-2.0)  # [c, k], minus ||x||^2
            v, i = dc.min(1)
            v = (v + xc.pow(2).sum(1)).clamp_min_(0)
        codes[s : s + chunk_size] = i
        dist[s : s + chunk_size] = v
    return codes, dist


def _nearest(
    x: torch.Tensor, codebook: torch.Tensor, *, chunk_size: int | None = None, use_faiss: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of each row. x `[n, d]` float32, codebook `[k, d]` float32 (same device).

    Returns codes `[n]` int64 and squared distances `[n]` float32."""
    if _faiss_ok(x, use_faiss):
        codes = torch.empty(x.shape[0], dtype=torch.int64)  # [n]
        dist = torch.empty(x.shape[0], dtype=torch.float32)  # [n]
        if x.shape[0]:
            _nearest_faiss(x.contiguous(), codebook, codes, dist)
        return codes, dist
    return _nearest_torch(x, codebook, chunk_size)


def _weighted_queries(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries `[w*x, w]` `[n, 2d]` (float32) and constants `sum_t w_t x_t^2` `[n]` of the weighted search."""
    wx = w * x  # [n, d]
    return torch.cat([wx, w], 1).contiguous(), (wx * x).sum(1)


def _nearest_weighted(
    q: torch.Tensor, base: torch.Tensor, codebook: torch.Tensor, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword under per-entry weights. q `[n, 2d]` and base `[n]` from [`_weighted_queries`],
    codebook `[k, d]` float32.

    `sum_t w_t (x_t - c_t)^2 = base - q . [2c, -c*c]`, so the nearest codeword is the largest inner
    product: a chunked GEMM + max in torch (no faiss here: its OpenMP pool would compete with torch's threads).
    Returns codes `[n]` int64 and weighted squared distances `[n]` float32."""
    n = q.shape[0]
    k = codebook.shape[0]
    db_t = torch.cat([2 * codebook, -codebook.pow(2)], 1).t().contiguous()  # [2d, k]
    codes = torch.empty(n, dtype=torch.int64, device=q.device)  # [n]
    score = torch.empty(n, dtype=torch.float32, device=q.device)  # [n]
    if chunk_size is None:  # CPU: blocks that stay in cache; GPU: large blocks
        chunk_size = max(1, (1 << 20 if q.device.type == "cpu" else _TORCH_BLOCK) // k)
    for s in range(0, n, chunk_size):
        torch.max(q[s : s + chunk_size] @ db_t, 1, out=(score[s : s + chunk_size], codes[s : s + chunk_size]))  # [c, k]
    return codes, (base - score).clamp_min_(0)


def assign(
    x: torch.Tensor, codebook: torch.Tensor, *, chunk_size: int | None = None, use_faiss: bool | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the nearest codeword (squared L2, or weighted squared L2) of every row of `x`.

    Args:
        x (`torch.Tensor`): subvectors `[n, d]`, any float dtype, any device.
        codebook (`torch.Tensor`): codewords `[k, d]`.
        chunk_size (`int`, *optional*):
            rows per block of the pure-torch search; the `[chunk_size, k]` distance block is the most
            memory it takes (default: about 16M distances per block). The full `[n, k]` matrix is never
            materialised. faiss blocks its own search.
        use_faiss (`bool`, *optional*):
            `None` (default) uses faiss for CPU tensors when it is installed, `False` forces the torch
            search, `True` requires faiss.
        weights (`torch.Tensor`, *optional*): non-negative weight per entry `[n, d]`; the distance becomes
            `sum_t w_t (x_t - c_t)^2` (see the module docstring; this search is always torch's).

    Returns:
        `torch.Tensor`: codes `[n]`, int64, on `x.device`.
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected x [n, d] and codebook [k, d], got {tuple(x.shape)} and {tuple(codebook.shape)}.")
    xf = x.detach().to(torch.float32)  # [n, d]
    cb = codebook.detach().to(device=x.device, dtype=torch.float32)  # [k, d]
    if weights is not None:
        q, base = _weighted_queries(xf, _check_weights(weights, xf))  # [n, 2d], [n]
        return _nearest_weighted(q, base, cb, chunk_size=chunk_size)[0]
    return _nearest(xf, cb, chunk_size=chunk_size, use_faiss=use_faiss)[0]


def _check_weights(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`weights` as float32 on `x.device`, validated: same shape as `x [n, d]`, finite, non-negative."""
    if tuple(weights.shape) != tuple(x.shape):
        raise ValueError(f"weights must have the shape of the subvectors {tuple(x.shape)}, got {tuple(weights.shape)}.")
    w = weights.detach().to(device=x.device, dtype=torch.float32)  # [n, d]
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative (e.g. second moments of input channels).")
    return w


def _init_codebook(
    xp: torch.Tensor, k: int, gen: torch.Generator, sigma: torch.Tensor, method: str
) -> torch.Tensor:
    """Initial codebook from the (already shuffled) data `xp [n, d]`. -> `[k, d]` float32.

    `"random"`: the first k distinct rows of the shuffled data (k random distinct subvectors).
    `"kmeans++"`: greedy k-means++ seeding on the first `_KPP_POINTS_PER_CENTROID * k` shuffled rows.
    Both add tiny noise (1e-6 std). When the data has fewer than k distinct rows, the missing codewords
    are copies of random rows moved by slightly more noise (they are re-seeded or stay empty; never NaN).
    """
    n, d = xp.shape
    if method == "kmeans++":
        m = min(n, _KPP_POINTS_PER_CENTROID * k)
        cb = _kmeanspp(xp[:m], k, gen, trials=2 + int(math.log(k)))  # [<=k, d]
    elif method == "random":
        m = min(n, 2 * k)
        while True:
            uniq, inverse = torch.unique(xp[:m], dim=0, return_inverse=True)  # [u, d], [m]
            first = torch.full((uniq.shape[0],), m, dtype=torch.int64, device=xp.device)
            first.scatter_reduce_(0, inverse, torch.arange(m, device=xp.device), reduce="amin")  # [u]
            chosen = first.sort().values[:k]  # positions of the first k distinct rows, in shuffled order
            if chosen.numel() >= k or m == n:
                break
            m = min(n, 4 * m)
        cb = xp[chosen]  # [<=k, d]
    else:
        raise ValueError(f"init_method must be 'kmeans++' or 'random', got {method!r}.")
    scale = sigma.clamp_min(1e-12).to(torch.float32)  # [d]
    missing = k - cb.shape[0]
    if missing > 0:
        fill = xp[torch.randint(n, (missing,), generator=gen, device=xp.device)]  # [missing, d]
        fill = fill + 1e-3 * scale * torch.randn(missing, d, generator=gen, device=xp.device)
        cb = torch.cat([cb, fill])
    return cb + 1e-6 * scale * torch.randn(k, d, generator=gen, device=xp.device)  # [k, d]


def _kmeanspp(xs: torch.Tensor, k: int, gen: torch.Generator, trials: int) -> torch.Tensor:
    """Greedy k-means++ seeding (D^2 sampling, best of `trials` candidates per step) on `xs [m, d]`.

    Returns up to k distinct rows `[k', d]` (k' < k only when xs has fewer than k distinct rows)."""
    m, d = xs.shape
    xs64 = xs.to(torch.float64)
    first = int(torch.randint(m, (1,), generator=gen, device=xs.device))
    chosen = [first]
    pot = (xs64 - xs64[first]).pow(2).sum(1)  # [m] squared distance to the nearest chosen row
    u = torch.rand(k, trials, generator=gen, device=xs.device, dtype=torch.float64)  # [k, trials]
    for j in range(1, k):
        cum = pot.cumsum(0)  # [m]
        total = cum[-1]
        if not total > 0:
            break  # every remaining row duplicates a chosen one
        cand = torch.searchsorted(cum, u[j] * total, right=True).clamp_max_(m - 1)  # [trials]
        d_cand = (xs64[None, :, :] - xs64[cand][:, None, :]).pow(2).sum(2)  # [trials, m]
        new_pot = torch.minimum(pot[None, :], d_cand)  # [trials, m]
        best = int(new_pot.sum(1).argmin())
        chosen.append(int(cand[best]))
        pot = new_pot[best]
    return xs[torch.tensor(chosen, device=xs.device)]


def _cluster_stats(
    a: torch.Tensor, mats: list[torch.Tensor], sq: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster counts and sums. a `[m]` codes; the summed values are the columns of `mats` (each `[m, c]`,
    float32 or float64) followed by `sq` `[m]` (float64, optional); every sum is accumulated in float64.

    Returns counts `[k]` float64 and sums `[k, p]` float64 (`p` = the columns of `mats`, + 1 with `sq`).
    Deterministic on every device. The values are read where they are: no `[p, m]` float64 copy of the data is made
    (a 65 M-weight layer at d = 4 would take 0.66 GB for it)."""
    columns = [mat[:, j] for mat in mats for j in range(mat.shape[1])] + ([] if sq is None else [sq])  # [m] each
    if a.device.type == "cpu":
        # numpy's bincount (float64 accumulation; a float32 column is widened exactly): serial, and free of OpenMP
        # fork/join (torch's 2-thread bincount can be 30x slower than its serial one on a busy 2-core machine).
        an = a.numpy()
        counts = torch.from_numpy(np.bincount(an, minlength=k).astype(np.float64))  # [k]
        sums = torch.from_numpy(np.stack([np.bincount(an, weights=c.numpy(), minlength=k) for c in columns], 1))
        return counts, sums  # [k], [k, p]
    # GPU: a one-hot GEMM instead of atomics (atomic float adds would break bit-reproducibility).
    m = a.shape[0]
    counts = torch.zeros(k, dtype=torch.float64, device=a.device)
    sums = torch.zeros(k, len(columns), dtype=torch.float64, device=a.device)
    chunk = max(1, (1 << 23) // k)
    ar = torch.arange(k, device=a.device)
    for s in range(0, m, chunk):
        onehot = (a[None, s : s + chunk] == ar[:, None]).to(torch.float64)  # [k, c]
        counts += onehot.sum(1)
        sums += onehot @ torch.stack([c[s : s + chunk].to(torch.float64) for c in columns], 1)  # [k, p]
    return counts, sums


def _reseed_empty(codebook: torch.Tensor, empty: torch.Tensor, x: torch.Tensor, dist: torch.Tensor,
                  w: torch.Tensor | None = None) -> None:
    """Move the empty codewords `codebook[empty]` onto data points, farthest-first, in place.

    Each empty codeword takes the point farthest from every codeword placed so far (`dist [m]` holds
    the (weighted) squared distances to the current assignment); distances are then lowered by the new
    codeword, so successive re-seeds spread over different far regions instead of piling up in one.
    codebook `[k, d]`, empty `[e]`, x `[m, d]`, w `[m, d]` per-entry weights or None.
    """
    dist = dist.clone()  # [m]
    for j in empty.tolist():
        far = int(dist.argmax())
        if not float(dist[far]) > 0:
            break  # every point sits on a codeword: nothing left to cover
        codebook[j] = x[far]
        sq = (x - x[far]).pow(2)  # [m, d]
        dist = torch.minimum(dist, (sq if w is None else w * sq).sum(1))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "cpu":
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


def _sample_fraction(r: float, t: float) -> float:
    """Fraction of the data whose mean has sampling noise below the annealing noise at time t.

    With `r` = within-cluster variance / data variance, the sampling variance of a cluster mean,
    `r * (1 - f) / m_c`, stays below the target `(1 - t) * f / m_c` iff `f >= r / (r + 1 - t)`."""
    if t >= 1.0:
        return 1.0
    return min(1.0, _SAMPLE_SAFETY * r / (r + (1.0 - t)))


def _variance64(x: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Per-column variance of `x [n, d]` (population), accumulated in float64 by row chunks: no float64 copy of the
    whole data. Returns `[d]` float64."""
    n = x.shape[0]
    mean = sum(x[s : s + chunk].to(torch.float64).sum(0) for s in range(0, n, chunk)) / n  # [d]
    return sum((x[s : s + chunk].to(torch.float64) - mean).pow(2).sum(0) for s in range(0, n, chunk)) / n


class _Shuffled:
    """Rows of `x [n, d]` in the shuffled order `perm [n]`, gathered on access: `shuffled[i]` is `x[perm[i]]` (i an
    int, a slice or an index tensor). Only what is read is copied."""

    def __init__(self, x: torch.Tensor, perm: torch.Tensor):
        self.x, self.perm, self.shape, self.device = x, perm, x.shape, x.device

    def __getitem__(self, index) -> torch.Tensor:
        rows = self.perm[index]
        return self.x[rows] if rows.dim() == 0 else self.x.index_select(0, rows)


class _Run:
    """State of one k-means problem (one layer). All tensors on the data's device."""

    def __init__(
        self, x: torch.Tensor, k: int, *, n_iter: int, anneal: bool, seed: int,
        init: torch.Tensor | None, subsample: bool, use_faiss: bool | None, chunk_size: int | None,
        init_method: str = "random", weights: torch.Tensor | None = None,
    ):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty [n, d] tensor, got {tuple(x.shape)}.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.device = x.device
        self.k, self.n_iter, self.anneal = k, n_iter, anneal
        self.n, self.d = x.shape
        self.use_faiss = _faiss_ok(x, use_faiss)
        self.chunk_size = chunk_size
        self.gen = torch.Generator(device=x.device)
        self.gen.manual_seed(seed)
        self.x = x.detach().to(torch.float32).contiguous()  # [n, d] (the caller's tensor when it is float32)
        self.w = None if weights is None else _check_weights(weights, self.x)  # [n, d]
        self.weighted = weights is not None
        self.var = _variance64(self.x)  # [d] per-dimension data variance
        self.var_total = float(self.var.sum())
        # Shuffle once; a subsample is a cyclic window of this order, gathered piece by piece (no shuffled copy).
        self.perm = torch.randperm(self.n, generator=self.gen, device=x.device)  # [n]
        if self.n < 2**31:
            self.perm = self.perm.to(torch.int32)  # half the memory, the same shuffle
        # Summed per cluster by the update: weighted, `[w*x, w]` first, then x, then |x|² (when needed).
        self.sx = 2 * self.d if self.weighted else 0  # the column of the first plain coordinate
        if init is not None:
            if tuple(init.shape) != (k, self.d):
                raise ValueError(f"init must be [{k}, {self.d}], got {tuple(init.shape)}.")
            self.codebook = init.detach().to(device=x.device, dtype=torch.float32).clone()  # [k, d]
        else:
            self.codebook = _init_codebook(_Shuffled(self.x, self.perm), k, self.gen, self.var.sqrt(),
                                           init_method)  # [k, d]
        self.subsample = subsample and anneal
        self.min_sample = min(self.n, _MIN_POINTS_PER_CENTROID * k)
        self.r = 1.0  # within-cluster / total variance, re-estimated each iteration
        self.prev_codes: torch.Tensor | None = None
        self.done = False
        self.points_seen = 0
        if self.n <= k:  # at most k points: each is its own codeword (zero error); spare ones repeat the first
            unique = torch.unique(self.x, dim=0)  # [u, d]
            self.codebook = torch.cat([unique, unique[:1].expand(k - len(unique), -1)]).contiguous()  # [k, d]
            self.done = True

    def _pieces(self, off: int, m: int) -> list[tuple[int, int]]:
        """Ranges of the cyclic window `off .. off + m` of the shuffled order, at most `_CHUNK_POINTS` each."""
        ranges = [(off, off + m)] if off + m <= self.n else [(off, self.n), (0, off + m - self.n)]
        return [(s, min(b, s + _CHUNK_POINTS)) for a, b in ranges for s in range(a, b, _CHUNK_POINTS)]

    def _assign(self, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """Nearest codewords of the points `rows` (indices or a slice of the original order): codes `[c]`,
        (weighted) squared distances `[c]`, the points `[c, d]` and the matrices the update sums (`[w*x, w]`, x)."""
        # a slice is a view; indices are gathered with index_select (faster on CPU than advanced indexing `t[idx]`)
        take = (lambda t: t[rows]) if isinstance(rows, slice) else (lambda t: t.index_select(0, rows))
        xc = take(self.x)  # [c, d]
        if not self.weighted:
            codes, dist = _nearest(xc, self.codebook, chunk_size=self.chunk_size, use_faiss=self.use_faiss)
            return codes, dist, xc, [xc]
        q, base = _weighted_queries(xc, take(self.w))  # [c, 2d], [c]
        codes, dist = _nearest_weighted(q, base, self.codebook, chunk_size=self.chunk_size)
        return codes, dist, xc, [q, xc]

    def step(self, i: int) -> None:
        """Iteration i = 1..n_iter: assign (a window of) the clean data, then the (noisy) update."""
        if self.done:
            return
        n, k = self.n, self.k
        t = i / self.n_iter
        f = _sample_fraction(self.r, t) if self.subsample else 1.0
        m = n if f >= 1.0 else max(self.min_sample, math.ceil(f * n))
        full = m >= n
        if full:
            m, off = n, 0
        else:
            off = int(torch.randint(n, (1,), generator=self.gen, device=self.device))
        need_sq = self.weighted or not full  # the within-cluster sums of squares are read only then
        track = full and not self.anneal  # Lloyd stops at its fixed point: compare with the previous assignment
        codes_now = torch.empty(n, dtype=torch.int32, device=self.device) if track else None  # [n]
        counts = sums = None
        dist_sum = 0.0
        for a, b in self._pieces(off, m):  # piece by piece: [b - a, d] at a time
            # a window of the shuffled order is gathered; all the data is read in place (the sums do not depend on
            # the order, and gathering it would cost a third more time on large layers)
            codes, dist, xc, mats = self._assign(slice(a, b) if full else self.perm[a:b])
            sq = (xc * xc).sum(1).to(torch.float64) if need_sq else None  # [c] (per point: float32 is plenty)
            c, sm = _cluster_stats(codes, mats, sq, k)  # [k], [k, p]
            counts, sums = (c, sm) if counts is None else (counts + c, sums + sm)
            dist_sum += float(dist.numpy().sum(dtype=np.float64)) if dist.device.type == "cpu" \
                else float(dist.sum(dtype=torch.float64))
            if track:
                codes_now[a:b] = codes
        self.points_seen += m
        nonempty = counts > 0  # [k]
        cnt = counts.clamp_min(1.0)[:, None]  # [k, 1]
        d, sx = self.d, self.sx
        mean = sums[:, sx : sx + d] / cnt  # [k, d] float64
        # within-cluster sum of squares of the plain coordinates, [k]
        ss = (sums[:, sx + d] - (sums[:, sx : sx + d] ** 2).sum(1) / counts.clamp_min(1.0)).clamp_min(0) \
            if need_sq else None
        if self.weighted:
            wsum = sums[:, d : 2 * d]  # [k, d]
            mean = torch.where(wsum > 0, sums[:, :d] / wsum.clamp_min(1e-300), mean)  # weighted mean per entry
            sq_err = float(ss.sum())  # unweighted, like the variances the annealing schedule is made of
        else:
            sq_err = dist_sum
        new = torch.where(nonempty[:, None], mean, self.codebook.to(torch.float64))  # [k, d]
        self.r = max(sq_err / max(m * self.var_total, 1e-300), 1e-6)

        if self.anneal:
            frac = m / n
            # Target noise of a noisy-data mean: var_dim * (1 - t) / n_c, with n_c ~ m_c / frac.
            target = self.var[None, :] * ((1.0 - t) * frac) / cnt  # [k, d]
            if not full:
                # Sampling noise already in `mean`: s_c^2 * (1 - frac) / m_c per dimension, with
                # s_c^2 the (isotropic, unbiased) within-cluster variance of the sampled members.
                s2 = ss / ((counts - 1).clamp_min(1.0) * self.d)  # [k]
                target = (target - (s2 * (1.0 - frac))[:, None] / cnt).clamp_min(0)
            noise = torch.randn(k, self.d, generator=self.gen, device=self.device, dtype=torch.float64)  # [k, d]
            new = new + torch.where(nonempty[:, None], noise * target.sqrt(), torch.zeros_like(noise))
        new = new.to(torch.float32)

        if full:
            empty = (~nonempty).nonzero().flatten()  # [e]
            if empty.numel():  # rare: every point's distance to the codebook it was assigned with, again
                _reseed_empty(new, empty, self.x, self._assign(slice(None))[1], self.w)
            elif track and self.prev_codes is not None and _equal(codes_now, self.prev_codes):
                self.done = True  # Lloyd fixed point: the codebook can no longer move
            if track:
                self.prev_codes = codes_now
        self.codebook = new

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.empty(self.n, dtype=torch.int64, device=self.device)  # [n]
        for a in range(0, self.n, _CHUNK_POINTS):
            codes[a : a + _CHUNK_POINTS] = self._assign(slice(a, a + _CHUNK_POINTS))[0]
        return self.codebook, codes


def kmeans_many(
    xs: list[torch.Tensor], ks: list[int] | int, *, n_iter: int = 100, anneal: bool = True, seed: int = 0,
    inits: list[torch.Tensor | None] | None = None, subsample: bool = True,
    use_faiss: bool | None = None, chunk_size: int | None = None, init_method: str = "random",
    weights: list[torch.Tensor | None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[`kmeans`] on many independent problems (e.g. all layers of a model) in one call.

    Problem `j` gives exactly `kmeans(xs[j], ks[j], seed=seed, ...)`: each has its own generator, so
    results do not depend on which other problems share the call.

    Args:
        xs (`list[torch.Tensor]`): subvectors `[n_j, d_j]` per problem (any device each).
        ks (`list[int]` or `int`): codewords per problem (an `int` applies to all).
        n_iter, anneal, seed, subsample, use_faiss, chunk_size, init_method: as in [`kmeans`].
        inits (`list`, *optional*): initial codebook `[k_j, d_j]` or `None` per problem.
        weights (`list`, *optional*): per-entry weights `[n_j, d_j]` or `None` per problem (see [`kmeans`]).

    Returns:
        `list[tuple[torch.Tensor, torch.Tensor]]`: per problem, codebook `[k_j, d_j]` (float32) and
        codes `[n_j]` (int64), on `xs[j].device`.
    """
    if isinstance(ks, int):
        ks = [ks] * len(xs)
    if len(ks) != len(xs) or any(v is not None and len(v) != len(xs) for v in (inits, weights)):
        raise ValueError("xs, ks (and inits, weights) must have the same length.")
    out = []
    for j, (x, k) in enumerate(zip(xs, ks)):
        run = _Run(x, k, n_iter=n_iter, anneal=anneal, seed=seed, init=None if inits is None else inits[j],
                   subsample=subsample, use_faiss=use_faiss, chunk_size=chunk_size, init_method=init_method,
                   weights=None if weights is None else weights[j])
        for i in range(1, n_iter + 1):
            run.step(i)
        out.append(run.result())
    return out


def kmeans(
    x: torch.Tensor, k: int, *, n_iter: int = 100, anneal: bool = True, seed: int = 0,
    init: torch.Tensor | None = None, subsample: bool = True,
    use_faiss: bool | None = None, chunk_size: int | None = None, init_method: str = "random",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Annealed k-means (SR-C) of subvectors; `anneal=False` gives plain Lloyd.

    Each iteration assigns the clean subvectors to their nearest codeword and moves every codeword to
    the mean of its members plus Gaussian noise of per-dimension std
    `std(x)_dim * sqrt(1 - i / n_iter) / sqrt(n_c)` — the same distribution as the paper's mean of
    noisy members `x + sqrt(1 - i/T) * N(0, 1) * std(x)`, drawn in O(k·d). While that noise is large the
    update reads only a random subsample whose own sampling noise is counted into it (see the module
    docstring); the final iterations use all points and add no noise. Empty clusters are re-seeded
    farthest-first (each with the point farthest from every codeword placed so far). With at most `k`
    subvectors the codebook is the subvectors themselves (zero error; spare codewords repeat the first).

    Args:
        x (`torch.Tensor`): subvectors `[n, d]`, any float dtype, any device.
        k (`int`): number of codewords.
        n_iter (`int`, defaults to 100): iterations `T`.
        anneal (`bool`, defaults to `True`): SR-C noise schedule; `False` is plain Lloyd (stops early
            at its fixed point).
        seed (`int`, defaults to 0): seeds the shuffle, the init and the noise. Same input and seed give
            bit-identical output on the same device.
        init (`torch.Tensor`, *optional*): initial codebook `[k, d]`; default: chosen by `init_method`.
        subsample (`bool`, defaults to `True`): variance-matched subsampling of annealed iterations.
            `False` runs every iteration on all points (slower, same noise distribution).
        use_faiss (`bool`, *optional*): see [`assign`].
        chunk_size (`int`, *optional*): see [`assign`].
        init_method (`str`, defaults to `"random"`): `"random"` (the paper's: k random distinct
            subvectors plus tiny noise) or `"kmeans++"` (greedy D² seeding on a subsample: slower to
            start, better on data made of a few well-separated clusters).
        weights (`torch.Tensor`, *optional*): non-negative weight per entry `[n, d]`: minimise
            `sum w * (x - c)^2` instead (weighted k-means; see the module docstring). hf_vq passes the
            second moment of the input channel each weight entry multiplies ([`hf_vq.quantize_`] with
            `calibration=`).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: codebook `[k, d]` (float32, on `x.device`) and codes `[n]`
        (int64): the nearest codeword of each subvector (under the weights, when given).
    """
    return kmeans_many([x], [k], n_iter=n_iter, anneal=anneal, seed=seed, inits=[init], subsample=subsample,
                       use_faiss=use_faiss, chunk_size=chunk_size, init_method=init_method,
                       weights=None if weights is None else [weights])[0]
