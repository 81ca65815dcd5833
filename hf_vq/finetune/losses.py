"""Distillation objectives: KL on logits, cosine / MSE on hidden states, and how a batch feeds a model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..calibrate import mean_pool
from .arguments import FinetuneArguments

__all__ = ["mean_pool", "distillation_loss", "hidden_state_loss", "model_inputs", "logits_of", "representation",
           "Objective", "detect_mode", "check_outputs", "held_out_loss_key"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) of temperature-softened distributions, times T², averaged over samples.

    Args:
        student_logits / teacher_logits: `[B, C]` or `[B, T, C]` (per-token logits).
        mask: `[B, T]` for per-token logits: only positions where it is 1 count.
    """
    s = student_logits.float().reshape(-1, student_logits.shape[-1])  # [N, C]
    t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])  # [N, C]
    if mask is not None and student_logits.dim() == 3:
        keep = mask.reshape(-1).bool()  # [N]
        s, t = s[keep], t[keep]
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="none").sum(-1)  # [N]
    return kl.mean() * temperature**2


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "cosine",
                      mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Distance between student and teacher representations `[B, H]` or `[B, T, H]` (`mask` `[B, T]` for tokens).

    `kind="cosine"`: 1 - cosine similarity; `"mse"`: mean squared error over the hidden size. Per token for
    `[B, T, H]` inputs, averaged over the masked tokens of each sample. `reduction="none"` returns `[B]`.
    """
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        dist = 1 - F.cosine_similarity(s, t, dim=-1)  # [B] or [B, T]
    else:
        dist = ((s - t) ** 2).mean(-1)  # [B] or [B, T]
    if dist.dim() == 2:
        if mask is not None and mask.shape[1] != dist.shape[1]:  # several layers' tokens, concatenated
            mask = mask.repeat(1, dist.shape[1] // mask.shape[1])  # [B, L·T]
        m = mask.to(dist.dtype) if mask is not None else torch.ones_like(dist)  # [B, T]
        dist = (dist * m).sum(1) / m.sum(1).clamp(min=1)  # [B]
    return dist if reduction == "none" else dist.mean()


def model_inputs(batch: dict[str, torch.Tensor], library: str) -> tuple[tuple, dict]:
    """Positional and keyword model inputs of a batch: timm models take the image tensor, transformers keywords."""
    if library == "timm":
        return (batch["pixel_values"],), {}  # [B, C, H, W]
    return (), {k: v for k, v in batch.items() if k != "labels"}


def logits_of(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    return out.get("logits") if hasattr(out, "get") else getattr(out, "logits", None)


def representation(out: Any, mask: torch.Tensor | None, target: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):  # a headless timm model: pooled features [B, H]
        return out
    if target == "layers":
        layers = out.get("hidden_states") if hasattr(out, "get") else None
        if not layers:
            raise ValueError("hidden_target='layers' needs a transformers model that returns hidden_states.")
        return torch.cat(layers[1:], dim=1)  # [B, L·T, H]: every layer's output, token by token
    hidden = out.get("last_hidden_state") if hasattr(out, "get") else None
    if hidden is None:
        raise ValueError("loss='hidden' needs a model returning last_hidden_state (a transformers base model) or "
                         "features (a timm model with num_classes=0).")
    return mean_pool(hidden, mask) if target == "pooled" else hidden  # [B, H] or [B, T, H]


class Objective:
    """Computes the fine-tuning loss (and evaluation statistics) of a student against its teacher."""

    def __init__(self, args: FinetuneArguments, library: str, mode: str) -> None:
        self.args, self.library, self.mode = args, library, mode

    def __call__(self, student_out: Any, teacher_out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        args, mask = self.args, batch.get("attention_mask")
        if self.mode == "kl":
            s, t = logits_of(student_out), logits_of(teacher_out)  # [B, C] or [B, T, C]
            loss = args.distill_weight * distillation_loss(s, t, temperature=args.temperature, mask=mask)
            labels = batch.get("labels")
            if labels is not None and args.task_weight and s.dim() == 2:
                loss = loss + args.task_weight * F.cross_entropy(s.float(), labels)
            return loss
        s = representation(student_out, mask, args.hidden_target)
        t = representation(teacher_out, mask, args.hidden_target)
        return args.distill_weight * hidden_state_loss(s, t, kind=args.hidden_loss, mask=mask)


def held_out_loss_key(metrics: dict[str, float]) -> str | None:
    """The evaluation metric early stopping compares: `eval_loss` (hidden-state distance, or cross-entropy when the
    data has labels), else `eval_kl`; `None` when neither was measured."""
    return next((key for key in ("eval_loss", "eval_kl") if key in metrics), None)


def detect_mode(args: FinetuneArguments, out: Any) -> str:
    if args.loss != "auto":
        return args.loss
    return "kl" if logits_of(out) is not None else "hidden"


def check_outputs(mode: str, s_out: Any, t_out: Any) -> None:
    if mode == "kl":
        s, t = logits_of(s_out), logits_of(t_out)
        if s is None or t is None:
            raise ValueError("loss='kl' needs logits from both models; this model is headless: use loss='hidden'.")
        if s.shape != t.shape:
            raise ValueError(f"The student's logits {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ: the "
                             "teacher is not the dense model this checkpoint was compressed from.")
    else:
        s, t = representation(s_out, None, "last"), representation(t_out, None, "last")
        if s.shape != t.shape:
            raise ValueError(f"The student's hidden states {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ: "
                             "the teacher is not the dense model this checkpoint was compressed from.")
