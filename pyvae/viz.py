"""Pictures saved as PNG through matplotlib (Agg backend, no display needed).

Every ``save_*`` function writes atomically (a temporary file, then ``os.replace``), so an
interrupted run never leaves a half-written picture, and returns the path it wrote. Figures are
built as standalone :class:`matplotlib.figure.Figure` objects (never registered with pyplot), so
these functions leave pyplot's list of open figures unchanged, even when they raise.

Pictures:

=============================== ==========================================================
:func:`save_reconstructions`    originals over reconstructions
:func:`save_image_rows`         labelled rows of image grids
:func:`save_samples`            a grid of samples
:func:`save_traversals`         latent traversals of a global model (rows = latent dims)
:func:`save_training_curves`    metrics.jsonl curves against the step
:func:`save_aggregate_posterior` posterior means / samples against the prior's 1σ/2σ circles
:func:`save_rate_distortion`    rate (bits) vs distortion (nats) for a set of models
:func:`save_layer_rates`        per-layer rates over training steps, or stacked bars per model
:func:`save_probe_accuracy`     per-attribute accuracy bars, feature sets side by side
:func:`save_heatmap`            a labelled matrix (e.g. results on a (β₁, β₂) grid)
=============================== ==========================================================
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _new_figure(rows: int = 1, columns: int = 1, figsize=(6.0, 4.0), **subplot_kw):
    """A standalone Agg figure (not managed by pyplot) and its (rows, columns) axes array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False, **subplot_kw)
    return fig, axes


def _style(ax, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
           grid: bool = True, title_size: int = 10) -> None:
    """The one axes style of these pictures: labels, a light grid, no top/right spines."""
    if title:
        ax.set_title(title, fontsize=title_size)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if grid:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _array(value, name: str, owner: str, ndim: int | tuple[int, ...] | None = None
           ) -> np.ndarray:
    """``value`` (tensor, array or nested sequence) as a float64 numpy array, with its number of
    dimensions checked."""
    try:
        array = (value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor)
                 else np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be numbers (an array, tensor or sequence), "
                         f"got {type(value).__name__}") from None
    array = array.astype(np.float64)
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and array.ndim not in dims:
        wanted = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{owner}: {name} must be {wanted}, got shape {array.shape}")
    return array


def _labels(labels, count: int, name: str, owner: str) -> list[str]:
    if isinstance(labels, str) or len(labels) != count:
        got = repr(labels) if isinstance(labels, str) else f"{len(labels)}"
        raise ValueError(f"{owner}: {name} must be a sequence of {count} labels, got {got}")
    return [str(label) for label in labels]


def _images(images, name: str, owner: str) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] (tensor or array; uint8 scaled) as a float tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images.astype(np.float32) / 255.0 if images.dtype == np.uint8
                                  else images.astype(np.float32))
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{owner}: {name} must be a non-empty (N, C, H, W) tensor or array "
                         f"with values in [0, 1], got {shape}")
    return images.detach().float().cpu()


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


def _show_grid(ax, grid: np.ndarray) -> None:
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_image_rows(path: str | os.PathLike, rows: Sequence[torch.Tensor],
                    labels: Sequence[str], columns: int | None = None,
                    title: str | None = None) -> Path:
    """One grid per row of images (e.g. originals over reconstructions), labelled on the left.

    Args:
        rows: tensors (N_r, C, H, W) in [0, 1], all with the same C, H, W.
        labels: one label per row.
        columns: images per line of a grid (default: all N_r of the row on one line).
    """
    owner = "save_image_rows"
    if not len(rows):
        raise ValueError(f"{owner}: rows must hold at least one (N, C, H, W) tensor")
    rows = [_images(images, f"rows[{k}]", owner) for k, images in enumerate(rows)]
    labels = _labels(labels, len(rows), "labels", owner)
    grids = [image_grid(images, columns or len(images)) for images in rows]
    heights = [12.0 * grid.shape[0] / grid.shape[1] for grid in grids]  # 12-inch-wide grids
    fig, axes = _new_figure(len(rows), 1, figsize=(12, sum(heights) + 0.3 * len(rows) + 0.4),
                            gridspec_kw={"height_ratios": heights})
    for ax, grid, label in zip(axes[:, 0], grids, labels):
        _show_grid(ax, grid)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
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
    (:func:`pyvae.train.read_metrics`): one panel per key present in the records (scalar values
    only), at most four panels per line. Without any of the keys, the picture says so."""
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    columns = min(max(len(present), 1), 4)
    lines = max(-(-len(present) // columns), 1)
    fig, axes = _new_figure(lines, columns, figsize=(4 * columns, 3 * lines))
    for ax in axes.flat[len(present):]:
        ax.set_axis_off()
    if not present:
        axes[0, 0].text(0.5, 0.5, f"no records with {', '.join(keys)}", ha="center",
                        va="center", transform=axes[0, 0].transAxes)
    for ax, key in zip(axes.flat, present):
        for split, style in (("train", "-"), ("eval", "o--")):
            points = [(r["step"], r[key]) for r in records
                      if r.get("split", "train") == split and isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=split, markersize=3)
        _style(ax, key.replace("_", " "), "step")
        ax.legend()
    return save_figure(fig, path)


# ---- model pictures ----------------------------------------------------------------------------

def save_samples(path: str | os.PathLike, images, columns: int = 8, *,
                 title: str | None = None) -> Path:
    """A grid of samples.

    Args:
        images: (N, C, H, W) tensor or array in [0, 1] (uint8 arrays are scaled by 1/255),
            e.g. ``model.sample(n)``.
        columns: images per line of the grid.
        title: defaults to "N samples".
    """
    owner = "save_samples"
    images = _images(images, "images", owner)
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"{owner}: columns must be an int >= 1, got {columns!r}")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    _, _, h, w = images.shape
    scale = 8.0 / max(columns * (w + 1), 1)
    fig, axes = _new_figure(figsize=(max(columns * (w + 1) * scale, 2.0),
                                     max(rows * (h + 1) * scale, 1.0) + 0.4))
    _show_grid(axes[0, 0], image_grid(images, columns))
    axes[0, 0].set_title(title or f"{len(images)} samples", fontsize=10)
    return save_figure(fig, path)


def _check_global_model(owner: str, model) -> None:
    if not hasattr(model, "likelihood") or not callable(getattr(model, "encode", None)):
        raise ValueError(f"{owner}: model must be a global model with encode(x), decode(z) and "
                         f"a likelihood (VAE, BetaTCVAE, HierarchicalVAE, CapacityAE); "
                         f"{type(model).__name__} has no likelihood (a PatchVAE decodes to "
                         f"PixelCNN features, not images)")


@torch.no_grad()
def save_traversals(path: str | os.PathLike, model, x, *, dims: Sequence[int] | None = None,
                    values=np.linspace(-3, 3, 9), relative: bool = False,
                    max_dims: int = 10, title: str | None = None) -> Path:
    """Latent traversals of a global model: one latent dimension varied at a time.

    Each image is encoded to its posterior mean mu; for every dim d of ``dims`` and every v of
    ``values``, z = mu with z_d = v (``relative=True``: z_d = mu_d + v) is decoded to
    ``model.likelihood.mean(model.decode(z))``. Rows are the (image, dim) pairs, columns the
    values.

    Args:
        model: a global model (VAE, BetaTCVAE, CapacityAE, HierarchicalVAE) — for a
            HierarchicalVAE the dims index z_1, the layer the decoder reads, the other layers
            staying at their posterior means.
        x: one image (C, H, W) or a few (N, C, H, W) in [0, 1] (tensor or array).
        dims: latent dims to vary, each in [0, D); default: every dim when D <= ``max_dims``,
            else the ``max_dims`` dims with the largest KL(q(z_d|x) || N(0, 1)) on ``x`` (most
            used first; the title says so).
        values: the V values (prior standard deviations) of the columns, 1-D.
        relative: the values are offsets from the posterior mean instead of absolute values.

    Shapes:
        the picture is a grid of (N·len(dims)) × V decoded images of shape (C, H, W).
    """
    owner = "save_traversals"
    _check_global_model(owner, model)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x.astype(np.float32))
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(f"{owner}: x must be one image (C, H, W) or images (N, C, H, W), "
                         f"got {shape}")
    x = x[None] if x.dim() == 3 else x
    values = _array(values, "values", owner, 1)
    if len(values) == 0:
        raise ValueError(f"{owner}: values must hold at least one value")
    was_training = model.training
    model.eval()
    try:
        x = x.to(model.device, torch.float32)
        mu, logvar = model.encode(x)
        latent = getattr(model, "latent_dims", [mu.shape[-1]])[0]  # hierarchical: z_1
        chosen = "the latent dims z_d"
        if dims is None:
            if latent <= max_dims:
                dims = list(range(latent))
            else:
                m, lv = mu[:, :latent].float(), logvar[:, :latent].float()
                kl = 0.5 * (m ** 2 + lv.exp() - 1 - lv).mean(0)
                dims = kl.argsort(descending=True)[:max_dims].tolist()
                chosen = f"the {max_dims} of {latent} dims with the largest KL"
        dims = list(dims)
        bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, numbers.Integral)
               or not 0 <= d < latent]
        if bad or not dims:
            raise ValueError(f"{owner}: dims must be a non-empty list of ints in [0, {latent}), "
                             f"got {dims!r}")
        codes = []
        for n in range(len(x)):
            for d in dims:
                z = mu[n].repeat(len(values), 1)
                v = torch.as_tensor(values, dtype=z.dtype, device=z.device)
                z[:, d] = z[:, d] + v if relative else v
                codes.append(z)
        z = torch.cat(codes)
        images = torch.cat([model.likelihood.mean(model.decode(part)).float().cpu()
                            for part in z.split(256)])
    finally:
        model.train(was_training)
    _, c, h, w = images.shape
    columns, rows = len(values), len(images) // len(values)
    scale = 0.9 / max(h, w)
    fig, axes = _new_figure(figsize=(columns * w * scale + 1.2, rows * h * scale + 0.8))
    ax = axes[0, 0]
    ax.imshow(image_grid(images, columns), cmap="gray" if c < 3 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([1 + k * (w + 1) + (w - 1) / 2 for k in range(columns)])
    ax.set_xticklabels([("+" if relative and v > 0 else "") + f"{v:.3g}" for v in values],
                       fontsize=8)
    ax.set_yticks([1 + k * (h + 1) + (h - 1) / 2 for k in range(rows)])
    ax.set_yticklabels([(f"x{n} " if len(x) > 1 else "") + f"z{d}"
                        for n in range(len(x)) for d in dims], fontsize=8)
    ax.tick_params(length=0)
    what = "mu_d + v" if relative else "v"
    heading = title or f"latent traversals of {type(model).__name__}"
    ax.set_title(f"{heading}\nz_d = {what} (columns), other dims at the posterior mean; "
                 f"rows: {chosen}", fontsize=9)
    return save_figure(fig, path)


def _projection(mu: np.ndarray, projection: str, owner: str):
    """2-D coordinates of (N, D) codes and the words saying which: the first two dims, or the
    two principal axes of the centred codes applied to the uncentred codes (orthonormal axes, so
    N(0, I) projects to N(0, I_2) and the prior circles stay exact)."""
    d = mu.shape[1]
    if d == 2:
        return np.eye(2), "2-D latent"
    if projection == "first":
        return np.eye(d)[:, :2], f"first 2 of {d} dims"
    if projection == "pca":
        centred = mu - mu.mean(0)
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        explained = singular[:2] ** 2 / max(float((singular ** 2).sum()), 1e-300)
        return vt[:2].T, (f"PCA projection of {d} dims ({100 * explained.sum():.0f}% of the "
                          f"variance of the means)")
    raise ValueError(f"{owner}: projection must be 'pca' or 'first', got {projection!r}")


def save_aggregate_posterior(path: str | os.PathLike, mu, logvar=None, *, labels=None,
                             num_samples_per_point: int = 1, projection: str = "pca",
                             seed: int = 0, title: str | None = None) -> Path:
    """The aggregate posterior q(z) against the prior N(0, I) (seed 001, Fig. 5.2).

    A scatter of the posterior means, or, with ``logvar``, of ``num_samples_per_point`` draws
    z = mu + σ·ε per example, coloured by label, over the prior's 1σ and 2σ circles. For D > 2
    the codes are projected on two orthonormal axes (``projection="pca"``: the principal axes of
    the means; ``"first"``: dims 0 and 1), under which the prior is still N(0, I_2); the title
    says which.

    Args:
        mu: (N, D) posterior means, D >= 2.
        logvar: optional (N, D) posterior log-variances: plot samples instead of means.
        labels: optional (N,) labels: integers or strings (<= 20 distinct: a legend; more:
            a colour bar for numbers).
        num_samples_per_point: draws per example when ``logvar`` is given.
        projection: ``"pca"`` or ``"first"`` (D > 2 only).
        seed: seed of the draws.
        title: a first line for the title.
    """
    owner = "save_aggregate_posterior"
    mu = _array(mu, "mu", owner, 2)
    n, d = mu.shape
    if n == 0 or d < 2:
        raise ValueError(f"{owner}: mu must be (N, D) with N >= 1 and D >= 2, got {mu.shape}")
    if isinstance(num_samples_per_point, bool) or not isinstance(
            num_samples_per_point, int) or num_samples_per_point < 1:
        raise ValueError(f"{owner}: num_samples_per_point must be an int >= 1, "
                         f"got {num_samples_per_point!r}")
    if labels is not None:
        labels = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor)
                  else np.asarray(labels))
        if labels.shape != (n,):
            raise ValueError(f"{owner}: labels must have shape ({n},) (one per row of mu), "
                             f"got {labels.shape}")
    axes_2d, how = _projection(mu, projection, owner)
    if logvar is not None:
        logvar = _array(logvar, "logvar", owner, 2)
        if logvar.shape != mu.shape:
            raise ValueError(f"{owner}: logvar must have mu's shape {mu.shape}, "
                             f"got {logvar.shape}")
        eps = np.random.default_rng(seed).standard_normal((num_samples_per_point, n, d))
        points = (mu + np.exp(0.5 * logvar) * eps).reshape(-1, d)
        what = (f"samples z ~ q(z|x) ({num_samples_per_point} per example, "
                f"{len(points)} points)")
        if labels is not None:
            labels = np.tile(labels, num_samples_per_point)
    else:
        points, what = mu, f"posterior means ({n} points)"
    xy = points @ axes_2d

    fig, axes = _new_figure(figsize=(5.6, 5.0))
    ax = axes[0, 0]
    size = float(np.clip(3000.0 / len(xy), 2.0, 30.0))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.5, linewidths=0, color="tab:blue",
                   label="q(z)")
    else:
        distinct = np.unique(labels)
        if len(distinct) <= 20 or labels.dtype.kind not in "iuf":
            import matplotlib
            palette = matplotlib.colormaps["tab10" if len(distinct) <= 10 else "tab20"]
            for k, value in enumerate(distinct[:20]):
                keep = labels == value
                ax.scatter(xy[keep, 0], xy[keep, 1], s=size, alpha=0.6, linewidths=0,
                           color=palette(k % palette.N), label=str(value))
            if len(distinct) > 20:
                keep = ~np.isin(labels, distinct[:20])
                ax.scatter(xy[keep, 0], xy[keep, 1], s=size, alpha=0.3, linewidths=0,
                           color="grey", label="other")
        else:
            dots = ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.6, linewidths=0,
                              c=labels.astype(float), cmap="viridis")
            fig.colorbar(dots, ax=ax, label="label")
    angle = np.linspace(0, 2 * np.pi, 200)
    for radius, style in ((1, "-"), (2, "--")):
        ax.plot(radius * np.cos(angle), radius * np.sin(angle), style, color="black",
                linewidth=1, label=f"prior {radius}σ")
    limit = max(3.0, float(np.nanpercentile(np.abs(xy), 99.5)) * 1.1)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    pca = not (how == "2-D latent" or how.startswith("first"))
    _style(ax, (f"{title}\n" if title else "") + f"aggregate posterior: {what}\n{how}",
           "PC1" if pca else "z[0]", "PC2" if pca else "z[1]")
    ax.legend(fontsize=7, markerscale=max(1.0, 12.0 / size) ** 0.5, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def save_rate_distortion(path: str | os.PathLike, points, labels: Sequence[str] | None = None,
                         *, connect: bool = True, title: str | None = None) -> Path:
    """Rate (bits) against distortion (nats) for a set of models, e.g. a β sweep.

    Args:
        points: (M, 2) pairs (rate in bits, distortion in nats), one per model.
        labels: optional M annotations (e.g. ``"β=4"``).
        connect: join the points in order of increasing rate (the empirical curve).
    """
    owner = "save_rate_distortion"
    points = _array(points, "points", owner, 2)
    if points.shape[0] == 0 or points.shape[1] != 2:
        raise ValueError(f"{owner}: points must be (M, 2) pairs (rate_bits, distortion_nats) "
                         f"with M >= 1, got shape {points.shape}")
    if labels is not None:
        labels = _labels(labels, len(points), "labels", owner)
    fig, axes = _new_figure(figsize=(5.5, 4.2))
    ax = axes[0, 0]
    if connect and len(points) > 1:
        order = np.argsort(points[:, 0], kind="stable")
        ax.plot(points[order, 0], points[order, 1], "-", color="tab:blue", alpha=0.5)
    ax.plot(points[:, 0], points[:, 1], "o", color="tab:blue")
    for (rate, distortion), label in zip(points, labels or []):
        ax.annotate(label, (rate, distortion), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    _style(ax, title or "rate-distortion", "rate (bits)", "distortion (nats)")
    return save_figure(fig, path)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def save_layer_rates(path: str | os.PathLike, steps_or_labels, layer_rates, *,
                     layer_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Per-layer rates of hierarchical models (seed 002).

    With numeric ``steps_or_labels`` (training steps): one line per layer plus the total
    (dashed). With string labels (one per model): bars per model stacked by layer, the bar's
    height being the total rate.

    Args:
        steps_or_labels: T steps (numbers) or T model names (strings).
        layer_rates: (T, L) rates in bits, column l = layer z_{l+1} (pyvae's order: column 0
            is z_1, next to x), e.g. the ``layer_rates_bits`` of metrics records.
        layer_names: L names; default ``z1 … zL``.
    """
    owner = "save_layer_rates"
    rates = _array(layer_rates, "layer_rates", owner, (1, 2))
    rates = rates[:, None] if rates.ndim == 1 else rates
    if isinstance(steps_or_labels, str):
        raise ValueError(f"{owner}: steps_or_labels must be a sequence, got a string")
    xs = list(steps_or_labels.tolist() if hasattr(steps_or_labels, "tolist")
              else steps_or_labels)
    if len(xs) != rates.shape[0] or not xs:
        raise ValueError(f"{owner}: layer_rates must be (T, L) with one row per entry of "
                         f"steps_or_labels ({len(xs)}), got shape {rates.shape}")
    layers = rates.shape[1]
    names = (_labels(layer_names, layers, "layer_names", owner) if layer_names is not None
             else [f"z{l + 1}" + (" (next to x)" if l == 0 and layers > 1 else "")
                   + (" (top)" if l == layers - 1 and layers > 1 else "")
                   for l in range(layers)])
    numeric = all(_is_number(x) for x in xs)
    if not numeric and not all(isinstance(x, str) for x in xs):
        raise ValueError(f"{owner}: steps_or_labels must be all numbers (steps) or all "
                         f"strings (model names), got {xs!r}")
    fig, axes = _new_figure(figsize=(6.0 if numeric else max(4.0, 0.6 * len(xs) + 2.5), 4.0))
    ax = axes[0, 0]
    if numeric:
        for l in range(layers):
            ax.plot(xs, rates[:, l], "-", marker="o" if len(xs) < 30 else None, markersize=3,
                    label=names[l])
        if layers > 1:
            ax.plot(xs, rates.sum(1), "--", color="black", linewidth=1, label="total")
        _style(ax, title or "rate per latent layer", "step", "rate (bits)")
    else:
        bottom = np.zeros(len(xs))
        positions = np.arange(len(xs))
        for l in range(layers):
            ax.bar(positions, rates[:, l], bottom=bottom, label=names[l])
            bottom += rates[:, l]
        ax.set_xticks(positions)
        ax.set_xticklabels(xs, rotation=45 if len(xs) > 4 else 0,
                           ha="right" if len(xs) > 4 else "center")
        _style(ax, title or "rate per latent layer (stacked: total)", None, "rate (bits)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_probe_accuracy(path: str | os.PathLike, names: Sequence[str], accuracies,
                        baseline=None, *, baseline_label: str = "chance",
                        ylabel: str = "accuracy", title: str | None = None) -> Path:
    """Per-attribute accuracy bars, several feature sets side by side (seed 000, Fig. 8).

    Args:
        names: the K attribute (or class) names.
        accuracies: ``{feature set name: (K,) accuracies}`` (one group of bars per attribute,
            one bar per feature set), or a single (K,) sequence.
        baseline: (K,) per-attribute baseline (e.g. the frequency of the attribute: chance),
            drawn as a black mark over each group, or one number drawn as a horizontal line.
        baseline_label: the baseline's legend entry.
    """
    owner = "save_probe_accuracy"
    if isinstance(names, str):
        raise ValueError(f"{owner}: names must be a sequence of attribute names, got a string")
    names = [str(name) for name in names]
    if not names:
        raise ValueError(f"{owner}: names must hold at least one attribute name")
    sets = dict(accuracies) if isinstance(accuracies, Mapping) else {"": accuracies}
    if not sets:
        raise ValueError(f"{owner}: accuracies must hold at least one feature set")
    table = {}
    for key, values in sets.items():
        values = _array(values, f"accuracies[{key!r}]" if key else "accuracies", owner, 1)
        if len(values) != len(names):
            raise ValueError(f"{owner}: accuracies{f'[{key!r}]' if key else ''} has "
                             f"{len(values)} values for {len(names)} names")
        table[str(key)] = values
    k, s = len(names), len(table)
    fig, axes = _new_figure(figsize=(max(5.0, k * (0.25 + 0.12 * s) + 1.5), 4.2))
    ax = axes[0, 0]
    positions = np.arange(k)
    width = 0.8 / s
    for j, (key, values) in enumerate(table.items()):
        ax.bar(positions - 0.4 + (j + 0.5) * width, values, width,
               label=key or None)
    if baseline is not None:
        if _is_number(baseline):
            ax.axhline(float(baseline), color="black", linestyle="--", linewidth=1,
                       label=baseline_label)
        else:
            base = _array(baseline, "baseline", owner, 1)
            if len(base) != k:
                raise ValueError(f"{owner}: baseline must be one number or {k} values (one per "
                                 f"name), got {len(base)}")
            ax.hlines(base, positions - 0.45, positions + 0.45, color="black", linewidth=1.5,
                      label=baseline_label)
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=90 if k > 8 else 0, fontsize=8)
    ax.set_xlim(-0.6, k - 0.4)
    _style(ax, title or "linear-probe accuracy per attribute", None, ylabel)
    if s > 1 or baseline is not None:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def save_heatmap(path: str | os.PathLike, matrix, x_labels: Sequence, y_labels: Sequence,
                 title: str, *, xlabel: str | None = None, ylabel: str | None = None,
                 colorbar_label: str | None = None, cmap: str = "viridis",
                 fmt: str = ".3g", annotate: bool | None = None) -> Path:
    """A labelled matrix, e.g. a metric on a grid of (β₁, β₂) (rows: y, columns: x).

    Args:
        matrix: (R, C) values; NaN cells (runs that are missing or failed) stay blank.
        x_labels: C column labels; y_labels: R row labels (row 0 at the top).
        title: the picture's title.
        annotate: write each value in its cell (default: when R·C <= 144).
    """
    owner = "save_heatmap"
    matrix = _array(matrix, "matrix", owner, 2)
    rows, columns = matrix.shape
    if rows == 0 or columns == 0:
        raise ValueError(f"{owner}: matrix must be non-empty (R, C), got shape {matrix.shape}")
    x_labels = _labels(x_labels, columns, "x_labels", owner)
    y_labels = _labels(y_labels, rows, "y_labels", owner)
    fig, axes = _new_figure(figsize=(max(4.0, 0.6 * columns + 2.5), max(3.0, 0.45 * rows + 1.5)))
    ax = axes[0, 0]
    masked = np.ma.masked_invalid(matrix)
    image = ax.imshow(masked, cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_xticks(range(columns))
    ax.set_xticklabels(x_labels, rotation=45 if columns > 6 else 0, fontsize=8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(y_labels, fontsize=8)
    if annotate is None:
        annotate = rows * columns <= 144
    if annotate and np.isfinite(matrix).any():
        low, high = np.nanmin(matrix), np.nanmax(matrix)
        for r in range(rows):
            for c in range(columns):
                if math.isfinite(matrix[r, c]):
                    bright = high > low and (matrix[r, c] - low) / (high - low) > 0.6
                    ax.text(c, r, format(matrix[r, c], fmt), ha="center", va="center",
                            fontsize=7, color="black" if bright else "white")
    _style(ax, title, xlabel, ylabel, grid=False)
    return save_figure(fig, path)


def save_metric_lines(path: str | os.PathLike, x, series: dict, *, xlabel: str,
                      ylabel: str, title: str, log_x: bool | None = None) -> Path:
    """One line per entry of ``series`` against a hyper-parameter, e.g. the final rate of a β
    sweep (one line per seed, or a mean).

    Args:
        x: N hyper-parameter values (numbers), one per point of every line.
        series: label -> N values (NaN: a missing point, left out of its line).
        log_x: a logarithmic x axis (default: when all x > 0 and they span > 20×).
    """
    owner = "save_metric_lines"
    xs = _array(x, "x", owner, 1)
    if xs.size == 0 or not series:
        raise ValueError(f"{owner}: need at least one x value and one series, got {xs.size} "
                         f"x values and {len(series)} series")
    fig, axes = _new_figure(figsize=(5.5, 4.0))
    ax = axes[0, 0]
    order = np.argsort(xs, kind="stable")
    for label, values in series.items():
        ys = _array(values, f"series[{label!r}]", owner, 1)
        if ys.shape != xs.shape:
            raise ValueError(f"{owner}: series[{label!r}] has {ys.size} values for "
                             f"{xs.size} x values")
        keep = order[np.isfinite(ys[order])]
        ax.plot(xs[keep], ys[keep], "-o", markersize=4, label=str(label))
    if log_x is None:
        log_x = bool((xs > 0).all() and xs.max() > 20 * xs.min())
    if log_x:
        ax.set_xscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
    _style(ax, title, xlabel, ylabel)
    return save_figure(fig, path)
