"""Fine-tuning data: a 🤗 Datasets id, local text files (any suffix is plain text) or image folders, preprocessed
with the model's own transform or tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..calibrate.sources import load_dataset_any
from .arguments import STRUCTURED_SUFFIXES, FinetuneArguments

__all__ = ["load_raw", "preprocess", "load_text_file"]

_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label")
_TEXT_COLUMNS = ("text", "sentence", "content", "document")


def load_text_file(path: str, field: str = "train_file"):
    """A local text file as a 🤗 Dataset: `.csv` / `.tsv` / `.json` / `.jsonl` by their format, anything else as plain
    text with one sample per non-blank line (e.g. gensim's `lee_background.cor`).

    Raises:
        `ValueError`: if the file holds no sample (naming the field and the file).
    """
    import datasets

    suffix = Path(path).suffix.lower()
    builder = STRUCTURED_SUFFIXES.get(suffix, "text")
    with open(path, "rb") as f:
        if b"\x00" in f.read(8192):
            raise ValueError(f"FinetuneArguments.{field}={path!r} is not a text file (it holds NUL bytes); give plain "
                             "text, .csv/.tsv or .json/.jsonl.")
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **kwargs)
    if builder == "text":  # one sample per line: blank lines are not samples
        ds = ds.filter(lambda row: bool(row["text"].strip()))
    if len(ds) == 0:
        raise ValueError(f"FinetuneArguments.{field}={path!r} holds no sample (only blank lines); give a file with "
                         "text, one sample per line.")
    return ds


def load_raw(args: FinetuneArguments):
    """`(train, validation or None)` as 🤗 Datasets, from a Hub id, local text files or image folders."""
    import datasets

    if args.dataset_name:
        raw = load_dataset_any(args.dataset_name, args.dataset_config_name)
        if "train" not in raw:
            raise ValueError(f"Dataset {args.dataset_name!r} has no 'train' split (it has {list(raw)}).")
        train = raw["train"]
        val = next((raw[s] for s in ("validation", "valid", "test") if s in raw), None)
    elif args.train_dir:
        train = datasets.load_dataset("imagefolder", data_dir=args.train_dir, split="train")
        val = (datasets.load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
               if args.validation_dir else None)
    elif args.train_file:
        train = load_text_file(args.train_file, "train_file")
        val = load_text_file(args.validation_file, "validation_file") if args.validation_file else None
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


def preprocess(args: FinetuneArguments, train, val, *, student: nn.Module, library: str,
                tokenizer_dirs: list[Path]) -> tuple[Any, Any, Callable]:
    """Apply the model's own preprocessing; returns `(train, val, collate_fn)` whose batches are dicts of tensors."""
    image_col = _find_column(train, args.image_column, _IMAGE_COLUMNS, "image", feature="Image")
    label_col = _find_column(train, args.label_column, _LABEL_COLUMNS, "label", feature="ClassLabel")
    if image_col is not None:
        if library == "timm":
            from ..integrations.timm import eval_transform

            eval_tf, data_config = eval_transform(student)
            train_tf = eval_transform(data_config=data_config, training=True)[0] if args.augment else eval_tf
            mode = "L" if data_config["input_size"][0] == 1 else "RGB"

            def make(tf):
                def apply(rows):
                    out = {"pixel_values": [tf(img.convert(mode)) for img in rows[image_col]]}  # each [C, H, W]
                    if label_col is not None:
                        out["labels"] = rows[label_col]
                    return out
                return apply
        else:
            from ..integrations.transformers.tools import load_image_processor

            processor = load_image_processor(_first_with(tokenizer_dirs, "preprocessor_config.json"))

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
    from ..integrations.transformers.tools import load_tokenizer, padding_collator

    tokenizer = load_tokenizer(_first_with(tokenizer_dirs, "tokenizer_config.json"))

    def tokenize(rows):
        out = tokenizer(rows[text_col], truncation=True, max_length=args.max_seq_length)
        if label_col is not None:
            out["labels"] = rows[label_col]
        return out

    def prepare(ds):
        return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")

    train = prepare(train)
    val = prepare(val) if val is not None else None
    return train, val, padding_collator(tokenizer)


def _first_with(folders: list[Path], filename: str) -> Path:
    for folder in folders:
        if folder is not None and (Path(folder) / filename).is_file():
            return Path(folder)
    raise FileNotFoundError(f"None of {[str(f) for f in folders if f]} has {filename}: copy the dense model's "
                            "tokenizer / preprocessor files next to the compressed model.")
