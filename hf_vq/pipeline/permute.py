"""PQF's first step on a model: search a permutation per channel space and apply it in place.

Channel spaces come from [`hf_vq.graph.find_channel_spaces`]; the search ([`hf_vq.codec.permutation`]) runs per
open space on the matrices that will be quantized, and the permutations are applied in place. The function is
unchanged (up to float rounding of reordered sums).

The objective is the paper's (log-det of the children's weight-subvector covariance) unless calibration
statistics are given: then each child's weight columns are first scaled by the RMS of the input channel they
multiply ([`hf_vq.calibrate.input_moments`]), so the search groups subvectors by how they act on real inputs.
The statistics follow the permutation by indexing ([`PermutationReport.input_index`]): no second forward pass.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibrate import entry_moments, input_moments
from ..codec.permutation import ObjectiveTerm, apply_index, search_permutation
from ..config import LayerLayout, VQConfig
from ..graph import ChannelSpace, find_channel_spaces
from .parallel import Workers

__all__ = ["permute_", "shard_groups", "PermutationReport", "SpaceReport"]

logger = logging.getLogger(__name__)


# ================================================================================================ report
@dataclass
class SpaceReport:
    """One channel space: who writes it, who reads it, and what the search did.

    Attributes:
        name (`str`): a short name (the first parent).
        size (`int`): channels permuted (`P`); `repeats` copies share the permutation (attention heads).
        repeats (`int`): how many times the permutation is repeated along the parents' dimension.
        parents / children / followers (`list[str]`): module or parameter names.
        status (`str`): `"permuted"`, `"unchanged"` (no permutation beat the identity), `"nothing to optimise"`
            (no quantized child whose subvectors span several channels) or `"refused"`.
        reasons (`list[str]`): why a space was refused (left in its original order).
        objective_identity / objective_greedy / objective (`float`, *optional*): the search's log-det objective.
        steps / accepted (`int`), seconds (`float`): search effort.
    """

    name: str
    size: int
    repeats: int
    parents: list[str]
    children: list[str]
    followers: list[str]
    status: str = "nothing to optimise"
    reasons: list[str] = field(default_factory=list)
    terms: int = 0
    objective_identity: float | None = None
    objective_greedy: float | None = None
    objective: float | None = None
    steps: int = 0
    accepted: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PermutationReport:
    """What [`permute_`] found and did: every channel space, permuted or refused, with reasons.

    `str(report)` is a readable summary (printed by `hf-vq compress`); `to_dict()` is JSON-ready.
    """

    spaces: list[SpaceReport] = field(default_factory=list)
    traced: bool = False
    reason: str | None = None
    device: str = "cpu"
    iters: int = 0
    seconds: float = 0.0
    objective: str = "weights"
    #: module name -> index of its input channels after the permutation (`new[c] = old[index[c]]`), for the
    #: modules whose inputs were reordered; statistics measured before the permutation follow it by indexing.
    input_index: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def permuted(self) -> list[SpaceReport]:
        return [s for s in self.spaces if s.status == "permuted"]

    @property
    def refused(self) -> list[SpaceReport]:
        return [s for s in self.spaces if s.status == "refused"]

    def to_dict(self) -> dict[str, Any]:
        return {"traced": self.traced, "reason": self.reason, "device": self.device, "iters": self.iters,
                "objective": self.objective,
                "seconds": round(self.seconds, 3), "spaces": [s.to_dict() for s in self.spaces]}

    def summary(self) -> dict[str, Any]:
        """The few figures a model card and `hf-vq info` show (what [`hf_vq.CompressionRecord`] keeps)."""
        return {"traced": self.traced, "reason": self.reason, "spaces": len(self.spaces),
                "permuted": len(self.permuted), "refused": len(self.refused), "objective": self.objective,
                "iters": self.iters}

    def __str__(self) -> str:
        if not self.traced:
            return f"permutation: skipped ({self.reason})"
        lines = [f"permutation: {len(self.spaces)} channel spaces, {len(self.permuted)} permuted, "
                 f"{len(self.refused)} refused ({self.seconds:.1f} s on {self.device}, <= {self.iters} steps per space, "
                 f"{self.objective} objective)"]
        searched = [s for s in self.spaces if s.objective is not None]
        if searched:
            lines.append(f"  {'space':<44} {'P':>6} {'terms':>5} {'logdet before':>14} {'greedy':>10} {'after':>10} {'swaps':>6}")
            for s in searched:
                size = f"{s.size}" + (f"x{s.repeats}" if s.repeats > 1 else "")
                lines.append(f"  {_short(s.name, 44):<44} {size:>6} {s.terms:>5} {s.objective_identity:>14.4f} "
                             f"{s.objective_greedy:>10.4f} {s.objective:>10.4f} {s.accepted:>6}")
                lines.append(f"      parents: {_names(s.parents)}; children: {_names(s.children)}")
        quiet = [s for s in self.spaces if s.status == "nothing to optimise"]
        if quiet:
            lines.append(f"  nothing to optimise (no quantized reader whose subvectors span channels): "
                         f"{_names([s.name for s in quiet], 6)}")
        for s in self.refused:
            lines.append(f"  refused {_short(s.name, 40)} (P={s.size}, children: {_names(s.children, 3)}): "
                         f"{'; '.join(s.reasons[:2])}")
        return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _names(names: list[str], limit: int = 4) -> str:
    if not names:
        return "-"
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", … (+{len(names) - limit})"



def _objective_terms(space: ChannelSpace, tensors: dict[str, torch.Tensor], layouts: dict[str, LayerLayout],
                     owners: dict[int, str], moments: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[list[ObjectiveTerm], list[str]]:
    """The matrices of `space` that will be quantized with subvectors spanning several channels.

    With `moments` (module -> `E[x_c^2]` of its input channels, see [`input_moments`]) each matrix column is
    scaled by the RMS of the input channel it multiplies, so the objective measures the subvectors as they
    act on the data (`‖ΔW x‖` rather than `‖ΔW‖`).
    """
    terms, seen, notes = [], set(), []
    P = space.size
    for ref in space.refs:
        ten = tensors[ref.fqn]
        module = owners.get(id(ten))
        if module is None or not ref.fqn.endswith("weight") or (id(ten), ref.dim) in seen:
            continue
        layout = layouts[module]
        seen.add((id(ten), ref.dim))
        w = ten.detach()
        if layout.kind == "conv1d":
            if ref.dim != 0:
                continue
            mat, pre, stride = w.t(), 1, 1  # [out, in]
        else:
            if ref.dim == 0:
                continue  # rows: permuting them leaves the set of subvectors unchanged
            mat = w.reshape(w.shape[0], -1)
            pre, stride = math.prod(w.shape[1:ref.dim]), math.prod(w.shape[ref.dim + 1:])
        g = ref.inner * stride
        reps = w.shape[ref.dim] // (P * ref.inner)
        d = layout.d
        entry = entry_moments(ten, layout.kind, moments.get(module)) if moments else None  # like the weight
        if entry is not None:
            entry = entry.t() if layout.kind == "conv1d" else entry.reshape(mat.shape)  # like mat
            mat = mat.float() * entry.to(mat.device, torch.float32).clamp_min(0).sqrt()  # columns x input RMS
        if d % g == 0 and d // g >= 2 and P % (d // g) == 0:
            x = mat.reshape(mat.shape[0] * pre * reps, P, g)  # [N, P, g]
            terms.append(ObjectiveTerm(x.float(), d // g))
        elif not (g % d == 0 or d == g):
            notes.append(f"{module}: subvectors of {d} do not align with channels of {g} columns")
    return terms, notes



def shard_groups(n_groups: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """The groups one process searches when the search is spread over `num_processes` (round robin)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes}).")
    return list(range(process_index, n_groups, num_processes))


@torch.no_grad()
def permute_(
    model: nn.Module,
    config: VQConfig | None = None,
    *,
    example_inputs: Any = None,
    layouts: dict[str, LayerLayout] | None = None,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    calibration: Any = None,
    moments: dict[str, torch.Tensor] | None = None,
) -> PermutationReport:
    """PQF's permutation step: permute coupled channels of `model` in place so that it quantizes better.

    The function of the model is unchanged. Channel spaces are found by tracing ([`hf_vq.graph`]); each open
    space whose quantized readers have subvectors spanning several channels gets a greedy start plus a
    stochastic local search on the log-determinant objective, and the permutation is kept only if it lowers the
    objective. With `calibration` data (or its `moments`) the objective is activation-aware: each child's weight
    columns are scaled by the RMS of the input channel they multiply, so subvectors are grouped by how they act
    on real inputs; without it, the paper's weight-only objective is used. Spaces are independent and can be
    spread over processes: pass an `accelerate.Accelerator` (or `PartialState`) and each process searches its
    share (see [`shard_groups`]); results are gathered and every process applies all of them.

    Args:
        model (`nn.Module`): a dense model (weights materialised).
        config (`VQConfig`, *optional*): block sizes (which layers are quantized, with which `d`),
            `permute_iters` (search steps per space) and `seed`. Defaults to `VQConfig()`.
        example_inputs (*optional*): inputs to trace with (a tensor, tuple, dict or `(args, kwargs)`); by
            default [`hf_vq.graph.default_example_inputs`]. Outputs of this call keep their order exactly.
        layouts (`dict[str, LayerLayout]`, *optional*): the quantization plan; by default `hf_vq.plan(model, config)`.
        device (`torch.device` or `str`, *optional*): where the search runs; CUDA when available by default.
        accelerator (*optional*): an `accelerate` state (`PartialState`, `Accelerator`) or a
            [`hf_vq.pipeline.parallel.Workers`] to spread the search over processes (`torch.distributed` initialised).
        calibration (*optional*): real inputs for the activation-aware objective: one batch (a tensor or a dict
            of model inputs) or a list of batches (see [`hf_vq.calibrate.input_moments`]). Use data disjoint
            from any evaluation set.
        moments (`dict[str, torch.Tensor]`, *optional*): the second moments of the quantized modules' inputs,
            already measured on calibration data (module -> `[in_channels]`); used instead of `calibration`.

    Returns:
        [`PermutationReport`]: the spaces found, refused (with reasons) and permuted (objective before / after),
        and the index each reordered module's input channels follow (`input_index`). When the model cannot be
        traced the report says why and nothing is changed.

    Example:
        ```python
        >>> import timm, hf_vq
        >>> model = timm.create_model("resnet18")
        >>> report = hf_vq.permute_(model, hf_vq.VQConfig(permute_iters=200))
        >>> print(report)  # doctest: +SKIP
        ```
    """
    from .select import plan

    start = time.perf_counter()
    config = VQConfig() if config is None else config
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aware = calibration is not None or moments is not None
    report = PermutationReport(device=str(dev), iters=config.permute_iters,
                               objective="activation-aware" if aware else "weights")
    try:
        spaces = find_channel_spaces(model, example_inputs)
    except (ValueError, RuntimeError, TypeError) as err:
        report.reason = str(err)
        report.seconds = time.perf_counter() - start
        logger.info("hf_vq: channels not permuted: %s", err)
        return report
    report.traced = True
    layouts = plan(model, config) if layouts is None else layouts
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    owners = _weight_owners(model, layouts)
    if moments is None and calibration is not None:
        moments = input_moments(model, sorted(set(owners.values())), calibration)
    work = _describe_spaces(report, spaces, tensors, layouts, owners, moments)
    results = _search_all(work, config, dev, accelerator)
    for i, (perm, before, greedy, after, steps, accepted, seconds) in sorted(results.items()):
        entry, space = report.spaces[i], spaces[i]
        entry.objective_identity, entry.objective_greedy, entry.objective = before, greedy, after
        entry.steps, entry.accepted, entry.seconds = steps, accepted, seconds
        perm = torch.tensor(perm, dtype=torch.long)
        if after < before and not torch.equal(perm, torch.arange(space.size)):
            _apply(space, perm, tensors, owners, report.input_index)
            entry.status = "permuted"
        else:
            entry.status = "unchanged"
    report.seconds = time.perf_counter() - start
    logger.info("hf_vq: %s", report)
    return report


def _weight_owners(model: nn.Module, layouts: dict[str, LayerLayout]) -> dict[int, str]:
    """id(weight) -> the (first, untied) module of the plan holding it."""
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[int, str] = {}
    for name, layout in layouts.items():
        w = modules[name]._parameters.get("weight") if name in modules else None
        if w is not None and layout.tied_to is None:
            owners.setdefault(id(w), name)
    return owners


def _describe_spaces(report: PermutationReport, spaces: list[ChannelSpace], tensors: dict[str, torch.Tensor],
                     layouts: dict[str, LayerLayout], owners: dict[int, str],
                     moments: dict[str, torch.Tensor] | None) -> list[tuple[int, list[ObjectiveTerm]]]:
    """Add a [`SpaceReport`] per space to `report`; return the spaces to search with their objective terms."""
    work: list[tuple[int, list[ObjectiveTerm]]] = []
    for i, space in enumerate(spaces):
        sample = next(r for r in space.refs if r.role == "parent")
        entry = SpaceReport(name=space.names("parent")[0] if space.names("parent") else space.origin,
                            size=space.size, repeats=tensors[sample.fqn].shape[sample.dim] // (space.size * sample.inner),
                            parents=space.names("parent"), children=space.names("child"),
                            followers=space.names("follower"))
        report.spaces.append(entry)
        if not space.open:
            entry.status, entry.reasons = "refused", space.reasons
            continue
        terms, notes = _objective_terms(space, tensors, layouts, owners, moments)
        entry.reasons = notes
        entry.terms = len(terms)
        if terms and space.size > 1:
            work.append((i, terms))
    return work


def _search_all(work: list[tuple[int, list[ObjectiveTerm]]], config: VQConfig, device: torch.device,
                accelerator: Any) -> dict[int, tuple]:
    """Search every space of `work` (this process's share when `accelerator` spreads them; results gathered).

    Returns space index -> (permutation as a list, objective before, greedy, after, steps, accepted, seconds)."""
    workers = Workers.of(accelerator)
    mine = {}
    for j in shard_groups(len(work), workers.index, workers.count):
        i, terms = work[j]
        r = search_permutation(terms, iters=config.permute_iters, seed=config.seed + i, device=device)
        mine[i] = (r.perm.tolist(), r.objective_identity, r.objective_greedy, r.objective, r.steps, r.accepted,
                   r.seconds)
    return workers.exchange(mine)


def _apply(space: ChannelSpace, perm: torch.Tensor, tensors: dict[str, torch.Tensor], owners: dict[int, str],
           input_index: dict[str, torch.Tensor]) -> None:
    """Permute every parameter of `space` along its dimension, in place (tied tensors once), and record the new
    input-channel order of the quantized modules that read the space (`input_index`)."""
    done = set()
    for ref in space.refs:
        ten = tensors[ref.fqn]
        key = (id(ten), ref.dim, ref.inner)
        if key in done:
            continue
        done.add(key)
        idx = apply_index(ten.shape[ref.dim], perm, ref.inner).to(ten.device)
        ten.data.copy_(ten.data.index_select(ref.dim, idx))
        module = owners.get(id(ten))
        depthwise = ref.role == "follower" and ref.dim == 0 and ten.dim() == 4 and ten.shape[1] == 1
        if module is not None and ref.fqn.endswith("weight") and (ref.role == "child" or depthwise):
            old = input_index.get(module)
            input_index[module] = idx.cpu() if old is None else old[idx.cpu()]
