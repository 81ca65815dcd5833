"""Random crops of photos: the views calibration and fine-tuning draw from a few real photos (pure PIL + torch)."""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["random_view", "PhotoCrops"]


def random_view(photo, gen: torch.Generator, *, mirror: bool):
    """A random crop of `photo` (10-100% of its area, aspect 3:4 to 4:3) drawn from `gen`, mirrored if asked."""
    from PIL import ImageOps

    w, h = photo.size
    u = torch.rand(3, generator=gen).tolist()
    area = w * h * (0.1 + 0.9 * u[0])
    aspect = math.exp(math.log(3 / 4) + u[1] * (math.log(4 / 3) - math.log(3 / 4)))
    cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
    x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    view = photo.crop((x0, y0, x0 + cw, y0 + ch))
    return ImageOps.mirror(view) if mirror else view


class PhotoCrops(torch.utils.data.Dataset):
    """`n` random crops of `photos`, made when asked (item `i` is the same on every call and process): fine-tuning
    data that never has to fit in memory. Items are `{"pixel_values": [C, H, W]}`, preprocessed by `transform`.

    Args:
        photos (`list`): `PIL.Image`s, e.g. `hf_vq.data.real_photos(CALIBRATION_PHOTOS)` or `photo_folder(...)`.
        n (`int`): number of crops.
        transform (`Callable`): PIL image -> `[C, H, W]` tensor (e.g. a timm model's evaluation transform).
        seed (`int`, defaults to 0): crop `i` is drawn from a generator seeded with `(seed, i)`.
    """

    def __init__(self, photos: list, n: int, transform: Callable, *, seed: int = 0) -> None:
        if not photos:
            raise ValueError("PhotoCrops needs at least one photo.")
        self.photos, self.n, self.seed, self.transform = photos, int(n), int(seed), transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        photo = self.photos[i % len(self.photos)]
        view = random_view(photo, gen, mirror=bool(torch.randint(0, 2, (1,), generator=gen)))
        return {"pixel_values": self.transform(view)}  # [C, H, W]
