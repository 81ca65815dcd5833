"""Bit allocation (`hf_vq.codec.allocate`): meets the budget, finds the brute-force optimum on small cases, beats
uniform allocation where sensitivities differ, refuses infeasible budgets with the numbers."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from hf_vq.codec.allocate import Allocation, Option, allocate_bits, option_bits


def _brute_force(layers: list[list[Option]], budget: float) -> float:
    best = math.inf
    for combo in itertools.product(*[range(len(layer)) for layer in layers]):
        bits = sum(layers[i][j].bits for i, j in enumerate(combo))
        if bits <= budget:
            best = min(best, sum(layers[i][j].distortion for i, j in enumerate(combo)))
    return best


def _random_layers(rng: random.Random, n_layers: int, n_options: int, whole: bool) -> list[list[Option]]:
    layers = []
    for _ in range(n_layers):
        size = rng.randint(1_000, 50_000)
        sensitivity = rng.lognormvariate(0, 1.5)
        opts = [Option(16.0 * size, 0.0, "dense")]
        for b in sorted(rng.sample(range(1, 9), n_options - 1)):
            bits = b * size + rng.choice([0, 4096, 8192]) + (0 if whole else rng.random())
            opts.append(Option(bits, sensitivity * 4.0 ** -b * (1 + 0.3 * rng.random()), f"{b}bit"))
        rng.shuffle(opts)
        layers.append(opts)
    return layers


def test_option_bits_counts_codes_codebooks_and_scales():
    # 384 x 384 at d = 4, k = 256: 2 bits per weight of codes + a 256 x 4 fp16 codebook
    assert option_bits(384, 384, d=4, k=256) == 384 * 96 * 8 + 256 * 4 * 16
    assert option_bits(384, 384, d=8, k=256, num_codebooks=2, scales=True) == 384 * 48 * 16 + 2 * 256 * 8 * 16 + 384 * 16
    assert option_bits(10, 9, d=3, k=5) == 10 * 3 * 3 + 5 * 3 * 16  # ceil(log2 5) = 3 bits per code
    with pytest.raises(ValueError, match="d=4 must divide cols=9"):
        option_bits(10, 9, d=4, k=256)


@pytest.mark.parametrize("method", ["dp", "greedy"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_cases(method, seed):
    rng = random.Random(seed)
    layers = _random_layers(rng, n_layers=6, n_options=4, whole=True)
    cheapest = sum(min(o.bits for o in layer) for layer in layers)
    most = sum(max(o.bits for o in layer) for layer in layers)
    fixed = 12_345.0
    for frac in (0.0, 0.05, 0.2, 0.5, 0.9):
        budget = fixed + cheapest + frac * (most - cheapest)
        alloc = allocate_bits(layers, budget, fixed_bits=fixed, method=method, resolution=10**7)
        optimum = _brute_force(layers, budget - fixed)
        assert alloc.bits <= budget
        assert alloc.bits == pytest.approx(fixed + sum(layers[i][c].bits for i, c in enumerate(alloc.choices)))
        assert alloc.distortion == pytest.approx(sum(layers[i][c].distortion for i, c in enumerate(alloc.choices)))
        if method == "dp":  # whole-bit costs, free budget below the resolution: exact
            assert alloc.distortion == pytest.approx(optimum, rel=1e-12, abs=1e-15)
        else:  # the hull walk + local search is a heuristic: never better than the optimum, and on these few-layer
            # cases within 1.3x of it (measured worst: 1.28x, seed 1 at 5% of the free budget)
            assert optimum - 1e-12 <= alloc.distortion <= optimum * 1.3 + 1e-12


def test_coarse_dp_still_fits_and_is_near_optimal():
    rng = random.Random(11)
    layers = _random_layers(rng, n_layers=7, n_options=4, whole=False)
    cheapest = sum(min(o.bits for o in layer) for layer in layers)
    most = sum(max(o.bits for o in layer) for layer in layers)
    budget = cheapest + 0.3 * (most - cheapest)
    alloc = allocate_bits(layers, budget, resolution=2_000)
    optimum = _brute_force(layers, budget)
    assert alloc.bits <= budget
    assert alloc.distortion <= optimum * 1.05


def test_beats_uniform_allocation_where_sensitivities_differ():
    # 10 equal layers of 100k weights, options 2/3/4 bits; the first two layers are 50x as sensitive.
    # Uniform 3 bits spends exactly the budget; the optimum moves bits from the robust layers to the
    # sensitive ones: the two sensitive layers at 4 bits are paid for by two robust layers at 2 bits.
    n = 100_000
    sens = [50.0, 50.0] + [1.0] * 8
    layers = [[Option(b * n, s * 4.0 ** -b, f"{b}bit") for b in (2, 3, 4)] for s in sens]
    budget = 3 * n * len(layers)
    uniform = sum(s * 4.0 ** -3 for s in sens)
    expected = 2 * 50 * 4.0 ** -4 + 2 * 4.0 ** -2 + 6 * 4.0 ** -3  # the known optimum
    assert expected == pytest.approx(_brute_force(layers, budget))
    for method in ("dp", "greedy"):
        alloc = allocate_bits(layers, budget, method=method)
        assert alloc.distortion == pytest.approx(expected)
        assert alloc.distortion < 0.6 * uniform
        assert alloc.bits <= budget
        assert alloc.labels[:2] == ["4bit", "4bit"]


def test_infeasible_budget_names_the_budget_and_the_minimum():
    layers = [[(100.0, 1.0), (300.0, 0.1)], [(50.0, 2.0), (800.0, 0.0)]]
    with pytest.raises(ValueError, match=r"budget_bits=149 is infeasible: the minimum achievable is 160 bits"):
        allocate_bits(layers, 149, fixed_bits=10)
    alloc = allocate_bits(layers, 160, fixed_bits=10)  # exactly the minimum is fine
    assert alloc.choices == [0, 0] and alloc.bits == 160


def test_a_generous_budget_keeps_everything_dense():
    layers = [[Option(16.0 * 1000, 0.0, "dense"), Option(2000.0, 0.3, "2bit")] for _ in range(5)]
    alloc = allocate_bits(layers, 1e9)
    assert alloc.labels == ["dense"] * 5 and alloc.distortion == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="layer 1 has no options"):
        allocate_bits([[(1.0, 0.0)], []], 10)
    with pytest.raises(ValueError, match="method='exact'"):
        allocate_bits([[(1.0, 0.0)]], 10, method="exact")
    with pytest.raises(ValueError, match="bits must be finite"):
        allocate_bits([[(float("nan"), 0.0)]], 10)


def test_fast_for_a_hundred_layers_of_eight_options():
    rng = random.Random(5)
    layers = _random_layers(rng, n_layers=100, n_options=8, whole=False)
    cheapest = sum(min(o.bits for o in layer) for layer in layers)
    budget = cheapest * 1.6
    results: dict[str, Allocation] = {}
    for method in ("dp", "greedy"):
        start = time.perf_counter()
        results[method] = allocate_bits(layers, budget, method=method)
        assert time.perf_counter() - start < 5.0
        assert results[method].bits <= budget
        assert results[method].bits > 0.99 * budget  # spends (almost) all of it
    # the two solvers agree to within a percent on a large instance
    assert results["dp"].distortion == pytest.approx(results["greedy"].distortion, rel=0.01)
