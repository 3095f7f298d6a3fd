"""Images from files: a folder of PNG/JPEG files and arrays of images in ``.npy`` files."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pyvae.data._utils import check_pair, check_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# The largest image (height × width) pyvae decodes unless told otherwise: 2**26 ≈ 67 M pixels
# (8192 × 8192). A small compressed file can declare a huge image (a decompression bomb); its
# header is checked against this before anything is decoded or allocated.
DEFAULT_MAX_PIXELS = 2 ** 26


def check_max_pixels(max_pixels) -> int | None:
    """``max_pixels`` as an int (None: no limit), or ValueError naming it."""
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) \
            or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    return int(max_pixels)


class ImageTooLargeError(ValueError):
    """An image file declares more pixels than ``max_pixels`` allows."""


def check_image_pixels(path, height: int, width: int, max_pixels: int | None) -> None:
    """:class:`ImageTooLargeError` naming the file if its declared height × width exceeds
    ``max_pixels``."""
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(f"image {os.fspath(path)!r} declares {width}×{height} = "
                         f"{height * width:,} pixels, more than max_pixels={max_pixels:,} "
                         f"(--max-pixels); a decompression bomb or a mistake? Pass a larger "
                         f"max_pixels to read it")


@contextlib.contextmanager
def _pyvae_bomb_check():
    """While the body runs, Pillow's own decompression-bomb check (a warning above its
    ``Image.MAX_IMAGE_PIXELS``, an error above twice that, raised while opening) is off:
    :func:`check_image_pixels` applies ``max_pixels`` to the same header instead, so that the
    limit is the one the user set and the error names the file and ``max_pixels``."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (corrupt, truncated or not an image).

    Attributes:
        path: the file.
        reason: what the decoder reported.
    """

    def __init__(self, path: str | os.PathLike, reason: object):
        self.path = Path(path)
        self.reason = str(reason)
        super().__init__(f"cannot read image {self.path}: {self.reason}")

    def __reduce__(self):  # pickle with the constructor's arguments (DataLoader workers)
        return type(self), (self.path, self.reason)


def output_size(height: int, width: int, size=None, crop=None) -> tuple[int, int]:
    """The (height, width) that :func:`load_image` makes of a ``height`` × ``width`` image."""
    size, crop = check_size(size), check_pair(crop, "crop")
    if isinstance(size, int):
        # Shorter side to ``size``, aspect ratio kept (truncating, as torchvision does).
        if height <= width:
            height, width = size, int(size * width / height)
        else:
            height, width = int(size * height / width), size
    elif size is not None:
        height, width = size
    if crop is not None:
        if crop[0] > height or crop[1] > width:
            raise ValueError(f"crop={tuple(crop)} is larger than the {height}×{width} image "
                             f"{'after resizing ' if size is not None else ''}(height × width)")
        height, width = crop
    return height, width


def load_image(path: str | os.PathLike, *, size=None, crop=None, grayscale: bool = False,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode one image file into a float32 tensor (C, H, W) with values in [0, 1].

    Args:
        path: a file Pillow can decode (PNG, JPEG, ...). 16-bit grayscale is scaled by 1/65535,
            everything else is converted to 8-bit RGB (alpha dropped) or L and scaled by 1/255.
        size: resize first (bilinear, antialiased): an int sets the shorter side and keeps the
            aspect ratio, an ``(h, w)`` pair sets both sides.
        crop: then cut the centre ``crop`` × ``crop`` (int) or ``(h, w)`` region.
        grayscale: 1 channel (ITU-R 601 luma) instead of 3 (RGB).
        max_pixels: refuse (ValueError) a file whose header declares more than this many
            pixels, before decoding it (None: no limit).

    Returns:
        C = 1 if ``grayscale`` else 3; (H, W) as given by :func:`output_size`.

    Raises:
        UnreadableImageError: the file is missing or cannot be decoded.
        ValueError: ``crop`` is larger than the (resized) image, or the image is larger than
            ``max_pixels``.
    """
    size, crop = check_size(size), check_pair(crop, "crop")
    max_pixels = check_max_pixels(max_pixels)
    try:
        with _pyvae_bomb_check(), Image.open(path) as image:
            check_image_pixels(path, image.height, image.width, max_pixels)
            image.load()  # the full decode: truncated or corrupt data fails here
            if image.mode.startswith("I;16") or image.mode == "I":
                # Pillow's conversion to 8 bits clips 16-bit values instead of scaling them.
                image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)
            else:
                image = image.convert("L" if grayscale else "RGB")
    except ImageTooLargeError:
        raise
    except Exception as error:  # Pillow reports bad data with many types (OSError, SyntaxError...)
        raise UnreadableImageError(path, error) from error

    height, width = output_size(image.height, image.width, size, crop)
    if size is not None:
        resized = output_size(image.height, image.width, size)
        image = image.resize(resized[::-1], Image.Resampling.BILINEAR)
    array = np.asarray(image)
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    array = array[top:top + height, left:left + width]

    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:  # the 16-bit path: float32 already scaled (resizing may overshoot [0, 1] slightly)
        array = np.clip(array, 0.0, 1.0)
    if array.ndim == 2:
        array = array[None]
        if not grayscale:
            array = np.repeat(array, 3, axis=0)
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class ImageFolder(Dataset):
    """The image files under a folder, in sorted order of their relative paths.

    ``dataset[i]`` (or ``dataset.load(i)``) is image ``i`` as a float32 tensor
    :attr:`image_shape` = (C, H, W) with values in [0, 1]; see :func:`load_image` for ``size``,
    ``crop`` and ``grayscale``. All images must come out the same size: without ``size`` or
    ``crop`` the files must share one size, and a file of another size raises ``ValueError``
    when it is loaded.

    Construction reads only each file's header. Files whose header Pillow cannot read are left
    out, listed in :attr:`unreadable` and reported by one warning; a file that passes the header
    check but fails to decode raises :class:`UnreadableImageError` when it is loaded. A header
    that declares more than ``max_pixels`` pixels raises :class:`ImageTooLargeError` (a
    ValueError) naming the file, before anything is decoded.

    Args:
        root: the folder.
        size, crop, grayscale: see :func:`load_image`.
        extensions: file name endings to take (case-insensitive).
        recursive: also take files in sub-folders.

    Attributes:
        root: ``Path`` of the folder.
        files: ``Path`` of every readable image, relative to ``root``, sorted.
        names: the same as POSIX strings (``"sub/a.png"``).
        unreadable: list of ``(path, reason)`` for the files left out.
        image_shape: (C, H, W) of every item (from the first file's header).
    """

    def __init__(self, root: str | os.PathLike, *, size=None, crop=None, grayscale: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        if not self.root.is_dir():
            error = NotADirectoryError if self.root.exists() else FileNotFoundError
            raise error(f"root must be an existing directory, got {str(root)!r}")
        self.size, self.crop, self.grayscale = check_size(size), check_pair(crop, "crop"), grayscale
        self.max_pixels = check_max_pixels(max_pixels)
        if isinstance(extensions, str) or not extensions:
            raise TypeError(f"extensions must be a non-empty sequence like ('.png', '.jpg'), "
                            f"got {extensions!r}")
        suffixes = {("" if e.startswith(".") else ".") + e.lower() for e in extensions}

        paths = self.root.rglob("*") if recursive else self.root.iterdir()
        candidates = sorted((p.relative_to(self.root) for p in paths
                             if p.suffix.lower() in suffixes and p.is_file()), key=Path.as_posix)
        self.files: list[Path] = []
        self.unreadable: list[tuple[Path, str]] = []
        first_size = None
        for relative in candidates:
            try:
                with _pyvae_bomb_check(), Image.open(self.root / relative) as image:
                    header_size = image.height, image.width  # the header only
            except Exception as error:
                self.unreadable.append((self.root / relative, str(error)))
                continue
            check_image_pixels(self.root / relative, *header_size, self.max_pixels)
            self.files.append(relative)
            first_size = first_size or header_size
        if self.unreadable:
            listed = "; ".join(f"{p.relative_to(self.root).as_posix()} ({reason})"
                               for p, reason in self.unreadable[:5])
            more = f"; and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
            warnings.warn(f"ImageFolder: left out {len(self.unreadable)} unreadable file(s) under "
                          f"{self.root}: {listed}{more} (see .unreadable)", stacklevel=2)
        if not self.files:
            raise ValueError(f"no readable image with an extension in {sorted(suffixes)} under "
                             f"root {str(root)!r}{' (recursive)' if recursive else ''}")
        channels = 1 if grayscale else 3
        self.image_shape = (channels, *output_size(*first_size, self.size, self.crop))

    @property
    def names(self) -> list[str]:
        """Relative POSIX paths of the images, in dataset order."""
        return [f.as_posix() for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.load(index)

    def load(self, index: int) -> torch.Tensor:
        """Image ``index``: float32 tensor :attr:`image_shape` with values in [0, 1]."""
        relative = self.files[index]
        image = load_image(self.root / relative, size=self.size, crop=self.crop,
                           grayscale=self.grayscale,
                           max_pixels=self.max_pixels)
        if tuple(image.shape) != self.image_shape:
            raise ValueError(f"image {relative.as_posix()!r} loads with shape "
                             f"{tuple(image.shape)} but {self.files[0].as_posix()!r} with "
                             f"{self.image_shape}: the images differ in size; pass size= and/or "
                             f"crop= to ImageFolder")
        return image


class NumpyImages(Dataset):
    """Images stored in one numpy array, typically a memory-mapped ``.npy`` file.

    ``dataset[i]`` reads only image ``i`` and returns a float32 tensor (C, H, W) in [0, 1].

    Args:
        path_or_array: a ``.npy`` file (memory-mapped read-only, never loaded whole) or an array.
            dtype uint8 (scaled by 1/255) or floating point with values in [0, 1] (checked per
            item). Shape (N, H, W) (grayscale), or (N, H, W, C) / (N, C, H, W) with
            C ∈ {1, 3, 4}.
        layout: ``"NHWC"``, ``"NCHW"`` or ``"auto"``: the channel axis is whichever of axes 1
            and 3 has size 1, 3 or 4 (if both do, pass ``layout``). Only for 4-D arrays.
        labels: optional ``.npy`` path or array with one row per image → :attr:`targets`
            (integer labels become int64).

    Attributes:
        array: the underlying array (an ``np.memmap`` for a path).
        layout: the resolved layout, ``"NCHW"``, ``"NHWC"`` or ``"NHW"``.
        image_shape: (C, H, W).
        targets: the labels, or ``None``.
    """

    def __init__(self, path_or_array, *, layout: str = "auto", labels=None):
        if isinstance(path_or_array, (str, os.PathLike)):
            array = np.load(path_or_array, mmap_mode="r", allow_pickle=False)
            if not isinstance(array, np.ndarray):  # an .npz archive
                raise ValueError(f"path_or_array must be a .npy file holding one array, "
                                 f"got {str(path_or_array)!r}")
        else:
            array = np.asarray(path_or_array)
        if array.dtype != np.uint8 and array.dtype.kind != "f":
            raise TypeError(f"path_or_array must hold uint8 or floating point images, "
                            f"got dtype {array.dtype}")
        if layout not in ("auto", "NHWC", "NCHW"):
            raise ValueError(f"layout must be 'auto', 'NHWC' or 'NCHW', got {layout!r}")
        if array.ndim == 3:
            if layout != "auto":
                raise ValueError(f"layout={layout!r} applies to 4-D arrays; a 3-D array "
                                 f"{array.shape} is read as (N, H, W) grayscale")
            layout = "NHW"
        elif array.ndim == 4:
            if layout == "auto":
                found = [name for axis, name in ((1, "NCHW"), (3, "NHWC"))
                         if array.shape[axis] in (1, 3, 4)]
                if len(found) != 1:
                    raise ValueError(f"cannot tell the channel axis of an array of shape "
                                     f"{array.shape}: pass layout='NCHW' or layout='NHWC'")
                layout = found[0]
        else:
            raise ValueError(f"path_or_array must be 3-D (N, H, W) or 4-D (N, H, W, C) / "
                             f"(N, C, H, W), got shape {array.shape}")
        self.array, self.layout = array, layout
        n, *dims = array.shape
        if layout == "NHW":
            self.image_shape = (1, *dims)
        elif layout == "NHWC":
            self.image_shape = (dims[2], dims[0], dims[1])
        else:
            self.image_shape = tuple(dims)

        self.targets = None
        if labels is not None:
            targets = np.load(labels, allow_pickle=False) if isinstance(
                labels, (str, os.PathLike)) else np.asarray(labels)
            if targets.ndim == 0 or len(targets) != n:
                raise ValueError(f"labels must have one row per image ({n}), "
                                 f"got shape {targets.shape}")
            self.targets = targets.astype(np.int64) if targets.dtype.kind in "iub" else targets

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = np.array(self.array[index])  # copies this one image out of the memmap
        if self.layout == "NHW":
            image = image[None]
        elif self.layout == "NHWC":
            image = image.transpose(2, 0, 1)
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        elif image.size and not (image.min() >= 0.0 and image.max() <= 1.0):  # NaN fails too
            raise ValueError(f"image {index} has values in [{image.min()}, {image.max()}]; "
                             f"floating point images must lie in [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
