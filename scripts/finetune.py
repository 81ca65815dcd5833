#!/usr/bin/env python
"""Fine-tune a compressed model (PQF's third step): codebooks and scales train (codes too with
--code_update_fraction), the dense model teaches.

A thin command line over [`hf_vq.finetune.finetune`]; its flags follow the Hugging Face `*_no_trainer.py` examples.
It runs unchanged as a plain process and under `accelerate launch`, which decides the distribution:

    # one process (CPU, or the GPU if there is one)
    python scripts/finetune.py --model_name_or_path resnet18-vq --teacher_name_or_path resnet18-dense \\
        --train_dir data/train --validation_dir data/val --output_dir resnet18-vq-ft --num_train_epochs 3

    # whatever `accelerate config` saved (GPUs, nodes, DDP or FSDP, mixed precision)
    accelerate launch scripts/finetune.py --model_name_or_path ... --output_dir ...

    # explicitly: 8 GPUs with DDP and bf16; 2 nodes x 8 GPUs; FSDP; two CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 scripts/finetune.py ...
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $RANK \\
        --main_process_ip $MASTER --main_process_port 29500 scripts/finetune.py ...
    accelerate launch --use_fsdp --num_processes 8 --fsdp_sharding_strategy FULL_SHARD scripts/finetune.py ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py ...

(`accelerate launch --cpu` alone starts ONE process.) Resume an interrupted run with
`--resume_from_checkpoint latest` (states are saved with `--checkpointing_steps N|epoch` under
`<output_dir>/checkpoints/`); already-seen batches of the interrupted epoch are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from hf_vq.finetune import FinetuneArguments, finetune  # noqa: E402

_HELP = {
    "model_name_or_path": "the compressed model: a folder written by hf_vq (timm or transformers) or a Hub repo id",
    "teacher_name_or_path": "the dense teacher (folder or Hub id); default: the base_model the checkpoint records",
    "output_dir": "where the fine-tuned Hub-ready folder and checkpoints/ are written",
    "dataset_name": "a 🤗 Datasets id", "train_file": "local .txt (one sample per line), .csv or .json(l) training data",
    "train_dir": "a local image folder (<dir>/<class>/<image>)",
    "checkpointing_steps": "save the training state every N steps, or 'epoch'",
    "resume_from_checkpoint": "a checkpoints/step_N or epoch_N folder, or 'latest'",
    "mixed_precision": "'no', 'fp16' or 'bf16' (default: the accelerate launch setting)",
    "loss": "'kl' (logits), 'hidden' (hidden states / embeddings) or 'auto'",
    "hidden_target": "'pooled' (sentence embedding), 'last' (every token) or 'layers' (every layer's tokens)",
    "code_update_fraction": "let codes move: at most this share of each layer's blocks re-assigned per update (0: off)",
    "code_update_every": "optimizer steps between code re-assignments",
    "eval_steps": "evaluate on the validation data every N steps",
    "early_stopping_patience": "with --eval_steps: stop after N evaluations without improvement, keep the best weights",
    "train_scales": "train the per-output-channel scales of modules that have them",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    hints = typing.get_type_hints(FinetuneArguments)
    for f in dataclasses.fields(FinetuneArguments):
        hint, flag = hints[f.name], f"--{f.name}"
        help_text = _HELP.get(f.name, "") + f" (default: {f.default})"
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if typing.get_origin(hint) is typing.Literal:
            p.add_argument(flag, choices=list(args), default=f.default, help=help_text)
        else:
            kind = base if base in (int, float) else str
            p.add_argument(flag, type=kind, default=f.default, help=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        args = FinetuneArguments(**vars(ns))
        result = finetune(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps({"metrics": result.metrics, "metrics_before": result.metrics_before,
                          "completed_steps": result.completed_steps,
                          "output_dir": str(result.output_dir) if result.output_dir else None}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
