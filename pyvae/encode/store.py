"""The feature store on disk (format described in :mod:`pyvae.encode.dataset`): its manifest,
arrays, chunk markers and their checksums, creating or resuming it, and :func:`open_features`."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

import pyvae
from pyvae._io import LOCK_NAME, exclusive_lock, fsync_path, preallocate, write_text_atomic
from pyvae.encode.sources import sha256_hex
from pyvae.errors import IntegrityError

FORMAT = "pyvae-feature-store"
FORMAT_VERSION = 1
MANIFEST, FEATURES, LOGVAR, VALID, CHUNKS = (
    "manifest.json", "features.npy", "logvar.npy", "valid.npy", "chunks")
STORE_DTYPES = ("float16", "float32")


class StoreError(ValueError):
    """A feature store that cannot be written as asked: ``out`` holds another store (or other
    files) and ``resume`` was not given, or resuming would mix incompatible results."""


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's config JSON (``model.config`` when it has one, keys sorted) and
    every state_dict tensor's name, dtype, shape and bytes, in name order."""
    config = getattr(model, "config", None)
    parts = [json.dumps(config, sort_keys=True, default=str).encode()]
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        parts.append(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        parts.append(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return sha256_hex(*parts)


def write_manifest(out: Path, manifest: dict) -> None:
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def marker_path(out: Path, chunk: int) -> Path:
    return out / CHUNKS / f"{chunk:06d}.done"


def done_chunks(out: Path) -> set[int]:
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
    write_manifest(out, manifest)


def prepare_store(out: Path, manifest: dict, resume: bool) -> dict:
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


def open_arrays(out: Path, manifest: dict) -> dict[str, np.memmap]:
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


def skipped_from_markers(out: Path, chunks: int) -> tuple[list[dict], list[int], list]:
    """The unreadable images recorded in the markers, the chunks without a marker, and every
    chunk's ``{"rows": [start, stop], "sha256": {array: digest}}`` (None where not recorded)."""
    skipped, missing, digests = [], [], []
    for chunk in range(chunks):
        path = marker_path(out, chunk)
        if not path.is_file():
            missing.append(chunk)
            digests.append(None)
            continue
        marker = json.loads(path.read_text())
        skipped += marker["skipped"]
        digests.append({"rows": marker["rows"], "sha256": marker["sha256"]}
                       if "sha256" in marker else None)
    return sorted(skipped, key=lambda entry: entry["index"]), missing, digests


def chunk_digests(arrays: dict, start: int, stop: int) -> dict[str, str]:
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


def damaged_chunks(out: Path, arrays: dict, chunks) -> list[int]:
    """The finished chunks among ``chunks`` whose rows no longer match the SHA-256 in their
    marker (or whose marker is unreadable). Markers without checksums are trusted."""
    damaged = []
    for chunk in chunks:
        try:
            marker = json.loads(marker_path(out, chunk).read_text())
            recorded, rows = marker.get("sha256"), marker["rows"]
        except (json.JSONDecodeError, KeyError, TypeError):
            damaged.append(chunk)
            continue
        if recorded is not None and chunk_digests(arrays, *rows) != recorded:
            damaged.append(chunk)
    return damaged


def agree_across_ranks(group, error: BaseException | None) -> None:
    """Raise on every rank if rank 0 failed (rank 0 re-raises its own error); a barrier."""
    messages = group.gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if messages[0] is not None:
        raise StoreError(f"encode_dataset: rank 0 failed: {messages[0]}")


def lock_store(out: Path, group) -> contextlib.ExitStack:
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
        except BaseException as caught:  # noqa: BLE001  (re-raised by agree_across_ranks)
            error = caught
    agree_across_ranks(group, error)
    return stack


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
        digests = skipped_from_markers(out, int(manifest.get("num_chunks", 0)))[2]
    for chunk, entry in enumerate(digests):
        if entry is None:
            continue  # unfinished, or written by a pyvae without chunk checksums
        actual = chunk_digests(arrays, *entry["rows"])
        for name, digest in entry["sha256"].items():
            if actual.get(name) != digest:
                start, stop = entry["rows"]
                raise IntegrityError(
                    f"open_features: {str(out / name)!r} is damaged: rows {start}..{stop - 1} "
                    f"(chunk {chunk}) do not match the SHA-256 recorded when they were written; "
                    f"re-encode them with encode_dataset(..., resume=True)")
