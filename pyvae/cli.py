"""The ``pyvae`` command line."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

import pyvae
from pyvae.ops import _backend


def cmd_info(args) -> int:
    """Versions, devices and which backend can run on each device (and why not)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"pyvae {pyvae.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton_version}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else "host CPU"
        print(f"\n{device} ({name}); auto picks "
              f"{next(b for b in _backend.AUTO_ORDER[device] if not _backend.unavailable_reason(b, device))}")
        for backend in _backend.BACKENDS:
            reason = _backend.unavailable_reason(backend, device)
            print(f"  {backend:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_bench(args) -> int:
    """Run the benchmarks of a source checkout (benchmarks/run.py)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyvae.__file__)))
    script = os.path.join(root, "benchmarks", "run.py")
    if not os.path.exists(script):
        print("pyvae bench: the benchmarks live in the source checkout (benchmarks/run.py), "
              "which this installation does not have", file=sys.stderr)
        return 2
    extra = (["--quick"] if args.quick else []) + (["--save", args.save] if args.save else [])
    extra += ["-k", args.select] if args.select else []
    return subprocess.call([sys.executable, script, *extra])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvae", description=pyvae.__doc__)
    parser.add_argument("--version", action="version", version=f"pyvae {pyvae.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the backends available on each device")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark the ops against eager PyTorch and "
                                         "torch.compile (source checkout)")
    bench.add_argument("--quick", action="store_true", help="the small `make demo` subset")
    bench.add_argument("--save", metavar="DIR", help="save the results JSON into DIR")
    bench.add_argument("-k", dest="select", help="pytest -k expression selecting cases")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
