"""Multi-panel pictures the reproductions need beyond :mod:`pyvae.viz` (which draws one panel
per file): panels of image grids, panels of 2-D scatters over the prior, line plots and
scatters coloured by a value. Saved atomically through :func:`pyvae.viz.save_figure`."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pyvae import viz


def _tidy(ax, title=None, xlabel=None, ylabel=None, grid=True):
    viz._style(ax, title, xlabel, ylabel, grid, title_size=9)


def save_image_panels(path, panels: Sequence[tuple[str, torch.Tensor]], columns: int, *,
                      panel_columns: int = 3, title: str | None = None):
    """One image grid per panel: ``panels`` = [(title, images (N, C, H, W) in [0, 1])]."""
    rows = math.ceil(len(panels) / panel_columns)
    cols = min(panel_columns, len(panels))
    fig, axes = viz._new_figure(rows, cols, (3.4 * cols, 3.4 * rows * 0.9 + 0.4))
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (name, images) in zip(axes.flat, panels):
        grid = viz.image_grid(images.float().cpu(), columns)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return viz.save_figure(fig, path)


def save_scatter_panels(path, panels: Sequence[tuple[str, np.ndarray, np.ndarray | None]], *,
                        limit: float | None = None, panel_columns: int = 4,
                        title: str | None = None, per_panel_limits: bool = False):
    """2-D point clouds, one per panel, over the N(0, I) prior's 1σ and 2σ circles, on shared
    square axes (``limit``: half-width; default: fit the data, at least 3), or each panel on its
    own (``per_panel_limits``).

    ``panels`` = [(title, points (N, 2), labels (N,) or None)]."""
    from matplotlib import cm
    rows = math.ceil(len(panels) / panel_columns)
    cols = min(panel_columns, len(panels))
    fig, axes = viz._new_figure(rows, cols, (3.0 * cols, 3.0 * rows + 0.4))
    def fitted(xy) -> float:
        return max(3.0, 1.1 * float(np.nanpercentile(np.abs(np.asarray(xy)), 99.5)))

    if limit is None and not per_panel_limits:
        limit = max(fitted(xy) for _, xy, _ in panels)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    circle = np.linspace(0, 2 * np.pi, 200)
    for ax, (name, xy, labels) in zip(axes.flat, panels):
        xy = np.asarray(xy, dtype=np.float64)
        if labels is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.4, color="tab:blue", linewidths=0)
        else:
            ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5, c=labels, cmap=cm.tab10,
                       vmin=-0.5, vmax=9.5, linewidths=0)
        for r in (1, 2):
            ax.plot(r * np.cos(circle), r * np.sin(circle), "k--", linewidth=0.7, alpha=0.7)
        half = fitted(xy) if per_panel_limits else limit
        ax.set_xlim(-half, half)
        ax.set_ylim(-half, half)
        ax.set_aspect("equal")
        _tidy(ax, name)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return viz.save_figure(fig, path)


def save_lines(path, x, series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str,
               title: str, logx: bool = False, hlines: dict[str, float] | None = None,
               styles: dict[str, str] | None = None, panels: list[dict] | None = None):
    """Line plots: one panel (``series``) or several (``panels``: dicts with ``series``,
    ``title``, optional ``hlines`` and ``x``, sharing the labels)."""
    panels = panels or [dict(series=series, title=title, hlines=hlines, x=x)]
    fig, axes = viz._new_figure(1, len(panels), (4.6 * len(panels), 3.4))
    for ax, panel in zip(axes[0], panels):
        px = panel.get("x", x)
        for name, values in panel["series"].items():
            ax.plot(px, values, (styles or {}).get(name, "o-"), label=name, markersize=4)
        for name, value in (panel.get("hlines") or {}).items():
            ax.axhline(value, color="black", linestyle="--", linewidth=0.9, label=name)
        if logx:
            ax.set_xscale("log")
            ax.set_xticks(list(px))
            ax.set_xticklabels([f"{v:g}" for v in px])
            ax.minorticks_off()
        _tidy(ax, panel.get("title"), xlabel, ylabel)
        ax.legend(fontsize=7)
    if len(panels) > 1 and title:
        fig.suptitle(title, fontsize=10)
    return viz.save_figure(fig, path)


def save_colored_scatter(path, panels: Sequence[dict], *, xlabel: str, ylabel: str,
                         title: str | None = None):
    """Scatters coloured by a value, one panel per dict: ``x``, ``y``, ``c`` (values),
    ``title``, ``colorbar`` (label), optional ``labels`` (text next to each point)."""
    fig, axes = viz._new_figure(1, len(panels), (4.4 * len(panels), 3.6))
    for ax, panel in zip(axes[0], panels):
        points = ax.scatter(panel["x"], panel["y"], c=panel["c"], cmap="viridis", s=60,
                            edgecolors="black", linewidths=0.5)
        fig.colorbar(points, ax=ax, label=panel.get("colorbar"))
        for x, y, text in zip(panel["x"], panel["y"], panel.get("labels") or []):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
        _tidy(ax, panel.get("title"), xlabel, ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    return viz.save_figure(fig, path)
