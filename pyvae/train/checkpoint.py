"""Checkpoints: atomic on disk, loadable without unpickling, checked against their checksums,
enough state for an exact resume.

A run directory holds ``checkpoint``, a symbolic link to a hidden directory
``.checkpoint-<step>-<random>`` with

* ``model.safetensors`` — the weights (shared tensors stored once, every tensor contiguous);
* ``model.json`` — ``model.config``, from which :func:`pyvae.models.build_model` rebuilds the
  model;
* ``state.pt`` — the training state: step, epoch, position in the epoch, optimizer, LR scheduler
  and GradScaler state, every rank's RNG states and the open metrics log window, made only of
  tensors, numbers, strings, lists and dicts, so that ``torch.load(..., weights_only=True)``
  reads it;
* ``manifest.json`` — ``{"format": 1, "step": ..., "sha256": {file name: hex digest}}`` of the
  three files above. :func:`load_model` and :func:`load_checkpoint` verify the files they read
  against it and raise :class:`pyvae.errors.IntegrityError` naming a damaged file.
  Checkpoints written before manifests existed have none and are read unchecked.

A new checkpoint is written and fsync'ed in its own directory and then published by atomically
replacing the link, so ``checkpoint`` always names a complete checkpoint, and the previous one is
deleted only after that. A failed write (e.g. a full disk) removes the new directory and raises
an OSError naming the file and the cause; the previous checkpoint stays as it was.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from pyvae._io import fsync_path, os_error, sha256_file, verify_sha256
from pyvae.errors import IntegrityError, UserError
from pyvae.models import BaseVAE, build_model

LINK = "checkpoint"
DIR_PREFIX = ".checkpoint-"
WEIGHTS, CONFIG, STATE, MANIFEST = "model.safetensors", "model.json", "state.pt", "manifest.json"
MANIFEST_FORMAT = 1


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint, or one of its files, is not there (e.g. ``checkpoint`` is a dangling
    link)."""


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory of ``path``: a checkpoint directory, or a run directory holding
    one under ``checkpoint/``. Raises :class:`MissingCheckpointError` saying what is missing."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    link = path / LINK
    if (link / CONFIG).is_file():
        return link
    if link.is_symlink() and not link.exists():
        raise MissingCheckpointError(f"the checkpoint link {str(link)!r} points to "
                                     f"{os.readlink(link)!r}, which does not exist")
    if link.is_dir():
        raise MissingCheckpointError(f"the checkpoint {str(link)!r} is incomplete: it has no "
                                     f"{CONFIG}")
    raise MissingCheckpointError(f"no checkpoint at {str(path)!r}: expected {CONFIG} in it or "
                                 f"in its {LINK}/ directory")


def _json_roundtrip(value):
    return json.loads(json.dumps(value))


def _verify(directory: Path, names: tuple[str, ...]) -> None:
    """Check the files ``names`` of a checkpoint directory against its manifest (none: a
    checkpoint from before manifests, nothing to check against)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return
    try:
        digests = json.loads(manifest.read_text())["sha256"]
        if not isinstance(digests, dict):
            raise TypeError(f"'sha256' is a {type(digests).__name__}, not an object")
    except (ValueError, KeyError, TypeError) as error:
        raise IntegrityError(f"the checkpoint manifest {str(manifest)!r} is damaged: "
                             f"{type(error).__name__}: {error}") from None
    for name in names:
        path = directory / name
        if not path.is_file():
            raise MissingCheckpointError(f"the checkpoint file {str(path)!r} is missing")
        if name not in digests:
            raise IntegrityError(f"the checkpoint manifest {str(manifest)!r} records no "
                                 f"checksum of {name}")
        verify_sha256(path, digests[name], "checkpoint file")


def _unreadable(path: Path, error: Exception) -> Exception:
    """The error to raise when a library failed to read the checkpoint file ``path``."""
    if isinstance(error, FileNotFoundError):
        return MissingCheckpointError(f"the checkpoint file {str(path)!r} is missing")
    if isinstance(error, PermissionError):
        return os_error(error, path, "reading checkpoint file")
    # e.g. "OSError: Invalid argument" or "PytorchStreamReader failed reading zip archive"
    return IntegrityError(f"the checkpoint file {str(path)!r} is damaged or truncated: "
                          f"{type(error).__name__}: {error}")


def read_model_config(path: str | os.PathLike) -> dict:
    """The ``model.json`` of a checkpoint (or run) directory."""
    config = checkpoint_dir(path) / CONFIG
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise _unreadable(config, error) from None


def check_model_config(path: str | os.PathLike, model: BaseVAE) -> None:
    """Raise ValueError if ``model.config`` differs from the checkpoint's ``model.json``."""
    saved, current = read_model_config(path), _json_roundtrip(model.config)
    if saved != current:
        diffs = [f"{key}: checkpoint {saved.get(key, '<missing>')!r} != model "
                 f"{current.get(key, '<missing>')!r}"
                 for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
        raise ValueError(f"the checkpoint in {str(checkpoint_dir(path))!r} is of a different model "
                         f"({'; '.join(diffs)}); use the same model config, or another out_dir "
                         f"to start a new run")


def _load_weights(model: BaseVAE, directory: Path, device: str | torch.device) -> None:
    try:
        safetensors.torch.load_model(model, directory / WEIGHTS, device=str(device))
    except (OSError, safetensors.SafetensorError) as error:
        raise _unreadable(directory / WEIGHTS, error) from None


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> BaseVAE:
    """Rebuild a trained model from a checkpoint (or run) directory, in eval mode.

    The model's class must be registered (:func:`pyvae.models.register`), i.e. its module must
    have been imported. Raises :class:`pyvae.errors.IntegrityError` (a file does not match the
    checksum in ``manifest.json``, or cannot be parsed) or :class:`MissingCheckpointError`,
    naming the file.
    """
    directory = checkpoint_dir(path)
    _verify(directory, (CONFIG, WEIGHTS))
    model = build_model(read_model_config(directory))
    _load_weights(model, directory, device)
    return model.to(device).eval()


def load_checkpoint(path: str | os.PathLike, model: BaseVAE | None = None, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint into the objects given and return its training state.

    Args:
        path: a checkpoint directory or a run directory (``out_dir`` of :func:`pyvae.train.fit`).
        model: receives the weights (on its own device); its config must equal the checkpoint's.
        optimizer, scheduler, scaler: receive their saved state when given.
        map_location: where the tensors of the returned state are loaded.

    Returns:
        The ``state.pt`` dict (``step``, ``epoch``, ``batch_in_epoch``, ``rng``, ...), read with
        ``weights_only=True``.

    Raises:
        IntegrityError, MissingCheckpointError: as :func:`load_model`; every file is verified
            before any is used.
    """
    directory = checkpoint_dir(path)
    _verify(directory, (CONFIG, WEIGHTS, STATE))
    try:
        state = torch.load(directory / STATE, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, OSError, EOFError, UnpicklingError
        raise _unreadable(directory / STATE, error) from None
    if model is not None:
        check_model_config(directory, model)
        _load_weights(model, directory, model.device)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


# ---- writing -----------------------------------------------------------------------------------

class _RecordingWriter:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write: torch's zip
    writer reports it as a RuntimeError ("unexpected pos ...") without the cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _save_state(state: dict, path: Path) -> None:
    with open(path, "wb") as file:
        writer = _RecordingWriter(file)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None
        file.flush()
        os.fsync(file.fileno())


def _save_weights(model: BaseVAE, path: Path) -> None:
    try:
        safetensors.torch.save_model(model, str(path))
    except safetensors.SafetensorError as error:
        # The Rust writer gives only the text of its I/O error: "... (os error 28)".
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found is None:
            raise
        raise OSError(int(found[1]), os.strerror(int(found[1]))) from None
    fsync_path(path)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def save_checkpoint(out_dir: str | os.PathLike, model: BaseVAE, state: dict) -> Path:
    """Atomically write ``model``, the training ``state`` and their checksums as
    ``out_dir/checkpoint``.

    ``state`` must hold only tensors, numbers, strings, None, lists, tuples and dicts, so that
    :func:`load_checkpoint` can read it with ``weights_only=True``. Returns the path of the new
    checkpoint's link. Raises an OSError naming the file being written and the cause (e.g. "no
    space left on device") if writing fails; the previous checkpoint is then untouched and the
    partial new one removed.
    """
    out_dir = Path(out_dir)
    step = int(state["step"])
    directory, path, doing = None, out_dir, "creating a checkpoint directory in"
    committed = False
    try:
        directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{step:08d}-", dir=out_dir))
        doing = "writing checkpoint file"
        path = directory / WEIGHTS
        _save_weights(model, path)
        path = directory / CONFIG
        _write_bytes(path, (json.dumps(model.config, indent=2) + "\n").encode())
        path = directory / STATE
        _save_state(state, path)
        digests = {name: sha256_file(directory / name) for name in (WEIGHTS, CONFIG, STATE)}
        path = directory / MANIFEST
        _write_bytes(path, (json.dumps({"format": MANIFEST_FORMAT, "step": step,
                                        "sha256": digests}, indent=2) + "\n").encode())
        fsync_path(directory)
        link, staged = out_dir / LINK, out_dir / f".{LINK}-link-{os.getpid()}"
        path, doing = link, "publishing checkpoint"
        if link.is_dir() and not link.is_symlink():
            # A real directory (e.g. a run copied with `cp -L`) cannot be replaced by a link.
            os.replace(link, tempfile.mkdtemp(prefix=f"{DIR_PREFIX}moved-", dir=out_dir))
        staged.unlink(missing_ok=True)
        os.symlink(directory.name, staged)
        os.replace(staged, link)  # the commit point: rename(2) is atomic
        committed = True
        fsync_path(out_dir)
    except BaseException as error:
        if directory is not None and not committed:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(error, OSError):
            raise os_error(error, path, doing) from error
        raise
    remove_stale_checkpoints(out_dir)
    return link


def remove_stale_checkpoints(out_dir: str | os.PathLike) -> None:
    """Delete the checkpoint directories of ``out_dir`` that ``checkpoint`` does not point to
    (earlier checkpoints and any left half-written by a killed run)."""
    out_dir = Path(out_dir)
    link = out_dir / LINK
    current = os.readlink(link) if link.is_symlink() else None
    for entry in out_dir.iterdir():
        if entry.name.startswith(DIR_PREFIX) and entry.name != current:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".{LINK}-link-"):
            entry.unlink(missing_ok=True)


# ---- RNG state as tensors and plain numbers (so that weights_only=True loads it) -------------

def capture_rng_state(device: torch.device) -> dict:
    """The states of torch's CPU generator, ``device``'s CUDA generator (if CUDA), Python's
    ``random`` and NumPy's global generator."""
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
