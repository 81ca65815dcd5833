"""k-means: quality on real weights, determinism, empty-cluster repair, the faiss and torch searches agree."""

import pytest
import torch

from hf_vq.codec import assign, clamp_k, decode, kmeans, quantize_matrix, relative_error, split_blocks
from hf_vq.codec.kmeans import kmeans_many


def _blobs(n_per=200, k=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 10  # [k, d]
    x = centres.repeat_interleave(n_per, 0) + 0.1 * torch.randn(k * n_per, d, generator=g)  # [k * n_per, d]
    return x, centres


@pytest.mark.parametrize("anneal", [True, False])
def test_recovers_separated_clusters(anneal):
    x, centres = _blobs()
    # k-means++ seeding: random seeding may put two codewords in one blob, a local minimum no
    # algorithm of the Lloyd family leaves (the paper's random init is for dense weight clouds).
    codebook, codes = kmeans(x, 8, n_iter=30, anneal=anneal, seed=1, init_method="kmeans++")
    assert codebook.shape == (8, 4) and codes.shape == (x.shape[0],) and codes.dtype == torch.int64
    # each true centre has a codeword within noise of it, and the error is the noise floor
    gap = torch.cdist(centres, codebook).min(1).values
    assert gap.max() < 0.1
    assert float((x - codebook[codes]).pow(2).sum(1).mean()) < 0.05


def test_seeded_and_deterministic():
    x = torch.randn(5000, 4, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 64, n_iter=20, seed=3)
    b = kmeans(x, 64, n_iter=20, seed=3)
    c = kmeans(x, 64, n_iter=20, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_kmeans_many_equals_independent_runs():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3000, 4, generator=g), torch.randn(1000, 9, generator=g)]
    many = kmeans_many(xs, [32, 16], n_iter=10, seed=7)
    for x, k, (cb, codes) in zip(xs, [32, 16], many):
        ref_cb, ref_codes = kmeans(x, k, n_iter=10, seed=7)
        assert torch.equal(cb, ref_cb) and torch.equal(codes, ref_codes)


def test_codes_are_nearest_codewords():
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))
    codebook, codes = kmeans(x, 50, n_iter=15, seed=0)
    brute = torch.cdist(x.double(), codebook.double()).argmin(1)
    d_ours = (x.double() - codebook.double()[codes]).pow(2).sum(1)
    d_best = (x.double() - codebook.double()[brute]).pow(2).sum(1)
    assert torch.allclose(d_ours, d_best, rtol=1e-5, atol=1e-6)


def test_faiss_and_torch_search_agree():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    x, cb = torch.randn(20_000, 4, generator=g), torch.randn(256, 4, generator=g)
    a = assign(x, cb, use_faiss=True)
    b = assign(x, cb, use_faiss=False, chunk_size=777)  # several chunks, a ragged last one
    da = (x.double() - cb.double()[a]).pow(2).sum(1)
    db = (x.double() - cb.double()[b]).pow(2).sum(1)
    assert torch.allclose(da, db, rtol=1e-6, atol=1e-7)


def test_empty_clusters_are_repaired():
    # Every codeword starts on the same point: Lloyd alone would leave k - 1 of them empty forever.
    x, _ = _blobs(n_per=100, k=6)
    init = x[:1].repeat(6, 1)
    codebook, codes = kmeans(x, 6, n_iter=20, anneal=False, init=init, seed=0)
    assert codes.unique().numel() == 6
    assert float((x - codebook[codes]).pow(2).sum(1).mean()) < 0.05


def test_fewer_distinct_points_than_k_gives_finite_codebook():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).repeat(50, 1)  # 2 distinct rows, k = 8
    codebook, codes = kmeans(x, 8, n_iter=10, seed=0)
    assert torch.isfinite(codebook).all()
    assert torch.equal(codebook[codes], x)


def test_random_init_on_weight_like_data_matches_kmeanspp():
    x = torch.randn(20_000, 4, generator=torch.Generator().manual_seed(5)) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    errs = {}
    for init in ("random", "kmeans++"):
        codebook, codes = kmeans(x, 128, n_iter=30, seed=0, init_method=init)
        errs[init] = float((x - codebook[codes]).pow(2).sum())
    assert errs["random"] < 1.02 * errs["kmeans++"], errs


def test_bad_input_rejected():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        kmeans(torch.zeros(0, 4), 4)
    with pytest.raises(ValueError, match="init must be"):
        kmeans(torch.randn(100, 4), 4, init=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="init_method"):
        kmeans(torch.randn(100, 4), 4, init_method="farthest")
    with pytest.raises(ValueError, match="codebook"):
        assign(torch.randn(10, 4), torch.randn(5, 3))


def _weighted_problem(seed=0, n=6000, d=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)  # [n, d]
    w = torch.rand(n, d, generator=g).pow(3) * 4  # [n, d]: skewed, some entries nearly ignored
    return x, w


def _weighted_sse(x, w, codebook, codes):
    return float((w.double() * (x.double() - codebook.double()[codes]).pow(2)).sum())


@pytest.mark.parametrize("chunk_size", [None, 999])  # one block; several with a ragged last one
def test_weighted_assign_is_the_weighted_nearest_codeword(chunk_size):
    x, w = _weighted_problem()
    cb = torch.randn(64, 4, generator=torch.Generator().manual_seed(5))
    codes = assign(x, cb, weights=w, chunk_size=chunk_size)
    dist = (w.double()[:, None, :] * (x.double()[:, None, :] - cb.double()[None]).pow(2)).sum(-1)  # [n, k]
    chosen = dist.gather(1, codes[:, None])[:, 0]
    torch.testing.assert_close(chosen, dist.min(1).values, rtol=1e-5, atol=1e-6)
    assert not torch.equal(codes, assign(x, cb))  # the weights do change the assignment


def test_weighted_kmeans_minimises_the_weighted_error():
    x, w = _weighted_problem()
    plain_cb, plain_codes = kmeans(x, 32, n_iter=30, seed=0)
    cb, codes = kmeans(x, 32, n_iter=30, seed=0, weights=w)
    assert _weighted_sse(x, w, cb, codes) < 0.9 * _weighted_sse(x, w, plain_cb, plain_codes)
    # unit weights are plain k-means: same objective value within annealing noise
    ones_cb, ones_codes = kmeans(x, 32, n_iter=30, seed=0, weights=torch.ones_like(x))
    ones = torch.ones_like(x)
    assert _weighted_sse(x, ones, ones_cb, ones_codes) < 1.02 * _weighted_sse(x, ones, plain_cb, plain_codes)


def test_weighted_lloyd_fixed_point_is_the_weighted_mean():
    """At Lloyd's fixed point every codeword coordinate is the weighted mean of its members' coordinate."""
    x, w = _weighted_problem(n=3000)
    cb, codes = kmeans(x, 16, n_iter=200, anneal=False, seed=1, weights=w)
    for c in range(16):
        members = codes == c
        if members.any():
            expected = (w[members] * x[members]).sum(0) / w[members].sum(0)
            torch.testing.assert_close(cb[c], expected, rtol=1e-4, atol=1e-5)


def test_weights_rejected_when_malformed():
    x = torch.randn(100, 4)
    with pytest.raises(ValueError, match="shape of the subvectors"):
        kmeans(x, 4, weights=torch.ones(100, 3))
    with pytest.raises(ValueError, match="non-negative"):
        kmeans(x, 4, weights=-torch.ones(100, 4))
    with pytest.raises(ValueError, match="non-negative"):
        assign(x, torch.randn(4, 4), weights=torch.full((100, 4), float("nan")))


def test_quantize_matrix_decodes_to_its_codewords():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    codebooks, codes = quantize_matrix(w, d=4, k=32, n_iter=10)
    assert codebooks.shape == (1, 32, 4) and codes.shape == (64, 8, 1)
    approx = decode(codes, codebooks)  # [64, 32]
    # decode is exact: every block is bit-for-bit its codeword
    assert torch.equal(approx.reshape(-1, 4), codebooks[0][codes.flatten()])
    assert relative_error(w, approx) < 0.5


def test_annealed_no_worse_than_lloyd_on_minilm(minilm):
    """The paper's claim on real weights: SR-C annealing reaches a lower error than plain Lloyd's
    at the same number of iterations, summed over all of MiniLM's encoder linears (d=4, k=256)."""
    torch.manual_seed(0)
    err = {True: 0.0, False: 0.0}
    norm = 0.0
    for name, module in minilm.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.startswith("encoder.")):
            continue
        w = module.weight.detach()  # [out, in]
        x = split_blocks(w, 4)  # [out * in / 4, 4]
        k = clamp_k(256, x.shape[0])
        norm += float(w.double().pow(2).sum())
        for anneal in err:
            codebook, codes = kmeans(x, k, n_iter=40, anneal=anneal, seed=0)
            err[anneal] += float((x.double() - codebook.double()[codes]).pow(2).sum())
    annealed, lloyd = err[True] / norm, err[False] / norm
    assert annealed <= lloyd, (annealed, lloyd)
    assert annealed < 0.11  # 2 bits per weight on real weights: ~0.10 (benchmarks/results/kmeans.md)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_quality_and_is_deterministic():
    x = torch.randn(20_000, 4, generator=torch.Generator().manual_seed(0))
    cb_cpu, codes_cpu = kmeans(x, 256, n_iter=20, seed=0)
    a = kmeans(x.cuda(), 256, n_iter=20, seed=0)
    b = kmeans(x.cuda(), 256, n_iter=20, seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].device.type == "cuda"
    err_cpu = float((x - cb_cpu[codes_cpu]).pow(2).sum())
    err_gpu = float((x - a[0].cpu()[a[1].cpu()]).pow(2).sum())
    assert err_gpu < 1.02 * err_cpu


@pytest.mark.parametrize("weighted", [False, True])
def test_at_most_k_points_are_their_own_codewords(weighted):
    """A layer with no more subvectors than codewords is stored exactly (k-means noise would only add error)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    x = torch.cat([x, x[:5]])  # 45 points, 40 distinct, k = 45
    w = torch.rand(45, 2, generator=g) if weighted else None
    for k in (45, 64):
        codebook, codes = kmeans(x, k, n_iter=20, seed=0, weights=w)
        assert codebook.shape == (k, 2) and codes.shape == (45,)
        assert torch.equal(codebook[codes], x), k
    codebook, codes = kmeans(x, 39, n_iter=20, seed=0, weights=w)  # one codeword short: an error appears
    assert not torch.equal(codebook[codes], x)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("anneal", [True, False])
def test_iterations_in_pieces_match_one_piece(monkeypatch, weighted, anneal):
    """Large layers are assigned and summed in pieces of the data (bounded memory): the same k-means as one piece,
    up to the order of float64 sums (wrapped subsample windows, empty-cluster repair and Lloyd's stop included)."""
    import importlib

    km = importlib.import_module("hf_vq.codec.kmeans")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0])  # [n, d]
    w = torch.rand(6000, 4, generator=g) + 0.1 if weighted else None
    one = kmeans(x, 64, n_iter=15, anneal=anneal, seed=2, weights=w)
    monkeypatch.setattr(km, "_CHUNK_POINTS", 700)  # 9 pieces, windows cut across piece ends
    pieces = kmeans(x, 64, n_iter=15, anneal=anneal, seed=2, weights=w)
    assert torch.allclose(one[0], pieces[0], atol=1e-5)
    assert float((one[1] == pieces[1]).float().mean()) > 0.999
