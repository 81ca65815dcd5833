"""Fine-tuning compressed models: PQF's third step, as a library loop on 🤗 Accelerate.

The codes of a compressed model are frozen (uint8 buffers); its codebooks are trainable parameters, and so are,
by default, its norm layers and biases (the paper also trains BatchNorm statistics). [`finetune`] trains them by
distillation from the dense teacher:

* **logits** (`loss="kl"`, the default when the model has logits): KL divergence between the temperature-softened
  teacher and student distributions, plus the task loss (cross-entropy) when the data has labels;
* **hidden states** (`loss="hidden"`, the default for headless encoders such as MiniLM): MSE or cosine distance
  between the student's and the teacher's last hidden state or mean-pooled embedding.

The same code runs as a plain Python process, on one or several GPUs, on several nodes, and with DDP or FSDP: the
distribution is chosen by the `accelerate launch` configuration, never by the code. See `scripts/finetune.py`::

    python scripts/finetune.py --model_name_or_path resnet-vq --train_dir data/train --output_dir out
    accelerate launch scripts/finetune.py ...                                   # `accelerate config` decides
    accelerate launch --multi_gpu --num_processes 8 scripts/finetune.py ...     # 8 GPUs, DDP
    accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip HOST --main_process_port 29500 \\
        --multi_gpu --num_processes 16 scripts/finetune.py ...                  # 2 nodes x 8 GPUs
    accelerate launch --use_fsdp --fsdp_sharding_strategy FULL_SHARD ... scripts/finetune.py ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py ...  # 2 CPU processes (gloo)

Distributed details handled here: the codes never change and are identical on every process, so DDP neither
broadcasts them at each step nor checks them (they are excluded with DDP's ignore list); trainable parameters that
the loss does not reach (e.g. a pooler under a hidden-state loss) are found with one probe step before wrapping and
frozen, so DDP runs without `find_unused_parameters`; frozen parameters are ignored by DDP's reducer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import mean_pool
from .nn import VQModuleMixin

__all__ = [
    "FinetuneArguments", "FinetuneResult", "finetune", "load_model", "default_teacher", "mark_trainable_",
    "distillation_loss", "hidden_state_loss", "mean_pool", "card_sections",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_TEXT_EXTENSIONS = {".txt": "text", ".text": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label")
_TEXT_COLUMNS = ("text", "sentence", "content", "document")


# ============================================================================================ arguments
@dataclass
class FinetuneArguments:
    """Everything [`finetune`] needs; `scripts/finetune.py` exposes each field as a `--flag`.

    Args:
        model_name_or_path (`str`, *optional*):
            The compressed model: a folder written by hf_vq (timm or transformers) or a Hub repo id. Optional when
            [`finetune`] receives the model in memory.
        teacher_name_or_path (`str`, *optional*):
            The dense teacher (folder or Hub id). Defaults to the `base_model` the compressed checkpoint records
            (model card or config.json); an error says so when nothing is recorded.
        output_dir (`str`, *optional*):
            Where the fine-tuned, Hub-ready folder is written (config.json, model.safetensors, README.md with the
            metrics) and where `checkpoints/step_N` states go. `None` writes nothing.
        dataset_name (`str`, *optional*): a 🤗 Datasets id (e.g. `"fashion_mnist"`); `dataset_config_name` its config.
        train_file / validation_file (`str`, *optional*):
            Local text data: `.txt` (one sample per line), `.csv` / `.tsv` or `.json` / `.jsonl`.
        train_dir / validation_dir (`str`, *optional*):
            Local image folders in the `imagefolder` layout (`<dir>/<class>/<image>`; class names become labels).
        text_column / image_column / label_column (`str`, *optional*):
            Column names; found automatically (`text`, `sentence`, ... / `image`, `img` / `label`, `labels`).
        max_seq_length (`int`, defaults to 128): tokenizer truncation length.
        max_train_samples / max_eval_samples (`int`, *optional*): truncate the datasets (quick runs, tests).
        validation_split_percentage (`int`, defaults to 0):
            Hold out this percentage of the training data for evaluation when there is no validation split.
        augment (`bool`, defaults to `False`): timm's training augmentation instead of the eval transform.
        per_device_train_batch_size / per_device_eval_batch_size (`int`): batch size per process.
        learning_rate (`float`, defaults to 1e-3): Adam's learning rate (the paper's ImageNet value).
        weight_decay (`float`, defaults to 0.0): AdamW weight decay.
        num_train_epochs (`int`, defaults to 1): epochs, unless `max_train_steps` is set.
        max_train_steps (`int`, *optional*): optimizer steps in total; overrides `num_train_epochs`.
        gradient_accumulation_steps (`int`, defaults to 1): batches per optimizer step.
        lr_scheduler_type (`str`, defaults to `"cosine"`): any name of `transformers.get_scheduler`.
        num_warmup_steps (`int`, defaults to 0): warm-up optimizer steps.
        max_grad_norm (`float`, *optional*): clip the gradient norm.
        mixed_precision (`str`, *optional*): `"no"`, `"fp16"`, `"bf16"`; default: the `accelerate launch` setting.
        seed (`int`, defaults to 0): seed of everything (data order, initialisation of new heads).
        train_norms / train_biases / train_dense (`bool`):
            What trains besides the codebooks: norm layers (default yes), biases (default yes), every other dense
            parameter such as the stem and a dense classifier (default no; the paper trains them).
        freeze_norm_stats (`bool`, defaults to `False`):
            Keep BatchNorm running statistics fixed (BatchNorm layers in eval mode while training; their affine
            parameters still train). By default they update, as in the paper; freeze them for small batches or
            data unlike the teacher's training data.
        loss (`str`, defaults to `"auto"`):
            `"kl"` (logit distillation), `"hidden"` (hidden-state distillation) or `"auto"` (`"kl"` when the model
            returns logits, else `"hidden"`).
        temperature (`float`, defaults to 1.0): softmax temperature of the KL loss (scaled by T² as in Hinton et al.).
        distill_weight (`float`, defaults to 1.0): weight of the distillation term.
        task_weight (`float`, defaults to 1.0): weight of the cross-entropy on labels (when the data has labels).
        hidden_target (`str`, defaults to `"pooled"`):
            `"pooled"`: mean over the attention mask of the last hidden state (sentence embedding);
            `"last"`: every token's last hidden state.
        hidden_loss (`str`, defaults to `"cosine"`): `"cosine"` (1 - cosine similarity) or `"mse"`.
        checkpointing_steps (`str`, *optional*): save the training state every N optimizer steps (`"500"`) or
            at the end of every epoch (`"epoch"`), under `output_dir/checkpoints/`.
        resume_from_checkpoint (`str`, *optional*): a state folder to resume from, or `"latest"`.
        eval_every_epoch (`bool`, defaults to `True`): evaluate after each epoch, not only at the end.
        evaluate_before (`bool`, defaults to `True`): evaluate before training (figures "before fine-tuning").
        push_to_hub (`bool`, defaults to `False`): upload `output_dir` to `hub_model_id` at the end.
        hub_model_id (`str`, *optional*): the Hub repo to push to (`org/name`). hub_token: a token.
        num_workers (`int`, defaults to 0): dataloader worker processes.
        progress (`bool`, defaults to `True`): progress bars (main process only).
    """

    model_name_or_path: str | None = None
    teacher_name_or_path: str | None = None
    output_dir: str | None = None
    # data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    train_dir: str | None = None
    validation_dir: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    validation_split_percentage: int = 0
    augment: bool = False
    # optimisation
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: int = 0
    max_grad_norm: float | None = None
    mixed_precision: str | None = None
    seed: int = 0
    # what trains
    train_norms: bool = True
    train_biases: bool = True
    train_dense: bool = False
    freeze_norm_stats: bool = False
    # loss
    loss: Literal["auto", "kl", "hidden"] = "auto"
    temperature: float = 1.0
    distill_weight: float = 1.0
    task_weight: float = 1.0
    hidden_target: Literal["pooled", "last"] = "pooled"
    hidden_loss: Literal["cosine", "mse"] = "cosine"
    # checkpointing, evaluation, output
    checkpointing_steps: str | None = None
    resume_from_checkpoint: str | None = None
    eval_every_epoch: bool = True
    evaluate_before: bool = True
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"FinetuneArguments.{name}={getattr(self, name)!r}: {fix}")

        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "max_seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise bad("max_train_steps", "must be a positive integer (or None to train num_train_epochs).")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be > 0 (the paper used 1e-3 with Adam).")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0.")
        if self.loss not in ("auto", "kl", "hidden"):
            raise bad("loss", "use 'auto', 'kl' (logit distillation) or 'hidden' (hidden-state distillation).")
        if self.hidden_target not in ("pooled", "last"):
            raise bad("hidden_target", "use 'pooled' (mean over the attention mask) or 'last' (every token).")
        if self.hidden_loss not in ("cosine", "mse"):
            raise bad("hidden_loss", "use 'cosine' or 'mse'.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16", "fp8"):
            raise bad("mixed_precision", "use 'no', 'fp16', 'bf16' (or leave it to `accelerate launch`).")
        if not 0 <= self.validation_split_percentage < 100:
            raise bad("validation_split_percentage", "must be in [0, 100).")
        if self.checkpointing_steps is not None:
            value = str(self.checkpointing_steps)
            if value != "epoch" and not (value.isdigit() and int(value) > 0):
                raise bad("checkpointing_steps", "use a positive number of steps (e.g. '500') or 'epoch'.")
            self.checkpointing_steps = value
        if self.train_file and self.train_dir:
            raise ValueError("Give either train_file (text/csv/json) or train_dir (an image folder), not both.")
        if self.dataset_name and (self.train_file or self.train_dir):
            raise ValueError("Give either dataset_name (a Hub dataset) or local data (train_file / train_dir), not both.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and Path(path).suffix.lower() not in _TEXT_EXTENSIONS:
                raise bad(name, f"unsupported file type; use one of {sorted(_TEXT_EXTENSIONS)} (one sample per line for "
                                ".txt), or train_dir for images.")
        for name in ("train_file", "validation_file", "train_dir", "validation_dir"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise bad(name, "does not exist.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (the repo to create or update, e.g. 'my-org/resnet18-vq-ft').")
        if self.push_to_hub and not self.output_dir:
            raise ValueError("push_to_hub needs output_dir (the folder that is uploaded).")


@dataclass
class FinetuneResult:
    """What [`finetune`] returns.

    Attributes:
        metrics (`dict`): evaluation of the fine-tuned model (fp16 codebooks, exactly what is saved), e.g.
            `eval_accuracy`, `eval_agreement`, `eval_kl`, `eval_cosine`, `teacher_accuracy`.
        metrics_before (`dict`): the same before fine-tuning (empty with `evaluate_before=False`).
        history (`list[dict]`): per optimizer step: `step`, `epoch`, `loss` (this process), `lr`.
        completed_steps (`int`): optimizer steps done (including those before a resume).
        output_dir (`Path`, *optional*): the Hub-ready folder, if one was written.
        trainable (`dict`): number of trainable tensors and values per group (codebooks, norms, biases, dense).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    metrics_before: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    completed_steps: int = 0
    output_dir: Path | None = None
    trainable: dict[str, int] = field(default_factory=dict)


# ============================================================================================ models
def load_model(ref: str, *, revision: str | None = None) -> tuple[nn.Module, str, Path]:
    """Load a model (compressed or dense, timm or transformers) from a folder or a Hub repo id.

    Returns:
        `(model, library, folder)`: `library` is `"timm"` or `"transformers"`, `folder` the local copy.

    Raises:
        `FileNotFoundError`: `ref` is neither a folder nor a reachable Hub repo.
    """
    from .integrations.hub import detect_library, resolve_model_dir

    folder = resolve_model_dir(ref, revision=revision)
    library = detect_library(folder)
    if library == "timm":
        import timm

        model = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True)
    else:
        from .integrations.transformers import load_dense

        model = load_dense(folder)  # compressed folders load through hf_vq's registered quantizer
    return model, library, Path(folder)


def default_teacher(folder: str | os.PathLike) -> str | None:
    """The dense model a compressed folder records as its origin, or `None`.

    Looked up in order: `config.json` (`base_model`, `quantization_config.base_model`, transformers'
    `_name_or_path`) and the model card's `base_model` metadata. Only a reference that exists (a folder) or
    looks like a Hub repo id (`org/name`) is returned.
    """
    folder = Path(folder)
    candidates: list[Any] = []
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        candidates += [config.get("base_model"), (config.get("quantization_config") or {}).get("base_model"),
                       config.get("_name_or_path")]
    card_path = folder / "README.md"
    if card_path.is_file():
        from huggingface_hub import ModelCard

        try:
            base = ModelCard.load(card_path).data.to_dict().get("base_model")
        except Exception:  # a card without metadata
            base = None
        candidates += base if isinstance(base, list) else [base]
    for ref in candidates:
        if not isinstance(ref, str) or not ref:
            continue
        if Path(ref).is_dir() and Path(ref).resolve() != folder.resolve():
            return ref
        if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith((".", "/")):
            return ref
    return None


_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                            *( (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def mark_trainable_(model: nn.Module, *, norms: bool = True, biases: bool = True, dense: bool = False) -> dict[str, int]:
    """Set `requires_grad` for fine-tuning a compressed model: codebooks always, the rest as asked (in place).

    Codes are buffers and never train. Returns the number of trainable values per group
    (`codebooks`, `norms`, `biases`, `dense`) and `frozen` (values that stay fixed).

    Raises:
        `ValueError`: if the model has no VQ module (it is not compressed).
    """
    vq = [m for m in model.modules() if isinstance(m, VQModuleMixin)]
    # Codebooks may be shared by several modules and registered on another one (additive quantization with
    # `share="pool"/"global"`): recognise them by identity, wherever they are registered.
    codebooks = {id(m.codebooks) for m in vq}
    if not vq:
        raise ValueError("The model has no hf_vq module: fine-tune a compressed model (hf_vq.quantize_ or `hf-vq "
                         "compress` first), or load it from a folder written by hf_vq.")
    counts = {"codebooks": 0, "norms": 0, "biases": 0, "dense": 0, "frozen": 0}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in codebooks:
                group = "codebooks"
            elif _is_norm(module):
                group = "norms" if norms else "frozen"
            elif name == "bias" or name.endswith("bias"):
                group = "biases" if biases else "frozen"
            else:
                group = "dense" if dense else "frozen"
            param.requires_grad_(group != "frozen")
            counts[group] += param.numel()
    return counts


# ============================================================================================ losses
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
        m = mask.to(dist.dtype) if mask is not None else torch.ones_like(dist)  # [B, T]
        dist = (dist * m).sum(1) / m.sum(1).clamp(min=1)  # [B]
    return dist if reduction == "none" else dist.mean()


# ============================================================================================ data
def _load_raw(args: FinetuneArguments):
    """`(train, validation or None)` as 🤗 Datasets, from a Hub id, local text files or image folders."""
    import datasets

    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        if "train" not in raw:
            raise ValueError(f"Dataset {args.dataset_name!r} has no 'train' split (it has {list(raw)}).")
        train = raw["train"]
        val = next((raw[s] for s in ("validation", "valid", "test") if s in raw), None)
    elif args.train_dir:
        train = datasets.load_dataset("imagefolder", data_dir=args.train_dir, split="train")
        val = (datasets.load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
               if args.validation_dir else None)
    elif args.train_file:
        def load(path: str):
            builder = _TEXT_EXTENSIONS[Path(path).suffix.lower()]
            kwargs = {"delimiter": "\t"} if Path(path).suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(builder, data_files={"train": path}, split="train", **kwargs)
            if builder == "text":  # one sample per line: blank lines are not samples
                ds = ds.filter(lambda row: bool(row["text"].strip()))
            return ds

        train = load(args.train_file)
        val = load(args.validation_file) if args.validation_file else None
    else:
        raise ValueError("No training data: give dataset_name (a 🤗 Datasets id), train_file (.txt/.csv/.json) or "
                         "train_dir (an image folder), or pass train_dataset to finetune().")
    if val is None and args.validation_split_percentage:
        split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, val = split["train"], split["test"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if val is not None and args.max_eval_samples is not None:
        val = val.select(range(min(args.max_eval_samples, len(val))))
    return train, val


def _find_column(ds, wanted: str | None, defaults: tuple[str, ...], what: str, *, feature: str | None = None) -> str | None:
    columns = list(ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"The data has no {what} column {wanted!r}; its columns are {columns}.")
        return wanted
    hit = next((c for c in defaults if c in columns), None)
    if hit is None and feature is not None:
        hit = next((c for c, f in ds.features.items() if type(f).__name__ == feature), None)
    return hit


def _preprocess(args: FinetuneArguments, train, val, *, student: nn.Module, library: str,
                tokenizer_dirs: list[Path]) -> tuple[Any, Any, Callable]:
    """Apply the model's own preprocessing; returns `(train, val, collate_fn)` whose batches are dicts of tensors."""
    image_col = _find_column(train, args.image_column, _IMAGE_COLUMNS, "image", feature="Image")
    label_col = _find_column(train, args.label_column, _LABEL_COLUMNS, "label", feature="ClassLabel")
    if image_col is not None:
        if library == "timm":
            from timm.data import create_transform, resolve_data_config

            data_config = resolve_data_config({}, model=student)
            mode = "L" if data_config["input_size"][0] == 1 else "RGB"
            train_tf = create_transform(**data_config, is_training=args.augment)
            eval_tf = create_transform(**data_config)

            def make(tf):
                def apply(rows):
                    out = {"pixel_values": [tf(img.convert(mode)) for img in rows[image_col]]}  # each [C, H, W]
                    if label_col is not None:
                        out["labels"] = rows[label_col]
                    return out
                return apply
        else:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(_first_with(tokenizer_dirs, "preprocessor_config.json"))

            def make(tf):  # noqa: ARG001 - one processor for both splits
                def apply(rows):
                    pix = processor([img.convert("RGB") for img in rows[image_col]], return_tensors="pt")["pixel_values"]
                    out = {"pixel_values": list(pix)}  # each [C, H, W]
                    if label_col is not None:
                        out["labels"] = rows[label_col]
                    return out
                return apply
            train_tf = eval_tf = None
        train = train.with_transform(make(train_tf))
        val = val.with_transform(make(eval_tf)) if val is not None else None

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}  # [B, C, H, W]
            if "labels" in rows[0]:
                batch["labels"] = torch.tensor([r["labels"] for r in rows])  # [B]
            return batch
        return train, val, collate

    text_col = _find_column(train, args.text_column, _TEXT_COLUMNS, "text", feature=None)
    if text_col is None:
        text_col = next((c for c, f in train.features.items() if getattr(f, "dtype", None) == "string"), None)
    if text_col is None:
        raise ValueError(f"Found neither an image nor a text column in the data (columns {train.column_names}); "
                         "name it with image_column / text_column.")
    if library == "timm":
        raise ValueError("Text data was given for a timm (image) model; give image data (train_dir or an image dataset).")
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(_first_with(tokenizer_dirs, "tokenizer_config.json"))

    def tokenize(rows):
        out = tokenizer(rows[text_col], truncation=True, max_length=args.max_seq_length)
        if label_col is not None:
            out["labels"] = rows[label_col]
        return out

    def prepare(ds):
        return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")

    train = prepare(train)
    val = prepare(val) if val is not None else None
    return train, val, DataCollatorWithPadding(tokenizer)


def _first_with(folders: list[Path], filename: str) -> Path:
    for folder in folders:
        if folder is not None and (Path(folder) / filename).is_file():
            return Path(folder)
    raise FileNotFoundError(f"None of {[str(f) for f in folders if f]} has {filename}: copy the dense model's "
                            "tokenizer / preprocessor files next to the compressed model.")


# ============================================================================================ forward and loss
def _inputs(batch: dict[str, torch.Tensor], library: str) -> tuple[tuple, dict]:
    """Positional and keyword model inputs of a batch: timm models take the image tensor, transformers keywords."""
    if library == "timm":
        return (batch["pixel_values"],), {}  # [B, C, H, W]
    return (), {k: v for k, v in batch.items() if k != "labels"}


def _logits_of(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    return out.get("logits") if hasattr(out, "get") else getattr(out, "logits", None)


def _representation(out: Any, mask: torch.Tensor | None, target: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):  # a headless timm model: pooled features [B, H]
        return out
    hidden = out.get("last_hidden_state") if hasattr(out, "get") else None
    if hidden is None:
        raise ValueError("loss='hidden' needs a model returning last_hidden_state (a transformers base model) or "
                         "features (a timm model with num_classes=0).")
    return mean_pool(hidden, mask) if target == "pooled" else hidden  # [B, H] or [B, T, H]


class _Objective:
    """Computes the fine-tuning loss (and evaluation statistics) of a student against its teacher."""

    def __init__(self, args: FinetuneArguments, library: str, mode: str) -> None:
        self.args, self.library, self.mode = args, library, mode

    def __call__(self, student_out: Any, teacher_out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        args, mask = self.args, batch.get("attention_mask")
        if self.mode == "kl":
            s, t = _logits_of(student_out), _logits_of(teacher_out)  # [B, C] or [B, T, C]
            loss = args.distill_weight * distillation_loss(s, t, temperature=args.temperature, mask=mask)
            labels = batch.get("labels")
            if labels is not None and args.task_weight and s.dim() == 2:
                loss = loss + args.task_weight * F.cross_entropy(s.float(), labels)
            return loss
        s = _representation(student_out, mask, args.hidden_target)
        t = _representation(teacher_out, mask, args.hidden_target)
        return args.distill_weight * hidden_state_loss(s, t, kind=args.hidden_loss, mask=mask)


def _detect_mode(args: FinetuneArguments, out: Any) -> str:
    if args.loss != "auto":
        return args.loss
    return "kl" if _logits_of(out) is not None else "hidden"


# ============================================================================================ the loop
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


def _probe_unused_(model: nn.Module, teacher: nn.Module, objective: _Objective, batch: dict, library: str) -> list[str]:
    """One forward/backward on a small batch (eval mode, nothing updated): freeze trainable parameters the loss
    never reaches, so that DDP needs no `find_unused_parameters`. Returns their names."""
    was_training = model.training
    model.eval()
    args, kwargs = _inputs(batch, library)
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


def _train_mode_(model: nn.Module, freeze_norm_stats: bool) -> None:
    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _round_codebooks_(model: nn.Module) -> None:
    """Codebooks train in fp32 and are stored in fp16: round them so evaluation sees exactly the saved model."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, VQModuleMixin) and module.codebooks.is_floating_point():
                module.codebooks.copy_(module.codebooks.half().to(module.codebooks.dtype))


@torch.no_grad()
def _evaluate(accelerator, model: nn.Module, teacher: nn.Module, loader, objective: _Objective, library: str, *,
              teacher_metrics: bool, desc: str, progress: bool) -> dict[str, float]:
    """Metrics over the whole evaluation set, gathered across processes (`gather_for_metrics` drops the padding)."""
    from tqdm.auto import tqdm

    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in tqdm(loader, desc=desc, disable=not (progress and accelerator.is_local_main_process), leave=False):
        args, kwargs = _inputs(batch, library)
        with accelerator.autocast():
            s_out, t_out = model(*args, **kwargs), teacher(*args, **kwargs)
        stats: dict[str, torch.Tensor] = {}  # each [B]
        mask = batch.get("attention_mask")
        if objective.mode == "kl":
            s, t = _logits_of(s_out).float(), _logits_of(t_out).float()  # [B, C] (or [B, T, C])
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
            s = _representation(s_out, mask, "pooled").float()  # [B, H]: the sentence embedding
            t = _representation(t_out, mask, "pooled").float()
            stats["cosine"] = F.cosine_similarity(s, t, dim=-1)
            target = objective.args.hidden_target
            stats["loss"] = hidden_state_loss(_representation(s_out, mask, target), _representation(t_out, mask, target),
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
        accelerator (`accelerate.Accelerator`, *optional*): one to reuse (otherwise created from `args`).

    Returns:
        [`FinetuneResult`]: metrics after (and before) fine-tuning, the loss history, the output folder.

    Raises:
        `ValueError`: the model is not compressed, no teacher can be found, the teacher's outputs do not match the
            student's, or the data options are inconsistent (each message says what to pass instead).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # ---------------------------------------------------------------- models
    student_dir: Path | None = None
    teacher_dir: Path | None = None
    library = None
    if student is None:
        if not args.model_name_or_path:
            raise ValueError("Give model_name_or_path (a compressed model folder or Hub id) or pass student=.")
        student, library, student_dir = load_model(args.model_name_or_path)
    library = library or _library_of(student)
    if not any(isinstance(m, VQModuleMixin) for m in student.modules()):
        raise ValueError(f"{args.model_name_or_path or 'The student'} is not compressed with hf_vq (no VQ module). Compress "
                         "it first (`hf-vq compress MODEL --out DIR` or hf_vq.quantize_) and fine-tune DIR.")
    if teacher is None:
        ref = args.teacher_name_or_path or (default_teacher(student_dir) if student_dir is not None else None)
        if ref is None:
            raise ValueError(
                f"No dense teacher: {student_dir or 'the model'} records no base model (no `base_model` in its model "
                "card or config.json). Pass teacher_name_or_path (--teacher_name_or_path), the dense model's folder or "
                "Hub id."
            )
        teacher, _, teacher_dir = load_model(ref)
        args.teacher_name_or_path = ref
    if any(isinstance(m, VQModuleMixin) for m in teacher.modules()):
        raise ValueError("The teacher is itself compressed; pass the dense model (teacher_name_or_path).")
    teacher.eval().requires_grad_(False)

    # ---------------------------------------------------------------- accelerator
    if accelerator is None:
        from accelerate.state import AcceleratorState

        # Several runs in one process (benchmarks, notebooks) may differ in mixed precision or accumulation: start
        # from a fresh accelerator state; the distributed environment (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            project_dir=args.output_dir,
        )
    set_seed(args.seed)

    # ---------------------------------------------------------------- data
    if train_dataset is None:
        train_dataset, raw_eval = _load_raw(args)
        eval_dataset = eval_dataset if eval_dataset is not None else raw_eval
    if _is_hf_dataset(train_dataset):
        with accelerator.main_process_first():
            train_dataset, eval_dataset, collate_fn = _preprocess(
                args, train_dataset, eval_dataset, student=student, library=library,
                tokenizer_dirs=_asset_dirs(student_dir, teacher_dir, student, teacher))
    if len(train_dataset) == 0:
        raise ValueError("The training data is empty.")
    from torch.utils.data import DataLoader, default_collate

    collate = collate_fn or default_collate
    train_loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True,
                              collate_fn=collate, num_workers=args.num_workers)
    eval_loader = (DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate,
                              num_workers=args.num_workers) if eval_dataset is not None else None)

    # ---------------------------------------------------------------- what trains; DDP-safety
    trainable = mark_trainable_(student, norms=args.train_norms, biases=args.train_biases, dense=args.train_dense)
    probe = collate([train_dataset[i] for i in range(min(2, len(train_dataset)))])
    probe_args, probe_kwargs = _inputs(probe, library)
    with torch.no_grad():
        s_out, t_out = student.eval()(*probe_args, **probe_kwargs), teacher(*probe_args, **probe_kwargs)
    student.train()
    mode = _detect_mode(args, s_out)
    _check_outputs(mode, s_out, t_out)
    objective = _Objective(args, library, mode)
    unused = _probe_unused_(student, teacher, objective, probe, library)
    if unused:
        logger.info("hf_vq finetune: %d trainable tensors do not reach the loss and stay frozen: %s", len(unused),
                    unused[:8])
    trainable["unused_frozen"] = len(unused)
    # Codes never change and are identical on every process: DDP must neither broadcast nor check them.
    codes = [name for name, _ in student.named_buffers() if name.endswith("codes")]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(student, codes)

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)

    # ---------------------------------------------------------------- schedule (per-process batch counts)
    batches_per_epoch = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # The prepared scheduler steps once per process at every optimizer step (accelerate's convention).
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(student, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    teacher.to(accelerator.device)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    epochs = math.ceil(max_steps / steps_per_epoch)

    result = FinetuneResult(trainable=trainable)
    eval_kwargs = dict(objective=objective, library=library, progress=args.progress)
    if eval_loader is not None and args.evaluate_before and not args.resume_from_checkpoint:
        result.metrics_before = _evaluate(accelerator, model, teacher, eval_loader, teacher_metrics=True,
                                          desc="eval (before)", **eval_kwargs)
        accelerator.print(f"hf_vq finetune: before fine-tuning {_fmt(result.metrics_before)}")

    # ---------------------------------------------------------------- resume
    completed, start_epoch, skip_batches = 0, 0, 0
    state = _resolve_resume(args)
    if state is not None:
        accelerator.print(f"hf_vq finetune: resuming from {state}")
        accelerator.load_state(str(state))
        number = int(state.name.split("_")[1])
        if state.name.startswith("epoch_"):
            start_epoch, completed = number + 1, (number + 1) * steps_per_epoch
        else:  # the last step of an epoch may take fewer batches: count whole epochs in steps
            completed = number
            start_epoch, steps_into_epoch = divmod(number, steps_per_epoch)
            skip_batches = steps_into_epoch * args.gradient_accumulation_steps
    save_every = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None

    # ---------------------------------------------------------------- train
    accelerator.print(f"hf_vq finetune: {mode} distillation, {max_steps} steps ({epochs} epochs of {steps_per_epoch}), "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}, trainable {trainable}")
    bar = tqdm(total=max_steps, initial=completed, desc="finetune", unit="step",
               disable=not (args.progress and accelerator.is_local_main_process))
    for epoch in range(start_epoch, epochs):
        _train_mode_(model, args.freeze_norm_stats)
        train_loader.set_epoch(epoch)
        loader = train_loader
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
        for batch in loader:
            with accelerator.accumulate(model):
                b_args, b_kwargs = _inputs(batch, library)
                with accelerator.autocast():
                    with torch.no_grad():
                        t_out = teacher(*b_args, **b_kwargs)
                    loss = objective(model(*b_args, **b_kwargs), t_out, batch)
                accelerator.backward(loss)
                if args.max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # FSDP: the wrapped ones
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            result.history.append({"step": completed, "epoch": epoch, "loss": float(loss.item()),
                                   "lr": float(scheduler.get_last_lr()[0])})
            if save_every and completed % save_every == 0:
                accelerator.save_state(str(_checkpoint_dir(args.output_dir) / f"step_{completed}"))
            if completed >= max_steps:
                break
        if args.checkpointing_steps == "epoch":
            accelerator.save_state(str(_checkpoint_dir(args.output_dir) / f"epoch_{epoch}"))
        if eval_loader is not None and args.eval_every_epoch and completed < max_steps:
            metrics = _evaluate(accelerator, model, teacher, eval_loader, teacher_metrics=False,
                                desc=f"eval (epoch {epoch})", **eval_kwargs)
            accelerator.print(f"hf_vq finetune: epoch {epoch}: {_fmt(metrics)}")
        if completed >= max_steps:
            break
    bar.close()
    result.completed_steps = completed

    # ---------------------------------------------------------------- final evaluation, exactly the saved weights
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    _round_codebooks_(unwrapped)
    if eval_loader is not None:
        result.metrics = _evaluate(accelerator, model, teacher, eval_loader, teacher_metrics=True,
                                   desc="eval (after)", **eval_kwargs)
        accelerator.print(f"hf_vq finetune: after fine-tuning {_fmt(result.metrics)}")
    if args.output_dir:
        result.output_dir = Path(args.output_dir)
        to_save = unwrapped
        if accelerator.distributed_type == DistributedType.FSDP:
            # Sharded parameters: gather the full state dict (a collective) and load it into a fresh copy.
            full = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                if not args.model_name_or_path:
                    raise ValueError("Under FSDP the fine-tuned model is saved from model_name_or_path's folder; "
                                     "pass it (in-memory students cannot be re-materialised).")
                to_save = load_model(args.model_name_or_path)[0]
                to_save.load_state_dict(full)
        if accelerator.is_main_process:
            _save_output(to_save, args, library, result, student_dir=student_dir, teacher_dir=teacher_dir)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _asset_dirs(student_dir: Path | None, teacher_dir: Path | None, *models: nn.Module) -> list[Path]:
    """Folders that may hold the tokenizer / image processor: the models' own, then where in-memory transformers
    models were loaded from (`name_or_path`)."""
    dirs = [d for d in (student_dir, teacher_dir) if d is not None]
    for model in models:
        path = getattr(model, "name_or_path", None)
        if isinstance(path, str) and path and Path(path).is_dir():
            dirs.append(Path(path))
    return dirs


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _library_of(model: nn.Module) -> str:
    try:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            return "transformers"
    except ImportError:  # pragma: no cover
        pass
    return "timm"


def _is_hf_dataset(ds: Any) -> bool:
    try:
        import datasets

        return isinstance(ds, datasets.Dataset)
    except ImportError:  # pragma: no cover
        return False


def _check_outputs(mode: str, s_out: Any, t_out: Any) -> None:
    if mode == "kl":
        s, t = _logits_of(s_out), _logits_of(t_out)
        if s is None or t is None:
            raise ValueError("loss='kl' needs logits from both models; this model is headless: use loss='hidden'.")
        if s.shape != t.shape:
            raise ValueError(f"The student's logits {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ: the "
                             "teacher is not the dense model this checkpoint was compressed from.")
    else:
        s, t = _representation(s_out, None, "last"), _representation(t_out, None, "last")
        if s.shape != t.shape:
            raise ValueError(f"The student's hidden states {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ: "
                             "the teacher is not the dense model this checkpoint was compressed from.")


# ============================================================================================ output
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
                   + ("KL on logits" + (" + cross-entropy" if args.task_weight else "") if "eval_kl" in m
                      else f"{args.hidden_loss} on the {args.hidden_target} hidden state") + ")",
        "steps": f"{result.completed_steps} (batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps}"
                 " accumulation per process)",
        "optimizer": f"AdamW lr {args.learning_rate:g}, {args.lr_scheduler_type} schedule",
        "trained": "codebooks" + (", norms" if args.train_norms else "") + (", biases" if args.train_biases else "")
                   + (", dense layers" if args.train_dense else "") + "; codes frozen",
        "evaluation samples": m.get("eval_samples"),
    }
    eval_dataset = None
    if validation and metrics:
        name = args.dataset_name or Path(str(validation)).name
        eval_dataset = {"name": name, "type": args.dataset_name or name,
                        "split": "validation" if not args.dataset_name else "test"}
    return {"metrics": metrics, "fidelity": fidelity, "finetuning": finetuning, "eval_dataset": eval_dataset}


def _save_output(model: nn.Module, args: FinetuneArguments, library: str, result: FinetuneResult, *,
                 student_dir: Path | None, teacher_dir: Path | None) -> None:
    """Write the Hub-ready folder into `output_dir` (next to `checkpoints/`), with the metrics in the card; push."""
    from .checkpoint import checkpoint_size_report
    from .integrations.hub import render_model_card, upload_folder

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = args.teacher_name_or_path if args.teacher_name_or_path and not Path(args.teacher_name_or_path).exists() else None
    with tempfile.TemporaryDirectory(dir=out, prefix=".model-") as tmp:
        staged = Path(tmp) / "model"
        if library == "timm":
            from .integrations.timm import save_compressed

            save_compressed(model, staged, base_model=base, repo_id=args.hub_model_id)
        else:
            from .integrations.transformers import save_compressed

            save_compressed(model, staged, source_dir=student_dir or teacher_dir, base_model=base)
        config = model.vq_config
        sections = card_sections(args, result)
        card = render_model_card(base_model=base, library_name=library, config_spec=config.spec,
                                 size=checkpoint_size_report(staged), repo_id=args.hub_model_id,
                                 extra_tags=["timm", "image-classification"] if library == "timm" else None,
                                 config=config, source_dir=teacher_dir, **sections)
        if args.dataset_name:
            card.data.datasets = [args.dataset_name]
        card.save(staged / "README.md")
        (staged / "finetune_results.json").write_text(json.dumps(
            {"args": dataclasses.asdict(args) | {"hub_token": None}, "metrics": result.metrics,
             "metrics_before": result.metrics_before, "completed_steps": result.completed_steps,
             "trainable": result.trainable}, indent=2, default=str) + "\n")
        for path in staged.iterdir():  # move in file by file: checkpoints/ next to the model stays
            target = out / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
        if args.push_to_hub:
            upload = Path(tmp) / "upload"
            upload.mkdir()
            for path in out.iterdir():
                if path.is_file() and not path.name.startswith("."):
                    shutil.copy2(path, upload / path.name)
            upload_folder(upload, args.hub_model_id, token=args.hub_token,
                          commit_message="hf_vq: fine-tuned codebooks")
