"""Random square patches of a data set's images, for training patch VAEs."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from pyvae._validate import check_int


class RandomPatches(Dataset):
    """``patches_per_image`` random ``patch_size`` × ``patch_size`` crops of every image.

    Item ``k`` is a crop of image ``k // patches_per_image`` at a position drawn from a numpy
    generator seeded with ``(seed, k)``: the same ``(seed, k)`` always gives the same patch, in
    any process and in any access order, and nothing is stored per item. ``dataset[k]`` is a
    float32 tensor (C, p, p) with the image's values (in [0, 1] for pyvae's data sets).

    Args:
        dataset: a data set of (C, H, W) image tensors, all of one size; its ``image_shape``
            attribute is used when present, else the shape of ``dataset[0]``.
        patch_size: side p of the patches, 1 .. min(H, W).
        patches_per_image: patches taken from each image (>= 1).
        seed: seed of the positions (>= 0).

    Attributes:
        image_shape: (C, p, p).
        targets: the base data set's targets repeated for each patch of an image (if it has any).
    """

    def __init__(self, dataset: Dataset, patch_size: int, patches_per_image: int, *, seed: int = 0):
        self.dataset = dataset
        self.patch_size = check_int(None, "patch_size", patch_size, 1)
        self.patches_per_image = check_int(None, "patches_per_image", patches_per_image, 1)
        self.seed = check_int(None, "seed", seed, 0)
        shape = getattr(dataset, "image_shape", None)
        channels, height, width = tuple(shape) if shape is not None else tuple(dataset[0].shape)
        if self.patch_size > min(height, width):
            raise ValueError(f"patch_size={self.patch_size} exceeds the {height}×{width} images "
                             f"(height × width) of the data set")
        self.source_shape = (height, width)
        self.image_shape = (channels, self.patch_size, self.patch_size)

    def __len__(self) -> int:
        return len(self.dataset) * self.patches_per_image

    def positions(self, index: int) -> tuple[int, int, int]:
        """``(image, y, x)`` of item ``index``: the source image and the patch's top-left pixel."""
        index = check_int(None, "index", index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        index %= len(self)
        rng = np.random.default_rng((self.seed, index))
        height, width = self.source_shape
        y = int(rng.integers(0, height - self.patch_size + 1))
        x = int(rng.integers(0, width - self.patch_size + 1))
        return index // self.patches_per_image, y, x

    def __getitem__(self, index: int) -> torch.Tensor:
        image_index, y, x = self.positions(index)
        image = self.dataset[image_index]
        if tuple(image.shape[1:]) != self.source_shape:
            raise ValueError(f"image {image_index} has shape {tuple(image.shape)}; RandomPatches "
                             f"needs every image to be {self.source_shape} (height, width)")
        p = self.patch_size
        return image[:, y:y + p, x:x + p].clone(memory_format=torch.contiguous_format)

    @functools.cached_property
    def targets(self) -> np.ndarray | None:
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            return None
        return np.repeat(np.asarray(targets), self.patches_per_image, axis=0)
