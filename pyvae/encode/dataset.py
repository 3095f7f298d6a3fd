"""Encoding whole image collections at stride 1, from disk to a resumable on-disk store.

:func:`encode_dataset` streams a collection (an image folder, an ``.npy`` file, a data set or a
tensor) through the stride-1 patch encoder (:func:`pyvae.encode.encode_patches`) in chunks and
writes a *feature store*, a directory that plain numpy reads without pyvae::

    OUT/
      manifest.json    what the store holds (see below); written atomically
      features.npy     (N, D, H − p + 1, W − p + 1) posterior means, float16 (or float32)
      logvar.npy       the posterior log-variances, same shape and dtype (with_logvar=True only)
      valid.npy        (N,) bool: row n is encoded and its image was readable
      chunks/000012.done   one marker per finished chunk (JSON: its rows, unreadable images and
                           the SHA-256 of its rows in every array)
      .lock            held (fcntl.flock) by the job writing the store; a second job is refused

``features[n, :, y, x]`` is the code of the p×p patch of image n whose top-left corner is
(y, x), i.e. whose centre is (y + p // 2, x + p // 2). Rows of images that could not be read
are NaN and ``valid[n]`` is False.

Durability: every chunk of ``chunk_size`` images is computed, written into its rows of the
memory maps, flushed and fsync'ed, and only then recorded as done by atomically creating its
marker. A killed run loses at most the chunks in flight; ``resume=True`` encodes only the chunks
without a marker, and the result is byte-identical to an uninterrupted run on the same set-up
(device, batch size, number of CPU threads: convolutions may round differently otherwise).
Resuming with a different model, source or output-changing option is refused.

Integrity: the arrays are reserved on the disk (``posix_fallocate``) before they are mapped, so
a full disk is an OSError naming the file, never a Bus error. Resuming, and opening a store with
:func:`open_features`, check that every array file is as long as its header says (refused,
naming the file, if not) and every finished chunk's rows against the SHA-256 recorded when it
was written (resuming re-encodes a damaged chunk; :func:`open_features` raises
:class:`pyvae.errors.IntegrityError`).

Under ``torchrun`` every process encodes the chunks ``i`` with ``i % WORLD_SIZE == RANK`` into
the same store (which must live on a file system all processes share, e.g. a local disk for a
single machine); rank 0 creates the store and marks it complete.

Test hook: the environment variable ``PYVAE_ENCODE_TEST_DELAY`` (seconds, float) makes every
process sleep that long after each chunk's marker is written, so that tests can kill a run
between chunks. It has no other effect and is not meant for normal use.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import pyvae
from pyvae._distributed import setup
from pyvae._io import LOCK_NAME, exclusive_lock, fsync_path, preallocate, write_text_atomic
from pyvae._validate import check_int
from pyvae.data import ImageFolder, NumpyImages, UnreadableImageError, load_dataset
from pyvae.data.images import DEFAULT_MAX_PIXELS, check_max_pixels
from pyvae.errors import IntegrityError
from pyvae.encode.stride1 import encode_patches, fully_convolutional

FORMAT = "pyvae-feature-store"
FORMAT_VERSION = 1
MANIFEST, FEATURES, LOGVAR, VALID, CHUNKS = (
    "manifest.json", "features.npy", "logvar.npy", "valid.npy", "chunks")
STORE_DTYPES = ("float16", "float32")
PRECISIONS = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEST_DELAY_ENV = "PYVAE_ENCODE_TEST_DELAY"


class StoreError(ValueError):
    """A feature store that cannot be written as asked: ``out`` holds another store (or other
    files) and ``resume`` was not given, or resuming would mix incompatible results."""


@dataclass(frozen=True)
class EncodeResult:
    """What :func:`encode_dataset` returns.

    Attributes:
        path: the store directory.
        shape: (N, D, H − p + 1, W − p + 1) of ``features.npy``.
        images_per_second: images encoded by this call (all processes together) / seconds.
        seconds: wall-clock time of this call's encoding, store set-up excluded.
        encoded: images (rows) encoded by this call; 0 when a resumed store was already done.
        skipped: every unreadable image of the store (this and earlier runs, all processes):
            ``{"index": row, "name": name or None, "reason": text}``, by row.
    """

    path: Path
    shape: tuple[int, int, int, int]
    images_per_second: float
    seconds: float
    encoded: int
    skipped: list[dict] = field(default_factory=list)


# ---- sources --------------------------------------------------------------------------------

@dataclass
class _Source:
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


def _sha256(*parts: bytes) -> str:
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
    return _sha256(head, *(_raw_bytes(array[row]) for row in _sample_rows(len(array))))


def _folder_source(dataset) -> _Source:
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
                   "fingerprint": _sha256(json.dumps(stats).encode())}
    return _Source(dataset, len(names), tuple(dataset.image_shape), description, names,
                   [readable.get(name) for name in names], missing)


def _dataset_source(dataset, description: dict) -> _Source:
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
    description["fingerprint"] = _sha256(head.encode(), *samples)
    return _Source(dataset, rows, shape, description, names)


def _resolve_source(source, *, size=None, crop=None, grayscale: bool | None = None,
                   channels: int | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> _Source:
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
        return _Source(dataset, len(source), tuple(source.shape[1:]), description)
    if isinstance(source, np.ndarray):
        return _dataset_source(NumpyImages(source), {"kind": "array"})
    description = {"kind": "dataset", "class": type(source).__name__}
    filename = getattr(getattr(source, "array", None), "filename", None)
    if isinstance(source, NumpyImages) and filename:
        description.update(kind="npy", path=str(filename))
    return _dataset_source(source, description)


# ---- loading (in DataLoader workers) ----------------------------------------------------------

class _Rows(Dataset):
    """Row r → (r, image or None, reason or None): unreadable images become a reason."""

    def __init__(self, source: _Source):
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


def _collate(items) -> dict:
    """A batch of consecutive rows: their readable images stacked, the others' reasons."""
    images = [image for _, image, _ in items if image is not None]
    return {"start": items[0][0], "stop": items[-1][0] + 1,
            "ok": torch.tensor([image is not None for _, image, _ in items]),
            "images": torch.stack(images) if images else None,
            "failed": [(row, reason) for row, image, reason in items if image is None]}


# ---- the store ------------------------------------------------------------------------------

def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's config JSON (``model.config`` when it has one, keys sorted) and
    every state_dict tensor's name, dtype, shape and bytes, in name order."""
    config = getattr(model, "config", None)
    parts = [json.dumps(config, sort_keys=True, default=str).encode()]
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        parts.append(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        parts.append(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return _sha256(*parts)


def _write_manifest(out: Path, manifest: dict) -> None:
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _marker(out: Path, chunk: int) -> Path:
    return out / CHUNKS / f"{chunk:06d}.done"


def _done_chunks(out: Path) -> set[int]:
    directory = out / CHUNKS
    if not directory.is_dir():
        return set()
    return {int(p.name[:-5]) for p in directory.iterdir()
            if p.name.endswith(".done") and p.name[:-5].isdigit()}


def _array_names(with_logvar: bool) -> list[str]:
    return [FEATURES, *([LOGVAR] if with_logvar else []), VALID]


# What must agree to resume a store, and how to name it in the refusal.
_CHECKED = [("dtype", "dtype"), ("with_logvar", "with_logvar"), ("patch_size", "patch size"),
            ("latent_dim", "latent dimension"), ("image_shape", "image shape (C, H, W)"),
            ("shape", "store shape"), ("chunk_size", "chunk_size"),
            ("precision", "precision"), ("tile_size", "tile_size")]


def _differences(stored: dict, wanted: dict) -> list[str]:
    """What differs between a store's manifest and this run, in words."""
    changes = [f"{label}: store {stored.get(key)!r}, now {wanted[key]!r}"
               for key, label in _CHECKED if stored.get(key) != wanted[key]]
    if stored.get("model", {}).get("hash") != wanted["model"]["hash"]:
        old = stored.get("model", {}).get("config")
        diff = ([k for k in sorted(set(old) | set(wanted["model"]["config"]))
                 if old.get(k) != wanted["model"]["config"].get(k)]
                if isinstance(old, dict) and isinstance(wanted["model"]["config"], dict) else [])
        detail = f"config keys {diff} differ" if diff else "same config, different weights"
        changes.append(f"model: hash {stored.get('model', {}).get('hash')} in the store, "
                       f"{wanted['model']['hash']} now ({detail})")
    old_source, new_source = stored.get("source", {}), wanted["source"]
    for key in sorted(set(old_source) | set(new_source)):
        if key not in ("fingerprint", "path") and old_source.get(key) != new_source.get(key):
            changes.append(f"source {key}: store {old_source.get(key)!r}, now "
                           f"{new_source.get(key)!r}")
    if old_source.get("fingerprint") != new_source["fingerprint"]:
        old_names, new_names = stored.get("names"), wanted["names"]
        if old_names != new_names and old_names is not None and new_names is not None:
            first = next((k for k, (a, b) in enumerate(zip(old_names, new_names)) if a != b),
                         min(len(old_names), len(new_names)))
            detail = (f"{len(old_names)} images in the store, {len(new_names)} now; first "
                      f"difference at row {first}")
        elif old_source.get("kind") == "folder":
            detail = "same file names, but file sizes or modification times differ"
        else:
            detail = "its shape, dtype or sampled contents differ"
        changes.append(f"source: fingerprint {old_source.get('fingerprint')} in the store, "
                       f"{new_source['fingerprint']} now ({detail})")
    return changes


def _only_leftovers_of_creation(out: Path) -> bool:
    """True if ``out`` holds only what a store creation killed before its manifest leaves."""
    for entry in out.iterdir():
        if entry.name == CHUNKS and entry.is_dir():
            if any(p.name.endswith(".done") for p in entry.iterdir()):
                return False
        elif entry.name not in (FEATURES, LOGVAR, VALID, LOCK_NAME) and not entry.name.startswith(
                f".{MANIFEST}.tmp-"):
            return False
    return True


def _create_store(out: Path, manifest: dict) -> None:
    """Make the arrays (sparse, zero-filled; valid all False), then the manifest (the commit
    point of creation)."""
    (out / CHUNKS).mkdir(parents=True, exist_ok=True)
    for name in _array_names(manifest["with_logvar"]):
        shape = manifest["shape"][:1] if name == VALID else manifest["shape"]
        dtype = np.bool_ if name == VALID else np.dtype(manifest["dtype"])
        array = np.lib.format.open_memmap(out / name, mode="w+", dtype=dtype,
                                          shape=tuple(shape))
        array.flush()
        del array
        # Reserve the disk blocks now: a full disk is an OSError here, not a SIGBUS later.
        preallocate(out / name, (out / name).stat().st_size)
        fsync_path(out / name)
    _write_manifest(out, manifest)


def _prepare_store(out: Path, manifest: dict, resume: bool) -> dict:
    """Create the store, or check that the one there can be resumed; returns its manifest."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"encode_dataset: out {str(out)!r} exists and is not a directory")
    if not out.exists() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        _create_store(out, manifest)
        return manifest
    if not (out / MANIFEST).is_file():
        if resume and _only_leftovers_of_creation(out):
            _create_store(out, manifest)  # the previous run died while creating the store
            return manifest
        raise StoreError(f"encode_dataset: out {str(out)!r} is a non-empty directory that is "
                         f"not a feature store; choose another path")
    if not resume:
        raise StoreError(f"encode_dataset: out {str(out)!r} already holds a feature store; "
                         f"pass resume=True (--resume) to continue it, or choose another path")
    try:
        stored = json.loads((out / MANIFEST).read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"encode_dataset: the manifest of {str(out)!r} is not JSON "
                         f"({error})") from None
    if stored.get("format") != FORMAT or stored.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"encode_dataset: {str(out)!r} holds format "
                         f"{stored.get('format')!r} version {stored.get('format_version')!r}; "
                         f"this pyvae writes {FORMAT!r} version {FORMAT_VERSION}")
    changes = _differences(stored, manifest)
    if changes:
        raise StoreError(f"encode_dataset: cannot resume the store in {str(out)!r}, it was "
                         f"made differently: " + "; ".join(changes)
                         + ". Use the same model, source and options, or another out path")
    for name in _array_names(manifest["with_logvar"]):
        if not (out / name).is_file():
            raise StoreError(f"encode_dataset: the store in {str(out)!r} lacks {name}; it "
                             f"cannot be resumed, choose another path")
    # Keep the first run's record of when the store was made; refresh the rest.
    return {**manifest, "created": stored.get("created", manifest["created"])}


def _check_length(path: Path) -> int:
    """The byte length that ``path``'s .npy header implies; :class:`IntegrityError` naming the
    file when the file is not that long (cut short: numpy would map zeros past its end) or its
    header cannot be read."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(file)
            expected = file.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = os.fstat(file.fileno()).st_size
    except ValueError as error:
        raise IntegrityError(f"{str(path)!r} is not a readable .npy file ({error}); the "
                             f"feature store is damaged: encode it again into a new "
                             f"directory") from None
    if actual != expected:
        raise IntegrityError(f"{str(path)!r} is {actual:,} bytes, but its header "
                             f"({tuple(shape)} {dtype}) needs {expected:,}: the file was cut "
                             f"short or damaged, so the feature store cannot be trusted; "
                             f"encode it again into a new directory")
    return expected


def _open_arrays(out: Path, manifest: dict) -> dict[str, np.memmap]:
    arrays = {}
    for name in _array_names(manifest["with_logvar"]):
        size = _check_length(out / name)
        preallocate(out / name, size)  # e.g. a store copied as a sparse file
        array = np.load(out / name, mmap_mode="r+")
        expected = (tuple(manifest["shape"][:1]) if name == VALID else tuple(manifest["shape"]),
                    np.dtype(np.bool_ if name == VALID else manifest["dtype"]))
        if (array.shape, array.dtype) != expected:
            raise StoreError(f"encode_dataset: {out / name} is {array.shape} {array.dtype}, the "
                             f"manifest says {expected[0]} {expected[1]}; the store is damaged")
        arrays[name] = array
    return arrays


def _skipped_from_markers(out: Path, chunks: int) -> tuple[list[dict], list[int], list]:
    """The unreadable images recorded in the markers, the chunks without a marker, and every
    chunk's ``{"rows": [start, stop], "sha256": {array: digest}}`` (None where not recorded)."""
    skipped, missing, digests = [], [], []
    for chunk in range(chunks):
        path = _marker(out, chunk)
        if not path.is_file():
            missing.append(chunk)
            digests.append(None)
            continue
        marker = json.loads(path.read_text())
        skipped += marker["skipped"]
        digests.append({"rows": marker["rows"], "sha256": marker["sha256"]}
                       if "sha256" in marker else None)
    return sorted(skipped, key=lambda entry: entry["index"]), missing, digests


def _chunk_digests(arrays: dict, start: int, stop: int) -> dict[str, str]:
    """The SHA-256 of rows [start, stop) of every array, read in blocks of at most 64 MB."""
    digests = {}
    for name, array in arrays.items():
        digest = hashlib.sha256()
        row_bytes = max(1, array[0:1].nbytes)
        step = max(1, (64 << 20) // row_bytes)
        for first in range(start, stop, step):
            digest.update(np.ascontiguousarray(array[first:min(first + step, stop)]).data)
        digests[name] = digest.hexdigest()
    return digests


def _damaged_chunks(out: Path, arrays: dict, chunks) -> list[int]:
    """The finished chunks among ``chunks`` whose rows no longer match the SHA-256 in their
    marker (or whose marker is unreadable). Markers without checksums are trusted."""
    damaged = []
    for chunk in chunks:
        try:
            marker = json.loads(_marker(out, chunk).read_text())
            recorded, rows = marker.get("sha256"), marker["rows"]
        except (json.JSONDecodeError, KeyError, TypeError):
            damaged.append(chunk)
            continue
        if recorded is not None and _chunk_digests(arrays, *rows) != recorded:
            damaged.append(chunk)
    return damaged


# ---- encode_dataset -------------------------------------------------------------------------

def _agree(group, error: BaseException | None) -> None:
    """Raise on every rank if rank 0 failed (rank 0 re-raises its own error); a barrier."""
    messages = group.gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if messages[0] is not None:
        raise StoreError(f"encode_dataset: rank 0 failed: {messages[0]}")


def encode_dataset(model, source, out: str | os.PathLike, *, batch_size: int = 64,
                   chunk_size: int = 256, dtype: str = "float16", precision: str | None = None,
                   with_logvar: bool = False, resume: bool = False, num_workers: int = 0,
                   device: str | torch.device | None = None, progress: bool = True,
                   size=None, crop=None, grayscale: bool | None = None,
                   tile_size: int | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> EncodeResult:
    """Encode every p×p patch (stride 1) of every image of a collection into a feature store.

    Args:
        model: a patch model (``.encoder``, ``.patch_size`` p, ``.latent_dim`` D,
            ``.channels`` C, ``.preprocess``; e.g. :class:`pyvae.models.PatchVAE` or
            ``pyvae.train.load_model(checkpoint)``), encoded in eval mode.
        source: one of
            - a folder: its PNG/JPEG files, recursively, in sorted order of their relative paths
              (:class:`pyvae.data.ImageFolder`); every file is a row, files that cannot be
              decoded are skipped (see below);
            - a ``.npy`` file (:class:`pyvae.data.NumpyImages`, memory-mapped);
            - another :func:`pyvae.data.load_dataset` spec string, e.g. ``"digits"``;
            - a data set (``pyvae.data`` or any ``torch.utils.data.Dataset``) whose items are
              (C, H, W) tensors in [0, 1] (or uint8, or an ``(image, label)`` pair); it signals
              an unreadable item by raising :class:`pyvae.data.UnreadableImageError`;
            - an (N, C, H, W) tensor or numpy array, floats in [0, 1] or uint8.
            All images must have one size (H, W >= p).
        out: the store directory (created; see the module docstring for its layout). A
            non-empty ``out`` is refused unless ``resume``.
        batch_size: images per forward pass (batches never span two chunks).
        chunk_size: images per chunk, the unit of writing, fsync and resume.
        dtype: stored dtype, ``"float16"`` (default; half the disk) or ``"float32"``. The
            encoder computes in float32 (or ``precision``) and the result is rounded once.
        precision: autocast compute dtype, ``"bf16"`` or ``"fp16"`` (mostly for GPUs);
            default (``None`` / ``"fp32"``) full precision.
        with_logvar: also store the posterior log-variances (``logvar.npy``).
        resume: continue the store in ``out``: chunks with a marker are kept, the others are
            encoded. Refused (:class:`StoreError`, saying what changed) if the model (hash of
            config and weights), the source (fingerprint: file names, sizes and modification
            times for a folder; shape, dtype and a hash of sampled rows for arrays) or an
            option that changes the output (dtype, with_logvar, precision, chunk_size, folder
            size/crop/grayscale) differs. Without a store in ``out`` it starts one.
        num_workers: DataLoader worker processes that decode images while the model computes.
        device: where to compute; default the model's device (under ``torchrun``:
            ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU).
        progress: show a progress bar (images/s and ETA; rank 0 only).
        tile_size: encode each image in tiles of at most this many pixels per side (overlap
            p − 1; the same features) to bound memory for big images; default whole images.
        size, crop, grayscale: folder sources only, see :func:`pyvae.data.load_image`
            (``grayscale`` defaults to ``model.channels == 1``).
        max_pixels: the largest image (height × width) accepted, default
            :data:`pyvae.data.DEFAULT_MAX_PIXELS` = 2**26 (None: no limit). Image files are
            checked from their headers before anything is decoded (a small file can declare a
            huge image) and the images of any source before the store is allocated.

    Returns:
        An :class:`EncodeResult` (path, shape, images/s, seconds, rows encoded, skipped).

    Unreadable images (corrupt or truncated files, :class:`pyvae.data.UnreadableImageError`)
    are not fatal: their rows are NaN, ``valid.npy`` is False there, they are listed in the
    manifest's ``"skipped"`` with the reason, and a warning names them.

    Under ``torchrun`` (RANK / WORLD_SIZE set) every process calls this with the same
    arguments; a process group (Gloo on CPUs, NCCL on GPUs) is created if none exists and
    destroyed at the end. Process r encodes the chunks i with i % world_size == r.

    The job holds ``out/.lock`` (rank 0 under ``torchrun``) until it ends: a second job on the
    same store raises :class:`pyvae.errors.AlreadyRunningError` naming the process holding it.

    Raises:
        StoreError: ``out`` holds something else, or resuming would mix incompatible results.
        AlreadyRunningError: another process is writing the store.
        IntegrityError: resuming a store whose array files are shorter than their headers say.
        OSError: the disk is full (naming the file), or another file error.
        ValueError / TypeError: naming the bad argument (source, dtype, batch_size, ...).
    """
    for attribute in ("encoder", "patch_size", "latent_dim", "preprocess"):
        if not hasattr(model, attribute):
            raise TypeError(f"encode_dataset: model must be a patch model with .encoder, "
                            f".patch_size, .latent_dim and .preprocess (e.g. "
                            f"pyvae.models.PatchVAE); {type(model).__name__} lacks "
                            f".{attribute}")
    batch_size = check_int("encode_dataset", "batch_size", batch_size, 1)
    chunk_size = check_int("encode_dataset", "chunk_size", chunk_size, 1)
    if tile_size is not None:
        tile_size = check_int("encode_dataset", "tile_size", tile_size, int(model.patch_size))
    num_workers = check_int("encode_dataset", "num_workers", num_workers, 0)
    if str(dtype) not in STORE_DTYPES:
        raise ValueError(f"encode_dataset: dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"encode_dataset: precision must be None, 'fp32', 'bf16' or 'fp16', "
                         f"got {precision!r}")
    try:
        max_pixels = check_max_pixels(max_pixels)
    except ValueError as error:
        raise ValueError(f"encode_dataset: {error}") from None
    p = int(model.patch_size)
    channels = getattr(model, "channels", None)
    src = _resolve_source(source, size=size, crop=crop, grayscale=grayscale, channels=channels,
                          max_pixels=max_pixels)
    c, height, width = src.image_shape
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(f"encode_dataset: source images are {height}×{width} = "
                         f"{height * width:,} pixels, more than max_pixels={max_pixels:,} "
                         f"(--max-pixels); pass a larger max_pixels to encode them")
    if channels is not None and c != channels:
        hint = " (pass grayscale=True/False)" if src.description["kind"] == "folder" else ""
        raise ValueError(f"encode_dataset: source images have {c} channels, the model reads "
                         f"{channels}{hint}")
    if height < p or width < p:
        raise ValueError(f"encode_dataset: source images of {height}×{width} are smaller than "
                         f"the model's {p}×{p} patches")

    group = setup(device, next(model.parameters()).device)
    try:
        with _lock_store(Path(out), group):
            return _run(model, src, Path(out), group, batch_size=batch_size,
                        chunk_size=chunk_size, dtype=str(dtype), precision=precision,
                        with_logvar=bool(with_logvar), resume=resume, num_workers=num_workers,
                        progress=progress, tile_size=tile_size)
    finally:
        group.close()


def _lock_store(out: Path, group) -> contextlib.ExitStack:
    """Rank 0 takes the store's exclusive lock (held until the returned stack closes); every
    rank raises if it could not."""
    stack = contextlib.ExitStack()
    error = None
    if group.is_main:
        try:
            if out.exists() and not out.is_dir():
                raise StoreError(f"encode_dataset: out {str(out)!r} exists and is not a "
                                 f"directory")
            stack.enter_context(exclusive_lock(out, "feature store"))
        except BaseException as caught:  # noqa: BLE001  (re-raised by _agree)
            error = caught
    _agree(group, error)
    return stack


def _run(model, src: _Source, out: Path, group, *, batch_size, chunk_size, dtype, precision,
         with_logvar, resume, num_workers, progress, tile_size) -> EncodeResult:
    p, latent_dim = int(model.patch_size), int(model.latent_dim)
    c, height, width = src.image_shape
    shape = (src.rows, latent_dim, height - p + 1, width - p + 1)
    chunks = -(-src.rows // chunk_size)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pyvae_version": pyvae.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shape": list(shape), "dtype": dtype, "with_logvar": with_logvar,
        "arrays": {"features": FEATURES, "valid": VALID,
                   **({"logvar": LOGVAR} if with_logvar else {})},
        "layout": "features[n, :, y, x] is the posterior mean of the p×p patch of image n with "
                  "top-left corner (y, x) (centre (y + p // 2, x + p // 2)); rows of unreadable "
                  "images are NaN and valid[n] is False",
        "patch_size": p, "latent_dim": latent_dim, "image_shape": [c, height, width],
        "model": {"config": getattr(model, "config", None), "hash": model_hash(model)},
        "source": src.description, "names": src.names,
        "chunk_size": chunk_size, "num_chunks": chunks,
        "precision": {None: "fp32"}.get(precision, precision), "tile_size": tile_size,
        "skipped": [], "complete": False,
    }
    manifest = json.loads(json.dumps(manifest))  # JSON types (lists, not tuples) for comparison

    # Every rank must see the same rows; rank 0 creates or checks the store, then all open it.
    fingerprints = group.gather(src.description["fingerprint"])
    error = None
    if group.is_main:
        try:
            if len(set(fingerprints)) > 1:
                raise StoreError(f"encode_dataset: the processes see different sources "
                                 f"(fingerprints {fingerprints}); give every rank the same one")
            manifest = _prepare_store(out, manifest, resume)
        except BaseException as caught:  # noqa: BLE001  (re-raised by _agree)
            error = caught
    _agree(group, error)
    arrays = _open_arrays(out, manifest)

    done = _done_chunks(out)
    # Each rank checks the finished chunks it owns against their checksums; a damaged one is
    # encoded again (its marker goes first, so a kill now leaves it unfinished, not wrong).
    damaged = _damaged_chunks(out, arrays, sorted(k for k in done
                                                 if k % group.world_size == group.rank))
    if damaged:
        warnings.warn(f"encode_dataset: {len(damaged)} finished chunk(s) of {str(out)!r} no "
                      f"longer match their SHA-256 (damaged on disk?): {damaged[:10]}; "
                      f"encoding them again", stacklevel=3)
        for chunk in damaged:
            _marker(out, chunk).unlink()
        fsync_path(out / CHUNKS)
        done -= set(damaged)
    mine = [k for k in range(chunks) if k % group.world_size == group.rank and k not in done]
    batches = [list(range(start, min(start + batch_size, stop)))
               for k in mine
               for stop in [min((k + 1) * chunk_size, src.rows)]
               for start in range(k * chunk_size, stop, batch_size)]
    cuda = group.device.type == "cuda"
    loader = DataLoader(_Rows(src), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=cuda)
    network = fully_convolutional(model.encoder, p).to(group.device)
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)

    started = time.perf_counter()
    bar = tqdm(total=sum(map(len, batches)), unit="img", desc=f"encode {out.name}",
               disable=not progress or not group.is_main, dynamic_ncols=True)
    skipped_now: list[dict] = []
    chunk_skipped: list[dict] = []
    fds = {name: os.open(out / name, os.O_RDONLY) for name in arrays}
    try:
        for batch in loader:
            start, stop = batch["start"], batch["stop"]
            _encode_batch(model, network, batch, arrays, group.device, PRECISIONS[precision],
                          tile_size)
            chunk_skipped += [{"index": row, "name": src.names[row] if src.names else None,
                               "reason": reason} for row, reason in batch["failed"]]
            bar.update(stop - start)
            chunk = start // chunk_size
            if stop == min((chunk + 1) * chunk_size, src.rows):  # the chunk's last batch
                for name, array in arrays.items():
                    array.flush()
                    os.fsync(fds[name])
                marker = {"chunk": chunk, "rows": [chunk * chunk_size, stop],
                          "rank": group.rank, "skipped": chunk_skipped,
                          "sha256": _chunk_digests(arrays, chunk * chunk_size, stop)}
                write_text_atomic(_marker(out, chunk), json.dumps(marker) + "\n")
                skipped_now += chunk_skipped
                chunk_skipped = []
                if delay:
                    time.sleep(delay)
    finally:
        bar.close()
        for fd in fds.values():
            os.close(fd)
        del arrays
    if skipped_now:
        listed = "; ".join(f"{s['name'] or s['index']} ({s['reason']})" for s in skipped_now[:5])
        more = f"; and {len(skipped_now) - 5} more" if len(skipped_now) > 5 else ""
        warnings.warn(f"encode_dataset: {len(skipped_now)} unreadable image(s) left as NaN rows "
                      f"(valid.npy False, listed in manifest.json 'skipped'): {listed}{more}",
                      stacklevel=3)

    encoded = sum(group.gather(sum(map(len, batches))))  # also waits for every rank
    seconds = time.perf_counter() - started
    error = None
    if group.is_main:
        try:
            skipped, missing, digests = _skipped_from_markers(out, chunks)
            if missing:
                raise StoreError(f"encode_dataset: chunks {missing[:10]} of {str(out)!r} have "
                                 f"no marker after every process finished")
            manifest.update(skipped=skipped, complete=True, chunk_sha256=digests, last_run={
                "seconds": round(seconds, 3), "images": encoded,
                "images_per_second": round(encoded / max(seconds, 1e-9), 3),
                "processes": group.world_size, "device": str(group.device),
                "batch_size": batch_size})
            _write_manifest(out, manifest)
        except BaseException as caught:  # noqa: BLE001
            error = caught
    _agree(group, error)
    skipped = json.loads((out / MANIFEST).read_text())["skipped"]
    return EncodeResult(out, shape, encoded / max(seconds, 1e-9), seconds, encoded, skipped)


@torch.no_grad()
def _encode_batch(model, network, batch: dict, arrays: dict, device, compute_dtype,
                  tile_size: int | None) -> None:
    """Encode one batch and write its rows (NaN for unreadable images) into the memory maps."""
    start, stop, ok = batch["start"], batch["stop"], batch["ok"]
    features = arrays[FEATURES]
    mu = logvar = None
    if batch["images"] is not None:
        images = batch["images"].to(device, non_blocking=True)
        mu, logvar = encode_patches(model, images, batch_size=len(images), dtype=compute_dtype,
                                    return_logvar=True, device=device, network=network,
                                    tile_size=tile_size)
    for name, values in ((FEATURES, mu), (LOGVAR, logvar)):
        if name not in arrays:
            continue
        if bool(ok.all()):
            arrays[name][start:stop] = values.to(torch.float16 if features.dtype == np.float16
                                                 else torch.float32).cpu().numpy()
        else:
            rows = np.full((stop - start, *features.shape[1:]), np.nan, dtype=features.dtype)
            if values is not None:
                rows[ok.numpy()] = values.cpu().numpy().astype(features.dtype)
            arrays[name][start:stop] = rows
    arrays[VALID][start:stop] = ok.numpy()


def open_features(out: str | os.PathLike, *, require_complete: bool = True,
                  verify: bool = True) -> tuple[np.memmap, dict]:
    """Open a feature store written by :func:`encode_dataset` for reading.

    Args:
        out: the store directory.
        require_complete: raise if the store is unfinished (a killed or running
            :func:`encode_dataset`); with False, rows whose ``valid.npy`` entry is False are
            not (yet) meaningful.
        verify: check every array file's length against its header and every finished
            chunk's rows against the SHA-256 recorded when it was written (reads the whole
            store once, at about the disk's speed); :class:`pyvae.errors.IntegrityError`
            naming the file and the rows if one differs. ``False`` skips this.

    Returns:
        ``(features, manifest)``: a read-only ``np.memmap`` (N, D, H − p + 1, W − p + 1) of the
        posterior means (float16 or float32) and the manifest dict (``names``, ``skipped``,
        ``patch_size``, ``model``, ``source``, ...). ``features[n, :, y, x]`` is the code of
        image n's p×p patch with top-left corner (y, x).

    Without pyvae, plain numpy reads the same store::

        import json, numpy as np
        features = np.load("OUT/features.npy", mmap_mode="r")   # (N, D, H', W')
        valid = np.load("OUT/valid.npy")                         # (N,) bool
        manifest = json.load(open("OUT/manifest.json"))          # names, skipped, ...
        logvar = np.load("OUT/logvar.npy", mmap_mode="r")        # if manifest["with_logvar"]
    """
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"open_features: no {MANIFEST} in out {str(out)!r}; is it a "
                                f"store written by pyvae.encode.encode_dataset?")
    manifest = json.loads(path.read_text())
    if require_complete and not manifest.get("complete"):
        raise ValueError(f"open_features: the store in {str(out)!r} is incomplete (the encoding "
                         f"was interrupted or is still running); finish it with "
                         f"encode_dataset(..., resume=True), or pass require_complete=False")
    if verify:
        _verify_store(out, manifest)
    features = np.load(out / manifest["arrays"]["features"], mmap_mode="r")
    return features, manifest


def _verify_store(out: Path, manifest: dict) -> None:
    """IntegrityError naming the file if an array is cut short or a chunk's rows differ from
    the SHA-256 recorded for them (the manifest's, else the chunk markers')."""
    names = _array_names(manifest.get("with_logvar", False))
    for name in names:
        _check_length(out / name)
    arrays = {name: np.load(out / name, mmap_mode="r") for name in names}
    digests = manifest.get("chunk_sha256")
    if digests is None:
        digests = _skipped_from_markers(out, int(manifest.get("num_chunks", 0)))[2]
    for chunk, entry in enumerate(digests):
        if entry is None:
            continue  # unfinished, or written by a pyvae without chunk checksums
        actual = _chunk_digests(arrays, *entry["rows"])
        for name, digest in entry["sha256"].items():
            if actual.get(name) != digest:
                start, stop = entry["rows"]
                raise IntegrityError(
                    f"open_features: {str(out / name)!r} is damaged: rows {start}..{stop - 1} "
                    f"(chunk {chunk}) do not match the SHA-256 recorded when they were written; "
                    f"re-encode them with encode_dataset(..., resume=True)")
