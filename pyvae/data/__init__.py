"""Image data sets for pyvae.

Every data set is a ``torch.utils.data.Dataset`` whose item ``dataset[i]`` is one float32 image
tensor of shape ``dataset.image_shape`` = (C, H, W) with values in [0, 1]. Labels, where the data
has them, are in ``dataset.targets`` (a numpy array: (N,) int64 classes, or (N, K) attributes or
factors). Nothing is ever downloaded: data sets are rendered (:class:`Shapes2D`), ship with
scikit-learn (:class:`Digits`, :class:`Photos`) or are read from a path.
"""
from pyvae.data.bundled import Digits, Photos, photo_images
from pyvae.data.images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageFolder,
                               ImageTooLargeError, NumpyImages, UnreadableImageError, load_image,
                               output_size)
from pyvae.data.patches import RandomPatches
from pyvae.data.registry import load_dataset
from pyvae.data.shapes2d import Shapes2D
from pyvae.data.standard import CIFAR10, CelebA

__all__ = [
    "CIFAR10", "CelebA", "DEFAULT_MAX_PIXELS", "Digits", "IMAGE_EXTENSIONS", "ImageFolder",
    "ImageTooLargeError", "NumpyImages", "Photos",
    "RandomPatches", "Shapes2D", "UnreadableImageError", "load_dataset", "load_image",
    "output_size", "photo_images",
]
