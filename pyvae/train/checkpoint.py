"""Checkpoints: atomic on disk, loadable without unpickling, enough state for an exact resume.

A run directory holds ``checkpoint``, a symbolic link to a hidden directory
``.checkpoint-<step>-<random>`` with

* ``model.safetensors`` — the weights (shared tensors stored once, every tensor contiguous);
* ``model.json`` — ``model.config``, from which :func:`pyvae.models.build_model` rebuilds the
  model;
* ``state.pt`` — the training state: step, epoch, position in the epoch, optimizer, LR scheduler
  and GradScaler state and every rank's RNG states, made only of tensors, numbers, strings,
  lists and dicts, so that ``torch.load(..., weights_only=True)`` reads it.

A new checkpoint is written and fsync'ed in its own directory and then published by atomically
replacing the link, so ``checkpoint`` always names a complete checkpoint, and the previous one is
deleted only after that.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from pyvae._io import fsync_path
from pyvae.models import BaseVAE, build_model

LINK = "checkpoint"
DIR_PREFIX = ".checkpoint-"
WEIGHTS, CONFIG, STATE = "model.safetensors", "model.json", "state.pt"


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory of ``path``: a checkpoint directory, or a run directory holding
    one under ``checkpoint/``."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    if (path / LINK / CONFIG).is_file():
        return path / LINK
    raise FileNotFoundError(f"no checkpoint at {str(path)!r}: expected {CONFIG} in it or in "
                            f"its {LINK}/ directory")


def _json_roundtrip(value):
    return json.loads(json.dumps(value))


def read_model_config(path: str | os.PathLike) -> dict:
    """The ``model.json`` of a checkpoint (or run) directory."""
    return json.loads((checkpoint_dir(path) / CONFIG).read_text())


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


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> BaseVAE:
    """Rebuild a trained model from a checkpoint (or run) directory, in eval mode.

    The model's class must be registered (:func:`pyvae.models.register`), i.e. its module must
    have been imported.
    """
    directory = checkpoint_dir(path)
    model = build_model(read_model_config(directory))
    safetensors.torch.load_model(model, directory / WEIGHTS, device=str(device))
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
    """
    directory = checkpoint_dir(path)
    state = torch.load(directory / STATE, map_location=map_location, weights_only=True)
    if model is not None:
        check_model_config(directory, model)
        safetensors.torch.load_model(model, directory / WEIGHTS, device=str(model.device))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def save_checkpoint(out_dir: str | os.PathLike, model: BaseVAE, state: dict) -> Path:
    """Atomically write ``model`` and the training ``state`` as ``out_dir/checkpoint``.

    ``state`` must hold only tensors, numbers, strings, None, lists, tuples and dicts, so that
    :func:`load_checkpoint` can read it with ``weights_only=True``. Returns the path of the new
    checkpoint's link.
    """
    out_dir = Path(out_dir)
    step = int(state["step"])
    directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{step:08d}-", dir=out_dir))
    try:
        safetensors.torch.save_model(model, str(directory / WEIGHTS))
        (directory / CONFIG).write_text(json.dumps(model.config, indent=2) + "\n")
        torch.save(state, directory / STATE)
        for name in (WEIGHTS, CONFIG, STATE):
            fsync_path(directory / name)
        fsync_path(directory)
        link, staged = out_dir / LINK, out_dir / f".{LINK}-link-{os.getpid()}"
        if link.is_dir() and not link.is_symlink():
            # A real directory (e.g. a run copied with `cp -L`) cannot be replaced by a link.
            os.replace(link, tempfile.mkdtemp(prefix=f"{DIR_PREFIX}moved-", dir=out_dir))
        staged.unlink(missing_ok=True)
        os.symlink(directory.name, staged)
        os.replace(staged, link)  # the commit point: rename(2) is atomic
        fsync_path(out_dir)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
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
