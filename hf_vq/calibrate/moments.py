"""Statistics of the inputs each layer sees on calibration data: second moments per input channel.

Statistics are indexed by input channel, so they follow a channel permutation by indexing (no second forward
pass): see [`permute_moments`].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batches import calibration_batches, to_device

__all__ = ["input_moments", "entry_moments", "permute_moments"]


def _each_batch(n: int, measure: Callable[[int], Any], merge: Callable[[Any], None]) -> None:
    for i in range(n):
        merge(measure(i))


@torch.no_grad()
def input_moments(model: nn.Module, names: list[str], calibration: Any, *,
                  reduce_batches: Callable[[int, Callable, Callable], None] | None = None) -> dict[str, torch.Tensor]:
    """Second moment `E[x_c^2]` of every input channel of the named modules, over calibration batches.

    Args:
        model (`nn.Module`): the dense model (run in eval mode, restored afterwards).
        names (`list[str]`): modules whose inputs to measure (linear: last dim; conv: dim 1; GPT-2's
            `Conv1D`: last dim).
        calibration: one batch (a tensor or a dict of model inputs, e.g. a tokenizer's output) or a list
            of batches; tensors are moved to the model's device.
        reduce_batches (`Callable`, *optional*): `reduce_batches(n, measure, merge)` runs `measure(i)` for batches
            and calls `merge` with every batch's result in batch order; by default all batches here, one after the
            other ([`hf_vq.pipeline.parallel.Workers.reduce_batches`] splits them between processes).

    Returns:
        `dict[str, torch.Tensor]`: float64 `[in_channels]` per module that saw an input.
    """
    batches = calibration_batches(calibration)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modules = dict(model.named_modules(remove_duplicate=False))
    part: dict[str, tuple[torch.Tensor, int]] = {}  # one batch's sums of squares and rows
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return
        channel_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
        x = x.detach().double().movedim(channel_dim, -1)  # [..., C]
        flat = x.reshape(-1, x.shape[-1])  # [n, C]
        seen, rows = part.get(name, (0, 0))
        part[name] = (seen + flat.pow(2).sum(0), rows + flat.shape[0])  # [C]

    def measure(i: int) -> dict[str, tuple[torch.Tensor, int]]:
        args, kwargs = batches[i]
        part.clear()
        model(*[to_device(a, device) for a in args], **{k: to_device(v, device) for k, v in kwargs.items()})
        return dict(part)

    def merge(batch: dict[str, tuple[torch.Tensor, int]]) -> None:
        for name, (total, rows) in batch.items():
            sums[name] = sums.get(name, 0) + total.to(device)
            counts[name] = counts.get(name, 0) + rows

    handles = [modules[n].register_forward_pre_hook(lambda m, i, n=n: hook(n, m, i)) for n in names if n in modules]
    was_training = model.training
    model.eval()
    try:
        (reduce_batches or _each_batch)(len(batches), measure, merge)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: total / counts[name] for name, total in sums.items()}


def entry_moments(weight: torch.Tensor, kind: str, second: torch.Tensor | None) -> torch.Tensor | None:
    """`E[x_c^2]` of the input channel every entry of `weight` multiplies, in the weight's own layout.

    `second` `[in_channels]` comes from [`input_moments`]; linear weights are `[out, in]`, GPT-2's `Conv1D`
    `[in, out]`, convolutions `[out, in/groups, *kernel]` (groups inferred from `second`). None for
    embeddings (their input is an index) or when `second` does not fit the weight.
    """
    if second is None or kind == "embedding":
        return None
    second = second.to(weight.device)  # [in_channels]
    if kind == "conv1d":
        return second[:, None].expand(weight.shape) if second.numel() == weight.shape[0] else None
    if weight.dim() == 2:
        return second.expand(weight.shape) if second.numel() == weight.shape[1] else None
    out, per_group = weight.shape[:2]
    groups = second.numel() // per_group
    if groups * per_group != second.numel() or out % groups:
        return None
    group = torch.arange(out, device=weight.device) // (out // groups)  # [out]
    channel = group[:, None] * per_group + torch.arange(per_group, device=weight.device)  # [out, in/groups]
    return second[channel].reshape(out, per_group, *[1] * (weight.dim() - 2)).expand(weight.shape)


def permute_moments(second: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The second moments `[in_channels]` of a layer after its input channels are reordered by `index`
    (`new[c] = old[index[c]]`, the same index the weight's columns were permuted with)."""
    return second.index_select(0, index.to(second.device))
