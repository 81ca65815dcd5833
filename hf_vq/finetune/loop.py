"""PQF's third step as a library loop on 🤗 Accelerate: fine-tune a compressed model by distillation.

The same code runs as a plain Python process, on one or several GPUs, on several nodes, and with DDP or FSDP: the
distribution is chosen by the `accelerate launch` configuration, never by the code.

Distributed details handled here: the codes are identical on every process (code updates re-assign them from the
same all-reduced targets everywhere), so DDP neither broadcasts them at each step nor checks them (they are excluded with DDP's ignore list); trainable parameters that
the loss does not reach (e.g. a pooler under a hidden-state loss) are found with one probe step before wrapping and
frozen, so DDP runs without `find_unused_parameters`; frozen parameters are ignored by DDP's reducer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from ..nn import VQModuleMixin, dense_dtype_of, mark_trainable_, round_to_storage_
from .arguments import CHECKPOINTS_DIR, FinetuneArguments, FinetuneResult
from .codes import code_deltas, disable_code_updates_, enable_code_updates_, reassign_codes_
from .data import load_raw, preprocess
from .losses import (Objective, check_outputs, detect_mode, held_out_loss_key, hidden_state_loss, logits_of,
                     model_inputs, representation)
from .models import asset_dirs, default_teacher, library_of, load_model
from .output import check_output_dir, save_output

__all__ = ["finetune", "new_accelerator"]

logger = logging.getLogger(__name__)


def finetune(
    args: FinetuneArguments,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    collate_fn: Callable | None = None,
    accelerator: Any = None,
) -> FinetuneResult:
    """Fine-tune the codebooks (and norms, biases) of a compressed model by distillation from its dense teacher.

    Models come from `args.model_name_or_path` / `args.teacher_name_or_path` or are passed in memory; data comes from
    `args` (a 🤗 Datasets id, text files, image folders, preprocessed with the model's own transform / tokenizer) or
    is passed as `train_dataset` / `eval_dataset`: a 🤗 `datasets.Dataset` (preprocessed here) or any torch dataset
    whose items are dicts of model inputs (`pixel_values`, `input_ids`, ...) plus an optional `labels` (used as is,
    batched with `collate_fn` or torch's default).

    Runs under whatever `accelerate launch` set up (one process, DDP on CPUs / GPUs / nodes, FSDP); only the main
    process writes the output folder and pushes.

    Args:
        args ([`FinetuneArguments`]): the run's settings.
        student (`nn.Module`, *optional*): the compressed model (otherwise loaded from `args.model_name_or_path`).
        teacher (`nn.Module`, *optional*): the dense model (otherwise loaded from `args.teacher_name_or_path` or the
            base model the checkpoint records).
        train_dataset / eval_dataset (*optional*): data instead of `args`' data options.
        collate_fn (`Callable`, *optional*): batches items of a torch dataset.
        accelerator (`accelerate.Accelerator`, *optional*): one to reuse (otherwise created from `args`). A run that
            creates its own ends its training at the end (trackers finished, process group destroyed); a run given
            one leaves both to its caller (e.g. `hf-vq compress --finetune-steps` under `accelerate launch`, which
            goes on using the process group).

    Returns:
        [`FinetuneResult`]: metrics after (and before) fine-tuning, the loss history, the output folder.

    Raises:
        `ValueError`: the model is not compressed, no teacher can be found, the teacher's outputs do not match the
            student's, or the data options are inconsistent (each message says what to pass instead).
        [`hf_vq.serialization.SaveTargetError`], `PermissionError`: `output_dir` is a file, a folder of other files,
            or not writable (checked before any training).
    """
    check_output_dir(args)  # a file or a folder of other files at output_dir: refused before any work
    models = _resolve_models(args, student, teacher)
    with _hidden_states(args, models):
        return _finetune(args, models, train_dataset, eval_dataset, collate_fn, accelerator)


@contextlib.contextmanager
def _hidden_states(args: FinetuneArguments, models: "_Models"):
    """With `hidden_target="layers"`, both transformers models return every layer's hidden states for the run."""
    configs = [getattr(m, "config", None) for m in (models.student, models.teacher)]
    configs = [c for c in configs if c is not None and hasattr(c, "output_hidden_states")]
    previous = [c.output_hidden_states for c in configs]
    if args.hidden_target == "layers":
        for config in configs:
            config.output_hidden_states = True
    try:
        yield
    finally:
        for config, value in zip(configs, previous):
            config.output_hidden_states = value


def _finetune(args: FinetuneArguments, models: "_Models", train_dataset: Any, eval_dataset: Any,
              collate_fn: Callable | None, accelerator: Any) -> FinetuneResult:
    from accelerate.utils import DistributedType, set_seed

    owned = accelerator is None
    accelerator = accelerator or new_accelerator(args)
    if args.code_update_fraction > 0 and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("code_update_fraction > 0 re-assigns codes from whole straight-through targets, which FSDP "
                         "shards; run code updates under DDP (`accelerate launch --multi_gpu`) or one process.")
    if args.scale_parameter and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("scale_parameter=True gives every tensor its own optimizer group, which FSDP's flattened "
                         "parameters do not keep; run it under DDP (`accelerate launch --multi_gpu`) or one process.")
    set_seed(args.seed)
    train_dataset, eval_dataset, collate = _datasets(args, accelerator, models, train_dataset, eval_dataset, collate_fn)
    trainable, objective = _prepare_student(args, models, train_dataset, collate)
    run = _Run.prepare(args, accelerator, models, train_dataset, eval_dataset, collate)
    result = FinetuneResult(trainable=trainable, arguments=args)
    eval_kwargs = dict(objective=objective, library=models.library, progress=args.progress)
    if run.eval_loader is not None and args.evaluate_before and not args.resume_from_checkpoint:
        result.metrics_before = _evaluate(accelerator, run.model, models.teacher, run.eval_loader, teacher_metrics=True,
                                          desc="eval (before)", **eval_kwargs)
        accelerator.print(f"hf_vq finetune: before fine-tuning {_fmt(result.metrics_before)}")
    accelerator.print(f"hf_vq finetune: {objective.mode} distillation, {run.max_steps} steps ({run.epochs} epochs of "
                      f"{run.steps_per_epoch}), {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"trainable {trainable}")
    result.completed_steps = _train(args, accelerator, run, models.teacher, objective, result, eval_kwargs)
    _finish(args, accelerator, run, models, result, eval_kwargs)
    if owned:
        accelerator.end_training()
    return result


@dataclass
class _Models:
    student: nn.Module
    teacher: nn.Module
    library: str
    student_dir: Path | None
    teacher_dir: Path | None


def _resolve_models(args: FinetuneArguments, student: nn.Module | None, teacher: nn.Module | None) -> _Models:
    """The compressed student and its dense teacher, loaded from `args` when not given."""
    student_dir = teacher_dir = library = None
    if student is None:
        if not args.model_name_or_path:
            raise ValueError("Give model_name_or_path (a compressed model folder or Hub id) or pass student=.")
        student, library, student_dir = load_model(args.model_name_or_path)
    library = library or library_of(student)
    if not any(isinstance(m, VQModuleMixin) for m in student.modules()):
        raise ValueError(f"{args.model_name_or_path or 'The student'} is not compressed with hf_vq (no VQ module). Compress "
                         "it first (`hf-vq compress MODEL --out DIR` or hf_vq.quantize_) and fine-tune DIR.")
    if teacher is None:
        ref = args.teacher_name_or_path or (default_teacher(student_dir) if student_dir is not None else None)
        if ref is None:
            raise ValueError(
                f"No dense teacher: {student_dir or 'the model'} records no base model (no `base_model` in its model "
                "card, weights metadata or config.json). Pass teacher_name_or_path (--teacher_name_or_path), the dense "
                "model's folder or Hub id."
            )
        teacher, _, teacher_dir = load_model(ref)
        args.teacher_name_or_path = ref
    if any(isinstance(m, VQModuleMixin) for m in teacher.modules()):
        raise ValueError("The teacher is itself compressed; pass the dense model (teacher_name_or_path).")
    teacher.eval().requires_grad_(False)
    return _Models(student, teacher, library, student_dir, teacher_dir)


def new_accelerator(args: FinetuneArguments):
    """The `accelerate.Accelerator` [`finetune`] creates for `args` (mixed precision, accumulation, seedable
    sampler, `output_dir` as the project folder), on whatever `accelerate launch` set up."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState

    # Several runs in one process (benchmarks, notebooks) may differ in mixed precision or accumulation: start
    # from a fresh accelerator state; the distributed environment (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), project_dir=args.output_dir)


def _datasets(args: FinetuneArguments, accelerator: Any, models: _Models, train_dataset: Any, eval_dataset: Any,
              collate_fn: Callable | None) -> tuple[Any, Any, Callable]:
    """The preprocessed train / eval datasets and the collate function."""
    if train_dataset is None:
        train_dataset, raw_eval = load_raw(args)
        eval_dataset = eval_dataset if eval_dataset is not None else raw_eval
    if _is_hf_dataset(train_dataset):
        with accelerator.main_process_first():
            train_dataset, eval_dataset, collate_fn = preprocess(
                args, train_dataset, eval_dataset, student=models.student, library=models.library,
                tokenizer_dirs=asset_dirs(models.student_dir, models.teacher_dir, models.student, models.teacher))
    if len(train_dataset) == 0:
        raise ValueError("The training data is empty: give a dataset, file or folder with at least one sample.")
    return train_dataset, eval_dataset, collate_fn or default_collate


def _prepare_student(args: FinetuneArguments, models: _Models, train_dataset: Any, collate: Callable
                     ) -> tuple[dict[str, int], Objective]:
    """Mark what trains, pick the loss from a probe batch, freeze what the loss never reaches (DDP-safe)."""
    student, teacher, library = models.student, models.teacher, models.library
    trainable = mark_trainable_(student, norms=args.train_norms, biases=args.train_biases, dense=args.train_dense,
                                scales=args.train_scales)
    if args.code_update_fraction > 0:
        trainable["code_deltas"] = enable_code_updates_(student)
    probe = collate([train_dataset[i] for i in range(min(2, len(train_dataset)))])
    probe_args, probe_kwargs = model_inputs(probe, library)
    with torch.no_grad():
        s_out, t_out = student.eval()(*probe_args, **probe_kwargs), teacher(*probe_args, **probe_kwargs)
    student.train()
    mode = detect_mode(args, s_out)
    check_outputs(mode, s_out, t_out)
    objective = Objective(args, library, mode)
    unused = _probe_unused_(student, teacher, objective, probe, library)
    if unused:
        logger.info("hf_vq finetune: %d trainable tensors do not reach the loss and stay frozen: %s", len(unused),
                    unused[:8])
    trainable["unused_frozen"] = len(unused)
    # Codes never change and are identical on every process: DDP must neither broadcast nor check them.
    codes = [name for name, _ in student.named_buffers() if name.endswith("codes")]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(student, codes)
    return trainable, objective


#: The smallest RMS `scale_parameter` scales a learning rate by (zero-initialised biases would not train otherwise).
_RMS_FLOOR = 0.02


def _relative_groups(params: list[nn.Parameter], learning_rate: float) -> list[dict[str, Any]]:
    """One optimizer group per tensor, with the learning rate `learning_rate × max(RMS, _RMS_FLOOR)` (its size now)."""
    groups = []
    for p in params:
        rms = p.detach().float().pow(2).mean().sqrt().item() if p.numel() else 0.0
        groups.append({"params": [p], "lr": learning_rate * max(rms, _RMS_FLOOR)})
    return groups


def _scheduled_lr(args: FinetuneArguments, run: "_Run") -> float:
    """`learning_rate` times the schedule's factor now (with `scale_parameter`, each tensor's rate is a multiple)."""
    group = run.optimizer.param_groups[0]
    return float(args.learning_rate * run.scheduler.get_last_lr()[0] / group.get("initial_lr", group["lr"]))


@dataclass
class _Run:
    """The prepared training objects and the schedule, in optimizer steps."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    max_steps: int
    steps_per_epoch: int
    epochs: int

    @classmethod
    def prepare(cls, args: FinetuneArguments, accelerator: Any, models: _Models, train_dataset: Any, eval_dataset: Any,
                collate: Callable) -> "_Run":
        from ..integrations.transformers.tools import get_scheduler

        train_loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True,
                                  collate_fn=collate, num_workers=args.num_workers)
        eval_loader = (DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate,
                                  num_workers=args.num_workers) if eval_dataset is not None else None)
        deltas = code_deltas(models.student)
        delta_ids = {id(p) for p in deltas}
        params = [p for p in models.student.parameters() if p.requires_grad and id(p) not in delta_ids]
        groups = _relative_groups(params, args.learning_rate) if args.scale_parameter else [{"params": params}]
        if deltas:  # the straight-through code targets: their own learning rate, no decay towards zero
            groups.append({"params": deltas, "weight_decay": 0.0, "lr": args.code_learning_rate or args.learning_rate})
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
        # per-process batch counts; the prepared scheduler steps once per process at every optimizer step
        batches_per_epoch = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * accelerator.num_processes))
        max_steps = args.max_train_steps or args.num_train_epochs * math.ceil(
            batches_per_epoch / args.gradient_accumulation_steps)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                  num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                  num_training_steps=max_steps * accelerator.num_processes)
        model, optimizer, train_loader, scheduler = accelerator.prepare(models.student, optimizer, train_loader,
                                                                        scheduler)
        if eval_loader is not None:
            eval_loader = accelerator.prepare(eval_loader)
        models.teacher.to(accelerator.device)
        steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
        return cls(model, optimizer, scheduler, train_loader, eval_loader, max_steps, steps_per_epoch,
                   math.ceil(max_steps / steps_per_epoch))


def _resume(args: FinetuneArguments, accelerator: Any, run: _Run) -> tuple[int, int, int]:
    """`(completed steps, first epoch, batches to skip in it)` after loading the state to resume from, if any."""
    state = _resolve_resume(args)
    if state is None:
        return 0, 0, 0
    accelerator.print(f"hf_vq finetune: resuming from {state}")
    accelerator.load_state(str(state))
    number = int(state.name.split("_")[1])
    if state.name.startswith("epoch_"):
        return (number + 1) * run.steps_per_epoch, number + 1, 0
    # the last step of an epoch may take fewer batches: count whole epochs in steps
    start_epoch, steps_into_epoch = divmod(number, run.steps_per_epoch)
    return number, start_epoch, steps_into_epoch * args.gradient_accumulation_steps


def _train(args: FinetuneArguments, accelerator: Any, run: _Run, teacher: nn.Module, objective: Objective,
           result: FinetuneResult, eval_kwargs: dict) -> int:
    """The training loop; returns the optimizer steps completed (including those before a resume)."""
    completed, start_epoch, skip_batches = _resume(args, accelerator, run)
    save_every = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None
    bar = tqdm(total=run.max_steps, initial=completed, desc="finetune", unit="step",
               disable=not (args.progress and accelerator.is_local_main_process))
    stopper = _EarlyStop(args, accelerator, run, teacher, result, eval_kwargs)
    if completed == 0:
        stopper.start(result.metrics_before)
    for epoch in range(start_epoch, run.epochs):
        _train_mode_(run.model, args.freeze_norm_stats, args.dropout)
        run.train_loader.set_epoch(epoch)
        loader = run.train_loader
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(run.train_loader, skip_batches)
        for batch in loader:
            loss = _step(args, accelerator, run, teacher, objective, batch)
            if not accelerator.sync_gradients:
                continue
            completed += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            result.history.append({"step": completed, "epoch": epoch, "loss": float(loss.item()),
                                   "lr": _scheduled_lr(args, run)})
            if args.code_update_fraction > 0 and completed % args.code_update_every == 0:
                moved = reassign_codes_(accelerator.unwrap_model(run.model), args.code_update_fraction)
                result.history[-1]["codes_changed"] = moved["changed"] / max(moved["blocks"], 1.0)
            if stopper.check(completed):
                break
            if save_every and completed % save_every == 0:
                accelerator.save_state(str(_checkpoint_dir(args.output_dir) / f"step_{completed}"))
            if completed >= run.max_steps:
                break
        if args.checkpointing_steps == "epoch":
            accelerator.save_state(str(_checkpoint_dir(args.output_dir) / f"epoch_{epoch}"))
        if run.eval_loader is not None and args.eval_every_epoch and completed < run.max_steps:
            metrics = _evaluate(accelerator, run.model, teacher, run.eval_loader, teacher_metrics=False,
                                desc=f"eval (epoch {epoch})", **eval_kwargs)
            accelerator.print(f"hf_vq finetune: epoch {epoch}: {_fmt(metrics)}")
        if completed >= run.max_steps or stopper.stopped:
            break
    bar.close()
    stopper.restore_best()
    return completed


class _EarlyStop:
    """Evaluation every `eval_steps` on the held-out data; with `early_stopping_patience`, stop when the loss has
    not improved for that many evaluations and end with the best weights (trainable tensors and codes)."""

    def __init__(self, args: FinetuneArguments, accelerator: Any, run: _Run, teacher: nn.Module,
                 result: FinetuneResult, eval_kwargs: dict) -> None:
        self.args, self.accelerator, self.run, self.teacher = args, accelerator, run, teacher
        self.result, self.eval_kwargs = result, eval_kwargs
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.bad = 0
        self.stopped = False
        self.active = args.eval_steps is not None and run.eval_loader is not None

    def start(self, before: dict[str, float]) -> None:
        """The weights before training are the first candidate (step 0): a run whose every evaluation is worse than
        its start ends where it started."""
        key = held_out_loss_key(before)
        if self.active and self.args.early_stopping_patience is not None and key is not None:
            self.best = (before[key], 0, self._snapshot())

    def check(self, step: int) -> bool:
        """Evaluate if `step` is an evaluation step; returns whether training should stop."""
        if not self.active or step % self.args.eval_steps:
            return False
        metrics = _evaluate(self.accelerator, self.run.model, self.teacher, self.run.eval_loader, teacher_metrics=False,
                            desc=f"eval (step {step})", **self.eval_kwargs)
        _train_mode_(self.run.model, self.args.freeze_norm_stats, self.args.dropout)
        key = held_out_loss_key(metrics)
        self.result.evaluations.append({"step": step, **metrics})
        if self.args.early_stopping_patience is None or key is None:
            return False
        loss = metrics[key]
        if self.best is None or loss < self.best[0]:
            self.best, self.bad = (loss, step, self._snapshot()), 0
        else:
            self.bad += 1
            self.stopped = self.bad >= self.args.early_stopping_patience
            if self.stopped:
                self.accelerator.print(f"hf_vq finetune: early stop at step {step} (best held-out loss "
                                       f"{self.best[0]:.5f} at step {self.best[1]})")
        return self.stopped

    def _snapshot(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.run.model)
        # the straight-through code targets are not kept (a float copy of every compressed weight): the codes are
        state = {n: p.detach().clone() for n, p in model.named_parameters()
                 if p.requires_grad and not n.endswith("code_delta")}
        state.update({n: b.clone() for n, b in model.named_buffers() if n.endswith("codes")})
        return state

    def restore_best(self) -> None:
        """Load the best evaluated weights (when early stopping evaluated any)."""
        if self.best is None:
            return
        model = self.accelerator.unwrap_model(self.run.model)
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name, value in self.best[2].items():
                tensors[name].copy_(value)
        self.result.best_step = self.best[1]


def _step(args: FinetuneArguments, accelerator: Any, run: _Run, teacher: nn.Module, objective: Objective,
          batch: dict) -> torch.Tensor:
    """One (accumulated) training step; returns this process's loss."""
    with accelerator.accumulate(run.model):
        b_args, b_kwargs = model_inputs(batch, objective.library)
        with accelerator.autocast():
            with torch.no_grad():
                t_out = teacher(*b_args, **b_kwargs)
            loss = objective(run.model(*b_args, **b_kwargs), t_out, batch)
        accelerator.backward(loss)
        if args.max_grad_norm is not None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)  # FSDP: the wrapped ones
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    return loss


def _finish(args: FinetuneArguments, accelerator: Any, run: _Run, models: _Models, result: FinetuneResult,
            eval_kwargs: dict) -> None:
    """Final evaluation of exactly the saved weights, then the output folder (main process only)."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(run.model)
    disable_code_updates_(unwrapped)  # the codes keep their last assignment; the format has no deltas
    # codebooks, scales and what stays dense trained in fp32; the file stores them at 16 bits: evaluate exactly that
    round_to_storage_(unwrapped, dense_dtype_of(getattr(unwrapped, "vq_config", None)))
    if run.eval_loader is not None:
        result.metrics = _evaluate(accelerator, run.model, models.teacher, run.eval_loader, teacher_metrics=True,
                                   desc="eval (after)", **eval_kwargs)
        accelerator.print(f"hf_vq finetune: after fine-tuning {_fmt(result.metrics)}")
    if args.output_dir:
        result.output_dir = Path(args.output_dir)
        to_save = unwrapped
        if accelerator.distributed_type == DistributedType.FSDP:
            # Sharded parameters: gather the full state dict (a collective) and load it into a fresh copy.
            full = accelerator.get_state_dict(run.model)
            if accelerator.is_main_process:
                if not args.model_name_or_path:
                    raise ValueError("Under FSDP the fine-tuned model is saved from model_name_or_path's folder; "
                                     "pass it (in-memory students cannot be re-materialised).")
                to_save = load_model(args.model_name_or_path)[0]
                to_save.load_state_dict(full)
        if accelerator.is_main_process:
            save_output(to_save, args, models.library, result, student_dir=models.student_dir,
                        teacher_dir=models.teacher_dir)
        accelerator.wait_for_everyone()


def _checkpoint_dir(output_dir: str | None) -> Path:
    if not output_dir:
        raise ValueError("checkpointing_steps and resume_from_checkpoint need output_dir (states go to "
                         f"output_dir/{CHECKPOINTS_DIR}/).")
    return Path(output_dir) / CHECKPOINTS_DIR


def _resolve_resume(args: FinetuneArguments) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        folder = _checkpoint_dir(args.output_dir)
        states = [p for p in folder.glob("*") if re.fullmatch(r"(step|epoch)_\d+", p.name)] if folder.is_dir() else []
        if not states:
            raise FileNotFoundError(f"resume_from_checkpoint='latest' but {folder} holds no step_N / epoch_N state.")
        return max(states, key=lambda p: p.stat().st_mtime)
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir() or not re.fullmatch(r"(step|epoch)_\d+", path.name):
        raise FileNotFoundError(f"resume_from_checkpoint={args.resume_from_checkpoint!r} is not a state folder written "
                                f"by finetune (output_dir/{CHECKPOINTS_DIR}/step_N or epoch_N), nor 'latest'.")
    return path


def _probe_unused_(model: nn.Module, teacher: nn.Module, objective: Objective, batch: dict, library: str) -> list[str]:
    """One forward/backward on a small batch (eval mode, nothing updated): freeze trainable parameters the loss
    never reaches, so that DDP needs no `find_unused_parameters`. Returns their names."""
    was_training = model.training
    model.eval()
    args, kwargs = model_inputs(batch, library)
    with torch.no_grad():
        t_out = teacher(*args, **kwargs)
    loss = objective(model(*args, **kwargs), t_out, batch)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in model.named_parameters():
        param.grad = None
        if name in unused:
            param.requires_grad_(False)
    model.train(was_training)
    return unused


def _train_mode_(model: nn.Module, freeze_norm_stats: bool, dropout: bool = True) -> None:
    """Training mode, or eval mode without `dropout` (every dropout off: `nn.Dropout` and the attention dropout that
    transformers' attention modules apply when `self.training`; BatchNorm statistics then stay fixed too)."""
    if not dropout:
        model.eval()
        return
    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def _evaluate(accelerator, model: nn.Module, teacher: nn.Module, loader, objective: Objective, library: str, *,
              teacher_metrics: bool, desc: str, progress: bool) -> dict[str, float]:
    """Metrics over the whole evaluation set, gathered across processes (`gather_for_metrics` drops the padding)."""
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in tqdm(loader, desc=desc, disable=not (progress and accelerator.is_local_main_process), leave=False):
        args, kwargs = model_inputs(batch, library)
        with accelerator.autocast():
            s_out, t_out = model(*args, **kwargs), teacher(*args, **kwargs)
        stats: dict[str, torch.Tensor] = {}  # each [B]
        mask = batch.get("attention_mask")
        if objective.mode == "kl":
            s, t = logits_of(s_out).float(), logits_of(t_out).float()  # [B, C] (or [B, T, C])
            if s.dim() == 2:
                stats["kl"] = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                       reduction="none").sum(-1)  # [B]
                stats["agreement"] = (s.argmax(-1) == t.argmax(-1)).float()
                if "labels" in batch:
                    stats["accuracy"] = (s.argmax(-1) == batch["labels"]).float()
                    stats["loss"] = F.cross_entropy(s, batch["labels"], reduction="none")
                    if teacher_metrics:
                        stats["teacher_accuracy"] = (t.argmax(-1) == batch["labels"]).float()
            else:  # per-token logits: per-sample mean KL over the mask
                kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
                m = mask.float() if mask is not None else torch.ones_like(kl)
                stats["kl"] = (kl * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            s = representation(s_out, mask, "pooled").float()  # [B, H]: the sentence embedding
            t = representation(t_out, mask, "pooled").float()
            stats["cosine"] = F.cosine_similarity(s, t, dim=-1)
            target = objective.args.hidden_target
            stats["loss"] = hidden_state_loss(representation(s_out, mask, target), representation(t_out, mask, target),
                                              kind=objective.args.hidden_loss, mask=mask, reduction="none")  # [B]
        gathered = accelerator.gather_for_metrics(stats)
        for key, value in gathered.items():
            sums[key] = sums.get(key, 0.0) + float(value.double().sum())
            if key == "cosine":
                sums["cosine_min"] = min(sums.get("cosine_min", 1.0), float(value.min()))
        count += int(next(iter(gathered.values())).shape[0])
    metrics = {f"eval_{k}": (v if k.endswith("_min") else v / max(count, 1)) for k, v in sums.items()}
    if "eval_teacher_accuracy" in metrics:
        metrics["teacher_accuracy"] = metrics.pop("eval_teacher_accuracy")
    metrics["eval_samples"] = count
    return metrics


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _is_hf_dataset(ds: Any) -> bool:
    try:
        import datasets

        return isinstance(ds, datasets.Dataset)
    except ImportError:  # pragma: no cover
        return False
