"""Additive quantization (AQ): each subvector is the sum of M codewords, one from each of M codebooks.

Pure tensor code: no `nn.Module`, no Hugging Face. Runs on any device (CPU and CUDA with the same
torch ops; on CPU the single-codebook nearest-codeword searches go to faiss like [`kmeans`]).

The method (Babenko & Lempitsky 2014, used across layers by Sun et al., arXiv 2111.10320)
--------------------------------------------------------------------------------------------
A subvector `x` (length d) is approximated by `C_1[b_1] + ... + C_M[b_M]`, with codebooks `C_m` of K
codewords each and codes `b_m` in `[0, K)`: M·log2(K) bits per subvector. Training alternates

* **encoding** given the codebooks: an ordered **beam search**. Codebooks are visited in order
  1..M; each of the `beam_size` partial sums kept so far is extended by every codeword of the next
  codebook, and the `beam_size` best extensions (lowest squared error) survive. The search is run
  in chunks of rows so that the `[chunk, beam, d]` residuals stay bounded; each extension step is a
  `beam`-nearest-codeword search (faiss on CPU), and the last codebook needs only the nearest one. One pass of
  iterated conditional modes (re-pick each code optimally given the others) then polishes the
  result, and a row keeps its previous codes if they were better: encoding never increases the error.
* **codebook update** given the codes: joint least squares over all M·K codewords,
  `min_C ‖B C − X‖² + λ‖C − C_prev‖²` where `B [n, M·K]` is the one-hot design (M ones per row).
  The normal equations `(BᵀB + λI) C = BᵀX + λ C_prev` are small (`[M·K, M·K]`); `BᵀB` is
  accumulated with `bincount` and `BᵀX` with `index_add_`, never forming `B`. The ridge towards the
  previous codebooks fixes the M−1 directions that the sum leaves free (a constant moved from one
  codebook to another) and keeps unused codewords where they were; since `C_prev` is feasible the
  update never increases the error either.

The start is **residual k-means** (hf_vq's annealed k-means): codebook 1 = k-means of the subvectors,
codebook m = k-means of what codebooks 1..m−1 leave. With M = 1 the whole method is k-means
(encoding = nearest codeword, least squares = cluster means, i.e. Lloyd iterations after the k-means init).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .kmeans import _faiss, kmeans
from .pq import decode

__all__ = ["aq_decode", "aq_encode", "aq_quantize", "aq_relative_error", "aq_update_codebooks", "residual_init"]

# Elements of one `[chunk, beam, d]` residual block of the beam search, and of one `[chunk, K]` distance block
# of the pure-torch nearest-codeword search (bounds their memory: 4 bytes each).
_BEAM_BLOCK = 1 << 22
# Above this many codewords in total (M·K) the joint normal equations get large: update codebook by codebook.
_MAX_JOINT_CODEWORDS = 4096


def _check(x: torch.Tensor, codebooks: torch.Tensor) -> None:
    if x.ndim != 2 or codebooks.ndim != 3 or x.shape[1] != codebooks.shape[2]:
        raise ValueError(f"expected x [n, d] and codebooks [M, K, d], got {tuple(x.shape)} and {tuple(codebooks.shape)}.")


def aq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of the selected codewords.

    Args:
        codes (`torch.Tensor`): integer codes `[n, M]`.
        codebooks (`torch.Tensor`): `[M, K, d]`.

    Returns:
        `torch.Tensor`: the decoded subvectors `[n, d]`, dtype of `codebooks`.
    """
    return decode(codes[:, None, :], codebooks)  # one block per row: [n, d]


def _sq_err(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Squared error per row `[n]` of `codes [n, M]` for `x [n, d]`."""
    return (x - aq_decode(codes, codebooks)).pow(2).sum(1)


def aq_relative_error(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> float:
    """`‖X − X̂‖² / ‖X‖²` of the subvectors `x [n, d]` (float64 sums)."""
    err = _sq_err(x.float(), codes, codebooks.float()).double().sum()
    return float(err / x.double().pow(2).sum().clamp_min(1e-300))


def residual_init(
    x: torch.Tensor, num_codebooks: int, k: int, *, n_iter: int = 100, anneal: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual k-means: codebook m is the k-means of what codebooks 1..m−1 leave of `x`.

    Args:
        x (`torch.Tensor`): subvectors `[n, d]`.
        num_codebooks (`int`): M.
        k (`int`): codewords per codebook.
        n_iter, anneal, seed: k-means settings (codebook m uses `seed + m`).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: codebooks `[M, k, d]` (float32) and codes `[n, M]` (int64).
    """
    residual = x.detach().float()  # [n, d]
    books, codes = [], []
    for m in range(num_codebooks):
        codebook, code = kmeans(residual, k, n_iter=n_iter, anneal=anneal, seed=seed + m)  # [k, d], [n]
        books.append(codebook)
        codes.append(code)
        if m + 1 < num_codebooks:
            residual = residual - codebook[code]
    return torch.stack(books), torch.stack(codes, dim=1)


@contextlib.contextmanager
def _single_threaded_faiss() -> Iterator[None]:
    """Run faiss on one OpenMP thread: its pool and torch's spin against each other between the many small
    searches of the beam search (measured on 2 cores: encoding 1.6x faster, small problems 3x)."""
    if _faiss is None:
        yield
        return
    saved = _faiss.omp_get_max_threads()
    _faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        _faiss.omp_set_num_threads(saved)


def _knn(x: torch.Tensor, codebook: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `kk` nearest codewords of every row: squared distances `[n, kk]` (ascending) and indices `[n, kk]`.

    `x [n, d]` and `codebook [K, d]` are float32 on one device. faiss's exact search on CPU (it never
    materialises the `[n, K]` distance matrix), a chunked matmul + top-k elsewhere."""
    n, d = x.shape
    if _faiss is not None and x.device.type == "cpu":
        dist = torch.empty(n, kk, dtype=torch.float32)  # [n, kk]
        idx = torch.empty(n, kk, dtype=torch.int64)  # [n, kk]
        if n:
            index = _faiss.IndexFlatL2(d)
            index.add(codebook.contiguous().numpy())
            saved = _faiss.cvar.distance_compute_blas_threshold
            # k = 1: the blocked BLAS path is fastest; k > 1: faiss's BLAS path keeps slow heaps, the SIMD scalar
            # path is 2-4x faster for small d (measured on 2 cores, d = 8, K = 256)
            _faiss.cvar.distance_compute_blas_threshold = 0 if kk == 1 else 2**30
            try:
                index.search(x.contiguous().numpy(), kk, D=dist.numpy(), I=idx.numpy())
            finally:
                _faiss.cvar.distance_compute_blas_threshold = saved
        return dist, idx
    norms = codebook.pow(2).sum(1)  # [K]
    chunk = max(1, _BEAM_BLOCK // codebook.shape[0])
    dists, idxs = [], []
    for start in range(0, n, chunk):
        xc = x[start:start + chunk]  # [c, d]
        scores = torch.addmm(norms, xc, codebook.T, alpha=-2.0) + xc.pow(2).sum(1, keepdim=True)  # [c, K]
        top = scores.topk(kk, dim=1, largest=False) if kk > 1 else scores.min(dim=1, keepdim=True)
        dists.append(top[0].clamp_min(0))
        idxs.append(top[1])
    if not dists:
        return x.new_empty(0, kk), torch.empty(0, kk, dtype=torch.int64, device=x.device)
    return torch.cat(dists), torch.cat(idxs)


def _beam_chunk(x: torch.Tensor, codebooks: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered beam search for a chunk `x [c, d]` and codebooks `[M, K, d]`.

    The `beam` partial sums of each row are extended by their `beam` nearest codewords of the next
    codebook (the best `beam` of all `beam·K` extensions are among them), and the last codebook only
    needs each hypothesis's nearest codeword. Returns the best codes `[c, M]` and their squared errors `[c]`."""
    c, d = x.shape
    n_books, k, _ = codebooks.shape
    rows = torch.arange(c, device=x.device)[:, None]  # [c, 1]
    if n_books == 1:
        err, code = _knn(x, codebooks[0], 1)  # [c, 1], [c, 1]
        return code, err[:, 0]
    err, first = _knn(x, codebooks[0], min(beam, k))  # [c, b], [c, b]
    paths = first[..., None]  # [c, b, 1]
    residual = x[:, None, :] - codebooks[0][first]  # [c, b, d]
    for m in range(1, n_books):
        b = residual.shape[1]
        kk = 1 if m == n_books - 1 else min(beam, k)
        dist, idx = _knn(residual.reshape(c * b, d), codebooks[m], kk)  # [c·b, kk] each
        err, flat = dist.reshape(c, b * kk).topk(min(beam, b * kk), dim=1, largest=False)  # [c, b']
        parent = torch.div(flat, kk, rounding_mode="floor")  # [c, b']
        code = idx.reshape(c, b * kk).gather(1, flat)  # [c, b']
        paths = torch.cat([paths[rows, parent], code[..., None]], dim=2)  # [c, b', m + 1]
        residual = residual[rows, parent] - codebooks[m][code]  # [c, b', d]
    best = err.argmin(dim=1)  # [c]
    return paths[rows[:, 0], best], err[rows[:, 0], best]


def aq_encode(
    x: torch.Tensor, codebooks: torch.Tensor, *, beam_size: int = 8, init_codes: torch.Tensor | None = None,
    icm_sweeps: int = 1, chunk_size: int | None = None,
) -> torch.Tensor:
    """Codes of `x` under additive codebooks: ordered beam search, then iterated conditional modes.

    Args:
        x (`torch.Tensor`): subvectors `[n, d]`, any float dtype, any device.
        codebooks (`torch.Tensor`): `[M, K, d]`.
        beam_size (`int`, defaults to 8): partial sums kept per row. With `beam_size >= K**(M-1)` the
            search is exhaustive.
        init_codes (`torch.Tensor`, *optional*): current codes `[n, M]`; a row keeps them when the
            search finds nothing better, so re-encoding never increases the error.
        icm_sweeps (`int`, defaults to 1): sweeps of iterated conditional modes after the search (each
            re-picks every code optimally given the others; never increases the error).
        chunk_size (`int`, *optional*): rows per beam-search block; default bounds the `[chunk, beam, d]`
            residuals to about 4M elements.

    Returns:
        `torch.Tensor`: codes `[n, M]`, int64, on `x.device`.
    """
    _check(x, codebooks)
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1.")
    xf = x.detach().float()  # [n, d]
    cb = codebooks.detach().to(xf.device, torch.float32)  # [M, K, d]
    n_books, k, d = cb.shape
    chunk = chunk_size or max(1, _BEAM_BLOCK // (min(beam_size, k) * d))
    codes = torch.empty(xf.shape[0], n_books, dtype=torch.int64, device=xf.device)  # [n, M]
    with _single_threaded_faiss():
        for start in range(0, xf.shape[0], chunk):
            codes[start:start + chunk] = _beam_chunk(xf[start:start + chunk], cb, beam_size)[0]
        for _ in range(icm_sweeps if n_books > 1 else 0):
            approx = aq_decode(codes, cb)  # [n, d]
            for m in range(n_books):
                others = approx - cb[m][codes[:, m]]  # [n, d]
                codes[:, m] = _knn(xf - others, cb[m], 1)[1][:, 0]
                approx = others + cb[m][codes[:, m]]
    if init_codes is not None:
        init_codes = init_codes.to(codes.device, torch.int64)
        keep = _sq_err(xf, init_codes, cb) < _sq_err(xf, codes, cb)  # [n]
        codes[keep] = init_codes[keep]
    return codes


def aq_update_codebooks(
    x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, *, ridge: float = 1e-4
) -> torch.Tensor:
    """Least-squares codebooks given the codes, all M codebooks jointly.

    Solves `(BᵀB + λI) C = BᵀX + λ C_prev` in float64, `B` the implicit one-hot design `[n, M·K]`,
    `λ = ridge · mean(diag BᵀB)`. Never increases `‖X − B C‖²` over `C_prev`. When `M·K` is above
    4,096 the codebooks are updated one at a time instead (each the exact mean of its residuals).

    Args:
        x (`torch.Tensor`): subvectors `[n, d]`.
        codes (`torch.Tensor`): `[n, M]` integer codes.
        codebooks (`torch.Tensor`): current codebooks `[M, K, d]` (kept for unused codewords).
        ridge (`float`, defaults to 1e-4): relative strength of the pull towards `codebooks`.

    Returns:
        `torch.Tensor`: new codebooks `[M, K, d]`, float32, on `x.device`.
    """
    _check(x, codebooks)
    n_books, k, d = codebooks.shape
    xd = x.detach().double()  # [n, d]
    prev = codebooks.detach().to(xd.device, torch.float64)  # [M, K, d]
    codes = codes.to(xd.device, torch.int64)
    mk = n_books * k
    flat = codes + torch.arange(n_books, device=xd.device) * k  # [n, M] indices into the M·K codewords
    if mk > _MAX_JOINT_CODEWORDS:
        return _update_blockwise(xd, codes, prev).float()
    gram = torch.zeros(mk * mk, dtype=torch.float64, device=xd.device)  # BᵀB flattened, [M·K · M·K]
    rhs = torch.zeros(mk, d, dtype=torch.float64, device=xd.device)  # BᵀX, [M·K, d]
    for a in range(n_books):
        rhs.index_add_(0, flat[:, a], xd)
        for b in range(n_books):
            gram += torch.bincount(flat[:, a] * mk + flat[:, b], minlength=mk * mk).double()
    gram = gram.reshape(mk, mk)  # [M·K, M·K]
    lam = ridge * float(gram.diagonal().mean().clamp_min(1.0))
    gram.diagonal().add_(lam)
    rhs += lam * prev.reshape(mk, d)
    chol, info = torch.linalg.cholesky_ex(gram)
    solution = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(gram, rhs)  # [M·K, d]
    return solution.reshape(n_books, k, d).float()


def _update_blockwise(x: torch.Tensor, codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """One sweep of per-codebook exact updates (residual means); unused codewords stay. float64 in and out."""
    books = books.clone()  # [M, K, d]
    n_books, k, d = books.shape
    approx = aq_decode(codes, books)  # [n, d]
    for m in range(n_books):
        target = x - (approx - books[m][codes[:, m]])  # [n, d] what codebook m should explain
        sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, codes[:, m], target)  # [K, d]
        counts = torch.bincount(codes[:, m], minlength=k).to(x.dtype)  # [K]
        used = counts > 0
        new = books[m].clone()
        new[used] = sums[used] / counts[used, None]
        approx = approx + new[codes[:, m]] - books[m][codes[:, m]]
        books[m] = new
    return books


def aq_quantize(
    x: torch.Tensor, num_codebooks: int, k: int, *, n_iter: int = 100, aq_iters: int = 4, beam_size: int = 8,
    anneal: bool = True, seed: int = 0, history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive quantization of subvectors: residual k-means init, then alternate encoding and least squares.

    Args:
        x (`torch.Tensor`): subvectors `[n, d]`, any device.
        num_codebooks (`int`): M, the codewords summed per subvector.
        k (`int`): codewords per codebook.
        n_iter (`int`, defaults to 100): k-means iterations of the residual initialisation.
        aq_iters (`int`, defaults to 4): alternations of (beam-search encoding, least-squares update).
        beam_size (`int`, defaults to 8): beam width of the encoding.
        anneal, seed: k-means settings of the initialisation.
        history (`list[float]`, *optional*): if given, receives the relative error after the
            initialisation and after each alternation (non-increasing).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: codebooks `[M, k, d]` (float32) and codes `[n, M]` (int64),
        on `x.device`.

    Raises:
        `ValueError`: for `num_codebooks < 1`, `k < 2` or `beam_size < 1`.
    """
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks={num_codebooks} must be >= 1 (1 is plain k-means).")
    if k < 2:
        raise ValueError(f"k={k} must be >= 2.")
    if x.ndim != 2:
        raise ValueError(f"expected subvectors [n, d], got {tuple(x.shape)}.")
    xf = x.detach().float()  # [n, d]
    with _single_threaded_faiss():
        codebooks, codes = residual_init(xf, num_codebooks, k, n_iter=n_iter, anneal=anneal, seed=seed)  # [M,k,d], [n,M]
        if history is not None:
            history.append(aq_relative_error(xf, codes, codebooks))
        for _ in range(aq_iters):
            codes = aq_encode(xf, codebooks, beam_size=beam_size, init_codes=codes)
            codebooks = aq_update_codebooks(xf, codes, codebooks)
            if history is not None:
                history.append(aq_relative_error(xf, codes, codebooks))
    return codebooks, codes
