"""``pyvae report`` on a grid run (:func:`pyvae.train.fit_grid`): the final rate and distortion
of every model over the grid's varied hyper-parameters.

The axes are the varied grid keys with numeric values, a list-valued key (``betas``) giving one
axis per position that varies (``betas[0]``, ``betas[1]``). ``seed`` is not an axis: models that
differ only in their seed are averaged (the caption says over how many). Two axes: heatmaps
(``grid_rate.png``, ``grid_distortion.png``; rows the second axis, columns the first); one
axis: line plots under the same names; always the rate-distortion plane of all models
(``rate_distortion.png``) and a table of every model's final training metrics.

Probe accuracy (``grid_probe.png``, and a column of the table): when the run's data
(``config.json``'s ``"data"`` spec, which ``pyvae train-grid`` records) has labels
(``targets``, or the first factor of :class:`pyvae.data.Shapes2D`), each exported model
(``models/<k>``) encodes ``max_points`` examples spread over the data set to posterior means,
and :func:`pyvae.metrics.linear_probe` (standardised logistic regression) is fitted on a
seeded random half and scored on the other half (fraction correct, shown in %).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

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


def probe_accuracies(run_dir: Path, count: int, config: dict, *, device="cpu",
                     max_points: int = 2000, seed: int = 0) -> tuple[list[float] | None, str]:
    """Held-out accuracy of a linear probe of the data's labels from each of the ``count``
    models' posterior means (see the module docstring), NaN for a model that cannot be loaded;
    or None when there is nothing to probe. The second value says what was probed, or why
    nothing was."""
    from pyvae.data import load_dataset
    from pyvae.metrics import linear_probe, mean_encoder
    from pyvae.report import _batch, _labels, _spread
    from pyvae.train import load_model
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
        return None, "`config.json` records no data spec, so no labels to probe"
    try:
        dataset = load_dataset(data["spec"], **{k: v for k, v in data.items() if k != "spec"})
    except Exception as error:
        return None, (f"the data (spec `{data['spec']}`) could not be loaded "
                      f"({type(error).__name__}: {error}), so no labels to probe")
    indices = _spread(max_points, len(dataset))
    labels, what = _labels(dataset, indices)
    if labels is None:
        return None, f"the data `{data['spec']}` has no labels to probe"
    classes, y = np.unique(labels, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(indices))
    train, test = np.sort(order[:len(order) // 2]), np.sort(order[len(order) // 2:])
    if len(classes) < 2 or len(np.unique(y[train])) < 2:
        return None, f"the {what} of `{data['spec']}` takes one value here: nothing to probe"
    images = _batch(dataset, indices)
    accuracies = []
    for k in range(count):
        try:
            model = load_model(run_dir / "models" / f"{k:03d}", device=device)
        except Exception:  # not exported (e.g. a run stopped before its first checkpoint)
            accuracies.append(math.nan)
            continue
        encode = mean_encoder(model)
        codes = torch.cat([encode(part) for part in images.split(512)]).numpy()
        accuracies.append(linear_probe(codes[train], y[train], codes[test], y[test],
                                       seed=seed)["test_accuracy"])
    return accuracies, (f"logistic probe of the {what} ({len(classes)} classes) from each "
                        f"model's posterior means: fitted on {len(train)} and scored on "
                        f"{len(test)} examples of `{data['spec']}`")


def _label(value: float) -> str:
    return format(value, ".3g")


def grid_report(run_dir: Path, out: Path, *, device="cpu", max_points: int = 2000,
                seed: int = 0) -> Path:
    """Write ``out/report.md`` and the grid pictures of the grid run ``run_dir``; returns the
    report's path (see the module docstring). ``device``, ``max_points`` and ``seed``: where
    the models encode, how many examples the probes read, the probes' split and seed."""
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
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    probes, probed = probe_accuracies(run_dir, len(points), config, device=device,
                                      max_points=max_points, seed=seed)
    shown = METRICS
    if probes is not None:
        metric["probe_accuracy"] = [100 * a for a in probes]
        shown = METRICS + (("probe_accuracy", "probe", "probe accuracy (%)"),)
        rep.notes.append(f"Probe accuracy: {probed}.")
    else:
        rep.notes.append(f"No probe accuracy: {probed}.")
    axes = grid_axes(points)
    seeds = len({json.dumps(p.get("seed")) for p in points})
    averaged = f" (mean over {seeds} seeds)" if "seed" in varied_keys(points) else ""

    pictures = rep.section("Rate, distortion and probe accuracy over the grid")
    if len(axes) in (1, 2):
        for name, short, unit in shown:
            levels, cells = _cell_means(axes, metric[name])
            what = "held-out probe accuracy" if short == "probe" else f"final training {short}"
            caption = f"{what}{averaged} over {' and '.join(a for a, _ in axes)}"
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
    probe_column = probes is not None
    table += ["| model | grid point | loss | distortion (nats) | rate (bits) |"
              + (" probe accuracy (%) |" if probe_column else ""),
              "|---|---|---|---|---|" + ("---|" if probe_column else "")]
    for k, (point, record) in enumerate(zip(points, final)):
        values = [_format(record[key]) if record is not None else "–"
                  for key in ("loss", "distortion", "rate_bits")]
        if probe_column:
            values.append(_format(metric["probe_accuracy"][k]))
        table.append(f"| {k} | `{json.dumps(point)}` | " + " | ".join(values) + " |")
    table.append("")

    last_step = max((r["step"] for r in records), default=None)
    return rep.write(f"Grid run report: {run_dir.resolve().name}",
                     [f"run: `{run_dir.resolve()}`", f"models: {len(points)}",
                      f"model: {described['models'][0].get('name', 'unknown')}",
                      f"varied: {', '.join(described.get('varied', [])) or 'nothing'}",
                      f"steps: {last_step if last_step is not None else 'unknown'}"])
