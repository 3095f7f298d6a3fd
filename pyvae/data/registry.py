"""Data sets named by one string, for the command line."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from pyvae.data.bundled import Digits, Photos
from pyvae.data.images import ImageFolder, NumpyImages
from pyvae.data.shapes2d import Shapes2D
from pyvae.data.standard import CIFAR10, CelebA

_NAMED = {"shapes2d": Shapes2D, "digits": Digits, "photos": Photos}
_ROOTED = {"cifar10": CIFAR10, "celeba": CelebA}
SPEC_FORMS = ("shapes2d", "digits", "photos", "cifar10:PATH", "celeba:PATH",
              "a directory of PNG/JPEG images", "a .npy file")


def load_dataset(spec: str, **options) -> Dataset:
    """The data set named by ``spec``, built with keyword ``options``.

    ======================== ===========================================================
    spec                     data set
    ======================== ===========================================================
    ``shapes2d``             :class:`Shapes2D` (options: size, seed)
    ``digits``               :class:`Digits` (size)
    ``photos``               :class:`Photos` (crop_size, stride, grayscale)
    ``cifar10:PATH``         :class:`CIFAR10` at PATH (train)
    ``celeba:PATH``          :class:`CelebA` at PATH (split, size, crop)
    a directory              :class:`ImageFolder` (size, crop, grayscale, ...)
    a ``.npy`` file          :class:`NumpyImages` (layout, labels)
    ======================== ===========================================================

    Names are case-insensitive. Raises ``ValueError`` listing these forms for anything else.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.partition(":")
    if name.lower() in _NAMED and not rest:
        return _NAMED[name.lower()](**options)
    if name.lower() in _ROOTED and rest:
        return _ROOTED[name.lower()](rest, **options)
    path = Path(spec)
    if path.is_dir():
        return ImageFolder(path, **options)
    if path.suffix.lower() == ".npy" and path.is_file():
        return NumpyImages(path, **options)
    problem = "no such file or directory" if not path.exists() else "not a data set"
    raise ValueError(f"spec {spec!r}: {problem}; accepted forms: {', '.join(SPEC_FORMS)}")
