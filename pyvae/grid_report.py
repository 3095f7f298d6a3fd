"""``pyvae report`` on a grid run (:func:`pyvae.train.fit_grid`): the final rate and distortion
of every model over the grid's varied hyper-parameters.

The axes are the varied grid keys with numeric values, a list-valued key (``betas``) giving one
axis per position that varies (``betas[0]``, ``betas[1]``). ``seed`` is not an axis: models that
differ only in their seed are averaged (the caption says over how many). Two axes: heatmaps
(``grid_rate.png``, ``grid_distortion.png``; rows the second axis, columns the first); one
axis: line plots under the same names; always the rate-distortion plane of all models
(``rate_distortion.png``) and a table of every model's final training metrics.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from pyvae import viz
from pyvae.train.grid import varied_keys
from pyvae.train.metrics import read_metrics

METRICS = (("rate_bits", "rate", "rate (bits)"), ("distortion", "distortion",
                                                   "distortion (nats)"))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def grid_axes(points: list[dict]) -> list[tuple[str, list[float]]]:
    """(axis name, the K points' values) of every numeric varied hyper-parameter but ``seed``;
    a list-valued key gives one axis per position that varies."""
    axes = []
    for key in varied_keys(points):
        if key == "seed":
            continue
        values = [point.get(key) for point in points]
        if all(_is_number(v) for v in values):
            axes.append((key, [float(v) for v in values]))
        elif all(isinstance(v, list) and v and all(map(_is_number, v)) for v in values) \
                and len({len(v) for v in values}) == 1:
            for i in range(len(values[0])):
                column = [float(v[i]) for v in values]
                if len(set(column)) > 1:
                    axes.append((f"{key}[{i}]", column))
    return axes


def final_metrics(records: list[dict], count: int) -> list[dict | None]:
    """The last training record of each of ``count`` models (None: it logged none)."""
    last: list[dict | None] = [None] * count
    for record in records:
        k = record.get("model")
        if record.get("split", "train") == "train" and isinstance(k, int) and 0 <= k < count:
            last[k] = record
    return last


def _cell_means(axes, values: list[float]) -> tuple[list[list[float]], dict]:
    """The mean of ``values`` over the models at each combination of the axes' values."""
    groups = defaultdict(list)
    for k, value in enumerate(values):
        groups[tuple(column[k] for _, column in axes)].append(value)
    levels = [sorted(set(column)) for _, column in axes]
    return levels, {key: float(np.nanmean(group)) for key, group in groups.items()}


def _label(value: float) -> str:
    return format(value, ".3g")


def grid_report(run_dir: Path, out: Path) -> Path:
    """Write ``out/report.md`` and the grid pictures of the grid run ``run_dir``; returns the
    report's path (see the module docstring)."""
    from pyvae.report import _Report, _format
    described = json.loads((run_dir / "grid.json").read_text())
    points = described["points"]
    rep = _Report(out)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    final = final_metrics(records, len(points))
    if any(record is None for record in final):
        rep.notes.append(f"{sum(r is None for r in final)} of {len(points)} models logged no "
                         f"training record: their cells are blank")
    metric = {name: [r[name] if r is not None else math.nan for r in final]
              for name, _, _ in METRICS}
    axes = grid_axes(points)
    seeds = len({json.dumps(p.get("seed")) for p in points})
    averaged = f" (mean over {seeds} seeds)" if "seed" in varied_keys(points) else ""

    pictures = rep.section("Rate and distortion over the grid")
    if len(axes) in (1, 2):
        for name, short, unit in METRICS:
            levels, cells = _cell_means(axes, metric[name])
            caption = f"final training {short}{averaged} over {' and '.join(a for a, _ in axes)}"
            if len(axes) == 2:
                matrix = [[cells.get((x, y), math.nan) for x in levels[0]] for y in levels[1]]
                draw = (lambda path, matrix=matrix, levels=levels, caption=caption, unit=unit:
                        viz.save_heatmap(path, matrix, [_label(v) for v in levels[0]],
                                         [_label(v) for v in levels[1]], caption,
                                         xlabel=axes[0][0], ylabel=axes[1][0],
                                         colorbar_label=unit))
            else:
                ys = [cells[(x,)] for x in levels[0]]
                draw = (lambda path, xs=levels[0], ys=ys, caption=caption, unit=unit:
                        viz.save_metric_lines(path, xs, {short: ys}, xlabel=axes[0][0],
                                              ylabel=unit, title=caption))
            rep.picture(pictures, f"grid_{short}", caption, draw)
    else:
        pictures += [f"{len(axes)} numeric hyper-parameters vary ({', '.join(a for a, _ in axes) or 'none'}"
                     f"): heatmaps need one or two.", ""]
    finite = [k for k, r in enumerate(final) if r is not None]
    if finite:
        rep.picture(pictures, "rate_distortion", "every model's final rate and distortion",
                    lambda path: viz.save_rate_distortion(
                        path, [[metric["rate_bits"][k], metric["distortion"][k]] for k in finite],
                        [str(k) for k in finite], connect=False))

    table = rep.section("Final training metrics")
    table += ["| model | grid point | loss | distortion (nats) | rate (bits) |",
              "|---|---|---|---|---|"]
    for k, (point, record) in enumerate(zip(points, final)):
        values = [_format(record[key]) if record is not None else "–"
                  for key in ("loss", "distortion", "rate_bits")]
        table.append(f"| {k} | `{json.dumps(point)}` | " + " | ".join(values) + " |")
    table.append("")

    last_step = max((r["step"] for r in records), default=None)
    return rep.write(f"Grid run report: {run_dir.resolve().name}",
                     [f"run: `{run_dir.resolve()}`", f"models: {len(points)}",
                      f"model: {described['models'][0].get('name', 'unknown')}",
                      f"varied: {', '.join(described.get('varied', [])) or 'nothing'}",
                      f"steps: {last_step if last_step is not None else 'unknown'}"])
