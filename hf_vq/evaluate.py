"""Fidelity of a compressed model to its dense original, on real inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .finetune.losses import mean_pool

__all__ = ["real_sentences", "mean_pool", "embedding_cosine", "REAL_PHOTOS", "real_photos", "real_images",
           "image_fidelity", "EVAL_SENTENCES", "calibration_batches"]


def real_sentences(n: int = 256, *, min_words: int = 6) -> list[str]:
    """`n` real English sentences from the Lee news corpus that ships with gensim (offline).

    Raises:
        `ImportError`: if gensim is not installed (`pip install gensim`).
    """
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise ImportError("Real test sentences come from gensim's bundled corpora: `pip install gensim`.") from err
    sentences: list[str] = []
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for doc in f:
            for sentence in doc.replace("?", ".").replace("!", ".").split(". "):
                sentence = sentence.strip()
                if len(sentence.split()) >= min_words:
                    sentences.append(sentence if sentence.endswith(".") else sentence + ".")
                if len(sentences) >= n:
                    return sentences
    return sentences


@torch.no_grad()
def embedding_cosine(dense: nn.Module, compressed: nn.Module, tokenizer, sentences: list[str], *,
                     batch_size: int = 32) -> dict[str, float]:
    """Cosine similarity of mean-pooled sentence embeddings, compressed vs dense (mean, min)."""
    cosines = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i: i + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        a = mean_pool(dense(**batch).last_hidden_state, batch["attention_mask"])
        b = mean_pool(compressed(**batch).last_hidden_state, batch["attention_mask"])
        cosines.append(F.cosine_similarity(a.float(), b.float(), dim=-1))
    cos = torch.cat(cosines)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n_sentences": len(sentences)}


# ------------------------------------------------------------------------------------------------ images
#: Real photographs bundled with scikit-image (no download), by their `skimage.data` name. Grey ones are
#: replicated to RGB; `motorcycle_left/right` are the two views of `stereo_motorcycle`.
REAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "camera", "clock",
               "coins", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon")


def real_photos() -> list:
    """The [`REAL_PHOTOS`] as RGB `PIL.Image`s (scikit-image's bundled data, offline).

    Raises:
        `ImportError`: if scikit-image is not installed (`pip install scikit-image`).
    """
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("Real test images come from scikit-image's bundled photos: `pip install scikit-image`.") from err
    import numpy as np
    from PIL import Image

    photos = []
    for name in REAL_PHOTOS:
        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            array = left if name.endswith("left") else right
        else:
            array = getattr(skimage.data, name)()
        array = np.asarray(array)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        photos.append(Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8)))
    return photos


def real_images(n: int = 128, *, model: nn.Module | None = None, data_config: dict | None = None,
                seed: int = 0) -> torch.Tensor:
    """`n` deterministic views of real photos, preprocessed as `model` expects: `[n, C, H, W]` float.

    View `i` is a random crop (10-100% of the photo's area, aspect 3:4 to 4:3, drawn from a generator
    seeded with `seed`) of photo `i mod 16` of [`REAL_PHOTOS`], mirrored for every other round through
    the photos, then passed through timm's evaluation transform for `model`
    (`resolve_data_config` + `create_transform`: resize, centre crop, normalisation). Give
    `data_config` instead of `model` to choose the preprocessing.
    """
    from PIL import ImageOps

    from .integrations.timm import eval_transform

    transform, _ = eval_transform(model, data_config=data_config)
    photos = real_photos()
    gen = torch.Generator().manual_seed(seed)
    views = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        u = torch.rand(3, generator=gen).tolist()
        area = w * h * (0.1 + 0.9 * u[0])
        aspect = math.exp(math.log(3 / 4) + u[1] * (math.log(4 / 3) - math.log(3 / 4)))
        cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        view = photo.crop((x0, y0, x0 + cw, y0 + ch))
        if (i // len(photos)) % 2 == 1:
            view = ImageOps.mirror(view)
        views.append(transform(view))
    return torch.stack(views)


@torch.no_grad()
def image_fidelity(dense: nn.Module, model: nn.Module, images: torch.Tensor | None = None, *, n_images: int = 128,
                   batch_size: int = 32) -> dict[str, float]:
    """How closely a compressed image classifier follows its dense original on real photos.

    Args:
        dense (`nn.Module`): the dense model (its timm preprocessing is used for the default images).
        model (`nn.Module`): the compressed model.
        images (`torch.Tensor`, *optional*): preprocessed inputs `[n, C, H, W]`; default
            [`real_images`]`(n_images, model=dense)`.

    Returns:
        `dict`: `top1_agreement` (fraction of images where both predict the same class),
        `mean_kl` (mean KL(dense ‖ compressed) of the softmax outputs, nats) and `n_images`.
    """
    if images is None:
        images = real_images(n_images, model=dense)
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


# ------------------------------------------------------------------------------------------------ calibration
#: The fidelity evaluations use the first `EVAL_SENTENCES` sentences and the image views drawn with seed 0.
EVAL_SENTENCES = 256


def calibration_batches(n: int, *, tokenizer=None, model: nn.Module | None = None, batch_size: int = 32) -> list:
    """`n` real inputs that the fidelity evaluations never see, in batches (for `quantize_(..., calibration=)`).

    Text (give `tokenizer`): the `n` sentences after the first [`EVAL_SENTENCES`], tokenized (dicts of model
    inputs). Images (give `model` for its preprocessing): `n` views drawn with seed 1 of the bundled photos (the
    evaluations draw theirs with seed 0), `[batch, C, H, W]` tensors.
    """
    if n < 1:
        raise ValueError(f"calibration_batches needs n >= 1 inputs, got {n}.")
    if tokenizer is not None:
        sentences = real_sentences(EVAL_SENTENCES + n)[EVAL_SENTENCES:]
        return [dict(tokenizer(sentences[i: i + batch_size], padding=True, truncation=True, max_length=128,
                               return_tensors="pt")) for i in range(0, len(sentences), batch_size)]
    return list(real_images(n, model=model, seed=1).split(batch_size))  # [batch, C, H, W] each
