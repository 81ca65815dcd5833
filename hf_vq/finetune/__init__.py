"""Fine-tuning compressed models: PQF's third step, as a library loop on 🤗 Accelerate.

The codes of a compressed model are uint8 buffers; its codebooks and per-output-channel scales are trainable
parameters, and so are, by default, its norm layers and biases (the paper also trains BatchNorm statistics);
`train_dense` adds what the compressor left dense (stem, heads). Codes can move too (opt-in, `code_update_fraction`:
straight-through targets and bounded re-assignment, `codes.py`). [`finetune`] trains them by distillation from the
dense teacher:

* **logits** (`loss="kl"`, the default when the model has logits): KL divergence between the temperature-softened
  teacher and student distributions, plus the task loss (cross-entropy) when the data has labels;
* **hidden states** (`loss="hidden"`, the default for headless encoders such as MiniLM): MSE or cosine distance
  between the student's and the teacher's mean-pooled embedding, last hidden state, or every layer's output.

Evaluation every `eval_steps` with `early_stopping_patience` stops a run when the held-out loss stops improving and
keeps the best weights. [`finetune_compressed`] (`recipe.py`) is PQF's third step right after compression, on the
calibration source: what `hf-vq compress --finetune-steps N` runs.

The same code runs as a plain Python process, on one or several GPUs, on several nodes, and with DDP or FSDP: the
distribution is chosen by the `accelerate launch` configuration, never by the code. See `scripts/finetune.py`::

    python scripts/finetune.py --model_name_or_path resnet-vq --train_dir data/train --output_dir out
    accelerate launch scripts/finetune.py ...                                   # `accelerate config` decides
    accelerate launch --multi_gpu --num_processes 8 scripts/finetune.py ...     # 8 GPUs, DDP
    accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip HOST --main_process_port 29500 \\
        --multi_gpu --num_processes 16 scripts/finetune.py ...                  # 2 nodes x 8 GPUs
    accelerate launch --use_fsdp --fsdp_sharding_strategy FULL_SHARD ... scripts/finetune.py ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py ...  # 2 CPU processes (gloo)

Distributed details handled here: the codes are identical on every process (code updates re-assign them from the
same all-reduced targets everywhere), so DDP neither broadcasts them at each step nor checks them (they are excluded with DDP's ignore list); trainable parameters that
the loss does not reach (e.g. a pooler under a hidden-state loss) are found with one probe step before wrapping and
frozen, so DDP runs without `find_unused_parameters`; frozen parameters are ignored by DDP's reducer.
"""

from __future__ import annotations

from ..nn import mark_trainable_
from .arguments import CHECKPOINTS_DIR, FinetuneArguments, FinetuneResult
from .codes import disable_code_updates_, enable_code_updates_, reassign_codes_
from .losses import distillation_loss, hidden_state_loss, mean_pool
from .loop import finetune
from .models import default_teacher, load_model
from .output import card_sections
from .recipe import finetune_compressed

__all__ = [
    "FinetuneArguments", "FinetuneResult", "finetune", "load_model", "default_teacher", "mark_trainable_",
    "distillation_loss", "hidden_state_loss", "mean_pool", "card_sections", "CHECKPOINTS_DIR", "finetune_compressed",
    "enable_code_updates_", "disable_code_updates_", "reassign_codes_",
]
