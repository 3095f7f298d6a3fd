"""pytest-benchmark plumbing shared by every op's benchmark module.

``timed(benchmark, fn, ...)`` times ``fn`` with pytest-benchmark, synchronising CUDA inside the
timed call, and stores what the report needs in ``extra_info``. The device, versions and date go
into the JSON's machine_info. ``--quick`` keeps the cases marked for the demo.
"""
from __future__ import annotations

import datetime
import os
import platform

import torch

from cpu_peak import fma_peak
from exp_peak import exp_peak
from peak_memory import peak_memory_mb

if not torch.cuda.is_available():  # triton is benchmarked on GPUs only
    os.environ.pop("TRITON_INTERPRET", None)


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="only the cases of `make demo`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--quick"):
        keep = [item for item in items if item.get_closest_marker("quick")]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: part of the `make demo` subset")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # The vector ISA ATen and pyvae's kernels run with (AVX2 or AVX512 on x86): the same 2-core
    # machine type has come with either, and their timings differ by up to 2x.
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{platform.processor() or platform.machine()} CPU ({isa}) "
            f"x{torch.get_num_threads()} threads")


def pytest_benchmark_update_machine_info(config, machine_info):
    import importlib.metadata as md
    device = "cuda" if torch.cuda.is_available() else "cpu"
    versions = {}
    for package in ("torch", "triton", "pyvae"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    machine_info["pyvae"] = dict(
        device=device, device_name=device_name(device), versions=versions,
        cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        copy_bandwidth_gbs=copy_bandwidth_gbs(device))
    if device == "cpu":  # the float32 FMA peak estimate and its formula
        peak = fma_peak(torch.get_num_threads())
        machine_info["pyvae"].update(fma_peak_gflops=peak and peak["gflops"],
                                     fma_peak_formula=peak and peak["formula"])
    exps = exp_peak(device, torch.get_num_threads())  # what kl_decomposition's G exp/s is held to
    machine_info["pyvae"].update(exp_peak_gexps=exps and exps["gexps"],
                                 exp_peak_formula=exps and exps["formula"])


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device-memory bandwidth of a large copy (bytes read + written per second)."""
    import time
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def timed(benchmark, fn, *, device, rounds, warmup=2, **info):
    """Benchmark ``fn()`` (synchronised) and record ``info`` (op, impl, shape, bytes, ...) and
    the call's peak extra memory."""
    def run():
        fn()
        synchronize(device)

    benchmark.extra_info.update(info, device=device)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    benchmark.extra_info["peak_mb"] = peak_memory_mb(run, device)
