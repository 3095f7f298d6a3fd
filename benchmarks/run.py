"""Run pyvae's benchmarks and print ratio tables; optionally save the results and refresh README.

    python benchmarks/run.py --quick             # the `make demo` subset, printed
    python benchmarks/run.py --save benchmarks/results   # everything, saved as JSON
    python benchmarks/run.py --readme            # README table from the committed JSON only

A saved file holds the device, versions, date, the measured copy bandwidth and, per case, the
median time, achieved GB/s (minimal bytes over time), exponentials per second (with the share
of the device's exp throughput, benchmarks/exp_peak.py) or TFLOP/s (useful work only: masked
taps are not counted), items (images or patches) per second for the model
benchmarks, the call's peak extra memory, and the ratios to eager PyTorch and torch.compile of
the same run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def run_pytest(quick: bool, select: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider",
               "--benchmark-only", f"--benchmark-json={out}", "--benchmark-disable-gc",
               "--benchmark-columns=median", "--benchmark-sort=name", "-rs",
               "-o", "python_files=bench_*.py", "--rootdir", HERE]
        if quick:
            cmd.append("--quick")
        if select:
            cmd += ["-k", select]
        status = subprocess.run(cmd, cwd=HERE).returncode
        if status == 5:  # pytest: no tests collected
            print(f"benchmarks/run.py: error: no benchmark case matches -k {select!r}"
                  if select else "benchmarks/run.py: error: no benchmark cases found",
                  file=sys.stderr)
            sys.exit(2)
        if status != 0:
            print(f"benchmarks/run.py: error: the benchmarks failed (pytest exit status "
                  f"{status}; its output is above)", file=sys.stderr)
            sys.exit(1)
        with open(out) as f:
            return json.load(f)


def summarise(raw: dict) -> dict:
    """pytest-benchmark JSON -> pyvae's compact results (with ratios within the same run)."""
    info = raw["machine_info"]["pyvae"]
    cases = []
    for bench in raw["benchmarks"]:
        extra = bench["extra_info"]
        median = bench["stats"]["median"]
        cases.append(dict(extra, median_ms=median * 1e3,
                          gbs=extra["bytes"] / median / 1e9 if "bytes" in extra else None,
                          gexps=extra["exps"] / median / 1e9 if "exps" in extra else None,
                          tflops=extra["flops"] / median / 1e12 if "flops" in extra else None,
                          items_per_s=extra["items"] / median if "items" in extra else None))
    for case in cases:
        same = {c["impl"]: c["median_ms"] for c in cases
                if all(c.get(k) == case.get(k) for k in ("op", "shape", "dtype", "mode"))}
        for baseline in ("eager", "compile"):
            if baseline in same:
                case[f"x_{baseline}"] = same[baseline] / case["median_ms"]
        if case.get("gbs"):
            case["pct_copy_bw"] = 100 * case["gbs"] / info["copy_bandwidth_gbs"]
        if case.get("gexps") and info.get("exp_peak_gexps"):
            case["pct_exp_peak"] = 100 * case["gexps"] / info["exp_peak_gexps"]
        if case.get("tflops") and info.get("fma_peak_gflops"):
            case["pct_fma_peak"] = 100 * case["tflops"] * 1e3 / info["fma_peak_gflops"]
    return dict(info, cases=cases)


def grid_table(result: dict, *, markdown: bool = False) -> str:
    """The train_grid cases (bench_train.py::test_grid_vs_sequential_fits): model·steps/s of a
    fit_grid run and of sequential fits of the same models, same run; "" when there are none."""
    head = ["models", "backend", "grid model·steps/s", "sequential model·steps/s", "× sequential"]
    rows = [[c["shape"], c["impl"], format(c["grid_model_steps_per_s"], ".2f"),
             format(c["sequential_model_steps_per_s"], ".2f"), format(c["speedup"], ".2f")]
            for c in result["cases"] if c["op"] == "train_grid"]
    return _render(head, rows, markdown) if rows else ""


def _render(head: list, rows: list, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def table(result: dict, *, markdown: bool = False) -> str:
    """Every case but the train_grid ones (see grid_table), one row each."""
    head = ["op", "shape", "dtype", "mode", "impl", "ms", "GB/s", "% copy BW", "G exp/s",
            "% exp peak", "TFLOP/s", "% FMA peak", "FLOP ratio", "items/s", "peak MB", "× eager",
            "× compile"]
    rows = []
    for c in result["cases"]:
        if c["op"] == "train_grid":
            continue
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        rows.append([c["op"], c["shape"], c["dtype"], c["mode"], c["impl"],
                     fmt(c["median_ms"], ".3f"), fmt(c.get("gbs"), ".1f"),
                     fmt(c.get("pct_copy_bw"), ".0f"), fmt(c.get("gexps"), ".2f"),
                     fmt(c.get("pct_exp_peak"), ".0f"),
                     fmt(c.get("tflops"), ".3f"), fmt(c.get("pct_fma_peak"), ".0f"),
                     fmt(c.get("flop_ratio"), ".1f"), fmt(c.get("items_per_s"), ".0f"),
                     fmt(c.get("peak_mb"), ".1f"),
                     fmt(c.get("x_eager"), ".2f"), fmt(c.get("x_compile"), ".2f")])
    return _render(head, rows, markdown)


def describe(result: dict) -> str:
    v = result["versions"]
    text = (f"{result['device_name']} ({result['device']}), torch {v['torch']}, "
            f"triton {v['triton']}, {result['date'][:10]}; measured copy bandwidth "
            f"{result['copy_bandwidth_gbs']:.0f} GB/s")
    if result.get("fma_peak_formula"):
        text += f"; float32 FMA peak {result['fma_peak_formula']}"
    if result.get("exp_peak_formula"):
        text += f"; exp peak {result['exp_peak_formula']}"
    return text


def case_key(case: dict) -> tuple:
    return tuple(case.get(k) for k in ("op", "shape", "dtype", "mode", "impl"))


def save(result: dict, folder: str, merge: bool = False) -> str:
    """Write ``result`` as ``<date>-<device>.json``; with ``merge`` (a ``-k`` subset) the cases
    of an existing file of the same day and device that this run did not repeat are kept."""
    os.makedirs(folder, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device_name"]).strip("-").lower()
    path = os.path.join(folder, f"{result['date'][:10]}-{slug}.json")
    if merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        ran = {case_key(c) for c in result["cases"]}
        result = dict(result, cases=[c for c in old["cases"] if case_key(c) not in ran]
                      + result["cases"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)  # atomic: never a half-written results file
    return path


def update_readme(folder: str, readme: str) -> None:
    """Replace the README's benchmark section with tables of the newest result per device and,
    from older results of that device, the ops the newer ones did not run (each table under
    its own run's description: ratios are only ever taken within one run)."""
    by_device: dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        by_device.setdefault(result["device_name"], []).append((path, result))
    parts = []
    for runs in by_device.values():
        covered: set[str] = set()
        for path, result in reversed(runs):  # newest first
            ops = {c["op"] for c in result["cases"]}
            shown = dict(result, cases=[c for c in result["cases"] if c["op"] not in covered])
            covered |= ops
            if not shown["cases"]:
                continue
            parts.append(f"**{describe(shown)}** (`{os.path.relpath(path, ROOT)}`)\n\n"
                         f"{table(shown, markdown=True)}\n")
            grids = grid_table(shown, markdown=True)
            if grids:
                parts.append("Model-batched training (`fit_grid` against sequential `fit`s of "
                             f"the same models, same run):\n\n{grids}\n")
    body = "\n".join(parts) or "_No committed results yet._\n"
    with open(readme) as f:
        text = f.read()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    with open(readme, "w") as f:
        f.write(text[:start] + "\n" + body + text[end:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small `make demo` subset")
    parser.add_argument("-k", dest="select", help="pytest -k expression to select cases")
    parser.add_argument("--save", metavar="DIR", help="write the results JSON into DIR")
    parser.add_argument("--readme", action="store_true",
                        help="only regenerate README.md's table from benchmarks/results/")
    args = parser.parse_args(argv)
    results_dir = os.path.join(HERE, "results")
    if not args.readme:
        result = summarise(run_pytest(args.quick, args.select))
        print(f"\n{describe(result)}\n{table(result)}\n{grid_table(result)}")
        if args.save:
            print(f"saved {save(result, args.save, merge=bool(args.select))}")
    if args.save or args.readme:
        update_readme(results_dir, os.path.join(ROOT, "README.md"))
        print("README.md benchmark table updated")


if __name__ == "__main__":
    main()
