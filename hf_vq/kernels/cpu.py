"""CPU kernels: the lookup-table (LUT) matmul straight from codes, and a fast decode.

**LUT matmul.** With a weight matrix `W [rows, n_blocks * d]` whose block `(r, j)` is the sum of the M
codewords `codebooks[m, codes[r, j, m]]`, the product with an input row `x` is

    y[r] = sum_j sum_m  x[j*d:(j+1)*d] · codebooks[m, codes[r, j, m]]
         = sum_j sum_m  lut[j, m, codes[r, j, m]],     lut[j, m, c] = x_j · codebooks[m, c]

so one small matmul builds the table `lut [n_blocks, M, k]` (n_blocks·M·k·d multiply-adds, independent
of `rows`) and the rest is `rows · n_blocks · M` table look-ups and adds: at d = 8 that is 8× fewer
operations than the dense product and the weight is never materialised. The gather-and-sum runs in a
numba kernel, parallel over output rows (each row is summed by one thread: no shared writes, results
do not depend on the thread count). Without numba, a torch `index_select` + `sum` does the same, slower.

**Decode.** `torch.nn.functional.embedding` over millions of tiny codewords spends most of its time in
per-row overhead; the numba decode writes the same values with one pass over the output. With one codebook
(M = 1) a codeword is copied as one or two machine words (a 16-byte `complex128` view for d = 4 in float32:
bits are moved, never computed), four codes per step: ~9e9 entries/s per core on the 2-core benchmark machine,
5x the element-wise loop. With M > 1 the codewords are summed in the reference's order. Both produce
bit-identical weights.

**Threads.** The kernels run on torch's thread count, but on one thread when the work is small
(`PARALLEL_MIN_WORK`): waking a second thread can cost a scheduler time slice on a busy machine.

Both kernels are **inference only**: callers use them when no autograd graph is needed (see
`hf_vq.kernels.needs_grad`); under autograd the differentiable reference (`hf_vq.codec.decode` +
`F.linear`) runs.
"""

from __future__ import annotations

import threading

import torch

from ..codec.pq import decode as reference_decode

__all__ = ["HAS_NUMBA", "PreparedDecode", "lut_matmul", "lut_codes", "fast_decode", "lut_is_faster"]

try:  # optional: `pip install hf_vq[kernels]`
    import numba
    import numpy as np

    HAS_NUMBA = True
except ImportError:  # pragma: no cover - exercised on installs without numba
    numba = None
    HAS_NUMBA = False


# ---------------------------------------------------------------------------------------------- numba kernels
# Each kernel is a loop over independent units (output tiles, rows) whose body is an inlined function, compiled twice:
# `parallel=True` over `numba.prange`, and serial. Work run on one thread takes the serial twin, so numba's thread
# pool is never started by it: the pool's OpenMP threads wait actively between kernels, and two processes of an
# `accelerate launch` on two cores (one torch thread each) ran every layer's encoding 10-25x slower once both pools
# existed (measured while compressing MiniLM; NUMBA_NUM_THREADS=1 restored the speed). The twins are written out as
# two small loops rather than one Python function compiled twice: numba's on-disk cache keys a function by its bytecode
# and signature, not its `parallel` option, so the two compilations would share (and overwrite) one cache entry.
if HAS_NUMBA:
    _body = numba.njit(cache=True, boundscheck=False, inline="always")

    @_body
    def _lut_tile(lut, codes_t, out, t, tile):  # pragma: no cover - compiled by numba
        """Output rows `[t·tile, (t+1)·tile)` of out[b, r] = sum_j lut[b, j, codes_t[j, r]] (lut f32 [B, n_codes, k],
        codes_t u8/i32 [n_codes, rows]): for each table row `j` the tile's codes `codes_t[j, r0:r1]` are contiguous
        and all its look-ups hit the same `k`-entry table row, which stays in L1. Each output is summed over `j` in
        order by one thread (independent of the thread count)."""
        n_batch, n_codes, _ = lut.shape
        rows = codes_t.shape[1]
        r0 = t * tile
        width = min(rows, r0 + tile) - r0
        acc = np.empty(width, np.float32)
        for b in range(n_batch):
            table = lut[b]
            acc[:] = 0.0
            for j in range(n_codes):
                entries = table[j]
                code_row = codes_t[j]
                for i in range(width):
                    acc[i] += entries[code_row[r0 + i]]
            for i in range(width):
                out[b, r0 + i] = acc[i]

    @_body
    def _decode_row(codes, codebooks, out, r):  # pragma: no cover - compiled by numba
        """out[r, j*d + t] = sum_m codebooks[m, codes[r, j, m], t] — codes [rows, n_blocks, M], codebooks [M, k, d].

        Summed in the order m = 0, 1, ... like the reference decode (bit-identical in the same dtype)."""
        _, n_blocks, n_books = codes.shape
        d = codebooks.shape[2]
        for j in range(n_blocks):
            first = codes[r, j, 0]
            for t in range(d):
                out[r, j * d + t] = codebooks[0, first, t]
            for m in range(1, n_books):
                code = codes[r, j, m]
                for t in range(d):
                    out[r, j * d + t] += codebooks[m, code, t]

    @_body
    def _copy_words1_row(codes, words, out, r):  # pragma: no cover - compiled by numba
        """out[r, j] = words[codes[r, j]]: M = 1 decode when a codeword is one machine word (8 or 16 bytes).

        Pure copies of the codeword bits (no arithmetic), four independent loads in flight per step."""
        n = codes.shape[1]
        row = out[r]
        code = codes[r]
        j = 0
        while j + 4 <= n:
            w0 = words[code[j]]
            w1 = words[code[j + 1]]
            w2 = words[code[j + 2]]
            w3 = words[code[j + 3]]
            row[j] = w0
            row[j + 1] = w1
            row[j + 2] = w2
            row[j + 3] = w3
            j += 4
        while j < n:
            row[j] = words[code[j]]
            j += 1

    @_body
    def _copy_words_row(codes, words, out, r):  # pragma: no cover - compiled by numba
        """out[r, j*w + q] = words[codes[r, j], q]: M = 1 decode, a codeword being `w` machine words."""
        n = codes.shape[1]
        w = words.shape[1]
        for j in range(n):
            code = codes[r, j]
            for q in range(w):
                out[r, j * w + q] = words[code, q]

    @_body
    def _transpose_tile(codes, out, t, block):  # pragma: no cover - compiled by numba
        """out[c, r] = codes[r, c] for rows `[t·block, (t+1)·block)`, in `block`×`block` tiles (torch's strided uint8
        copy is ~20x slower)."""
        rows, n = codes.shape
        r0 = t * block
        r1 = min(rows, r0 + block)
        for c0 in range(0, n, block):
            for c in range(c0, min(n, c0 + block)):
                for r in range(r0, r1):
                    out[c, r] = codes[r, c]

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _lut_gather_sum(lut, codes_t, out, tile):  # pragma: no cover - compiled by numba
        for t in numba.prange((codes_t.shape[1] + tile - 1) // tile):
            _lut_tile(lut, codes_t, out, t, tile)

    @numba.njit(cache=True, boundscheck=False)
    def _lut_gather_sum_serial(lut, codes_t, out, tile):  # pragma: no cover - compiled by numba
        for t in range((codes_t.shape[1] + tile - 1) // tile):
            _lut_tile(lut, codes_t, out, t, tile)

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _decode_rows(codes, codebooks, out):  # pragma: no cover - compiled by numba
        for r in numba.prange(codes.shape[0]):
            _decode_row(codes, codebooks, out, r)

    @numba.njit(cache=True, boundscheck=False)
    def _decode_rows_serial(codes, codebooks, out):  # pragma: no cover - compiled by numba
        for r in range(codes.shape[0]):
            _decode_row(codes, codebooks, out, r)

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _copy_words1(codes, words, out):  # pragma: no cover - compiled by numba
        for r in numba.prange(codes.shape[0]):
            _copy_words1_row(codes, words, out, r)

    @numba.njit(cache=True, boundscheck=False)
    def _copy_words1_serial(codes, words, out):  # pragma: no cover - compiled by numba
        for r in range(codes.shape[0]):
            _copy_words1_row(codes, words, out, r)

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _copy_words(codes, words, out):  # pragma: no cover - compiled by numba
        for r in numba.prange(codes.shape[0]):
            _copy_words_row(codes, words, out, r)

    @numba.njit(cache=True, boundscheck=False)
    def _copy_words_serial(codes, words, out):  # pragma: no cover - compiled by numba
        for r in range(codes.shape[0]):
            _copy_words_row(codes, words, out, r)

    @numba.njit(parallel=True, cache=True, boundscheck=False)
    def _transpose_codes(codes, out, block):  # pragma: no cover - compiled by numba
        for t in numba.prange((codes.shape[0] + block - 1) // block):
            _transpose_tile(codes, out, t, block)

    @numba.njit(cache=True, boundscheck=False)
    def _transpose_codes_serial(codes, out, block):  # pragma: no cover - compiled by numba
        for t in range((codes.shape[0] + block - 1) // block):
            _transpose_tile(codes, out, t, block)

    _SERIAL = {_lut_gather_sum: _lut_gather_sum_serial, _decode_rows: _decode_rows_serial,
               _copy_words1: _copy_words1_serial, _copy_words: _copy_words_serial,
               _transpose_codes: _transpose_codes_serial}


def _kernel(parallel_kernel, threads: int):
    """The kernel to run on `threads` threads: the serial twin on one (numba's pool stays unstarted)."""
    return parallel_kernel if threads > 1 else _SERIAL[parallel_kernel]


#: Below this many elements of work (decoded weight entries, table look-ups) a numba kernel runs on one thread: a
#: parallel region must wake a second thread, which on a busy or small machine (torch's OpenMP threads spin on the
#: same cores) can wait a whole scheduler time slice (~12 ms measured on 2 shared cores) for work worth ~0.1 ms.
PARALLEL_MIN_WORK = 1 << 20


_threads = threading.local()  # numba's thread count is per calling thread: remember what this thread set


def _sync_numba_threads(work: int | None = None) -> int:
    """Run numba kernels on as many threads as torch uses (`torch.set_num_threads`), within numba's limit; on one
    thread for less than `PARALLEL_MIN_WORK` elements of `work`. Returns the thread count."""
    wanted = 1 if work is not None and work < PARALLEL_MIN_WORK else torch.get_num_threads()
    wanted = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    if wanted > 1 and getattr(_threads, "count", None) != wanted:  # one thread: the serial twins (no pool to start)
        numba.set_num_threads(wanted)
        _threads.count = wanted
    return wanted


def _as_numpy(t: torch.Tensor) -> "np.ndarray":
    return t.detach().contiguous().numpy()


# ---------------------------------------------------------------------------------------------- public kernels
def build_lut(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Dot products of every input block with every codeword, in float32.

    Args:
        x (`torch.Tensor`): inputs `[B, n_blocks * d]`.
        codebooks (`torch.Tensor`): `[M, k, d]`.

    Returns:
        `torch.Tensor`: float32 table `[B, n_blocks * M, k]`, entry `(b, j*M + m, c)` = `x[b, block j] · codebooks[m, c]`.
    """
    n_books, k, d = codebooks.shape
    batch = x.shape[0]
    blocks = x.float().reshape(batch, -1, d)  # [B, n_blocks, d]
    books = codebooks.float().reshape(n_books * k, d)  # [M*k, d]
    return (blocks @ books.t()).reshape(batch, -1, k)  # [B, n_blocks*M, k]


def lut_codes(codes: torch.Tensor) -> torch.Tensor:
    """The codes in the layout the LUT kernel reads: `[n_blocks * M, rows]`, contiguous (a copy).

    Modules cache it next to their unpacked codes (`VQModuleMixin.lut_codes`): one more byte per code
    (uint8) while the LUT path is in use.

    Args:
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]`.
    """
    flat = codes.reshape(codes.shape[0], -1)  # [rows, n_blocks*M]
    if not HAS_NUMBA or flat.device.type != "cpu" or flat.dtype not in (torch.uint8, torch.int32, torch.int64):
        return flat.t().contiguous()  # [n_blocks*M, rows]
    out = torch.empty(flat.shape[1], flat.shape[0], dtype=flat.dtype)  # [n_blocks*M, rows]
    threads = _sync_numba_threads(flat.numel())
    _kernel(_transpose_codes, threads)(_as_numpy(flat), out.numpy(), 64)
    return out


def _tile(rows: int, threads: int) -> int:
    """Output rows per thread task: at most 256 (each lookup-table row is reused across them), fewer when that
    leaves threads idle."""
    return max(16, min(256, -(-rows // (2 * threads))))


def lut_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, *,
               codes_t: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T` for the VQ weight `W` given by `codes` and `codebooks`, without decoding `W`.

    Inference only (no autograd through the numba kernel): call it under `torch.no_grad()` or with
    inputs and codebooks that do not require grad.

    Args:
        x (`torch.Tensor`): inputs `[B, n_blocks * d]` (any float dtype; computed in float32).
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8 or int32, as unpacked by the module).
        codebooks (`torch.Tensor`): `[M, k, d]`.
        codes_t (`torch.Tensor`, *optional*): [`lut_codes`] of `codes` when the caller caches it (computed
            here otherwise, a copy of the codes per call).
        scales (`torch.Tensor`, *optional*): `[rows]` per-output-channel factors (`W = diag(scales) · decode`).

    Returns:
        `torch.Tensor`: float32 `[B, rows]` (callers round to the dtype of `x` once, after the bias).
    """
    rows = codes.shape[0]
    lut = build_lut(x, codebooks)  # [B, n_blocks*M, k]
    if HAS_NUMBA:
        codes_t = lut_codes(codes) if codes_t is None else codes_t  # [n_blocks*M, rows]
        threads = _sync_numba_threads(x.shape[0] * codes_t.numel())
        out = torch.empty(x.shape[0], rows, dtype=torch.float32)  # [B, rows]
        _kernel(_lut_gather_sum, threads)(_as_numpy(lut), _as_numpy(codes_t), out.numpy(), _tile(rows, threads))
    else:
        flat_codes = codes.reshape(rows, -1)  # [rows, n_blocks*M], a view of the unpacked codes
        n_codes, k = lut.shape[1], lut.shape[2]
        offsets = torch.arange(n_codes, dtype=torch.int64) * k  # [n_blocks*M]
        index = (flat_codes.to(torch.int64) + offsets).reshape(-1)  # [rows * n_blocks*M]
        out = lut.reshape(x.shape[0], -1).index_select(1, index).reshape(x.shape[0], rows, n_codes).sum(-1)  # [B, rows]
    return out if scales is None else out.mul_(scales.float())


_WORDS = ((16, torch.complex128), (8, torch.int64), (4, torch.int32), (2, torch.int16))  # (bytes, same-size dtype)


def fast_decode(codes: torch.Tensor, codebooks: torch.Tensor, *, scales: torch.Tensor | None = None) -> torch.Tensor:
    """[`hf_vq.codec.decode`] with the numba kernels: the weight matrix `[rows, n_blocks * d]`, dtype of `codebooks`.

    Same values as the reference (bit-identical in float32/float64; with M > 1 codebooks half precision is summed
    in float32 then rounded once). With one codebook the codewords are copied as 8- or 16-byte words. Falls back
    to the reference without numba. Inference only (no autograd).

    Args:
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8, int32 or int64).
        codebooks (`torch.Tensor`): `[M, k, d]`.
        scales (`torch.Tensor`, *optional*): `[rows]`; row `r` is multiplied by `scales[r]` (rounded once).
    """
    if not PreparedDecode.supports(codes, codebooks):
        weight = reference_decode(codes, codebooks)  # [rows, n_blocks*d]
        return weight if scales is None else weight * scales.to(weight.dtype)[:, None]
    return PreparedDecode(codes, codebooks)(scales)


class PreparedDecode:
    """[`fast_decode`] of fixed codes and codebooks with its per-call preparation done once.

    A compressed MiniLM decodes 36 small weights per forward, and for a weight that small the tensor-to-array views,
    checks and kernel choice of `fast_decode` are part of every call. A module keeps one of these while
    its codes and codebooks are unchanged (see `VQModuleMixin.decode_weight`); calling it allocates the output and
    runs the kernel. Same values as `fast_decode`. Requires numba and CPU tensors (`PreparedDecode.supports`).
    The arrays it reads are made once (views where possible, copies of non-contiguous or half-precision codebooks):
    prepare a new one when the codes or codebooks change.

    Args:
        codes (`torch.Tensor`): integer codes `[rows, n_blocks, M]` (uint8, int32 or int64).
        codebooks (`torch.Tensor`): `[M, k, d]`.
    """

    __slots__ = ("_out_shape", "_dtype", "_native", "_work", "_kernel", "_word", "_arrays")

    @staticmethod
    def supports(codes: torch.Tensor, codebooks: torch.Tensor) -> bool:
        return (HAS_NUMBA and codes.device.type == "cpu" and codebooks.device.type == "cpu"
                and codes.dtype in (torch.uint8, torch.int32, torch.int64))

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor) -> None:
        rows, n_blocks, n_books = codes.shape
        d = codebooks.shape[-1]
        books = codebooks.detach()  # [M, k, d]
        self._out_shape = (rows, n_blocks * d)
        self._dtype = codebooks.dtype
        self._native = codebooks.dtype in (torch.float32, torch.float64)
        self._work = rows * n_blocks * n_books * d
        if n_books == 1:  # bit copies: a codeword as the widest machine words that divide its bytes (any dtype)
            size = d * codebooks.element_size()
            self._word = next(dtype for nbytes, dtype in _WORDS if size % nbytes == 0)
            words = books[0].contiguous().view(self._word).numpy()  # [k, w]: one codeword as w words
            codes2d = codes.reshape(rows, -1).contiguous().numpy()  # [rows, n_blocks]
            if words.shape[1] == 1:
                self._kernel, self._arrays = _copy_words1, (codes2d, words.reshape(-1))
            else:
                self._kernel, self._arrays = _copy_words, (codes2d, words)
        else:  # summed codewords, in float32 for half-precision codebooks
            self._word = None
            books = books if self._native else books.float()  # [M, k, d]
            self._kernel = _decode_rows
            self._arrays = (_as_numpy(codes), _as_numpy(books))

    def __call__(self, scales: torch.Tensor | None = None) -> torch.Tensor:
        """The weight matrix `[rows, n_blocks * d]` (times `scales` `[rows]` per row), dtype of the codebooks."""
        kernel = _kernel(self._kernel, _sync_numba_threads(self._work))  # the serial twin on one thread
        if self._word is not None:
            out = torch.empty(self._out_shape, dtype=self._dtype)  # [rows, n_blocks*d]
            kernel(*self._arrays, out.view(self._word).numpy())
            return out if scales is None else out.mul_(scales.to(out.dtype)[:, None])
        out = torch.empty(self._out_shape, dtype=self._dtype if self._native else torch.float32)
        kernel(*self._arrays, out.numpy())
        if scales is not None:
            out.mul_(scales.to(out.dtype)[:, None])
        return out if self._native else out.to(self._dtype)


# ---------------------------------------------------------------------------------------------- dispatch rule
# Throughputs estimated on the 2-core benchmark machine (AMD EPYC, torch.set_num_threads(2), fp32) by timing
# both paths through `kernel_mode` (ad-hoc sweeps, not committed); the committed check is
# benchmarks/results/inference.md (batch 1, 8, 64: the rule's choice is in the "path" column). Only their
# ratios matter: they decide which path is cheaper.
_GEMV_MACS_PER_S = 6e9  # F.linear with one input row: memory-bound matrix-vector product
_GEMM_MACS_PER_S = 60e9  # F.linear with several rows, once the weight is packed ...
_GEMM_PACK_FLOATS_PER_S = 4e9  # ... which costs a pass over the weight
_LUT_LOOKUPS_PER_S = {True: 3.6e9, False: 0.09e9}  # gather-and-sum: numba (row tiles) / torch index_select
_LUT_SPILL_SLOWDOWN = 1.3  # when the tables of all input rows exceed `_LUT_CACHE_BYTES`
_LUT_CACHE_BYTES = 24 * 2**20
_DECODE_FLOATS_PER_S = {True: 7.0e9, False: 0.26e9}  # decoded weight entries: numba / F.embedding
# A decoded weight above glibc's largest mmap threshold (32 MiB) is a fresh mapping on every call, and its
# page faults then dominate the decode path (inference.md: decode + linear 25.6 ms at 4096x4096, batch 1).
_FRESH_PAGES_BYTES = 32 * 2**20
_FRESH_PAGES_BYTES_PER_S = 3.5e9


def lut_is_faster(batch: int, rows: int, n_blocks: int, num_codebooks: int, k: int, d: int, *,
                  weight_is_decoded: bool = False) -> bool:
    """Whether the LUT matmul beats decode-then-`F.linear` for `batch` input rows (the CPU dispatch rule).

    A cost model whose throughputs were measured on 2 cores (the constants above): the LUT path costs
    `batch · n_blocks·M·k·d` MACs for the tables plus `batch · rows·n_blocks·M` look-ups (slower once the
    tables spill out of the cache); the decode path `rows·cols·M` decoded entries and `F.linear`. Either
    pays page faults for an output (tables, decoded weight) too large for the allocator to reuse. At 4096×4096, k = 256, d = 8, M = 1
    it picks the LUT up to 52 input rows (inference.md: LUT ahead at batch 8, decode ahead at 64); for a
    768-input, 3072-output layer up to 20 (inference.md: LUT ahead at 8, decode ahead at 64).

    Args:
        batch (`int`): input rows (product of the leading dims of the input).
        rows, n_blocks, num_codebooks, k, d (`int`): the layout (`rows` outputs, `n_blocks·d` inputs).
        weight_is_decoded (`bool`): the decoded weight is already cached, so decoding costs nothing.
    """
    numba_ok = HAS_NUMBA
    cols = n_blocks * d
    n_codes = n_blocks * num_codebooks
    lookups_per_s = _LUT_LOOKUPS_PER_S[numba_ok]
    if batch * n_codes * k * 4 > _LUT_CACHE_BYTES:
        lookups_per_s /= _LUT_SPILL_SLOWDOWN
    lut_s = batch * (n_codes * k * d / _GEMM_MACS_PER_S + rows * n_codes / lookups_per_s)
    if batch * n_codes * k * 4 > _FRESH_PAGES_BYTES:  # the tables themselves are a fresh mapping
        lut_s += batch * n_codes * k * 4 / _FRESH_PAGES_BYTES_PER_S
    weight = rows * cols
    if batch == 1:
        linear_s = weight / _GEMV_MACS_PER_S
    else:
        linear_s = weight / _GEMM_PACK_FLOATS_PER_S + batch * weight / _GEMM_MACS_PER_S
    decode_s = 0.0
    if not weight_is_decoded:
        decode_s = weight * num_codebooks / _DECODE_FLOATS_PER_S[numba_ok]
        if weight * 4 > _FRESH_PAGES_BYTES:
            decode_s += weight * 4 / _FRESH_PAGES_BYTES_PER_S
    return lut_s < decode_s + linear_s
