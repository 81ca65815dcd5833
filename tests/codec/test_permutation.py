"""PQF's permutation search as a pure tensor algorithm: objective, greedy start, local search."""

import pytest
import torch

from hf_vq.codec.permutation import (ObjectiveTerm, _TermState, apply_index, greedy_permutation,
                                     permutation_objective, search_permutation, term_logdet)


def _terms(seed: int = 0) -> list[ObjectiveTerm]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(48, generator=gen) * 3 + 0.1  # channels of very different spread: permuting helps
    linear = torch.randn(64, 48, 1, generator=gen) * scales[None, :, None]  # [N, P, g=1]
    conv = torch.randn(16, 48, 9, generator=gen) * scales[None, :, None]  # [N, P, g=9] (3x3, d=18)
    return [ObjectiveTerm(linear, 4), ObjectiveTerm(conv, 2)]


def test_incremental_swap_scores_equal_direct_objective():
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    p, q = torch.tensor([0, 3, 5, 10, 2]), torch.tensor([1, 2, 40, 11, 47])
    for term in _terms():
        state = _TermState(term, perm, torch.device("cpu"))
        assert state.value == pytest.approx(term_logdet(term.x, term.n, perm), abs=1e-9)
        values, _, _ = state.propose(perm, p, q)
        for k in range(len(p)):
            swapped = perm.clone()
            swapped[p[k]], swapped[q[k]] = perm[q[k]], perm[p[k]]
            assert float(values[k]) == pytest.approx(term_logdet(term.x, term.n, swapped), abs=1e-8)


def test_search_lowers_objective_and_returns_valid_permutation():
    terms = _terms()
    res = search_permutation(terms, iters=200, seed=0, device="cpu")
    assert sorted(res.perm.tolist()) == list(range(48))
    assert res.objective < res.objective_identity - 0.1
    assert res.objective == pytest.approx(permutation_objective(terms, res.perm), abs=1e-8)
    assert res.accepted > 0 and res.proposals >= res.steps


def test_search_is_deterministic_and_seeded():
    a = search_permutation(_terms(), iters=50, seed=3, device="cpu")
    b = search_permutation(_terms(), iters=50, seed=3, device="cpu")
    assert torch.equal(a.perm, b.perm) and a.objective == b.objective


def test_never_worse_than_identity_and_zero_iters():
    # identical channels: nothing beats the identity, the search must return it
    x = torch.randn(32, 1, 1).expand(32, 16, 1).contiguous()
    res = search_permutation([ObjectiveTerm(x, 4)], iters=20, device="cpu")
    assert res.objective <= res.objective_identity
    res0 = search_permutation(_terms(), iters=0, device="cpu")
    assert res0.steps == 0 and res0.objective == min(res0.objective_identity, res0.objective_greedy)


def test_exhaustive_small_space_reaches_local_optimum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, 1, generator=gen) * torch.tensor([4, 4, 1, 1, 3, 0.2, 2, 0.5])[None, :, None]
    res = search_permutation([ObjectiveTerm(x, 2)], iters=1000, device="cpu")  # 28 pairs <= batch: exhaustive
    best = res.objective
    for i in range(8):  # no single swap improves any more
        for j in range(i + 1, 8):
            p = res.perm.clone()
            p[i], p[j] = p[j].clone(), p[i].clone()
            assert permutation_objective([ObjectiveTerm(x, 2)], p) >= best - 1e-9


def test_greedy_start_is_a_permutation_with_balanced_buckets():
    terms = _terms()
    perm = greedy_permutation(terms, n=4)
    assert sorted(perm.tolist()) == list(range(48))


def test_apply_index_layout():
    perm = torch.tensor([2, 0, 1])
    idx = apply_index(12, perm, 2)  # 2 repeats of 3 channels x 2 columns
    assert idx.tolist() == [4, 5, 0, 1, 2, 3, 10, 11, 6, 7, 8, 9]
    with pytest.raises(ValueError):
        apply_index(10, perm, 2)


def test_bad_terms_are_refused():
    with pytest.raises(ValueError):
        search_permutation([])
    with pytest.raises(ValueError):
        search_permutation([ObjectiveTerm(torch.randn(4, 6, 1), 4)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_search_matches_cpu_objective():
    terms = _terms()
    cpu = search_permutation(terms, iters=100, device="cpu")
    gpu = search_permutation(terms, iters=100, device="cuda")
    assert sorted(gpu.perm.tolist()) == list(range(48))
    assert gpu.objective == pytest.approx(permutation_objective(terms, gpu.perm), abs=1e-6)
    assert gpu.objective < gpu.objective_identity and abs(gpu.objective - cpu.objective) < 0.5
