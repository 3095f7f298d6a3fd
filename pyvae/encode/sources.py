"""Where :func:`pyvae.encode.encode_dataset` reads images from: a collection (an image folder, an
``.npy`` file, a data set or a tensor) as rows of the store, its fingerprint (what a resumed store
must match), and the DataLoader view that turns unreadable images into reasons."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pyvae.data import ImageFolder, NumpyImages, UnreadableImageError, load_dataset
from pyvae.data.images import DEFAULT_MAX_PIXELS


@dataclass
class Source:
    """A collection as rows of the store.

    ``item_of_row[r]`` is the data set index of row ``r`` (None: identity); ``missing`` maps the
    rows known to be unreadable before loading (files whose header failed) to the reason.
    """

    dataset: Dataset
    rows: int
    image_shape: tuple[int, int, int]
    description: dict
    names: list[str] | None = None
    item_of_row: list[int | None] | None = None
    missing: dict[int, str] = field(default_factory=dict)

    def load(self, row: int) -> torch.Tensor:
        """Row ``row`` as a float32 (C, H, W) tensor in [0, 1]."""
        index = row if self.item_of_row is None else self.item_of_row[row]
        image = self.dataset[index]
        if isinstance(image, (tuple, list)):  # (image, label) data sets
            image = image[0]
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"encode_dataset: source item {index} is a {type(image).__name__}; "
                            f"items must be (C, H, W) image tensors")
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        if tuple(image.shape) != self.image_shape:
            raise ValueError(f"encode_dataset: source item {index} has shape "
                             f"{tuple(image.shape)}, the first has {self.image_shape}; one "
                             f"image size per run (for a folder pass size= and/or crop=)")
        return image.float()


class _TensorImages(Dataset):
    """An (N, C, H, W) tensor as a data set (uint8 is scaled by 1/255 when loaded)."""

    def __init__(self, images: torch.Tensor):
        self.images = images.detach().cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def sha256_hex(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return "sha256:" + digest.hexdigest()


def _sample_rows(n: int, count: int = 16) -> list[int]:
    """Up to ``count`` evenly spaced indices of 0 .. n − 1, first and last included."""
    return sorted({int(round(k)) for k in np.linspace(0, n - 1, min(n, count))})


def _raw_bytes(item) -> bytes:
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(item).tobytes()


def _array_fingerprint(array, kind: str) -> str:
    """Shape, dtype and a hash of the raw bytes of a sample of rows."""
    head = json.dumps([kind, list(array.shape), str(array.dtype)]).encode()
    return sha256_hex(head, *(_raw_bytes(array[row]) for row in _sample_rows(len(array))))


def _folder_source(dataset) -> Source:
    """Every file of an ImageFolder is a row, the unreadable ones (header check) included, in
    ImageFolder's order; the fingerprint covers names, sizes and modification times."""
    readable = {name: index for index, name in enumerate(dataset.names)}
    reasons = {Path(path).relative_to(dataset.root).as_posix(): reason
               for path, reason in dataset.unreadable}
    names = sorted([*readable, *reasons])
    missing = {row: reasons[name] for row, name in enumerate(names) if name in reasons}
    stats = []
    for name in names:
        stat = (dataset.root / name).stat()
        stats.append([name, stat.st_size, stat.st_mtime_ns])
    description = {"kind": "folder", "path": str(dataset.root.resolve()),
                   "size": dataset.size, "crop": dataset.crop, "grayscale": dataset.grayscale,
                   "fingerprint": sha256_hex(json.dumps(stats).encode())}
    return Source(dataset, len(names), tuple(dataset.image_shape), description, names,
                   [readable.get(name) for name in names], missing)


def _dataset_source(dataset, description: dict) -> Source:
    """Any data set of images. Its image shape is ``dataset.image_shape`` or that of the first
    sampled item; its fingerprint hashes the length, shape, names and sampled items (the raw
    array rows for :class:`pyvae.data.NumpyImages`)."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"encode_dataset: source must be an image folder, a .npy path, a data "
                        f"set or an (N, C, H, W) tensor, got {type(dataset).__name__}")
    rows = len(dataset)
    if rows == 0:
        raise ValueError("encode_dataset: source is empty")
    names = getattr(dataset, "names", None)
    names = [str(name) for name in names] if isinstance(names, (list, tuple)) and len(
        names) == rows else None
    shape = getattr(dataset, "image_shape", None)
    samples = []
    if isinstance(dataset, NumpyImages):
        description.setdefault("layout", dataset.layout)
        samples.append(_array_fingerprint(dataset.array, "array").encode())
    else:
        for row in _sample_rows(rows):
            try:
                item = dataset[row]
            except UnreadableImageError:
                samples.append(b"")
                continue
            image = item[0] if isinstance(item, (tuple, list)) else item
            shape = shape if shape is not None else tuple(image.shape)
            samples.append(_raw_bytes(image))
    if shape is None:
        raise ValueError("encode_dataset: none of the sampled items of source could be read")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"encode_dataset: source items must be (C, H, W) images, got shape "
                         f"{shape}")
    head = json.dumps([type(dataset).__name__, rows, list(shape), names])
    description["fingerprint"] = sha256_hex(head.encode(), *samples)
    return Source(dataset, rows, shape, description, names)


def resolve_source(source, *, size=None, crop=None, grayscale: bool | None = None,
                   channels: int | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Source:
    """Turn ``source`` into rows, names, an image shape and a fingerprint (see
    :func:`encode_dataset`)."""
    is_path = isinstance(source, (str, os.PathLike))
    is_folder = is_path and Path(source).is_dir()
    if not is_folder:
        for name, value in (("size", size), ("crop", crop), ("grayscale", grayscale)):
            if value is not None:
                raise ValueError(f"encode_dataset: {name}= applies to image-folder sources "
                                 f"only, not to a {type(source).__name__} source")
    if is_folder:
        with warnings.catch_warnings():  # its unreadable files are reported with the others
            warnings.simplefilter("ignore")
            dataset = ImageFolder(source, size=size, crop=crop,
                                  grayscale=channels == 1 if grayscale is None else grayscale,
                                  max_pixels=max_pixels)
        return _folder_source(dataset)
    if isinstance(source, ImageFolder):
        return _folder_source(source)
    if is_path and str(source).lower().endswith(".npy"):
        if not Path(source).is_file():
            raise FileNotFoundError(f"encode_dataset: source {str(source)!r} does not exist")
        path = str(Path(source).resolve())
        return _dataset_source(NumpyImages(path), {"kind": "npy", "path": path})
    if is_path:
        try:
            dataset = load_dataset(str(source))
        except ValueError as error:
            raise ValueError(f"encode_dataset: source: {error}") from None
        return _dataset_source(dataset, {"kind": "spec", "spec": str(source)})
    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise ValueError(f"encode_dataset: a tensor source must be (N, C, H, W), got shape "
                             f"{tuple(source.shape)}")
        if source.dtype != torch.uint8 and not source.is_floating_point():
            raise TypeError(f"encode_dataset: a tensor source must be uint8 or floating, got "
                            f"{source.dtype}")
        if len(source) == 0:
            raise ValueError("encode_dataset: source is empty")
        dataset = _TensorImages(source)
        description = {"kind": "tensor",
                       "fingerprint": _array_fingerprint(dataset.images, "tensor")}
        return Source(dataset, len(source), tuple(source.shape[1:]), description)
    if isinstance(source, np.ndarray):
        return _dataset_source(NumpyImages(source), {"kind": "array"})
    description = {"kind": "dataset", "class": type(source).__name__}
    filename = getattr(getattr(source, "array", None), "filename", None)
    if isinstance(source, NumpyImages) and filename:
        description.update(kind="npy", path=str(filename))
    return _dataset_source(source, description)


# ---- loading (in DataLoader workers) ----------------------------------------------------------

class Rows(Dataset):
    """Row r → (r, image or None, reason or None): unreadable images become a reason."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return self.source.rows

    def __getitem__(self, row: int):
        reason = self.source.missing.get(row)
        if reason is None:
            try:
                return row, self.source.load(row), None
            except UnreadableImageError as error:
                reason = error.reason
        return row, None, reason


def collate_rows(items) -> dict:
    """A batch of consecutive rows: their readable images stacked, the others' reasons."""
    images = [image for _, image, _ in items if image is not None]
    return {"start": items[0][0], "stop": items[-1][0] + 1,
            "ok": torch.tensor([image is not None for _, image, _ in items]),
            "images": torch.stack(images) if images else None,
            "failed": [(row, reason) for row, image, reason in items if image is None]}
