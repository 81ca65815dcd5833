"""Additive quantization (`hf_vq.codec.aq`): exact recovery, monotone training, beats PQ at equal bits, M=1 is k-means."""

import pytest
import torch

from hf_vq.codec.aq import (aq_decode, aq_encode, aq_quantize, aq_relative_error, aq_update_codebooks,
                            residual_init)
from hf_vq.codec.kmeans import kmeans


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=gen)  # [d, d]: correlated dimensions, as in real weights
    return torch.randn(n, d, generator=gen) @ mixing  # [n, d]


def test_beam_search_recovers_the_codes_of_a_synthetic_sum():
    gen = torch.Generator().manual_seed(0)
    # codebooks of decreasing scale, as residual training makes them (codebook m refines codebook m - 1)
    scale = 0.5 ** torch.arange(3.0)  # [M]
    codebooks = torch.randn(3, 32, 8, generator=gen) * scale[:, None, None]  # [M, K, d]
    codes = torch.randint(0, 32, (2000, 3), generator=gen)  # [n, M]
    x = aq_decode(codes, codebooks)  # [n, d]: exact sums
    found = aq_encode(x, codebooks, beam_size=16, icm_sweeps=0)
    exact = (found == codes).all(1).float().mean().item()
    assert exact > 0.995, exact
    assert aq_relative_error(x, found, codebooks) < 1e-3
    # equal-scale codebooks are harder for an ordered search; a wider beam still finds almost every sum
    flat = torch.randn(2, 32, 8, generator=gen)  # [M, K, d]
    codes = torch.randint(0, 32, (2000, 2), generator=gen)  # [n, M]
    found = aq_encode(aq_decode(codes, flat), flat, beam_size=16)
    assert (found == codes).all(1).float().mean().item() > 0.97


def test_exhaustive_beam_is_optimal():
    gen = torch.Generator().manual_seed(1)
    codebooks = torch.randn(2, 8, 4, generator=gen)  # [M, K, d]
    x = torch.randn(300, 4, generator=gen)  # [n, d]
    codes = aq_encode(x, codebooks, beam_size=8, icm_sweeps=0)  # beam = K**(M-1): exhaustive
    every = (codebooks[0][:, None, :] + codebooks[1][None, :, :]).reshape(64, 4)  # [K*K, d] all sums
    best = torch.cdist(x, every).pow(2).min(1).values  # [n]
    got = (x - aq_decode(codes, codebooks)).pow(2).sum(1)  # [n]
    torch.testing.assert_close(got, best, atol=1e-4, rtol=1e-4)


def test_error_never_increases_over_iterations():
    x = _correlated(6000, 8)
    history: list[float] = []
    aq_quantize(x, 2, 32, n_iter=20, aq_iters=5, beam_size=4, history=history)
    assert len(history) == 6
    assert all(b <= a + 1e-6 for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.97 * history[0], history  # the alternation does real work beyond residual k-means


def test_least_squares_update_is_optimal_given_codes():
    x = _correlated(3000, 4, seed=2)
    codebooks, codes = residual_init(x, 2, 16, n_iter=10)
    before = aq_relative_error(x, codes, codebooks)
    updated = aq_update_codebooks(x, codes, codebooks, ridge=1e-9)
    after = aq_relative_error(x, codes, updated)
    # the dense least-squares solution, for reference
    design = torch.zeros(3000, 32, dtype=torch.float64)  # [n, M*K] one-hot
    design[torch.arange(3000), codes[:, 0]] = 1
    design[torch.arange(3000), 16 + codes[:, 1]] = 1
    solution = torch.linalg.lstsq(design, x.double()).solution  # [M*K, d]
    best = float((design @ solution - x.double()).pow(2).sum() / x.double().pow(2).sum())
    assert after <= before
    assert after == pytest.approx(best, rel=1e-4)


def test_aq_beats_pq_at_equal_bits_on_correlated_data():
    x = _correlated(8000, 8, seed=3)
    # AQ: M=2 codebooks of 64 on d=8 -> 12 bits / 8 weights; PQ: k=64 on d=4 -> 6 bits / 4 weights (same rate)
    codebooks, codes = aq_quantize(x, 2, 64, n_iter=20, aq_iters=3)
    aq_err = aq_relative_error(x, codes, codebooks)
    x4 = x.reshape(-1, 4)
    codebook, pq_codes = kmeans(x4, 64, n_iter=20)
    pq_err = float((x4 - codebook[pq_codes]).pow(2).sum() / x4.pow(2).sum())
    assert aq_err < 0.85 * pq_err, (aq_err, pq_err)


def test_one_codebook_is_kmeans():
    x = _correlated(5000, 4, seed=4)
    codebook, codes = kmeans(x, 32, n_iter=25, seed=7)
    aq_books, aq_codes = aq_quantize(x, 1, 32, n_iter=25, aq_iters=0, seed=7)
    torch.testing.assert_close(aq_books[0], codebook)
    assert torch.equal(aq_codes[:, 0], codes)
    # further AQ iterations are Lloyd steps: never worse than k-means
    books, more = aq_quantize(x, 1, 32, n_iter=25, aq_iters=2, seed=7)
    kmeans_err = float((x - codebook[codes]).pow(2).sum() / x.pow(2).sum())
    assert aq_relative_error(x, more, books) <= kmeans_err + 1e-7


def test_torch_search_matches_faiss(monkeypatch):
    import hf_vq.codec.aq as aq

    x = _correlated(700, 8, seed=5)
    codebooks = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))
    with_faiss = aq_encode(x, codebooks, beam_size=4)
    monkeypatch.setattr(aq, "_faiss", None)
    without = aq_encode(x, codebooks, beam_size=4, chunk_size=100)
    assert aq_relative_error(x, without, codebooks) == pytest.approx(aq_relative_error(x, with_faiss, codebooks), rel=1e-5)


@pytest.mark.parametrize("bad", [{"num_codebooks": 0}, {"k": 1}])
def test_bad_arguments_are_clear(bad):
    kwargs = {"num_codebooks": 2, "k": 16, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        aq_quantize(torch.randn(100, 4), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_quality():
    x = _correlated(20000, 8, seed=6)
    cpu_books, cpu_codes = aq_quantize(x, 2, 64, n_iter=20, aq_iters=2)
    gpu_books, gpu_codes = aq_quantize(x.cuda(), 2, 64, n_iter=20, aq_iters=2)
    assert gpu_codes.device.type == "cuda" and gpu_books.device.type == "cuda"
    cpu_err = aq_relative_error(x, cpu_codes, cpu_books)
    gpu_err = aq_relative_error(x.cuda(), gpu_codes, gpu_books)
    assert gpu_err == pytest.approx(cpu_err, rel=0.05)
