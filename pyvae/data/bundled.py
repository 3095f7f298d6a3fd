"""Small real image sets that ship with scikit-learn: usable offline, nothing is downloaded."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from pyvae._validate import check_int


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (parsed once per process): images (1797, 8, 8) 0..16, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for array in (digits.images, digits.target):
        array.setflags(write=False)  # shared by every Digits
    return digits.images, digits.target


@functools.lru_cache(maxsize=None)
def _sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's sample photos (decoded once per process), uint8 (427, 640, 3), by name."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    order = np.argsort([Path(name).name for name in photos.filenames])
    for array in photos.images:
        array.setflags(write=False)  # shared by every caller
    return tuple(photos.images[k] for k in order)


class Digits(Dataset):
    """The UCI handwritten digits of scikit-learn's ``load_digits``: 1,797 grayscale 8×8 images.

    ``dataset[i]`` is a float32 tensor (1, size, size) in [0, 1] (the 0..16 pixel counts divided
    by 16, bilinearly resized when ``size`` != 8).

    Args:
        size: side of the returned images (>= 1).

    Attributes:
        targets: int64 array (1797,), the digit 0..9 of each image.
        image_shape: (1, size, size).
    """

    def __init__(self, size: int = 8):
        size = check_int(None, "size", size, 1)
        pixels, labels = _digits()
        images = torch.from_numpy(pixels.astype(np.float32) / 16.0).unsqueeze(1)
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True).clamp_(0.0, 1.0)
        self.images = images.contiguous()
        self.targets = labels.astype(np.int64)
        self.image_shape = (1, size, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].clone()  # a copy: callers may modify it in place


def photo_images(grayscale: bool = False) -> list[torch.Tensor]:
    """scikit-learn's two sample photos, ``china.jpg`` and ``flower.jpg`` (427×640 RGB).

    Returns:
        Two float32 tensors (C, 427, 640) in [0, 1], C = 1 if ``grayscale`` (ITU-R 601 luma,
        as Pillow's ``convert("L")``) else 3.
    """
    tensors = []
    for array in _sample_photos():
        if grayscale:
            array = np.asarray(Image.fromarray(array).convert("L"))[..., None]
        tensors.append(torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255))
    return tensors


class Photos(Dataset):
    """Square crops of the two scikit-learn sample photos (see :func:`photo_images`), cut on a
    grid: for each photo, for each top ``y`` in ``range(0, 427 - crop_size + 1, stride)`` and each
    left ``x`` in ``range(0, 640 - crop_size + 1, stride)``.

    ``dataset[i]`` is a float32 tensor (C, crop_size, crop_size) in [0, 1].

    Args:
        crop_size: side of the crops, 1 .. 427.
        stride: grid step (>= 1); ``None`` = ``crop_size`` (non-overlapping crops).
        grayscale: 1 channel instead of 3.

    Attributes:
        names: ``"china.jpg@y=0,x=64"`` for every crop.
        positions: int64 array (N, 3): photo, y, x of every crop.
        targets: int64 array (N,): the photo (0 = china.jpg, 1 = flower.jpg).
        image_shape: (C, crop_size, crop_size).
    """

    photo_names = ("china.jpg", "flower.jpg")

    def __init__(self, crop_size: int = 64, stride: int | None = None, grayscale: bool = False):
        self.photos = photo_images(grayscale)
        height, width = self.photos[0].shape[1:]
        self.crop_size = check_int(None, "crop_size", crop_size, 1, min(height, width))
        self.stride = self.crop_size if stride is None else check_int(None, "stride", stride, 1)
        positions = [(k, y, x) for k, photo in enumerate(self.photos)
                     for y in range(0, photo.shape[1] - self.crop_size + 1, self.stride)
                     for x in range(0, photo.shape[2] - self.crop_size + 1, self.stride)]
        self.positions = np.array(positions, dtype=np.int64)
        self.targets = self.positions[:, 0].copy()
        self.names = [f"{self.photo_names[k]}@y={y},x={x}" for k, y, x in positions]
        self.image_shape = (self.photos[0].shape[0], self.crop_size, self.crop_size)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> torch.Tensor:
        k, y, x = self.positions[index].tolist()
        return self.photos[k][:, y:y + self.crop_size, x:x + self.crop_size].contiguous()
