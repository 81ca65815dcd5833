"""The output of a fine-tuning run: a Hub-ready folder whose card and record say how it was fine-tuned."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..integrations.cards import complete_record_, hub_id, render_model_card
from ..integrations.hub import upload_folder
from ..serialization import MANIFEST_NAME, atomic_folder, check_save_target, checkpoint_size_report
from .arguments import CHECKPOINTS_DIR, FinetuneArguments, FinetuneResult
from .losses import held_out_loss_key

__all__ = ["card_sections", "check_output_dir", "save_output"]


def check_output_dir(args: FinetuneArguments) -> None:
    """Refuse, before any training, an `output_dir` the fine-tuned model could not be written to: a file, a folder
    of other files (one holding only `checkpoints/`, or a model hf_vq wrote, is fine), an unwritable location.

    Raises:
        [`hf_vq.serialization.SaveTargetError`], `PermissionError`, `NotADirectoryError`: naming the folder and fix.
    """
    if args.output_dir:
        check_save_target(args.output_dir, keep={CHECKPOINTS_DIR})


def card_sections(args: FinetuneArguments, result: FinetuneResult) -> dict[str, Any]:
    """The model-card sections of a fine-tuned model, as keyword arguments of `render_model_card`.

    `metrics`: task metrics after fine-tuning (numbers; the dense teacher's too); `fidelity`: agreement with the
    dense teacher, after and before; `finetuning`: the data and recipe; `eval_dataset`: what was evaluated on.
    """
    m, b = result.metrics, result.metrics_before
    metrics: dict[str, Any] = {}
    if "eval_accuracy" in m:
        metrics["accuracy"] = round(m["eval_accuracy"], 4)
    fidelity: dict[str, Any] = {}
    if "teacher_accuracy" in m:
        fidelity["accuracy of the dense model"] = f"{m['teacher_accuracy']:.4f}"
    for key, label in (("eval_agreement", "top-1 agreement with the dense model"),
                       ("eval_kl", "KL divergence to the dense model"),
                       ("eval_cosine", "embedding cosine to the dense model (mean)"),
                       ("eval_cosine_min", "embedding cosine to the dense model (min)")):
        if key in m:
            text = f"{m[key]:.4f}"
            if key in b:
                text += f" (before fine-tuning: {b[key]:.4f})"
            fidelity[label] = text
    if "eval_accuracy" in b:
        fidelity["accuracy before fine-tuning"] = f"{b['eval_accuracy']:.4f}"
    data = args.dataset_name or args.train_file or args.train_dir or "an in-memory dataset"
    validation = args.validation_file or args.validation_dir or (args.dataset_name and "its validation/test split")
    finetuning = {
        "data": str(data) + (f" (evaluated on {validation})" if validation else ""),
        "teacher": f"{args.teacher_name_or_path or 'the dense model'} (distillation: "
                   + ("KL on logits" + (" + cross-entropy" if args.task_weight and "eval_accuracy" in m else "")
                      if "eval_kl" in m else f"{args.hidden_loss} on the {args.hidden_target} hidden state") + ")",
        "steps": f"{result.completed_steps}" + (f" of {args.max_train_steps}" if args.max_train_steps else "")
                 + f" (batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation per "
                 "process)" + ("" if result.best_step is None else f"; best held-out loss at step {result.best_step}"),
        "optimizer": f"AdamW lr {args.learning_rate:g}{' x each tensor RMS' if args.scale_parameter else ''}, "
                     f"{args.lr_scheduler_type} schedule"
                     + (f", {args.mixed_precision} autocast" if args.mixed_precision not in (None, "no") else ""),
        "trained": "codebooks" + (", scales" if args.train_scales and result.trainable.get("scales") else "")
                   + (", norms" if args.train_norms else "") + (", biases" if args.train_biases else "")
                   + (", dense layers" if args.train_dense else "")
                   + (f"; codes re-assigned (at most {args.code_update_fraction:g} of each layer's blocks every "
                      f"{args.code_update_every} steps)" if args.code_update_fraction > 0 else "; codes frozen")
                   + ("" if args.dropout else "; no dropout (eval mode)"),
        "evaluation samples": m.get("eval_samples"),
    }
    key = held_out_loss_key(m)
    if args.eval_steps and key in b:  # early-stopping runs: the loss that chose the weights, before -> after
        finetuning["held-out loss"] = f"{b[key]:.5f} -> {m[key]:.5f}"
    eval_dataset = None
    if validation and metrics:
        name = args.dataset_name or Path(str(validation)).name
        eval_dataset = {"name": name, "type": args.dataset_name or name,
                        "split": "validation" if not args.dataset_name else "test"}
    return {"metrics": metrics, "fidelity": fidelity, "finetuning": finetuning, "eval_dataset": eval_dataset}


def save_output(model: nn.Module, args: FinetuneArguments, library: str, result: FinetuneResult, *,
                student_dir: Path | None, teacher_dir: Path | None) -> None:
    """Write the Hub-ready folder into `output_dir` (next to `checkpoints/`), with the metrics in the card and the
    fine-tuning in the record, atomically: the model files of an earlier run are replaced, `checkpoints/` and
    anything else hf_vq did not write are kept ([`hf_vq.serialization.atomic_folder`]); push when asked."""
    out = Path(args.output_dir)
    teacher = args.teacher_name_or_path
    config = model.vq_config
    sections = card_sections(args, result)
    record = complete_record_(config, base_model=hub_id(teacher), library=library, source_dir=teacher_dir)
    record.finetuning = sections["finetuning"]
    record.fidelity = {**record.fidelity, **sections["fidelity"]}
    with tempfile.TemporaryDirectory(prefix="hf_vq-finetune-") as tmp:
        staged = Path(tmp) / "model"
        if library == "timm":
            from ..integrations.timm import save_compressed

            save_compressed(model, staged, repo_id=args.hub_model_id)
        else:
            from ..integrations.transformers import save_compressed

            save_compressed(model, staged, source_dir=student_dir or teacher_dir)
        card = render_model_card(library_name=library, config=config, size=checkpoint_size_report(staged),
                                 repo_id=args.hub_model_id, source_dir=teacher_dir, metrics=sections["metrics"],
                                 eval_dataset=sections["eval_dataset"],
                                 extra_tags=["timm", "image-classification"] if library == "timm" else None)
        if args.dataset_name:
            card.data.datasets = [args.dataset_name]
        card.save(staged / "README.md")
        (staged / "finetune_results.json").write_text(json.dumps(
            {"args": dataclasses.asdict(args) | {"hub_token": None}, "metrics": result.metrics,
             "metrics_before": result.metrics_before, "completed_steps": result.completed_steps,
             "trainable": result.trainable}, indent=2, default=str) + "\n")
        with atomic_folder(out, keep={CHECKPOINTS_DIR}) as swap:
            for path in staged.iterdir():
                if path.name != MANIFEST_NAME:
                    shutil.move(path, swap / path.name)
        if args.push_to_hub:
            _push(out, Path(tmp) / "upload", args)


def _push(out: Path, upload: Path, args: FinetuneArguments) -> None:
    """Upload the model files of `out` (not `checkpoints/`) to `args.hub_model_id`."""
    upload.mkdir()
    for path in out.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, upload / path.name)
    upload_folder(upload, args.hub_model_id, token=args.hub_token, commit_message="hf_vq: fine-tuned codebooks")
