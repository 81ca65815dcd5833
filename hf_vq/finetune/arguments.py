"""The arguments and the result of [`hf_vq.finetune.finetune`]."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["FinetuneArguments", "FinetuneResult", "CHECKPOINTS_DIR", "STRUCTURED_SUFFIXES", "BINARY_SUFFIXES"]

CHECKPOINTS_DIR = "checkpoints"
#: Structured text formats by suffix; a file with any other suffix is plain text, one sample per line, unless its
#: suffix names a binary format (refused: it would be read as garbage text).
STRUCTURED_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
BINARY_SUFFIXES = {".parquet", ".arrow", ".feather", ".zip", ".gz", ".bz2", ".xz", ".tar", ".npy", ".npz", ".pt",
                   ".pth", ".bin", ".safetensors", ".pkl", ".pickle", ".h5", ".hdf5", ".xlsx", ".pdf"}


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
            Local text data: `.csv` / `.tsv`, `.json` / `.jsonl`, or plain text with any other suffix (`.txt`,
            gensim's `.cor`, none...): one sample per non-blank line.
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
        scale_parameter (`bool`, defaults to `False`):
            Give each trained tensor the learning rate `learning_rate × max(RMS(tensor), 0.02)`, measured once before
            training (the relative step of Adafactor's `scale_parameter`). Adam's steps are about `lr` per value
            whatever the value's size, and a compressed layer's tensors differ in size by 100x: unit-RMS codebooks,
            per-channel scales near 0.01-0.1. One learning rate moves the scales 20x faster, relative to their size,
            than the codebooks; this moves every tensor by the same share of its size. Not under FSDP.
        weight_decay (`float`, defaults to 0.0): AdamW weight decay.
        num_train_epochs (`int`, defaults to 1): epochs, unless `max_train_steps` is set.
        max_train_steps (`int`, *optional*): optimizer steps in total; overrides `num_train_epochs`.
        gradient_accumulation_steps (`int`, defaults to 1): batches per optimizer step.
        lr_scheduler_type (`str`, defaults to `"cosine"`): any name of `transformers.get_scheduler`.
        num_warmup_steps (`int`, defaults to 0): warm-up optimizer steps.
        max_grad_norm (`float`, *optional*): clip the gradient norm.
        mixed_precision (`str`, *optional*): `"no"`, `"fp16"`, `"bf16"`; default: the `accelerate launch` setting.
        seed (`int`, defaults to 0): seed of everything (data order, initialisation of new heads).
        train_scales / train_norms / train_biases / train_dense (`bool`):
            What trains besides the codebooks: the per-output-channel scales of modules that have them (default yes),
            norm layers (default yes), biases (default yes), every other dense
            parameter such as the stem and a dense classifier (default no; the paper trains them).
        code_update_fraction (`float`, defaults to 0.0):
            Let the codes move (opt-in): every `code_update_every` optimizer steps, at most this share of each
            layer's code blocks is re-assigned towards a straight-through continuous target (see
            `hf_vq.finetune.codes`); `0` keeps the codes frozen. Costs a float32 copy of every compressed weight
            (plus its optimizer state) while training; the saved format is unchanged.
        code_update_every (`int`, defaults to 10): optimizer steps between code re-assignments.
        code_learning_rate (`float`, *optional*): AdamW learning rate of the straight-through targets (default:
            `learning_rate`). Adam's per-element steps bound how far a target moves between re-assignments (at most
            about `code_learning_rate × code_update_every`), hence how far a re-assigned codeword can jump; plain
            gradient steps were tried and let a few large-gradient blocks jump to extreme codewords (MiniLM's
            embedding cosine fell to 0.09 in an ad-hoc run, not committed).
        dropout (`bool`, defaults to `True`):
            `False` trains the student in eval mode: no dropout anywhere (and BatchNorm statistics fixed). For
            distillation towards a deterministic teacher, dropout is noise the student cannot match: on MiniLM at
            10x, 300 steps with dropout made the held-out loss worse at every evaluation, without it 13% better (an
            ad-hoc run, not committed).
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
            `"last"`: every token's last hidden state; `"layers"`: every token of every layer's output (a
            transformers model run with `output_hidden_states`), which gives each block its own target.
        hidden_loss (`str`, defaults to `"cosine"`): `"cosine"` (1 - cosine similarity) or `"mse"`.
        checkpointing_steps (`str`, *optional*): save the training state every N optimizer steps (`"500"`) or
            at the end of every epoch (`"epoch"`), under `output_dir/checkpoints/`.
        resume_from_checkpoint (`str`, *optional*): a state folder to resume from, or `"latest"`.
        eval_every_epoch (`bool`, defaults to `True`): evaluate after each epoch, not only at the end.
        eval_steps (`int`, *optional*): also evaluate every N optimizer steps (needs evaluation data).
        early_stopping_patience (`int`, *optional*): with `eval_steps`, stop when the evaluation loss has not
            improved for this many evaluations, and end with the best evaluated weights (codes included).
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
    scale_parameter: bool = False
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
    train_scales: bool = True
    train_norms: bool = True
    train_biases: bool = True
    train_dense: bool = False
    freeze_norm_stats: bool = False
    dropout: bool = True
    code_update_fraction: float = 0.0
    code_update_every: int = 10
    code_learning_rate: float | None = None
    # loss
    loss: Literal["auto", "kl", "hidden"] = "auto"
    temperature: float = 1.0
    distill_weight: float = 1.0
    task_weight: float = 1.0
    hidden_target: Literal["pooled", "last", "layers"] = "pooled"
    hidden_loss: Literal["cosine", "mse"] = "cosine"
    # checkpointing, evaluation, output
    checkpointing_steps: str | None = None
    resume_from_checkpoint: str | None = None
    eval_every_epoch: bool = True
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
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
        if not 0 <= self.code_update_fraction <= 1:
            raise bad("code_update_fraction", "must be in [0, 1] (a share of each layer's code blocks; 0 = frozen codes).")
        for name in ("code_update_every", "eval_steps", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise bad(name, "must be a positive integer.")
        if self.code_learning_rate is not None and not self.code_learning_rate > 0:
            raise bad("code_learning_rate", "must be > 0 (or None for learning_rate).")
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise bad("early_stopping_patience", "needs eval_steps (how often the held-out loss is measured).")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise bad("max_train_steps", "must be a positive integer (or None to train num_train_epochs).")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be > 0 (the paper used 1e-3 with Adam).")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0.")
        if self.loss not in ("auto", "kl", "hidden"):
            raise bad("loss", "use 'auto', 'kl' (logit distillation) or 'hidden' (hidden-state distillation).")
        if self.hidden_target not in ("pooled", "last", "layers"):
            raise bad("hidden_target", "use 'pooled' (mean over the attention mask), 'last' (every token) or 'layers' "
                                       "(every token of every layer's hidden state).")
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
            if path is not None and Path(path).suffix.lower() in BINARY_SUFFIXES:
                raise bad(name, f"unsupported file type {Path(path).suffix!r}; give plain text (one sample per line, any "
                                f"other suffix), {sorted(STRUCTURED_SUFFIXES)}, dataset_name for a 🤗 Datasets id, or "
                                "train_dir for images.")
        for name in ("train_file", "validation_file", "train_dir", "validation_dir"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise bad(name, "does not exist.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and (not Path(path).is_file() or Path(path).stat().st_size == 0):
                raise bad(name, "is empty or not a file; give a text (.txt, any suffix), .csv/.tsv or .json/.jsonl "
                                "file with at least one sample.")
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
        history (`list[dict]`): per optimizer step: `step`, `epoch`, `loss` (this process), `lr`; with code
            updates, `codes_changed` (share of the blocks re-assigned) at the steps that re-assign.
        evaluations (`list[dict]`): the held-out metrics at every `eval_steps` (with their `step`).
        best_step (`int`, *optional*): with early stopping, the step whose weights were kept (0: the weights before
            training, when no evaluation beat them).
        arguments ([`FinetuneArguments`], *optional*): the settings of the run (what the model card describes).
        completed_steps (`int`): optimizer steps done (including those before a resume).
        output_dir (`Path`, *optional*): the Hub-ready folder, if one was written.
        trainable (`dict`): number of trainable tensors and values per group (codebooks, norms, biases, dense).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    metrics_before: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    arguments: FinetuneArguments | None = None
    completed_steps: int = 0
    output_dir: Path | None = None
    trainable: dict[str, int] = field(default_factory=dict)
