"""Pictures saved as PNG through matplotlib (Agg backend, no display needed).

Every ``save_*`` function writes atomically (a temporary file, then ``os.replace``), so an
interrupted run never leaves a half-written picture, and returns the path it wrote.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) grey or (H, W, 3) RGB float array for imshow."""
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else \
        np.asarray(image, dtype=np.float32)
    array = np.clip(array, 0.0, 1.0)
    return array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)


def image_grid(images: torch.Tensor, columns: int, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into one (rows·(H+pad), columns·(W+pad)[, 3]) array
    with white padding."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad) + ((3,) if c >= 3 else ()),
                   dtype=np.float32)
    for k in range(n):
        r, col = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = to_numpy_image(images[k])
    return grid


def save_image_rows(path: str | os.PathLike, rows: Sequence[torch.Tensor],
                    labels: Sequence[str], columns: int | None = None,
                    title: str | None = None) -> Path:
    """One grid per row of images (e.g. originals over reconstructions), labelled on the left.

    Args:
        rows: tensors (N_r, C, H, W) in [0, 1], all with the same C, H, W.
        labels: one label per row.
        columns: images per line of a grid (default: all N_r of the row on one line).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.6 * len(rows) + 0.4), squeeze=False)
    for ax, images, label in zip(axes[:, 0], rows, labels):
        grid = image_grid(images, columns or len(images))
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_reconstructions(path: str | os.PathLike, originals: torch.Tensor,
                         reconstructions: torch.Tensor, title: str | None = None) -> Path:
    """Originals (top) over their reconstructions (bottom), (N, C, H, W) each in [0, 1]."""
    return save_image_rows(path, [originals, reconstructions], ["input", "reconstruction"],
                           title=title)


def save_training_curves(path: str | os.PathLike, records: Sequence[dict],
                         keys: Sequence[str] = ("loss", "distortion", "rate_bits",
                                                "bits_per_dim")) -> Path:
    """Training (and held-out) curves against the step from a run's ``metrics.jsonl`` records
    (:func:`pyvae.train.read_metrics`): one panel per key present in the records."""
    plt = _pyplot()
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4 * max(len(present), 1), 3),
                             squeeze=False)
    for ax, key in zip(axes[0], present):
        for split, style in (("train", "-"), ("eval", "o--")):
            points = [(r["step"], r[key]) for r in records
                      if r.get("split", "train") == split and isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key.replace("_", " "))
        ax.legend()
    return save_figure(fig, path)
