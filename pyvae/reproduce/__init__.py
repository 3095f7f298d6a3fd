"""Small reproductions of the seed papers' findings: ``pyvae reproduce NAME``.

Each experiment trains small models with pyvae, prints a table, and writes into its output folder
``results.md`` (the table, whether the seed's finding held, the setup, runtime and machine),
``results.json`` (everything in machine-readable form) and its pictures (PNG). Two sizes:
``"smoke"`` (seconds; the test suite runs it to check the machinery, not the findings) and
``"default"`` (minutes on a laptop CPU; the committed results in ``docs/reproduction/``).
Everything is seeded: the same size, seed and device give the same numbers.

=========================== ====== ==========================================================
name                        seed   what
=========================== ====== ==========================================================
``beta_vae_metric``         004    β-VAE metric on 2-D shapes: raw pixels, PCA, untrained VAE,
                                   VAE, β-VAE
``patch_vaes``              000    patch VAEs p|i: stored bits M and bits/dim fall as i grows;
                                   linear probes of stride-1 patch features on digits
``tcvae_decomposition``     003    MI / TC / dimension-wise KL of β-VAE and β-TCVAE for
                                   β ∈ {1, 3, 6}; MSS against MWS, and a Gaussian with known TC
``layer_rates``             002    two-layer hierarchical VAE on a (β₁, β₂) grid: layer rates,
                                   PSNR, a linear probe, sample FID / inception score
``beta_sweep``              001    2-D latent VAE for β from 1e-3 to 100: reconstructions, the
                                   aggregate posterior against the prior, ‖Cov − I‖_F and F̃
``area_pmi``                000    pointwise mutual information of image areas from a
                                   conditional PixelCNN: map over offsets, fall with distance
``layer_probes``            000    linear probes on every encoder layer (stride-1 patch VAE,
                                   global VAE) against the code and raw pixels
=========================== ====== ==========================================================

Python::

    from pyvae import reproduce
    reproduce.names()                                   # the seven names
    results = reproduce.run("beta_sweep", "out/beta_sweep", size="default")
    results["finding"]["held"], results["tables"][0]
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from types import ModuleType

from pyvae.reproduce._common import (SIZES, Report, WorkDir, _jsonable, machine,
                                     resolve_device, seed_everything, versions, write_json)

#: name -> module (imported on first use, so that listing is instant).
EXPERIMENTS = {
    "beta_vae_metric": "pyvae.reproduce.beta_vae_metric",
    "patch_vaes": "pyvae.reproduce.patch_vaes",
    "tcvae_decomposition": "pyvae.reproduce.tcvae_decomposition",
    "layer_rates": "pyvae.reproduce.layer_rates",
    "beta_sweep": "pyvae.reproduce.beta_sweep",
    "area_pmi": "pyvae.reproduce.area_pmi",
    "layer_probes": "pyvae.reproduce.layer_probes",
}

__all__ = ["EXPERIMENTS", "SIZES", "describe", "experiment", "names", "render_markdown", "run"]


def names() -> list[str]:
    """The experiments' names, in the order of the table above."""
    return list(EXPERIMENTS)


def experiment(name: str) -> ModuleType:
    """The module of experiment ``name`` (it has ``SEED``, ``TITLE``, ``SUMMARY``, ``CLAIM``,
    ``SIZES`` and ``run``)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def describe(name: str) -> str:
    """One line: name, seed and summary."""
    module = experiment(name)
    return f"{name:<21s} seed {module.SEED}  {module.SUMMARY}"


def run(name: str, out_dir, size: str = "smoke", *, device=None, seed: int = 0,
        overrides: dict | None = None, verbose: bool = True) -> dict:
    """Run experiment ``name`` at ``size`` and write its report into ``out_dir``.

    Args:
        name: one of :func:`names`.
        out_dir: the output folder (created): ``results.md``, ``results.json``, pictures.
        size: ``"smoke"`` (seconds) or ``"default"`` (minutes on a laptop CPU).
        device: ``"cpu"``, ``"cuda"``, ... (default: cuda when available, else cpu).
        seed: seeds data subsets, model initialisation, training and metrics.
        overrides: replace entries of the size's configuration (e.g. ``{"steps": 20000}`` for a
            bigger run on a GPU); unknown keys are an error.
        verbose: print the tables and the finding.

    Returns:
        The content of ``results.json``: ``experiment``, ``seed_paper``, ``size``, ``config``,
        ``device``, ``machine``, ``seconds`` (wall clock), ``cpu_seconds`` (this process's CPU
        time, all threads), ``tables`` (caption, columns, rows), ``finding``
        (``held``: True / False / None, ``text``), ``pictures``, ``notes`` and ``data``.
    """
    module = experiment(name)
    if size not in module.SIZES:
        raise ValueError(f"{name}: size must be one of {', '.join(module.SIZES)}, got {size!r}")
    config = dict(module.SIZES[size])
    unknown = set(overrides or {}) - set(config)
    if unknown:
        raise ValueError(f"{name}: unknown configuration keys {sorted(unknown)}; the keys are "
                         f"{sorted(config)}")
    config.update(overrides or {})
    device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    where = machine(device)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    seed_everything(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    with WorkDir() as work:
        report: Report = module.run(out, config, device=device, seed=seed, work_dir=work)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    results = {
        "experiment": name, "title": module.TITLE, "seed_paper": module.SEED, "size": size,
        "seed": seed, "overrides": dict(overrides or {}), "config": config,
        "device": str(device), "machine": where, "date": started, "versions": versions(),
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
        "tables": [table.as_json() for table in report.tables],
        "finding": {"held": report.held, "text": report.finding},
        "pictures": [{"file": file, "caption": caption} for file, caption in report.pictures],
        "notes": report.notes, "data": report.data,
    }
    results = _jsonable(results)  # plain Python values, as results.json holds them
    write_json(out / "results.json", results)
    (out / "results.md").write_text(_markdown(module, results, report))
    if verbose:
        print(_console(results, report))
    return results


def render_markdown(out_dir) -> Path:
    """Rewrite ``out_dir/results.md`` from ``out_dir/results.json`` (e.g. after the wording of
    an experiment's claim changed); the numbers, finding and notes are those of the run."""
    from pyvae.reproduce._common import Table
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    module = experiment(results["experiment"])
    report = Report([Table(t["caption"], t["columns"], t["rows"], t.get("formats"))
                     for t in results["tables"]],
                    results["finding"]["held"], results["finding"]["text"],
                    [(p["file"], p["caption"]) for p in results["pictures"]], results["notes"],
                    results["data"])
    path = out / "results.md"
    path.write_text(_markdown(module, results, report))
    return path


def _verdict(held) -> str:
    return {True: "held", False: "did not hold", None: "mixed"}[held]


def _console(results: dict, report: Report) -> str:
    lines = [f"{results['title']} (seed {results['seed_paper']}), size {results['size']}, "
             f"{results['seconds']} s on {results['device']}", ""]
    for table in report.tables:
        lines += [table.markdown(), ""]
    lines.append(f"Finding {_verdict(report.held)}: {report.finding}")
    return "\n".join(lines)


def _markdown(module: ModuleType, results: dict, report: Report) -> str:
    size, name = results["size"], results["experiment"]
    command = f"pyvae reproduce {name} --size {size}"
    if results["seed"]:
        command += f" --seed {results['seed']}"
    overrides = dict(results.get("overrides", {}))
    if overrides.get("seed_grid") is True and "seeds" in overrides:  # what --seeds N sets
        command += f" --seeds {overrides.pop('seeds')}"
        overrides.pop("seed_grid")
    for key, value in overrides.items():
        command += f" --set {key}={json.dumps(value)}"
    lines = [f"# {results['title']}", "",
             f"Seed {results['seed_paper']} ({module.SEED_TITLE}). Reproduced with "
             f"`{command}` in {results['seconds']:.0f} s wall-clock ({results['cpu_seconds']:.0f} "
             f"s of CPU time) on {results['device']} ({results['machine']})."
             + (f" Started {results['date']}; " + ", ".join(
                 f"{name} {version}" for name, version in results["versions"].items()) + "."
                if "date" in results else ""), "",
             f"**The seed's claim.** {module.CLAIM}", "",
             f"**Finding: {_verdict(report.held)}.** {report.finding}", ""]
    for table in report.tables:
        lines += [table.markdown(), ""]
    if report.pictures:
        lines += ["## Pictures", ""]
        for file, caption in report.pictures:
            lines += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    lines += ["## Setup", "", f"Size `{size}`: " + ", ".join(
        f"`{k}={json.dumps(v)}`" for k, v in results["config"].items()) + ".", ""]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


# ---- command line (`pyvae reproduce`) ---------------------------------------------------------

EPILOG = """\
examples:
  pyvae reproduce --list
  pyvae reproduce beta_sweep --size smoke --out /tmp/beta_sweep
  pyvae reproduce patch_vaes --size default --out docs/reproduction/patch_vaes
  pyvae reproduce layer_rates --device cuda --set steps=5000   # a bigger run on a GPU
  pyvae reproduce layer_rates --seeds 20   # 20 training seeds per cell, one fit_grid call

Each run writes results.md, results.json and its pictures into --out (default
reproduction/NAME) and prints the table."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", choices=names(), metavar="NAME",
                        help=f"the experiment: {', '.join(names())}")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: reproduction/NAME)")
    parser.add_argument("--size", choices=SIZES, default="default",
                        help="smoke (seconds) or default (minutes on a laptop CPU; default)")
    parser.add_argument("--device", metavar="DEV",
                        help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="train N seeds of every model together in one "
                             "pyvae.train.fit_grid call and report mean ± standard error "
                             "(= --set seeds=N --set seed_grid=true; layer_rates, "
                             "beta_vae_metric)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="override a configuration entry (JSON value), repeatable")


def main_from_args(args) -> int:
    import sys
    if args.list:
        for name in names():
            print(describe(name))
        return 0
    if args.name is None:
        print("pyvae reproduce: error: give an experiment NAME or --list", file=sys.stderr)
        return 2
    overrides = {}
    for pair in args.overrides:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            print(f"pyvae reproduce: error: --set expects KEY=VALUE, got {pair!r}",
                  file=sys.stderr)
            return 2
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    if args.seeds is not None:
        if args.seeds < 1:
            print(f"pyvae reproduce: error: --seeds must be >= 1, got {args.seeds}",
                  file=sys.stderr)
            return 2
        overrides.update(seeds=args.seeds, seed_grid=True)
    out = args.out or str(Path("reproduction") / args.name)
    try:
        run(args.name, out, args.size, device=args.device, seed=args.seed, overrides=overrides)
    except ValueError as error:
        print(f"pyvae reproduce: error: {error}", file=sys.stderr)
        return 2
    print(f"\nwrote {Path(out) / 'results.md'}, results.json and the pictures")
    return 0
