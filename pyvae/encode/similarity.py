"""Patch similarity search over stride-1 feature maps: distance maps and their pictures.

A location (y, x) of a feature map (N, D, H', W') from :func:`pyvae.encode.encode_patches` or
a feature store (:func:`pyvae.encode.open_features`) is the p×p patch whose top-left corner is
(y, x) in the image, i.e. whose centre is (y + p // 2, x + p // 2).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def _check_features(features, name: str = "features") -> tuple[int, int, int, int]:
    if not isinstance(features, (torch.Tensor, np.ndarray)) or features.ndim != 4:
        shape = getattr(features, "shape", type(features).__name__)
        raise ValueError(f"{name} must be an (N, D, H', W') tensor or numpy array, got {shape}")
    return tuple(int(s) for s in features.shape)


def _check_index(name: str, value, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
            0 <= value < size):
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")
    return int(value)


def similarity_map(features, image_index: int, y: int, x: int, *, chunk_size: int = 64):
    """L2 distance of every location's code to the code at ``(image_index, :, y, x)``.

    Args:
        features: (N, D, H', W') codes, a tensor or a numpy array (e.g. the read-only memmap of
            :func:`pyvae.encode.open_features`; it is read ``chunk_size`` images at a time,
            never loaded whole).
        image_index, y, x: the query: the patch of image ``image_index`` with top-left corner
            (y, x) (feature coordinates, 0 <= y < H', 0 <= x < W').
        chunk_size: images per step (bounds the float32 working memory).

    Returns:
        (N, H', W') float32 distances sqrt(Σ_d (f[n, d, i, j] − f[q, d, y, x])²), computed in
        float32; 0 at the query, small = similar, NaN where the features are NaN (unreadable
        images of a store). A numpy array for numpy input, else a tensor on the input's device.
    """
    n, _, height, width = _check_features(features)
    image_index = _check_index("image_index", image_index, n)
    y = _check_index("y", y, height)
    x = _check_index("x", x, width)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if isinstance(features, torch.Tensor):
        query = features[image_index, :, y, x].float()[None, :, None, None]
        out = torch.empty(n, height, width, dtype=torch.float32, device=features.device)
        for start in range(0, n, chunk_size):
            diff = features[start:start + chunk_size].float() - query
            out[start:start + chunk_size] = diff.square().sum(1).sqrt()
        return out
    query = np.asarray(features[image_index, :, y, x], dtype=np.float32)[None, :, None, None]
    out = np.empty((n, height, width), dtype=np.float32)
    for start in range(0, n, chunk_size):
        diff = np.asarray(features[start:start + chunk_size], dtype=np.float32) - query
        out[start:start + chunk_size] = np.sqrt(np.square(diff).sum(axis=1))
    return out


def _image_hwc(image) -> np.ndarray:
    """A (C, H, W) image in [0, 1] (tensor or array; uint8 scaled) as (H, W) or (H, W, 3)."""
    if isinstance(image, (tuple, list)):  # (image, label) items
        image = image[0]
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"images must hold (C, H, W) images, got an item of shape {array.shape}")
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(
        np.float32)
    array = np.clip(array.transpose(1, 2, 0), 0.0, 1.0)
    return array[..., 0] if array.shape[2] == 1 else array[..., :3]


def save_similarity_png(path: str | os.PathLike, images, distances, query: tuple[int, int, int],
                        patch_size: int, *, indices=None, max_images: int = 6,
                        names=None, cmap: str = "magma_r", alpha: float = 0.6,
                        dpi: int = 100) -> Path:
    """Draw distance maps over their images and save a PNG (atomically: tmp + os.replace).

    One row per shown image: the image on the left, on the right the image with the distance map
    overlaid (each distance sits on the centre pixel (i + p // 2, j + p // 2) of its patch; a
    shared colour scale from 0, bright = small distance = similar). The query patch is outlined
    with a solid cyan p×p square on the query image; on every other image a dashed square marks
    its most similar patch.

    Args:
        path: the PNG file to write (its folder must exist).
        images: the N images, (N, C, H, W) tensor or array (floats in [0, 1] or uint8), or a data
            set whose items are (C, H, W) images; only the shown ones are read.
        distances: (N, H − p + 1, W − p + 1) from :func:`similarity_map` (tensor or array).
        query: (image_index, y, x) of the query, in feature coordinates.
        patch_size: p.
        indices: which images to show, in order; default: the query image, then the others by
            increasing smallest distance (most similar first; all-NaN images left out), up to
            ``max_images`` in all.
        max_images: the most images shown by default.
        names: optional labels of the N images (e.g. the store manifest's ``"names"``).
        cmap, alpha: colour map and opacity of the overlay.
        dpi: resolution of the PNG.

    Returns:
        ``Path(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    distances = (distances.detach().cpu().numpy() if isinstance(distances, torch.Tensor)
                 else np.asarray(distances))
    if distances.ndim != 3:
        raise ValueError(f"distances must be (N, H', W'), got shape {distances.shape}")
    n, out_h, out_w = distances.shape
    if len(images) != n:
        raise ValueError(f"images has {len(images)} images, distances {n}")
    if not isinstance(query, (tuple, list)) or len(query) != 3:
        raise ValueError(f"query must be (image_index, y, x), got {query!r}")
    q_index = _check_index("query[0] (image_index)", query[0], n)
    q_y = _check_index("query[1] (y)", query[1], out_h)
    q_x = _check_index("query[2] (x)", query[2], out_w)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
    if names is not None and len(names) != n:
        raise ValueError(f"names has {len(names)} entries, distances {n} images")
    with np.errstate(all="ignore"):
        nearest = np.array([np.nanmin(d) if np.isfinite(d).any() else np.nan
                            for d in distances], dtype=np.float64)
    if indices is None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be an int >= 1, got {max_images!r}")
        others = [int(k) for k in np.argsort(nearest, kind="stable")
                  if k != q_index and np.isfinite(nearest[k])]
        indices = [q_index, *others][:max_images]
    indices = [_check_index("indices[k]", k, n) for k in indices]
    if not indices:
        raise ValueError("indices must name at least one image")

    p, c = patch_size, patch_size // 2
    shown = [_image_hwc(images[k]) for k in indices]
    height, width = shown[0].shape[:2]
    if (height - p + 1, width - p + 1) != (out_h, out_w):
        raise ValueError(f"images of {height}×{width} with patch_size {p} give {height - p + 1}"
                         f"×{width - p + 1} distance maps, distances are {out_h}×{out_w}")
    vmax = float(np.nanmax(distances[indices])) if np.isfinite(distances[indices]).any() else 1.0
    panel = 3.0 / max(height, width)
    fig = Figure(figsize=(2 * width * panel + 1.5, len(indices) * (height * panel + 0.4)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(indices), 2, squeeze=False)
    # Distance (i, j) is drawn on image pixel (i + c, j + c); pixel k spans [k − ½, k + ½].
    extent = (c - 0.5, c + out_w - 0.5, c + out_h - 0.5, c - 0.5)
    heat = None
    for row, (k, image) in enumerate(zip(indices, shown)):
        gray = {"cmap": "gray"} if image.ndim == 2 else {}
        label = names[k] if names is not None else f"image {k}"
        for col, ax in enumerate(axes[row]):
            ax.imshow(image, vmin=0.0, vmax=1.0, interpolation="nearest", **gray)
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 1:
                heat = ax.imshow(distances[k], cmap=cmap, vmin=0.0, vmax=vmax, alpha=alpha,
                                 extent=extent, interpolation="nearest")
            if k == q_index:
                ax.add_patch(Rectangle((q_x - 0.5, q_y - 0.5), p, p, fill=False,
                                       edgecolor="cyan", linewidth=2))
            elif np.isfinite(nearest[k]):
                best_y, best_x = np.unravel_index(np.nanargmin(distances[k]), (out_h, out_w))
                ax.add_patch(Rectangle((best_x - 0.5, best_y - 0.5), p, p, fill=False,
                                       edgecolor="cyan", linewidth=1.5, linestyle="--"))
        query_text = f", query (y={q_y}, x={q_x})" if k == q_index else (
            f", nearest {nearest[k]:.3g}" if np.isfinite(nearest[k]) else ", no features")
        axes[row][0].set_title(f"{label}{query_text}", fontsize=8, loc="left")
    fig.colorbar(heat, ax=[ax for pair in axes for ax in pair[1:]], shrink=0.8,
                 label="L2 distance to the query (small = similar)")

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
