"""Stages of block-sequential compression: the model's repeated blocks, in execution order, and what runs around them.

A *stage* is a set of layers compressed together after the layers of every earlier stage: the layers that run
before the first block (embeddings, stem), then each block (a transformer layer, a timm stage), then the layers
after (pooler, head). Each stage's statistics are measured on the inputs it receives from the already-compressed
stages before it ([`run_until`] stops the forward pass once the stage has run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibrate import to_device

__all__ = ["Stage", "find_blocks", "half_of", "plan_stages", "run_until", "StageDone"]


@dataclass
class Stage:
    """Layers compressed together. `block` names the block module (None for the layers around the blocks); `last`
    is the module whose forward ends the stage (the block, or its last-running layer)."""

    name: str
    layers: list[str]
    block: str | None = None
    last: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class StageDone(Exception):
    """Raised by a hook to stop a forward pass once the stage being measured has run."""


def _weights(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks, in order: the children of the `nn.ModuleList` / `nn.Sequential` with
    at least two children that holds the most parameters (BERT's `encoder.layer`, Llama's `model.layers`, timm's
    `blocks` or `stages`). Empty when the model has no such container."""
    best, best_weight = None, 0
    total = max(1, _weights(model))
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module.children())
        weight = sum(_weights(c) for c in children)
        if sum(_weights(c) > 0 for c in children) >= 2 and weight > best_weight and weight >= 0.25 * total:
            best, best_weight = name, weight
    if best is None:
        return []
    prefix = f"{best}." if best else ""
    return [f"{prefix}{child}" for child, module in model.get_submodule(best).named_children() if _weights(module)]


def _execution_order(model: nn.Module, names: list[str], batch: tuple[tuple, dict]) -> list[str]:
    """`names` in the order their forward first runs on `batch`."""
    seen: list[str] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, i, n=n: seen.append(n) if n not in seen else None)
               for n in names]
    try:
        with torch.no_grad():
            args, kwargs = batch
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen + [n for n in names if n not in seen]


def plan_stages(model: nn.Module, layers: list[str], batch: tuple[tuple, dict]) -> list[Stage]:
    """Group the layers to compress into stages: before the blocks, one per block, after the blocks.

    Args:
        model (`nn.Module`): the model (dense or partly compressed).
        layers (`list[str]`): names of the layers to compress.
        batch (`tuple`): one calibration batch `(args, kwargs)` on the model's device, to find the execution order.
    """
    blocks = find_blocks(model)
    order = _execution_order(model, list(dict.fromkeys(layers + blocks)), batch)
    position = {name: i for i, name in enumerate(order)}
    inside = {layer: next((b for b in blocks if layer.startswith(b + ".")), None) for layer in layers}
    first_block = min((position[b] for b in blocks), default=len(order))
    before = [n for n in layers if inside[n] is None and position[n] < first_block]
    after = [n for n in layers if inside[n] is None and position[n] >= first_block]
    stages = []
    if before:
        stages.append(Stage("before the blocks", sorted(before, key=position.get),
                            last=max(before, key=position.get)))
    for block in sorted(blocks, key=position.get):
        members = sorted([n for n in layers if inside[n] == block], key=position.get)
        if members:
            stages.append(Stage(block, members, block=block, last=block))
    if after:
        stages.append(Stage("after the blocks", sorted(after, key=position.get), last=max(after, key=position.get)))
    return stages


@contextmanager
def run_until(model: nn.Module, last: str | None) -> Iterator[None]:
    """Inside the block, a forward pass of `model` raises [`StageDone`] right after module `last` has run."""
    if last is None:
        yield
        return

    def stop(module: nn.Module, inputs: Any, output: Any) -> None:
        raise StageDone

    handle = model.get_submodule(last).register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def forward_batches(model: nn.Module, batches: list[tuple[tuple, dict]], *, last: str | None = None,
                    on_batch: Any = None) -> None:
    """Run `model` over `batches` (no grad, eval mode), each pass stopped after module `last`; `on_batch(kwargs)` is
    called before each batch (e.g. to set a token mask)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), run_until(model, last):
            for args, kwargs in batches:
                if on_batch is not None:
                    on_batch(kwargs)
                try:
                    model(*[to_device(a, device) for a in args], **{k: to_device(v, device) for k, v in kwargs.items()})
                except StageDone:
                    pass
    finally:
        model.train(was_training)


def half_of(i: int, n: int) -> int:
    """Which half of `n` calibration batches batch `i` is in (0: the first, 1: the second). The halves are contiguous:
    image batches hold one photo's crops each ([`hf_vq.data.photo_batches`]), so each half holds other photos."""
    return int(2 * i >= n)
