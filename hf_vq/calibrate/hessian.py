"""Second-order statistics of what each layer sees: `H = XᵀX` of its inputs, in the columns of its matrix view.

For a layer whose weight matrix is `W [rows, cols]` (hf_vq's view: linear `[out, in]`, GPT-2's `Conv1D` transposed,
convolutions `[out, in/groups · kh · kw]`), the output error of a compressed `Ŵ` on inputs `X [n, cols]` is
`‖XWᵀ − XŴᵀ‖² = tr(ΔW H ΔWᵀ)` with `H = XᵀX`. [`HessianCollector`] accumulates `H` with forward pre-hooks:

* linear / `Conv1D`: `X` is the input flattened to `[tokens, in]` (padding tokens left out when a token mask is set);
* convolutions: `X` is the unfolded patches `[positions, in/groups · kh · kw]`, one `H` per group (`[G, cols, cols]`;
  depthwise convs: one 9×9 or 25×25 `H` per channel), padded as the conv pads its input (timm's `Conv2dSame` too);
* embeddings: the input is an index, so the statistic is how often each row is read (`[num_embeddings]`), the
  weight of that row's error.

Statistics are float64 sums with their sample counts; they follow an input-channel permutation by indexing
([`permute_hessian`]).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..codec.hessian import with_isotropic

__all__ = ["PRIOR_ROWS", "LayerStatistics", "HessianCollector", "merge_statistics", "permute_hessian"]


#: Isotropic pseudo-rows per column that [`LayerStatistics.objective_hessian`] adds to the calibration rows: a prior
#: on the inputs a layer will see besides those calibration showed it. It matters where the rows are few for the
#: columns: EfficientNet-Lite0's classifier reads one pooled vector per image (256 rows of 1,280 columns, `H` of rank
#: <= 256: the encoder was free to put the error where no calibration crop looks; its diagonal gains 5x the mean
#: input energy), the 1x1 convs reading its 7x7 maps 49 positions per image (12,544 rows of 320 to 1,152 columns:
#: +0.03 to +0.09); MiniLM's linears read every token (~31,000 rows of 384 or 1,536 columns: +0.01 / +0.05).
#: `hf-vq compress --ratio 6` of Lite0 over seeds 0-2: held-out KL 0.052 / 0.069 / 0.084 -> 0.047 / 0.053 / 0.046,
#: mean top-1 agreement 0.810 -> 0.823 (benchmarks/results/experiment_seeds_lite0.md; the values before at commit
#: e4d7fbc); MiniLM at 16x, seed 0: cosine 0.9068 -> 0.9077 (benchmarks/results/experiment_hessian_prior_minilm.md).
PRIOR_ROWS = 1.0


@dataclass
class LayerStatistics:
    """What one layer saw: `hessian` `[cols, cols]` or `[G, cols, cols]` (sum of `xᵀx`) over `count` input rows, or
    for an embedding `row_counts` `[num_embeddings]`."""

    hessian: torch.Tensor | None = None
    row_counts: torch.Tensor | None = None
    count: int = 0

    def mean_hessian(self) -> torch.Tensor:
        """`H / count`: the per-sample second moment (scale-free across calibration sizes)."""
        return self.hessian / max(1, self.count)

    def objective_hessian(self) -> torch.Tensor:
        """The second moment a layer is encoded and measured under: the calibration rows plus [`PRIOR_ROWS`]` · cols`
        isotropic pseudo-rows of their mean energy, `H / count + PRIOR_ROWS · (cols / count) · mean(diag H / count) · I`
        (the mean over all groups). `[cols, cols]` or `[G, cols, cols]`, the dtype of `hessian`."""
        h = self.mean_hessian()  # [cols, cols] or [G, cols, cols]
        return with_isotropic(h, PRIOR_ROWS * h.shape[-1] / max(1, self.count))


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The unfolded input patches of a conv, per group: `[G, positions, in/G · kh · kw]`."""
    if _pads_like_tensorflow(module):
        x = F.pad(x, _tf_same_padding(module, x))
    padding = module.padding
    if isinstance(padding, str):  # "same" / "valid"
        padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size)) if padding == "same" else 0
    if module.padding_mode != "zeros" and any(padding if isinstance(padding, tuple) else (padding,)):
        pads = [p for p in reversed(padding) for _ in range(2)]  # F.pad order: last dim first
        x = F.pad(x, pads, mode=module.padding_mode)
        padding = 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    n, ckk, positions = cols.shape  # [N, C·kh·kw, L], channel-major like the weight's matrix view
    groups = module.groups
    cols = cols.view(n, groups, ckk // groups, positions).permute(1, 0, 3, 2)  # [G, N, L, C/G·kh·kw]
    return cols.reshape(groups, n * positions, ckk // groups)


def _pads_like_tensorflow(module: nn.Conv2d) -> bool:
    """timm's `Conv2dSame` (the `tf_*` models' strided convs): static padding 0, and its forward pads the input
    itself, TensorFlow's "SAME" way (what the patches must reproduce)."""
    return "Conv2dSame" in type(module).__name__


def _tf_same_padding(module: nn.Conv2d, x: torch.Tensor) -> list[int]:
    """`F.pad` amounts `[left, right, top, bottom]` of TensorFlow's "SAME" padding of `x [N, C, H, W]`: the total
    that keeps `ceil(size / stride)` positions, the odd pixel on the right / bottom."""
    pads = []
    for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(module.kernel_size), reversed(module.stride),
                             reversed(module.dilation)):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


class HessianCollector:
    """Accumulates [`LayerStatistics`] of named modules over forward passes (install with [`collecting`]).

    Args:
        modules (`dict[str, nn.Module]`): the layers to watch by name (linear, `Conv1D`, conv, embedding).
        transposed (`set[str]`, *optional*): names of layers whose weight is stored `[in, out]` (GPT-2's `Conv1D`);
            only their bookkeeping differs, the input is flattened the same way.
        max_rows (`int`, *optional*): keep at most this many input rows per batch and layer (a deterministic
            stride), to bound the cost on large convolutions.
    """

    def __init__(self, modules: dict[str, nn.Module], *, max_rows: int | None = None) -> None:
        self.modules = modules
        self.max_rows = max_rows
        self.stats: dict[str, LayerStatistics] = {}
        self.token_mask: torch.Tensor | None = None  # [batch, tokens] bool: rows to keep for sequence inputs
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (input, its H, its rows): reused by readers of the same tensor

    def _rows(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input rows of `module` as `[G, n, cols]` (G = 1 except for grouped convs)."""
        if isinstance(module, nn.Conv2d):
            return _conv_patches(module, x)
        if self.token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.token_mask.shape):
            x = x[self.token_mask.to(x.device)]  # [kept tokens, in]
        return x.reshape(1, -1, x.shape[-1])

    def _hook(self, name: str, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            return
        stat = self.stats.setdefault(name, LayerStatistics())
        if isinstance(module, nn.Embedding):
            ids = x if self.token_mask is None or tuple(x.shape) != tuple(self.token_mask.shape) else x[self.token_mask]
            counts = torch.bincount(ids.reshape(-1).cpu(), minlength=module.num_embeddings).double()
            stat.row_counts = counts if stat.row_counts is None else stat.row_counts + counts
            stat.count += int(ids.numel())
            return
        if not x.is_floating_point():
            return
        if not isinstance(module, nn.Conv2d) and self._last is not None and self._last[0] is x:
            _, h, n = self._last  # the input of the layer before (attention's q, k, v; gate and up): the same H
        else:
            rows = self._rows(name, module, x.detach()).double()  # [G, n, cols]
            if self.max_rows is not None and rows.shape[1] > self.max_rows:
                rows = rows[:, :: -(-rows.shape[1] // self.max_rows)]
            h, n = rows.transpose(1, 2) @ rows, int(rows.shape[1])  # [G, cols, cols]
            self._last = None if isinstance(module, nn.Conv2d) else (x, h, n)
        stat.hessian = h if stat.hessian is None else stat.hessian + h
        stat.count += n

    @contextmanager
    def collecting(self) -> Iterator["HessianCollector"]:
        """Hooks installed inside the block, removed after (also on errors)."""
        handles = [module.register_forward_pre_hook(lambda m, i, n=name: self._hook(n, m, i))
                   for name, module in self.modules.items()]
        try:
            yield self
        finally:
            self._last = None
            for handle in handles:
                handle.remove()

    def take(self) -> dict[str, LayerStatistics]:
        """The statistics gathered since the last `take` (one batch's contribution), as raw sums; the collector starts
        empty again. Fold them into a running total with [`merge_statistics`] (in batch order, as one process would)."""
        taken, self.stats, self._last = self.stats, {}, None
        return taken

    def result(self, stats: dict[str, LayerStatistics] | None = None) -> dict[str, LayerStatistics]:
        """The statistics per layer (this collector's, or `stats` summed from its [`take`]s by [`merge_statistics`]);
        a conv's `H` is `[G, cols, cols]`, any other layer's `[cols, cols]`."""
        out = {}
        for name, stat in (self.stats if stats is None else stats).items():
            if stat.hessian is not None and stat.hessian.shape[0] == 1:
                stat = LayerStatistics(hessian=stat.hessian[0], count=stat.count)
            out[name] = stat
        return out


def merge_statistics(total: dict[str, LayerStatistics], part: dict[str, LayerStatistics]) -> None:
    """Add `part` (a [`HessianCollector.take`] of one batch) into `total`, in place: the same float64 additions, in the
    same order, as a collector that saw the batches one after the other."""
    for name, stat in part.items():
        into = total.setdefault(name, LayerStatistics())
        if stat.hessian is not None:
            into.hessian = stat.hessian if into.hessian is None else into.hessian + stat.hessian
        if stat.row_counts is not None:
            into.row_counts = stat.row_counts if into.row_counts is None else into.row_counts + stat.row_counts
        into.count += stat.count


def permute_hessian(hessian: torch.Tensor, index: torch.Tensor, taps: int = 1) -> torch.Tensor:
    """`H` after the input channels were reordered by `index` (`new[c] = old[index[c]]`).

    Args:
        hessian (`torch.Tensor`): `[cols, cols]` or `[G, cols, cols]`, columns channel-major with `taps` entries per
            channel (a conv's `kh · kw`).
        index (`torch.Tensor`): `[channels]` long.
        taps (`int`, defaults to 1): columns per input channel.
    """
    cols = (index.to(hessian.device)[:, None] * taps + torch.arange(taps, device=hessian.device)).reshape(-1)
    return hessian.index_select(-1, cols).index_select(-2, cols)
