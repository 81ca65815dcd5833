"""`accelerate launch` for compression: the processes of a launch as [`hf_vq.pipeline.parallel.Workers`].

```bash
accelerate launch --num_processes 8 -m hf_vq.cli compress MODEL --out OUT            # 8 GPUs
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m hf_vq.cli compress MODEL --out OUT
```

Each process runs its share of the calibration batches, permutation spaces and layers, on its own device
(`PartialState().device`: `cuda:<local rank>` on GPUs); the main process evaluates and writes the folder. The
checkpoint is the same as one process writes (see [`hf_vq.pipeline.parallel`]).
"""

from __future__ import annotations

import os

import torch

from ..pipeline.parallel import Workers

__all__ = ["launched_workers"]


def launched_workers() -> tuple[Workers, torch.device | None]:
    """The processes of this launch and this process's accelerator device (None on CPUs), or `(Workers(), None)`
    when this process was not started as one of several (no `WORLD_SIZE` above 1 in the environment)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Workers(), None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # what Accelerator() does: `accelerate launch --cpu` / ACCELERATE_USE_CPU=1, or no GPU, means processes on CPUs
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)  # initialises torch.distributed (gloo on CPU, NCCL on GPUs)
    return Workers.of(state), (None if state.device.type == "cpu" else state.device)
