"""Real data that ships offline: news sentences and photos the fidelity evaluations use, and the disjoint
calibration sources (gensim's Wikipedia pages, other photos) — or the user's own (a text file of any suffix, a
folder of images, a 🤗 Datasets name)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .calibrate.images import PhotoCrops, random_view
from .calibrate.sources import calibration_texts, tokenize_batches, wikipedia_sentences

__all__ = ["real_sentences", "wikipedia_sentences", "REAL_PHOTOS", "EVAL_PHOTOS", "CALIBRATION_PHOTOS", "real_photos",
           "real_images", "EVAL_SENTENCES", "calibration_texts", "calibration_images", "calibration_batches", "photo_batches", "PhotoCrops",
           "photo_folder"]


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


#: Real photographs bundled with scikit-image (no download), by their `skimage.data` name. Grey ones are
#: replicated to RGB; `motorcycle_left/right` are the two views of `stereo_motorcycle`.
REAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "camera", "clock",
               "coins", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon")


#: The photos the fidelity evaluations use, and the disjoint ones calibration uses (the two halves of
#: [`REAL_PHOTOS`]; the stereo motorcycle pair stays on one side), plus matplotlib's bundled Grace Hopper portrait.
EVAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "clock", "coins", "hubble_deep_field")
CALIBRATION_PHOTOS = ("motorcycle_left", "motorcycle_right", "immunohistochemistry", "retina", "brick", "grass",
                      "gravel", "moon", "grace_hopper")


def real_photos(names: tuple[str, ...] = REAL_PHOTOS) -> list:
    """The named photos (default [`REAL_PHOTOS`]) as RGB `PIL.Image`s (scikit-image's bundled data and
    matplotlib's `grace_hopper.jpg`, offline).

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
    for name in names:
        if name == "grace_hopper":
            import matplotlib.cbook

            photos.append(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
            continue
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
                seed: int = 0, photos: tuple[str, ...] = REAL_PHOTOS) -> torch.Tensor:
    """`n` deterministic views of real photos, preprocessed as `model` expects: `[n, C, H, W]` float.

    View `i` is a random crop (10-100% of the photo's area, aspect 3:4 to 4:3, drawn from a generator
    seeded with `seed`) of photo `i mod len(photos)` of `photos` (default all of [`REAL_PHOTOS`]), mirrored for
    every other round through the photos, then passed through timm's evaluation transform for `model`
    (`resolve_data_config` + `create_transform`: resize, centre crop, normalisation). Give
    `data_config` instead of `model` to choose the preprocessing.
    """
    return _crops(real_photos(photos), n, model=model, data_config=data_config, seed=seed)


def _crops(photos: list, n: int, *, model: nn.Module | None = None, data_config: dict | None = None,
           seed: int = 0) -> torch.Tensor:
    """`n` deterministic random crops of `photos` (round robin, mirrored every other round), preprocessed."""
    from .integrations.timm import eval_transform

    transform, _ = eval_transform(model, data_config=data_config)
    gen = torch.Generator().manual_seed(seed)
    views = [transform(random_view(photos[i % len(photos)], gen, mirror=(i // len(photos)) % 2 == 1))
             for i in range(n)]
    return torch.stack(views)  # [n, C, H, W]


# ------------------------------------------------------------------------------------------------ calibration
#: The fidelity evaluations use the first `EVAL_SENTENCES` sentences of the Lee news corpus and views of
#: [`EVAL_PHOTOS`]; calibration never does.
EVAL_SENTENCES = 256

#: The seed of the calibration crops (the evaluation's are drawn with seed 0).
_CALIBRATION_SEED = 1


def calibration_images(n: int, model: nn.Module, source: str | None = None, *,
                       seed: int = _CALIBRATION_SEED) -> torch.Tensor:
    """`n` calibration images preprocessed for `model`, `[n, C, H, W]`: random crops of the images in folder `source`
    (any depth; jpg / png / ...) or, by default, of [`CALIBRATION_PHOTOS`] (disjoint from the evaluation's photos).

    Raises:
        `ValueError`: if the folder holds no readable image.
    """
    return _crops(_calibration_photos(source), n, model=model, seed=seed)


def _calibration_photos(source: str | None) -> list:
    """The photos calibration crops: those of folder `source`, or [`CALIBRATION_PHOTOS`]."""
    return real_photos(CALIBRATION_PHOTOS) if source is None else photo_folder(source)


def photo_folder(source: str | Path) -> list:
    """The readable images in folder `source` (any depth; jpg, png, ...) as RGB `PIL.Image`s, in path order.

    Raises:
        `ValueError`: if the folder holds no readable image (naming it).
    """
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in sorted(Path(source).rglob("*")):
        if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"):
            try:
                images.append(Image.open(path).convert("RGB"))
            except (UnidentifiedImageError, OSError):
                continue
    if not images:
        raise ValueError(f"--calibration-data {source!r} holds no readable image (jpg, png, ...).")
    return images


def calibration_batches(n: int, *, tokenizer=None, model: nn.Module | None = None, source: str | None = None,
                        batch_size: int = 32, max_length: int = 128) -> list:
    """`n` real inputs that the fidelity evaluations never see, in batches (for `quantize_(..., calibration=)`).

    Text (give `tokenizer`): [`calibration_texts`] (default: sentences of gensim's Wikipedia pages), tokenized
    (dicts of model inputs; truncated to the positions `model` embeds when it is given). Images (give `model` for its preprocessing): [`calibration_images`] (default: views of
    [`CALIBRATION_PHOTOS`]), `[batch, C, H, W]` tensors, each batch one photo's crops ([`photo_batches`]).
    """
    if n < 1:
        raise ValueError(f"calibration_batches needs n >= 1 inputs, got {n}.")
    if tokenizer is not None:
        texts = calibration_texts(n, source)
        return tokenize_batches(tokenizer, texts, model=model, batch_size=batch_size, max_length=max_length)
    photos = _calibration_photos(source)  # loaded once: the crops and their count of photos
    images = _crops(photos, n, model=model, seed=_CALIBRATION_SEED)  # [n, C, H, W], as calibration_images makes them
    return photo_batches(images, len(photos), batch_size)


def photo_batches(images: torch.Tensor, photos: int, batch_size: int = 32) -> list[torch.Tensor]:
    """Crops `images [n, C, H, W]` made round robin from `photos` photos (crop `i` of photo `i mod photos`, as
    [`real_images`] makes them) in batches of at most `batch_size` that each hold crops of one photo, photo by photo.

    What calibration holds out — the allocation's second half of the batches, block tuning's last share — is then
    other photos, not other crops of the same ones: fitted on some calibration photos, Lite0's layers code with an
    error on the others of 0.79-1.31x their error on the evaluation photos, on other crops of the same photos
    0.23-1.02x (benchmarks/results/experiment_floor_cv.md).
    """
    if photos < 1:
        raise ValueError(f"photo_batches needs photos >= 1, got {photos}.")
    batches = []
    for p in range(photos):
        batches += list(images[p::photos].split(batch_size))  # [<= batch_size, C, H, W] each
    return [b for b in batches if len(b)]
