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

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import pyvae
from pyvae._device import AUTOCAST_DTYPES
from pyvae._distributed import setup
from pyvae._io import fsync_path, write_text_atomic
from pyvae._validate import check_int
from pyvae.data.images import DEFAULT_MAX_PIXELS, check_max_pixels
from pyvae.encode.sources import Rows, Source, collate_rows, resolve_source
from pyvae.encode.store import (CHUNKS, FEATURES, FORMAT, FORMAT_VERSION, LOGVAR, MANIFEST,
                                STORE_DTYPES, VALID, StoreError, agree_across_ranks,
                                chunk_digests, damaged_chunks, done_chunks, lock_store,
                                marker_path, model_hash, open_arrays, prepare_store,
                                skipped_from_markers, write_manifest)
from pyvae.encode.stride1 import encode_patches, fully_convolutional

PRECISIONS = {None: None, **AUTOCAST_DTYPES}
TEST_DELAY_ENV = "PYVAE_ENCODE_TEST_DELAY"


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

# ---- encode_dataset -------------------------------------------------------------------------

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
    src = resolve_source(source, size=size, crop=crop, grayscale=grayscale, channels=channels,
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
        with lock_store(Path(out), group):
            return _run(model, src, Path(out), group, batch_size=batch_size,
                        chunk_size=chunk_size, dtype=str(dtype), precision=precision,
                        with_logvar=bool(with_logvar), resume=resume, num_workers=num_workers,
                        progress=progress, tile_size=tile_size)
    finally:
        group.close()

def _run(model, src: Source, out: Path, group, *, batch_size, chunk_size, dtype, precision,
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
            manifest = prepare_store(out, manifest, resume)
        except BaseException as caught:  # noqa: BLE001  (re-raised by agree_across_ranks)
            error = caught
    agree_across_ranks(group, error)
    arrays = open_arrays(out, manifest)

    done = done_chunks(out)
    # Each rank checks the finished chunks it owns against their checksums; a damaged one is
    # encoded again (its marker goes first, so a kill now leaves it unfinished, not wrong).
    damaged = damaged_chunks(out, arrays, sorted(k for k in done
                                                 if k % group.world_size == group.rank))
    if damaged:
        warnings.warn(f"encode_dataset: {len(damaged)} finished chunk(s) of {str(out)!r} no "
                      f"longer match their SHA-256 (damaged on disk?): {damaged[:10]}; "
                      f"encoding them again", stacklevel=3)
        for chunk in damaged:
            marker_path(out, chunk).unlink()
        fsync_path(out / CHUNKS)
        done -= set(damaged)
    mine = [k for k in range(chunks) if k % group.world_size == group.rank and k not in done]
    batches = [list(range(start, min(start + batch_size, stop)))
               for k in mine
               for stop in [min((k + 1) * chunk_size, src.rows)]
               for start in range(k * chunk_size, stop, batch_size)]
    cuda = group.device.type == "cuda"
    loader = DataLoader(Rows(src), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=collate_rows, pin_memory=cuda)
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
                          "sha256": chunk_digests(arrays, chunk * chunk_size, stop)}
                write_text_atomic(marker_path(out, chunk), json.dumps(marker) + "\n")
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
            skipped, missing, digests = skipped_from_markers(out, chunks)
            if missing:
                raise StoreError(f"encode_dataset: chunks {missing[:10]} of {str(out)!r} have "
                                 f"no marker after every process finished")
            manifest.update(skipped=skipped, complete=True, chunk_sha256=digests, last_run={
                "seconds": round(seconds, 3), "images": encoded,
                "images_per_second": round(encoded / max(seconds, 1e-9), 3),
                "processes": group.world_size, "device": str(group.device),
                "batch_size": batch_size})
            write_manifest(out, manifest)
        except BaseException as caught:  # noqa: BLE001
            error = caught
    agree_across_ranks(group, error)
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
