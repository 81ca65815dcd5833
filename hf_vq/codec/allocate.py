"""Bit allocation to a size budget: pick one compression option per layer, least total distortion, within budget.

Pure Python/numpy: no torch needed, no `nn.Module`, no Hugging Face.

Each layer offers candidate options (e.g. `d = 4, k = 256`; `d = 3, k = 512`; left dense), each with its cost in
bits (codes + fp16 codebooks + scales, see [`option_bits`]; dense costs 16 or 32 bits per weight) and a
measured distortion (e.g. the layer's relative output error times a sensitivity weight; 0 for dense). The
total distortion is the sum over layers (HIGGS's additive model of the loss increase, HAWQ's integer program)
and the budget covers the whole file, with whatever is not allocated here (norms, biases, layers left dense
elsewhere) passed as `fixed_bits`. That is a multiple-choice knapsack; two solvers:

* `"dp"` (default): dynamic programming over the free budget (`budget − fixed − Σ cheapest`) cut into
  `resolution` units. Option costs are rounded *up* to whole units, so the answer always fits; it is exact
  when every cost above a layer's cheapest option is a whole number of bits and the free budget is at most
  `resolution` bits, and otherwise can only miss solutions within `L` units (`L` layers) of the budget.
  `L × options × resolution` steps (100 × 8 × 20,000 in well under a second).
* `"greedy"`: the Lagrangian relaxation. Per layer only the lower convex hull of (bits, distortion) matters
  to a multiplier `λ` (minimise `D + λ·bits` per layer); walking all hull steps by decreasing distortion saved
  per bit and taking each that still fits traces `λ` down to the budget.

Both finish with a local search (moves changing one or two layers' options, within the budget) that spends
what rounding or the hull walk left over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["Option", "Allocation", "option_bits", "allocate_bits"]


class Option(NamedTuple):
    """One way to store one layer.

    Args:
        bits (`float`): its size in bits (everything the layer stores).
        distortion (`float`): its measured cost to the model (>= 0 expected; 0 for dense).
        label (`str`, *optional*): a name for reports, e.g. `"d4k256"` or `"dense"`.
    """

    bits: float
    distortion: float
    label: str = ""


@dataclass
class Allocation:
    """The chosen options.

    Attributes:
        choices (`list[int]`): index of the chosen option, per layer.
        labels (`list[str]`): their labels.
        bits (`float`): total size in bits, `fixed_bits` included (<= `budget_bits`).
        distortion (`float`): total distortion of the choices.
        budget_bits (`float`): the budget asked for.
        fixed_bits (`float`): the part of the size not allocated here.
        method (`str`): `"dp"` or `"greedy"`.
        multiplier (`float` or `None`): `"greedy"` only: distortion saved per bit by its last accepted step.
    """

    choices: list[int]
    labels: list[str]
    bits: float
    distortion: float
    budget_bits: float
    fixed_bits: float
    method: str
    multiplier: float | None = field(default=None)


def option_bits(rows: int, cols: int, *, d: int, k: int, num_codebooks: int = 1, scales: bool = False,
                codebook_bits: int = 16, scale_bits: int = 16) -> int:
    """Size in bits of a `[rows, cols]` weight stored as codes + codebooks (+ per-row scales).

    Args:
        rows (`int`), cols (`int`): the weight's shape (`d` must divide `cols`).
        d (`int`): subvector length.
        k (`int`): codewords per codebook (codes take `ceil(log2 k)` bits).
        num_codebooks (`int`, defaults to 1): `M` codes per subvector.
        scales (`bool`, defaults to `False`): one scale per row.
        codebook_bits (`int`, defaults to 16), scale_bits (`int`, defaults to 16): storage of each entry.

    Returns:
        `int`: `rows · cols/d · M · ceil(log2 k) + M · k · d · codebook_bits (+ rows · scale_bits)`.
    """
    if d < 1 or cols % d:
        raise ValueError(f"d={d} must divide cols={cols}.")
    if k < 2:
        raise ValueError(f"k={k} must be >= 2.")
    code = rows * (cols // d) * num_codebooks * math.ceil(math.log2(k))
    return code + num_codebooks * k * d * codebook_bits + (rows * scale_bits if scales else 0)


def _as_options(layers: Sequence[Sequence]) -> list[list[Option]]:
    out = []
    for i, layer in enumerate(layers):
        opts = [o if isinstance(o, Option) else Option(*o) for o in layer]
        if not opts:
            raise ValueError(f"layer {i} has no options; give every layer at least one (e.g. dense).")
        for o in opts:
            if not (math.isfinite(o.bits) and o.bits >= 0 and math.isfinite(o.distortion)):
                raise ValueError(f"layer {i} option {o}: bits must be finite and >= 0, distortion finite.")
        out.append(opts)
    return out


def _totals(opts: list[list[Option]], choices: list[int]) -> tuple[float, float]:
    bits = math.fsum(opts[i][c].bits for i, c in enumerate(choices))
    return bits, math.fsum(opts[i][c].distortion for i, c in enumerate(choices))


def _repair(opts: list[list[Option]], choices: list[int], room: float) -> list[int]:
    """Local search from `choices` with `room` bits to spare: repeatedly apply the best move that fits, changing
    the option of one layer or of two layers at once (an exchange: one gives bits up, the other uses them), until
    no move lowers the distortion. Pairs are searched only while `(layers × options)² <= 4M`."""
    n_layers, width = len(opts), max(len(layer) for layer in opts)
    bits = np.full((n_layers, width), np.inf)  # [L, K] (missing options cost infinitely much)
    dist = np.full((n_layers, width), np.inf)  # [L, K]
    for i, layer in enumerate(opts):
        bits[i, :len(layer)] = [o.bits for o in layer]
        dist[i, :len(layer)] = [o.distortion for o in layer]
    ch = np.array(choices)  # [L]
    rows = np.arange(n_layers)
    pairs = (n_layers * width) ** 2 <= 1 << 22
    other = rows[:, None, None, None] != rows[None, None, :, None]  # [L, 1, L, 1]: two different layers
    while True:
        db = bits - bits[rows, ch][:, None]  # [L, K] extra bits of each move
        dd = dist - dist[rows, ch][:, None]  # [L, K] distortion change (negative: better)
        single = np.where(db <= room, dd, np.inf)  # [L, K]
        best = (float(single.min()), np.unravel_index(int(single.argmin()), single.shape))
        if pairs and n_layers > 1:
            both = np.where(((db[:, :, None, None] + db[None, None]) <= room) & other,
                            dd[:, :, None, None] + dd[None, None], np.inf)  # [L, K, L, K]
            if float(both.min()) < best[0]:
                best = (float(both.min()), np.unravel_index(int(both.argmin()), both.shape))
        if not best[0] < -1e-12 * max(1.0, float(np.abs(dist[rows, ch]).sum())):
            return [int(c) for c in ch]
        moves = best[1]
        for i, j in zip(moves[0::2], moves[1::2]):
            room -= float(db[i, j])
            ch[i] = j


def _hull(layer: list[Option]) -> list[int]:
    """Indices of the lower convex hull of (bits, distortion), by increasing bits and decreasing distortion."""
    order = sorted(range(len(layer)), key=lambda j: (layer[j].bits, layer[j].distortion))
    hull: list[int] = []
    for j in order:
        if hull and layer[j].distortion >= layer[hull[-1]].distortion:
            continue  # costs more, not better
        while len(hull) >= 2:
            a, b = layer[hull[-2]], layer[hull[-1]]
            c = layer[j]
            # drop b if it lies on or above the segment a -> c
            if (b.distortion - a.distortion) * (c.bits - a.bits) >= (c.distortion - a.distortion) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _greedy(opts: list[list[Option]], free: float) -> tuple[list[int], float | None]:
    hulls = [_hull(layer) for layer in opts]
    steps = []  # (distortion saved per bit, layer, hull position)
    for i, hull in enumerate(hulls):
        for p in range(1, len(hull)):
            a, b = opts[i][hull[p - 1]], opts[i][hull[p]]
            steps.append(((a.distortion - b.distortion) / max(b.bits - a.bits, 1e-300), i, p))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    pos = [0] * len(opts)
    blocked = [False] * len(opts)
    room, multiplier = free, None
    for rate, i, p in steps:
        if blocked[i] or pos[i] != p - 1:
            continue
        cost = opts[i][hulls[i][p]].bits - opts[i][hulls[i][p - 1]].bits
        if cost <= room:
            room -= cost
            pos[i] = p
            multiplier = rate
        else:
            blocked[i] = True  # later hull points of this layer cost even more
    return [hulls[i][pos[i]] for i in range(len(opts))], multiplier


def _dp(opts: list[list[Option]], cheapest: list[float], free: float, resolution: int) -> list[int]:
    extra = [[o.bits - cheapest[i] for o in layer] for i, layer in enumerate(opts)]
    whole = all(float(e).is_integer() for layer in extra for e in layer)
    if whole and free <= resolution:
        unit, size = 1.0, int(math.floor(free))
    else:
        unit, size = free / resolution if free > 0 else 1.0, resolution if free > 0 else 0
    best = np.zeros(size + 1)  # [size + 1]: least distortion of the layers so far within b units
    picks = np.zeros((len(opts), size + 1), dtype=np.int32)  # [L, size + 1]
    for i, layer in enumerate(opts):
        new = np.full(size + 1, np.inf)
        for j, o in enumerate(layer):
            c = math.ceil(extra[i][j] / unit) if extra[i][j] > 0 else 0
            if c > size:
                continue
            cand = best[: size + 1 - c] + o.distortion  # [size + 1 - c]
            better = cand < new[c:]
            new[c:][better] = cand[better]
            picks[i, c:][better] = j
        best = new
    choices, b = [0] * len(opts), size
    for i in range(len(opts) - 1, -1, -1):
        j = int(picks[i, b])
        choices[i] = j
        b -= math.ceil(extra[i][j] / unit) if extra[i][j] > 0 else 0
    return choices


def allocate_bits(
    layers: Sequence[Sequence[Option | tuple]], budget_bits: float, *, fixed_bits: float = 0.0, method: str = "dp",
    resolution: int = 20_000,
) -> Allocation:
    """Choose one option per layer minimising the total distortion with total size <= `budget_bits`.

    Args:
        layers (`Sequence[Sequence[Option]]`): per layer, its candidate [`Option`]s (or `(bits, distortion)`
            / `(bits, distortion, label)` tuples).
        budget_bits (`float`): the size allowed for the whole file, in bits.
        fixed_bits (`float`, defaults to 0): size that is not allocated here (parameters kept dense
            elsewhere, metadata); counts against the budget.
        method (`str`, defaults to `"dp"`): `"dp"` (discretised dynamic programming) or `"greedy"`
            (Lagrangian hull walk); both end with a single-layer repair pass (see the module docstring).
        resolution (`int`, defaults to 20,000): `"dp"` only: units the free budget is cut into.

    Returns:
        [`Allocation`]: the choices, achieved total bits (<= `budget_bits`) and total distortion.

    Raises:
        `ValueError`: if the budget is below the minimum achievable size (`fixed_bits` + the cheapest option of
            every layer; the message gives both), or for malformed options / settings.
    """
    if method not in ("dp", "greedy"):
        raise ValueError(f"method={method!r} must be 'dp' or 'greedy'.")
    if resolution < 1:
        raise ValueError(f"resolution={resolution} must be >= 1.")
    if not (math.isfinite(budget_bits) and math.isfinite(fixed_bits) and fixed_bits >= 0):
        raise ValueError(f"budget_bits={budget_bits} and fixed_bits={fixed_bits} must be finite, fixed_bits >= 0.")
    opts = _as_options(layers)
    cheapest = [min(o.bits for o in layer) for layer in opts]
    minimum = fixed_bits + math.fsum(cheapest)
    if budget_bits < minimum:
        raise ValueError(f"budget_bits={budget_bits:.6g} is infeasible: the minimum achievable is {minimum:.6g} bits "
                         f"(fixed_bits={fixed_bits:.6g} plus the cheapest option of each of the {len(opts)} layers). "
                         "Raise the budget or offer cheaper options (smaller k, larger d).")
    free = budget_bits - minimum
    start = [min(range(len(layer)), key=lambda j: (layer[j].bits, layer[j].distortion)) for layer in opts]
    multiplier = None
    if method == "dp":
        choices = _dp(opts, cheapest, free, resolution)
    else:
        choices, multiplier = _greedy(opts, free)
    if _totals(opts, choices)[0] > budget_bits - fixed_bits:  # cannot happen; never return an over-budget answer
        choices = start
    choices = _repair(opts, choices, budget_bits - fixed_bits - _totals(opts, choices)[0])
    bits, distortion = _totals(opts, choices)
    return Allocation(choices=choices, labels=[opts[i][c].label for i, c in enumerate(choices)], bits=bits + fixed_bits,
                      distortion=distortion, budget_bits=budget_bits, fixed_bits=fixed_bits, method=method,
                      multiplier=multiplier)
