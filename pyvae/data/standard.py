"""Standard image data sets read from their usual on-disk formats. pyvae never downloads them:
point these classes at a copy you already have."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pyvae.data._utils import check_pair, check_size
from pyvae.data.images import UnreadableImageError, load_image, output_size

try:  # numpy >= 2 moved the array reconstructor; the old name still appears in old pickles
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain Python data and numpy arrays, and nothing else.

    A pickle can name any importable callable and have it called, so unpickling untrusted files
    runs untrusted code. The CIFAR-10 batches need only the three numpy names below.
    """

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays and plain Python data "
                f"are allowed") from None


def _load_batch(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} is missing; pyvae does not download data "
                                f"sets: extract cifar-10-python.tar.gz and pass its "
                                f"cifar-10-batches-py folder as root")
    try:
        with open(path, "rb") as file:
            batch = _ArrayUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as error:
        raise pickle.UnpicklingError(f"{path}: {error}") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, "
                         f"not a dict")
    # The original (Python 2) files have byte-string keys; accept re-saved ones with str keys.
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


class CIFAR10(Dataset):
    """CIFAR-10 from its python version (``cifar-10-batches-py``): 50,000 training or 10,000 test
    images, 32×32 RGB.

    ``dataset[i]`` is a float32 tensor (3, 32, 32) in [0, 1]. The batches are pickles; they are
    read with an unpickler that accepts only numpy arrays and plain data, so a tampered file
    raises ``pickle.UnpicklingError`` instead of running code.

    Args:
        root: the folder with ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
            ``batches.meta``, or a folder containing ``cifar-10-batches-py``.
        train: the five training batches, else the test batch.

    Attributes:
        images: uint8 array (N, 3, 32, 32).
        targets: int64 array (N,), class indices 0..9.
        classes: the 10 class names.
        image_shape: (3, 32, 32).
    """

    image_shape = (3, 32, 32)

    def __init__(self, root: str | os.PathLike, train: bool = True):
        root = Path(root)
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        if not root.is_dir():
            raise FileNotFoundError(f"root must be an existing directory, got {str(root)!r}")
        self.root, self.train = root, train
        names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
        images, labels = [], []
        for name in names:
            batch = _load_batch(root / name)
            data, batch_labels = batch.get("data"), batch.get("labels")
            if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                    or data.shape[1] != 3 * 32 * 32 or batch_labels is None
                    or len(batch_labels) != len(data)):
                raise ValueError(f"{root / name} is not a CIFAR-10 batch: expected 'data', a uint8 "
                                 f"array (n, 3072), and n 'labels'")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch_labels, dtype=np.int64))
        self.images = np.concatenate(images)
        self.targets = np.concatenate(labels)
        label_names = _load_batch(root / "batches.meta").get("label_names")
        if not isinstance(label_names, list):
            raise ValueError(f"{root / 'batches.meta'} has no 'label_names' list")
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in label_names]
        if self.targets.size and not (0 <= self.targets.min()
                                      and self.targets.max() < len(self.classes)):
            raise ValueError(f"labels in {root} must lie in [0, {len(self.classes) - 1}]")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index].astype(np.float32) / 255.0)


class CelebA(Dataset):
    """CelebA aligned faces (``img_align_celeba``, 178×218 JPEG) with their 40 binary attributes.

    ``dataset[i]`` is a float32 RGB tensor (3, H, W) in [0, 1]; ``size`` and ``crop`` are applied
    as by :func:`pyvae.data.load_image`, resize first, then centre crop: ``size=64, crop=64``
    gives the DCGAN framing, ``size=77, crop=64`` about the "crop 148, resize to 64" one.

    Args:
        root: folder with ``img_align_celeba/`` and ``list_attr_celeba.txt``, and for a
            ``split`` other than ``"all"`` also ``list_eval_partition.txt``.
        split: ``"all"``, ``"train"``, ``"valid"`` or ``"test"`` (partition 0, 1, 2).
        size, crop: see :func:`pyvae.data.load_image`.

    Attributes:
        names: the image file names, in dataset order (the order of ``list_attr_celeba.txt``).
        targets: int64 array (N, 40) of attributes in {0, 1} (the file's −1 → 0).
        target_names: the 40 attribute names.
        image_shape: (3, H, W) (from the first image's header, after ``size`` and ``crop``).
    """

    splits = {"train": 0, "valid": 1, "test": 2}

    def __init__(self, root: str | os.PathLike, *, split: str = "all", size=None, crop=None):
        self.root = Path(root)
        if split != "all" and split not in self.splits:
            raise ValueError(f"split must be 'all', 'train', 'valid' or 'test', got {split!r}")
        self.split, self.size, self.crop = split, check_size(size), check_pair(crop, "crop")
        self.image_dir = self.root / "img_align_celeba"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.image_dir} is not a directory; root must be the CelebA "
                                    f"folder (pyvae does not download data sets)")
        names, self.target_names, values = self._read_attributes(self.root / "list_attr_celeba.txt")
        if split != "all":
            partition = self._read_partition(self.root / "list_eval_partition.txt", names)
            keep = partition == self.splits[split]
            names, values = [n for n, k in zip(names, keep) if k], values[keep]
        if not names:
            raise ValueError(f"CelebA split {split!r} under {self.root} has no images")
        self.names = names
        self.targets = (values + 1) // 2

        present = set(os.listdir(self.image_dir))
        missing = [name for name in names if name not in present]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) listed in list_attr_celeba.txt are "
                                    f"missing from {self.image_dir}, e.g. {missing[:3]}")
        try:
            with Image.open(self.image_dir / names[0]) as image:  # header only
                height, width = image.height, image.width
        except Exception as error:
            raise UnreadableImageError(self.image_dir / names[0], error) from error
        self.image_shape = (3, *output_size(height, width, self.size, self.crop))

    @staticmethod
    def _read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
        if not path.is_file():
            raise FileNotFoundError(f"CelebA attribute file {path} is missing")
        lines = path.read_text().splitlines()
        try:
            count, attributes = int(lines[0]), lines[1].split()
        except (IndexError, ValueError):
            raise ValueError(f"{path}: line 1 must be the image count and line 2 the attribute "
                             f"names") from None
        rows = [line.split() for line in lines[2:] if line.strip()]
        if len(rows) != count:
            raise ValueError(f"{path}: line 1 announces {count} images but {len(rows)} follow")
        for number, row in enumerate(rows, start=3):
            if len(row) != len(attributes) + 1:
                raise ValueError(f"{path}, line {number}: expected a file name and "
                                 f"{len(attributes)} values, got {len(row) - 1}")
        try:
            values = np.array([row[1:] for row in rows], dtype=np.int64)
            values = values.reshape(count, len(attributes))
        except ValueError:
            values = None
        if values is None or not np.isin(values, (-1, 1)).all():
            raise ValueError(f"{path}: attribute values must be 1 or -1")
        return [row[0] for row in rows], attributes, values

    @staticmethod
    def _read_partition(path: Path, names: list[str]) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"a split other than 'all' needs the partition file {path}, "
                                    f"which is missing")
        partition = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}, line {number}: expected 'name 0|1|2', got {line!r}")
            partition[fields[0]] = int(fields[1])
        unassigned = [name for name in names if name not in partition]
        if unassigned:
            raise ValueError(f"{path} assigns no partition to {len(unassigned)} image(s), "
                             f"e.g. {unassigned[:3]}")
        return np.array([partition[name] for name in names])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        name = self.names[index]
        image = load_image(self.image_dir / name, size=self.size, crop=self.crop)
        if tuple(image.shape) != self.image_shape:
            raise ValueError(f"CelebA image {name!r} loads with shape {tuple(image.shape)} but "
                             f"{self.names[0]!r} with {self.image_shape}; pass size= and/or crop=")
        return image
