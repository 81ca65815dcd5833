"""PQF's third step right after compression: distil a freshly compressed model from its dense original on the
calibration source (`hf-vq compress --finetune-steps N`).

The data is drawn from the same source calibration used (gensim's Wikipedia sentences, random crops of the
calibration photos, or the user's `--calibration-data`), never from the inputs fidelity is reported on; a held-out
part of it measures the distillation loss every few steps and stops the run when it stops improving, keeping the
best weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..calibrate.sources import input_length
from .arguments import FinetuneArguments, FinetuneResult

__all__ = ["finetune_compressed", "DEFAULT_FINETUNE"]

logger = logging.getLogger(__name__)

#: The settings `hf-vq compress --finetune-steps` uses (runs on 2 CPU cores: benchmarks/results/finetune_minilm.md
#: and finetune_compress.md): batch, learning rates (text, images), held-out samples and early stopping.
#: Text models train every tensor at 3e-3 of its RMS (`scale_parameter`; the straight-through code targets at 2e-4):
#: on MiniLM at 16x, 600 steps end with a 7% lower held-out loss than one learning rate of 2e-4 for every tensor
#: (benchmarks/results/experiment_finetune_lr.md). Image models keep one rate, 5e-5 (relative rates are untested
#: there). Text students train without dropout (`FinetuneArguments(dropout=False)`): with it, MiniLM's default 10x
#: model got a worse held-out loss at every evaluation (best at step 0), without it 0.0155 -> 0.0134 in 300 steps
#: (an ad-hoc run, not committed). Text models compute in bfloat16 where the device does so natively
#: (`mixed_precision="bf16"`, see [`native_bf16`]): a training step of MiniLM at 16x takes 300 instead of 493 ms
#: (benchmarks/results/finetune_minilm.md), and 1000 steps ended with the same held-out loss and news cosine as in
#: float32 (ad-hoc runs, not committed).
DEFAULT_FINETUNE = dict(batch_size=16, learning_rate=3e-3, image_learning_rate=5e-5, held_out=128, eval_every=50,
                        patience=3, hidden_target="pooled",
                        # text models only (images keep one rate, their dropout and float32: untested there)
                        scale_parameter=True, code_learning_rate=2e-4, dropout=False, mixed_precision="bf16")


def native_bf16() -> bool:
    """Whether this process's device computes in bfloat16 natively, so that bf16 autocast runs faster, not slower:
    a CUDA GPU that supports it, a CPU with AVX512-BF16 (or AMX). Other devices: `False`."""
    from accelerate import PartialState

    device = PartialState().device
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe is not None and probe() for probe in probes)
    return False


def finetune_compressed(
    model: nn.Module,
    dense: nn.Module,
    *,
    steps: int,
    tokenizer: Any = None,
    photos: list | None = None,
    source: str | None = None,
    skip: int = 0,
    batch_size: int = DEFAULT_FINETUNE["batch_size"],
    learning_rate: float | None = None,
    held_out: int = DEFAULT_FINETUNE["held_out"],
    eval_every: int = DEFAULT_FINETUNE["eval_every"],
    patience: int | None = DEFAULT_FINETUNE["patience"],
    code_update_fraction: float = 0.0,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune the compressed `model` in place by distillation from `dense`, on the calibration source.

    Text models (give `tokenizer`): sentences of `source` (a text file of any suffix, a 🤗 Datasets name) or, by
    default, of gensim's Wikipedia pages, after the first `skip` (those calibration used); the last `held_out`
    drawn sentences are the early-stopping set. Image models (give `photos`, e.g. `hf_vq.data.real_photos(
    hf_vq.data.CALIBRATION_PHOTOS)` or the images of a folder): a different random crop for every sample, the
    held-out crops drawn with another seed.
    Trains codebooks, per-output-channel scales, norms, biases and the layers left dense (codes too with
    `code_update_fraction > 0`); text models in bfloat16 autocast where the device computes it natively
    ([`native_bf16`]; not over the `mixed_precision` of an `accelerate launch`), with
    the loss [`finetune`] picks (KL on logits, or the hidden-state cosine for encoders). Runs on the processes of an
    `accelerate launch`, like [`finetune`].

    Args:
        model (`nn.Module`): the compressed model (changed in place).
        dense (`nn.Module`): its dense original (the teacher; unchanged).
        steps (`int`): optimizer steps at most (early stopping may end sooner).
        tokenizer (*optional*): the text model's tokenizer; `None` for image models.
        photos (`list`, *optional*): `PIL.Image`s to crop, for image models.
        source (`str`, *optional*): text models: the calibration data given to `hf-vq compress --calibration-data`.
        skip (`int`, defaults to 0): text sentences to skip at the start of the source (used by calibration).
        batch_size (`int`): samples per step.
        learning_rate (`float`, *optional*): AdamW's; default for text models 3e-3 of each tensor's RMS
            (`scale_parameter=True`, see [`DEFAULT_FINETUNE`]), for image models 5e-5 for every tensor (on
            EfficientNet-Lite0 at 6x, 2e-4 made every held-out evaluation worse than the start in an ad-hoc run, not
            committed; 5e-5 improves it: benchmarks/results/finetune_compress.md).
        held_out (`int`): samples of the early-stopping set. eval_every: steps between its evaluations.
        patience (`int`, *optional*): evaluations without improvement before stopping (`None`: never stop early).
        code_update_fraction (`float`): see [`FinetuneArguments`]; `0` keeps the codes.
        overrides: any other [`FinetuneArguments`] field (e.g. `train_norms=False`, `hidden_target="last"`).

    Returns:
        [`FinetuneResult`]: held-out metrics before and after, the loss history, `best_step`.

    Raises:
        `ValueError`: `steps < 1`, or the source has too few samples for a training and a held-out set.
    """
    from .loop import finetune, new_accelerator

    if steps < 1:
        raise ValueError(f"finetune_compressed: steps={steps} must be >= 1 (hf-vq compress --finetune-steps).")
    text = tokenizer is not None
    if learning_rate is None:
        learning_rate = DEFAULT_FINETUNE["learning_rate" if text else "image_learning_rate"]
    if text:
        train, val, collate = _text_data(tokenizer, source, skip=skip, n_train=steps * batch_size, held_out=held_out,
                                         max_length=input_length(dense, max_length))
    elif photos:
        train, val, collate = _image_data(dense, photos, n_train=steps * batch_size, held_out=held_out, seed=seed)
    else:
        raise ValueError("finetune_compressed needs a tokenizer (text models) or photos (image models).")
    settings = dict(max_train_steps=steps, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
                    learning_rate=learning_rate, lr_scheduler_type="cosine", seed=seed,
                    hidden_target=DEFAULT_FINETUNE["hidden_target"], eval_every_epoch=False,
                    eval_steps=min(eval_every, steps), early_stopping_patience=patience,
                    code_update_fraction=code_update_fraction, progress=progress,
                    train_dense=True,  # what the compressor left dense (stem, depthwise convs, heads) trains too
                    # BatchNorm statistics stay the dense model's: batches of a few photos' crops would replace
                    # them with theirs (in an ad-hoc run, not committed, EfficientNet-Lite0's agreement fell from
                    # 0.55 to 0.31 when they updated)
                    freeze_norm_stats=True)
    if text:
        settings.update({key: DEFAULT_FINETUNE[key] for key in ("scale_parameter", "code_learning_rate", "dropout")})
        # bf16 only where it is native, and never over `accelerate launch --mixed_precision`'s own choice
        if "ACCELERATE_MIXED_PRECISION" not in os.environ and native_bf16():
            settings["mixed_precision"] = DEFAULT_FINETUNE["mixed_precision"]
    args = FinetuneArguments(**{**settings, **overrides})
    with torch.enable_grad():  # the caller (hf-vq compress) keeps the process group: hand the run an accelerator
        result = finetune(args, student=model, teacher=dense, train_dataset=train, eval_dataset=val,
                          collate_fn=collate, accelerator=new_accelerator(args))
    model.eval()
    return result


def _text_data(tokenizer: Any, source: str | None, *, skip: int, n_train: int, held_out: int, max_length: int):
    from ..calibrate.sources import calibration_texts
    from ..integrations.transformers.tools import padding_collator

    texts = calibration_texts(skip + n_train + held_out, source)[skip:]
    if len(texts) < held_out + 1:
        raise ValueError(f"fine-tuning data {source or 'Wikipedia sentences'!r} has {len(texts)} samples after the "
                         f"{skip} calibration used; at least {held_out + 1} are needed (held-out {held_out}). Give a "
                         "larger --calibration-data or fewer --calibration-samples.")
    train_texts, val_texts = texts[:-held_out], texts[-held_out:]
    if len(train_texts) < n_train:  # a small source: epochs over it (the loop counts steps)
        logger.info("hf_vq finetune: %d training samples for %d wanted; the run takes several epochs",
                    len(train_texts), n_train)

    def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
        enc = tokenizer(batch, truncation=True, max_length=max_length)
        return [{k: torch.tensor(v[i]) for k, v in enc.items()} for i in range(len(batch))]  # each [T]
    return encode(train_texts), encode(val_texts), padding_collator(tokenizer)


def _image_data(model: nn.Module, photos: list, *, n_train: int, held_out: int, seed: int):
    from torch.utils.data import default_collate

    from ..calibrate.images import PhotoCrops
    from ..integrations.timm import eval_transform

    transform = eval_transform(model)[0]
    # calibration drew its crops from one sequential generator; these are per-index draws of other seeds
    return (PhotoCrops(photos, n_train, transform, seed=seed + 17), PhotoCrops(photos, held_out, transform, seed=seed + 29),
            default_collate)
