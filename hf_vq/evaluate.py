"""Fidelity of a compressed model to its dense original, on real inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import (CALIBRATION_PHOTOS, EVAL_PHOTOS, EVAL_SENTENCES, REAL_PHOTOS, calibration_batches, real_images,
                   real_photos, real_sentences)
from .calibrate import mean_pool
from .calibrate.sources import tokenize_batches

__all__ = ["real_sentences", "mean_pool", "embedding_cosine", "REAL_PHOTOS", "EVAL_PHOTOS", "CALIBRATION_PHOTOS",
           "real_photos", "real_images", "image_fidelity", "EVAL_SENTENCES", "calibration_batches", "COSINE_MEAN",
           "COSINE_MIN", "AGREEMENT", "KL"]

#: The keys of the fidelity `hf-vq compress` reports (its `--json` "fidelity", the card's table): a text model's
#: mean-pooled sentence-embedding cosine to the dense model, an image classifier's agreement and KL with it.
COSINE_MEAN = "sentence embedding cosine (mean)"
COSINE_MIN = "sentence embedding cosine (min)"
AGREEMENT = "top-1 agreement with the dense model"
KL = "KL(dense || compressed) mean, nats"


@torch.no_grad()
def embedding_cosine(dense: nn.Module, compressed: nn.Module, tokenizer, sentences: list[str], *,
                     batch_size: int = 32) -> dict[str, float]:
    """Cosine similarity of mean-pooled sentence embeddings, compressed vs dense (mean, min); sentences truncated
    to 128 tokens or the positions the model embeds."""
    cosines = []
    for batch in tokenize_batches(tokenizer, sentences, model=dense, batch_size=batch_size):
        a = mean_pool(dense(**batch).last_hidden_state, batch["attention_mask"])
        b = mean_pool(compressed(**batch).last_hidden_state, batch["attention_mask"])
        cosines.append(F.cosine_similarity(a.float(), b.float(), dim=-1))
    cos = torch.cat(cosines)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n_sentences": len(sentences)}


# ------------------------------------------------------------------------------------------------ images
@torch.no_grad()
def image_fidelity(dense: nn.Module, model: nn.Module, images: torch.Tensor | None = None, *, n_images: int = 128,
                   batch_size: int = 32) -> dict[str, float]:
    """How closely a compressed image classifier follows its dense original on real photos.

    Args:
        dense (`nn.Module`): the dense model (its timm preprocessing is used for the default images).
        model (`nn.Module`): the compressed model.
        images (`torch.Tensor`, *optional*): preprocessed inputs `[n, C, H, W]`; default
            [`real_images`]`(n_images, model=dense, photos=EVAL_PHOTOS)` (never the calibration photos).

    Returns:
        `dict`: `top1_agreement` (fraction of images where both predict the same class),
        `mean_kl` (mean KL(dense ‖ compressed) of the softmax outputs, nats) and `n_images`.
    """
    if images is None:
        images = real_images(n_images, model=dense, photos=EVAL_PHOTOS)
    dense_was, model_was = dense.training, model.training
    dense.eval()
    model.eval()
    agree, kl = 0, 0.0
    try:
        for i in range(0, len(images), batch_size):
            x = images[i: i + batch_size]
            a, b = dense(x), model(x)
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.ndim != 2:
                raise ValueError("image_fidelity needs classifiers returning logits [batch, classes].")
            a, b = a.float(), b.float()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            log_p, log_q = F.log_softmax(a, -1), F.log_softmax(b, -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
    finally:
        dense.train(dense_was)
        model.train(model_was)
    n = len(images)
    return {"top1_agreement": agree / max(1, n), "mean_kl": kl / max(1, n), "n_images": n}

