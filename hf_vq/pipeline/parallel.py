"""Compression spread over processes (`accelerate launch`): who does which share, and how the shares meet.

Every process holds the whole (or, streaming, the same block of the) model and the same calibration batches. Work is
split three ways, and none of them changes a result (the checkpoint is the same bit for bit from 1 and from N
processes with the same number of threads per process, see `tests/test_parallel.py`):

* **calibration batches**: batch `i` runs on process `i mod N` ([`Workers.reduce_batches`]); each batch's statistics
  (`XᵀX`, row counts) are exchanged and every process adds them up *in batch order*, exactly the sum one process
  makes. Communication per batch is the statistics of the layers measured (one stage at a time).
* **layers** (their menu of options for bit allocation, their sensitivity, their encoding): split by estimated cost
  ([`split_by_cost`], a deterministic greedy on [`layer_cost`]), encoded where they fall, and the codes, codebooks
  and scales exchanged ([`Workers.exchange`]) so that every process installs every layer.
* **permutation spaces**: searched where they fall ([`hf_vq.pipeline.permute_`]), results exchanged.

What stays on one process: block-wise tuning (sequential optimizer steps: the main process tunes, the others receive
the tuned parameters) and everything the CLI does after compression (fidelity, saving, the card).

Processes meet through `torch.distributed` (gloo on CPU, NCCL on GPUs), which `accelerate launch` sets up when an
`accelerate.PartialState` / `Accelerator` is created; objects travel pickled between the processes of one job (never
from a file or a download).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Workers", "layer_cost", "split_by_cost"]

T = TypeVar("T")


class Workers:
    """The processes compressing one model together, and the time each phase took on this one.

    Args:
        index (`int`, defaults to 0): this process's rank.
        count (`int`, defaults to 1): the number of processes; above 1, `torch.distributed` must be initialised
            (`accelerate.PartialState()` does it under `accelerate launch`).

    Raises:
        `ValueError`: for an index outside `[0, count)`, or several processes without a process group.
    """

    def __init__(self, index: int = 0, count: int = 1) -> None:
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"Workers(index={index}, count={count}): the index must lie in [0, count) and count >= 1.")
        if count > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"Workers(count={count}) needs torch.distributed initialised: run under `accelerate "
                             "launch` and create `accelerate.PartialState()` (or an Accelerator) first.")
        self.index, self.count = index, count
        self.seconds: dict[str, float] = defaultdict(float)  # phase -> seconds spent on this process
        self._running: list[tuple[str, float]] = []  # nested phases and when each (re)started

    @classmethod
    def of(cls, accelerator: Any = None) -> "Workers":
        """The workers of an `accelerate` state (anything with `process_index` / `num_processes`), or one process."""
        if accelerator is None:
            return cls()
        if isinstance(accelerator, Workers):
            return accelerator
        return cls(int(accelerator.process_index), int(accelerator.num_processes))

    # accelerate's names, so that a Workers passes where an accelerate state is expected
    @property
    def process_index(self) -> int:
        return self.index

    @property
    def num_processes(self) -> int:
        return self.count

    @property
    def is_main(self) -> bool:
        """Whether this process reports, saves and shows progress."""
        return self.index == 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to `self.seconds[name]`, less the time of phases nested in it (an exchange
        inside encoding counts as exchange): the phases add up to the wall time."""
        now = time.perf_counter()
        if self._running:  # pause the enclosing phase
            outer, since = self._running[-1]
            self.seconds[outer] += now - since
        self._running.append((name, now))
        try:
            yield
        finally:
            now = time.perf_counter()
            _, since = self._running.pop()
            self.seconds[name] += now - since
            if self._running:  # resume the enclosing phase
                self._running[-1] = (self._running[-1][0], now)

    def share(self, costs: Sequence[float]) -> list[int]:
        """Indices of the items this process takes, in their order (see [`split_by_cost`])."""
        return [i for i, p in enumerate(split_by_cost(costs, self.count)) if p == self.index]

    def exchange(self, mine: dict[Any, T]) -> dict[Any, T]:
        """Every process's results merged (keys are unique across processes); one process returns `mine` as is."""
        if self.count == 1:
            return mine
        gathered: list[dict | None] = [None] * self.count
        with self.phase("exchange"):
            dist.all_gather_object(gathered, _to_cpu(mine))
        merged: dict[Any, T] = {}
        for part in gathered:
            merged.update(part or {})
        return merged

    def broadcast(self, value: T, src: int = 0) -> T:
        """`value` of process `src`, on every process."""
        if self.count == 1:
            return value
        box = [_to_cpu(value) if self.index == src else None]
        with self.phase("exchange"):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def batch_indices(self, n: int) -> list[int]:
        """The calibration batches this process runs: `i ≡ index (mod count)`."""
        return list(range(self.index, n, self.count))

    def reduce_batches(self, n: int, measure: Callable[[int], T], merge: Callable[[T], None]) -> None:
        """Run `measure(i)` for this process's batches and call `merge` on every process with every batch's result,
        in batch order `0..n-1` (what one process running all the batches would do)."""
        if self.count == 1:
            for i in range(n):
                merge(measure(i))
            return
        for start in range(0, n, self.count):
            i = start + self.index
            part = measure(i) if i < n else None
            gathered: list[Any] = [None] * self.count
            with self.phase("exchange"):
                dist.all_gather_object(gathered, _to_cpu(part))
            for part in gathered[: n - start]:
                merge(part)

    def close(self) -> None:
        """Wait for every process, then take the process group down: call it on every process when the job is done
        (a process that exits while the group's threads still run can abort in C++, `terminate called without an
        active exception`, and fail the launch)."""
        if self.count > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def split_by_cost(costs: Sequence[float], count: int) -> list[int]:
    """The process of each item: the costliest first, each to the least loaded of `count` processes (lowest rank on
    ties). A pure function of `costs` and `count`, so every process computes the same split."""
    load = [0.0] * count
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        p = min(range(count), key=lambda q: (load[q], q))
        owner[i] = p
        load[p] += float(costs[i])
    return owner


def layer_cost(rows: int, cols: int, k: int, *, output_aware: bool = True) -> float:
    """The relative cost of encoding a `[rows, cols]` matrix with `k` codewords: k-means's assignments
    (`rows · cols · k`), plus for the output-aware encoder GPTQ's error feedback and the refits (`rows · cols²`): there
    a layer with 4x the columns costs ~10x more (MiniLM's MLP output layer), which `rows x cols` would call equal."""
    return float(rows) * cols * (k + cols if output_aware else k)


def _to_cpu(value: Any) -> Any:
    """Tensors moved to the CPU (gloo and pickling need them there), containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_to_cpu(v) for v in value)
    return value
