"""Render a training run (the ``out_dir`` of :func:`pyvae.train.fit` / ``pyvae train``) into
pictures and a markdown summary, ``report.md``.

Always (from ``metrics.jsonl`` and ``config.json``): training curves (loss, distortion, rate,
bits/dim), the KL decomposition (MI, TC, dimension-wise KL) and per-layer rates when the run
logged them, the schedules, a table of the final train / eval metrics, and the configuration.

When the checkpoint and the run's data (``config.json``'s ``"data"`` spec, written by
``pyvae train``) can be loaded, also: reconstructions (patch models: whole images tiled into
p×p patches, each patch reconstructed by ``PatchVAE.reconstruct``), samples (models with
``sample``), latent traversals and the aggregate posterior (global models), and the metrics of
the model on the report's images (loss, distortion, rate, PSNR, per-layer rates). The images
are the held-out examples when the run had some (``eval_data``, or the ``eval_fraction`` split
that :func:`pyvae.train.split_dataset` reproduces from the seed), else training examples. When
something cannot be loaded, ``report.md`` says so and what was skipped.

Pictures are referenced from ``report.md`` by relative paths, so the folder can be moved.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pyvae import viz
from pyvae._device import check_device
from pyvae.metrics import evaluate, psnr

CURVE_KEYS = ("loss", "distortion", "rate_bits", "bits_per_dim")
KL_KEYS = ("mi", "tc", "dim_kl")
SCHEDULE_KEYS = ("kl_weight", "lr", "grad_norm", "images_per_s")
MAX_TILES = 16  # patch models: at most MAX_TILES × MAX_TILES patches per reconstructed image


def _psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1]."""
    return psnr(x.float().cpu(), x_hat.float().cpu())


def _evaluate(model, batch: torch.Tensor, seed: int, device: torch.device) -> dict:
    """Means of the model's loss outputs on ``batch`` (pyvae.metrics.evaluate, fixed seed)."""
    values = evaluate(model, batch, batch_size=1024, device=device, seed=seed)
    values.pop("num_examples", None)
    return values


def _format(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def _json_block(value) -> str:
    """JSON with one top-level key per line (compact values), for the markdown."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value)
    items = [f"  {json.dumps(str(k))}: {json.dumps(v)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n}"


class _Report:
    """The markdown under construction: notes, sections, pictures (paths relative to out)."""

    def __init__(self, out: Path):
        self.out = out
        self.notes: list[str] = []
        self.sections: list[tuple[str, list[str]]] = []
        self.pictures: dict[str, Path] = {}

    def section(self, title: str) -> list[str]:
        lines: list[str] = []
        self.sections.append((title, lines))
        return lines

    def picture(self, lines: list[str], name: str, caption: str, draw) -> Path | None:
        """Run ``draw(path)``; on success reference the PNG, else note why it is missing."""
        path = self.out / f"{name}.png"
        try:
            written = Path(draw(path))
        except Exception as error:  # one failing picture must not sink the whole report
            self.notes.append(f"the picture `{name}.png` could not be drawn "
                              f"({type(error).__name__}: {error})")
            return None
        self.pictures[name] = written
        rel = Path(os.path.relpath(written, self.out)).as_posix()
        lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
        return written

    def write(self, title: str, facts: list[str]) -> Path:
        """Write ``out/report.md`` (atomically): the title, ``facts`` as a list with the time
        of generation, the notes and the sections; returns its path."""
        generated = datetime.datetime.now().isoformat(timespec="seconds")
        text = [f"# {title}", ""] + [f"- {fact}" for fact in facts + [f"generated: {generated}"]]
        text.append("")
        if self.notes:
            text += ["## Notes", ""] + [f"- {note}" for note in self.notes] + [""]
        for heading, lines in self.sections:
            text += [f"## {heading}", ""] + lines
        path = self.out / "report.md"
        staged = self.out / f".report.md.tmp-{os.getpid()}"
        staged.write_text("\n".join(text).rstrip() + "\n")
        os.replace(staged, path)
        return path


def _read_config(run_dir: Path, notes: list[str]) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        notes.append("the run has no `config.json`: no model, training or data configuration")
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        notes.append(f"`config.json` could not be read ({error})")
        return {}
    return config if isinstance(config, dict) else {}


def _read_records(run_dir: Path, notes: list[str]) -> list[dict]:
    """The records of ``metrics.jsonl`` (the format of :func:`pyvae.train.read_metrics`), but
    tolerant of a torn line (noted) and of records without a step (dropped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        notes.append("the run has no `metrics.jsonl`: no training curves")
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # e.g. the torn last line of a killed run
                notes.append(f"`metrics.jsonl` line {number} is not JSON and was ignored")
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]


def _load_data(config: dict, notes: list[str]):
    """(dataset of the report's images, words saying which) or (None, None) with a note."""
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
        notes.append('`config.json` records no data spec (`"data": {"spec": ...}`, which '
                     "`pyvae train` writes; `pyvae.train.fit` writes it when given "
                     '`extra_config={"data": {"spec": ...}}`): the pictures that need data '
                     "(reconstructions, traversals, aggregate posterior) are skipped")
        return None, None
    from pyvae.data import load_dataset

    def load(section: dict, what: str):
        options = {k: v for k, v in section.items() if k != "spec"}
        try:
            return load_dataset(section["spec"], **options)
        except Exception as error:
            notes.append(f"the {what} (spec `{section['spec']}`"
                         f"{', options ' + json.dumps(options) if options else ''}) could not "
                         f"be loaded ({type(error).__name__}: {error}): the pictures that need "
                         f"data (reconstructions, traversals, aggregate posterior) are skipped")
            return None

    eval_data = config.get("eval_data")
    if isinstance(eval_data, dict) and isinstance(eval_data.get("spec"), str):
        dataset = load(eval_data, "evaluation data")
        return (dataset, f"the evaluation data `{eval_data['spec']}`") if dataset is not None \
            else (None, None)
    dataset = load(data, "data")
    if dataset is None:
        return None, None
    train = config.get("train", {}) if isinstance(config.get("train"), dict) else {}
    fraction = train.get("eval_fraction") or 0.0
    if fraction > 0:
        from pyvae.train import split_dataset
        _, held_out = split_dataset(dataset, fraction, train.get("seed", 0))
        return held_out, (f"the held-out split ({len(held_out)} examples, eval_fraction "
                          f"{fraction}) of `{data['spec']}`")
    return dataset, f"training examples of `{data['spec']}` (the run held none out)"


def _labels(dataset, indices: np.ndarray):
    """(labels (n,), what they are) of dataset items, or (None, None)."""
    from torch.utils.data import Subset
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices)[indices]
        dataset = dataset.dataset
    try:
        if hasattr(dataset, "factors_of"):  # Shapes2D: no need to compute every factor
            targets = np.asarray(dataset.factors_of(indices))
        else:
            targets = getattr(dataset, "targets", None)
            if targets is None:
                return None, None
            targets = np.asarray(targets)[indices]
    except Exception:
        return None, None
    what = "label"
    if targets.ndim == 2:
        names = getattr(dataset, "factor_names", None)
        what = f"{names[0]} (targets[:, 0])" if names else "targets[:, 0]"
        targets = targets[:, 0]
    elif targets.ndim != 1:
        return None, None
    for attribute in ("shape_names", "classes"):
        names = getattr(dataset, attribute, None)
        if names is not None and targets.dtype.kind in "iu" and targets.size and \
                0 <= targets.min() and targets.max() < len(names):
            targets = np.asarray(names, dtype=object)[targets].astype(str)
            break
    return targets, what


def _batch(dataset, indices) -> torch.Tensor:
    from pyvae.train import collate_images
    return collate_images([dataset[int(i)] for i in indices]).float()


def _spread(count: int, total: int) -> np.ndarray:
    """``count`` evenly spaced indices in [0, total)."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))


def _tile(images: torch.Tensor, p: int):
    """Centre crops of (n, C, H, W) images to (th·p, tw·p) and their p×p tiles
    (n·th·tw, C, p, p), th = min(H // p, MAX_TILES), tw likewise."""
    n, c, h, w = images.shape
    th, tw = min(h // p, MAX_TILES), min(w // p, MAX_TILES)
    y, x = (h - th * p) // 2, (w - tw * p) // 2
    crops = images[:, :, y:y + th * p, x:x + tw * p]
    tiles = crops.reshape(n, c, th, p, tw, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
    return crops, tiles, (th, tw)


def _untile(tiles: torch.Tensor, n: int, grid: tuple[int, int]) -> torch.Tensor:
    th, tw = grid
    _, c, p, _ = tiles.shape
    return tiles.reshape(n, th, tw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th * p,
                                                                              tw * p)


@torch.no_grad()
def _model_section(rep: _Report, model, dataset, source: str, *, num_images: int,
                   max_points: int, seed: int, device: torch.device) -> dict:
    """Pictures of the trained model; returns the metrics measured on the report's images."""
    from pyvae.models import PatchVAE
    lines = rep.section("Model pictures")
    if source:
        lines += [f"Images: {source}.", ""]
    generator = torch.Generator(device=device).manual_seed(seed)
    measured: dict = {}
    is_patch = isinstance(model, PatchVAE)
    is_global = hasattr(model, "likelihood")

    def samples() -> None:  # needs no data: drawn whatever happens to the data pictures
        if not hasattr(model, "sample"):
            rep.notes.append(f"{type(model).__name__} has no `sample` method: no samples")
            return
        how = "then the block PixelCNNs" if is_patch else "decoder mean"
        rep.picture(lines, "samples", f"{num_images} {'patches' if is_patch else 'images'} "
                    f"sampled from the model (z ~ prior, {how})",
                    lambda path: viz.save_samples(
                        path, model.sample(num_images, generator=generator),
                        columns=min(num_images, 8), title=f"samples of {type(model).__name__}"))

    if dataset is None or len(dataset) == 0:
        if dataset is not None:
            rep.notes.append("the report's data set is empty: no reconstructions")
        samples()
        return measured
    indices = _spread(num_images, len(dataset))
    try:
        x = _batch(dataset, indices).to(device)
    except Exception as error:
        rep.notes.append(f"the report's images could not be read ({type(error).__name__}: "
                         f"{error})")
        samples()
        return measured

    if is_patch:
        p = model.patch_size
        if x.shape[1] != model.channels or min(x.shape[2:]) < p:
            rep.notes.append(f"the data's images {tuple(x.shape[1:])} do not fit the patch "
                             f"model ({model.channels} channels, {p}×{p} patches): no "
                             f"reconstructions")
            samples()
            return measured
        crops, tiles, grid = _tile(x, p)
        try:
            recon = torch.cat([model.reconstruct(part, generator=generator)
                               for part in tiles.split(4096)])
        except Exception as error:
            rep.notes.append(f"the patches could not be reconstructed ({type(error).__name__}: "
                             f"{error})")
            samples()
            return measured
        recon_images = _untile(recon, len(x), grid)
        rep.picture(lines, "reconstructions",
                    f"inputs (top) and reconstructions (bottom): each image cut into "
                    f"{grid[0]}×{grid[1]} non-overlapping {p}×{p} patches, each patch drawn from "
                    f"p(patch | z = posterior mean) and put back in place",
                    lambda path: viz.save_reconstructions(
                        path, crops.cpu(), recon_images.cpu(),
                        title=f"{type(model).__name__} {p}|{model.independence}"))
        batch, recon_for_psnr, originals = tiles, recon_images, crops
        measured["examples"] = f"{len(tiles)} patches of {len(x)} images"
    else:
        expected = (getattr(model, "channels", None), *getattr(model, "image_size", (None,)))
        if tuple(x.shape[1:]) != tuple(expected):
            rep.notes.append(f"the data's images have shape {tuple(x.shape[1:])}, the model "
                             f"reads {tuple(expected)}: no data pictures")
            samples()
            return measured
        try:
            recon_images = (model.reconstruct(x) if hasattr(model, "reconstruct") else
                            model.likelihood.mean(model.decode(model.encode(x)[0])))
        except Exception as error:
            rep.notes.append(f"the images could not be reconstructed ({type(error).__name__}: "
                             f"{error})")
            samples()
            return measured
        rep.picture(lines, "reconstructions",
                    "inputs (top) and reconstructions (bottom): the mean of p(x | z) at the "
                    "posterior mean",
                    lambda path: viz.save_reconstructions(path, x.cpu(), recon_images.cpu(),
                                                          title=type(model).__name__))
        batch, recon_for_psnr, originals = x, recon_images, x
        measured["examples"] = f"{len(x)} images"

    # Metrics of the model on these examples (fixed noise, the global RNG untouched).
    try:
        measured.update(_evaluate(model, batch, seed, device))
        measured["psnr_db"] = float(_psnr(originals, recon_for_psnr).mean())
    except Exception as error:
        rep.notes.append(f"the metrics on the report's images could not be computed "
                         f"({type(error).__name__}: {error})")

    samples()
    if is_global:
        rep.picture(lines, "traversals",
                    "latent traversals of the first report image: one latent dimension set to "
                    "-3 … 3 at a time, the others at the posterior mean" +
                    (" (z_1, the layer the decoder reads)" if hasattr(model, "latent_dims")
                     else ""),
                    lambda path: viz.save_traversals(path, model, x[:1]))
        rep.picture(lines, "aggregate_posterior",
                    *_aggregate_posterior(model, dataset, max_points, seed, device))
    else:
        rep.notes.append("traversals and the aggregate posterior are drawn for global models "
                         f"only ({type(model).__name__} encodes patches)")
    return measured


def _aggregate_posterior(model, dataset, max_points: int, seed: int, device: torch.device):
    """(caption, draw) of the aggregate posterior of up to ``max_points`` examples."""
    indices = _spread(max_points, len(dataset))
    labels, what = _labels(dataset, indices)
    dims = getattr(model, "latent_dims", None)

    def draw(path):
        mus, logvars = [], []
        with torch.no_grad():
            for start in range(0, len(indices), 256):
                mu, logvar = model.encode(_batch(dataset, indices[start:start + 256]).to(device))
                mus.append(mu.float().cpu())
                logvars.append(logvar.float().cpu())
        mu, logvar = torch.cat(mus), torch.cat(logvars)
        title = type(model).__name__
        if dims is not None and len(dims) > 1:  # only the top layer has the prior N(0, I)
            mu, logvar = mu[:, -dims[-1]:], logvar[:, -dims[-1]:]
            title += f": top layer z{len(dims)}"
        if mu.shape[1] == 1:  # a 1-D latent: pad a zero dim so that the scatter can be drawn
            mu = torch.cat([mu, torch.zeros_like(mu)], 1)
            logvar = torch.cat([logvar, torch.full_like(logvar, -30.0)], 1)
            title += " (1-D latent, drawn on the z0 axis)"
        if labels is not None:
            title += f", colour: {what}"
        return viz.save_aggregate_posterior(path, mu, logvar, labels=labels, seed=seed,
                                            title=title)

    caption = (f"aggregate posterior q(z): one sample of q(z|x) for each of {len(indices)} "
               f"examples, against the prior's 1σ and 2σ circles"
               + (" (top latent layer)" if dims is not None and len(dims) > 1 else ""))
    return caption, draw


def _metrics_table(train: dict | None, evaluation: dict | None, measured: dict) -> list[str]:
    columns = []
    if train:
        columns.append((f"last train record (step {train.get('step')})", train))
    if evaluation:
        columns.append((f"last eval record (step {evaluation.get('step')})", evaluation))
    if measured:
        columns.append((f"report images ({measured.get('examples', '')})", measured))
    if not columns:
        return ["No metrics were recorded.", ""]
    skip = {"split", "examples"}
    keys: list[str] = []
    for _, record in columns:
        keys += [k for k in record if k not in skip and k not in keys]
    lines = ["| metric | " + " | ".join(title for title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(
            _format(record[key]) if key in record else "—" for _, record in columns) + " |")
    units = ("Units: distortion, elbo_nats, mi, tc, dim_kl: nats per example; rate_bits, "
             "layer_rates_bits (z1 … zL, z1 next to x), capacity_bits: bits per example; "
             "bits_per_dim, rate_bits_per_dim: bits per subpixel; psnr_db: dB of the "
             "reconstructions.")
    return lines + ["", units, ""]


def report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
           num_images: int = 16, device: str | torch.device = "cpu", max_points: int = 2000,
           seed: int = 0) -> Path:
    """Render a training run into PNG pictures and a markdown summary.

    Args:
        run_dir: a run directory of :func:`pyvae.train.fit` (``config.json``, ``metrics.jsonl``,
            ``checkpoint/``).
        out_dir: where to write ``report.md`` and the pictures (default ``run_dir/report``).
        num_images: images reconstructed and samples drawn (>= 1).
        device: where the model runs (e.g. ``"cpu"``, ``"cuda"``).
        max_points: examples encoded for the aggregate posterior (>= 1).
        seed: seed of the sampling noise (the report is reproducible).

    Pictures (written when their inputs exist): ``training_curves.png``,
    ``kl_decomposition.png``, ``layer_rates.png``, ``schedules.png``, ``reconstructions.png``,
    ``samples.png``, ``traversals.png``, ``aggregate_posterior.png``.

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory or holds none of config.json,
            metrics.jsonl and checkpoint/.
        ValueError: a bad ``num_images`` / ``max_points``.
    """
    run_dir = Path(run_dir)
    for name, value in (("num_images", num_images), ("max_points", max_points)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"report: {name} must be an int >= 1, got {value!r}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"report: no run directory at {str(run_dir)!r}")
    if not any((run_dir / name).exists() for name in ("config.json", "metrics.jsonl",
                                                       "checkpoint")):
        raise FileNotFoundError(f"report: {str(run_dir)!r} is not a training run: it holds no "
                                f"config.json, metrics.jsonl or checkpoint/")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    if (run_dir / "grid.json").is_file():  # a run of pyvae.train.fit_grid / pyvae train-grid
        from pyvae.grid_report import grid_report
        return grid_report(run_dir, out, device=check_device(device), max_points=max_points,
                           seed=seed)
    device = check_device(device)
    rep = _Report(out)
    config = _read_config(run_dir, rep.notes)
    records = _read_records(run_dir, rep.notes)
    train_records = [r for r in records if r.get("split", "train") == "train"]
    eval_records = [r for r in records if r.get("split") == "eval"]
    model_config = config.get("model") if isinstance(config.get("model"), dict) else {}
    model_name = model_config.get("name", "unknown model")

    # Final metrics: filled in below, placed first.
    summary = rep.section("Final metrics")

    curves = rep.section("Training curves")
    if records:
        rep.picture(curves, "training_curves",
                    "training (lines) and evaluation (circles) loss, distortion (nats), rate "
                    "(bits) and bits/dim against the step",
                    lambda path: viz.save_training_curves(path, records, CURVE_KEYS))
        if any(isinstance(r.get(k), (int, float)) for r in records for k in KL_KEYS):
            rep.picture(curves, "kl_decomposition",
                        "KL decomposition (nats): index-code mutual information, total "
                        "correlation and dimension-wise KL",
                        lambda path: viz.save_training_curves(path, records, KL_KEYS))
        layered = [r for r in train_records if isinstance(r.get("layer_rates_bits"), list)]
        if layered:
            rep.picture(curves, "layer_rates",
                        "rate of each latent layer (bits; z1 is next to x) over training, and "
                        "their total",
                        lambda path: viz.save_layer_rates(
                            path, [r["step"] for r in layered],
                            [r["layer_rates_bits"] for r in layered],
                            title=f"{model_name}: rate per latent layer (training)"))
        rep.picture(curves, "schedules", "KL weight, learning rate, gradient norm and "
                    "throughput", lambda path: viz.save_training_curves(path, records,
                                                                        SCHEDULE_KEYS))
    else:
        curves += ["No metrics records: no curves.", ""]

    measured: dict = {}
    model = None
    try:
        from pyvae.train import load_model
        model = load_model(run_dir, device=device)
        model_name = type(model).__name__
    except Exception as error:
        rep.notes.append(f"the checkpoint could not be loaded ({type(error).__name__}: "
                         f"{error}): no model pictures")
    if model is not None:
        dataset, source = _load_data(config, rep.notes)
        measured = _model_section(rep, model, dataset, source, num_images=num_images,
                                  max_points=max_points, seed=seed, device=device)

    summary += _metrics_table(train_records[-1] if train_records else None,
                              eval_records[-1] if eval_records else None, measured)

    configuration = rep.section("Configuration")
    for key, title in (("model", "Model"), ("train", "Training arguments"),
                       ("dataset", "Data set sizes"), ("data", "Data"),
                       ("eval_data", "Evaluation data")):
        if config.get(key) is not None:
            configuration += [f"{title}:", "", "```json", _json_block(config[key]), "```", ""]
    if not config:
        configuration += ["No configuration recorded.", ""]

    last_step = max((r["step"] for r in records), default=None)
    return rep.write(f"Training run report: {run_dir.resolve().name}",
                     [f"run: `{run_dir.resolve()}`", f"model: {model_name}",
                      f"steps: {last_step if last_step is not None else 'unknown'}"])


# ---- pyvae report ----------------------------------------------------------------------------

DESCRIPTION = """\
Render a training run (the --out of pyvae train) into PNG pictures and a markdown summary,
report.md: training curves (loss, distortion, rate, bits/dim; MI/TC/dimension-wise KL and
per-layer rates when logged), a table of the final train/eval metrics, the configuration, and,
from the checkpoint and the run's data: reconstructions, samples, latent traversals and the
aggregate posterior (global models), with metrics (PSNR, rate) on the report's images."""

EPILOG = """\
examples:
  pyvae report runs/vae                      # writes runs/vae/report/report.md and PNGs
  pyvae report runs/hvae --out reports/hvae --num-images 32 --device cuda

The data pictures need the run's data spec in config.json ("data": {"spec": ...}, written by
pyvae train); without it, or when the data cannot be loaded, report.md says so and keeps the
curves, the metrics table and the samples."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pyvae report`` arguments."""
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a training run directory (the --out of pyvae train)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write report.md and the pictures (default: "
                             "RUN_DIR/report)")
    parser.add_argument("--num-images", type=int, default=16, metavar="N",
                        help="images reconstructed and samples drawn (default: %(default)s)")
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="where the model runs, e.g. cpu, cuda (default: %(default)s)")


def main_from_args(args) -> int:
    """Run :func:`report` from parsed ``pyvae report`` arguments; prints what it wrote."""
    try:
        path = report(args.run_dir, args.out, num_images=args.num_images, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        print(f"pyvae report: error: {error}", file=sys.stderr)
        return 2
    pictures = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"pyvae report: {path}\n  pictures: {', '.join(pictures) or 'none'}")
    return 0
