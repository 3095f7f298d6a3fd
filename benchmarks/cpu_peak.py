"""The CPU's float32 FMA peak, estimated as cores × clock × FMA units × SIMD lanes × 2 FLOP.

The SIMD width comes from the CPU flags (/proc/cpuinfo), the FMA units per core from the vendor
and family (an assumption, stated in the formula), the cores are the threads torch uses (at most
one per physical core: hyper-threads share a core's FMA units), and the clock is measured with a
chain of dependent integer adds (one cycle each on every x86-64 core), compiled with the system
C compiler: a virtual machine's /proc/cpuinfo reports the nominal clock, below the boost clock
the cores run at (2.60 GHz reported against 3.6-3.7 GHz measured on the 2-core AMD EPYC of the
committed table). Without a C compiler or on another architecture the reported clock is used and
the formula says so.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
import time

_ADD_CHAIN = r"""
#include <stdint.h>
/* n iterations of 8 dependent adds: 8·n cycles (add latency is one cycle on x86-64 cores; the
   loop counter runs alongside on the other ALUs). */
void add_chain(uint64_t n) {
    uint64_t x = 0;
    for (uint64_t i = 0; i < n; ++i)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                         "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
}
"""


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo (None where it lacks them)."""
    cores, current = set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("physical id", "core id"):
                    current[key] = value.strip()
                elif not line.strip() and current:
                    cores.add((current.get("physical id"), current.get("core id")))
                    current = {}
        if current:
            cores.add((current.get("physical id"), current.get("core id")))
    except OSError:
        return None
    return len(cores) or None


def load_compiled(source: str, compilers: tuple[str, ...], flags: list[str],
                  suffix: str = ".c") -> ctypes.CDLL | None:
    """``source`` compiled into a shared library with the first of ``compilers`` found and
    loaded (the file may go once loaded); None without a compiler or if it fails to build."""
    compiler = next((path for path in map(shutil.which, compilers) if path), None)
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path, library = os.path.join(tmp, "source" + suffix), os.path.join(tmp, "library.so")
        with open(path, "w") as f:
            f.write(source)
        built = subprocess.run([compiler, *flags, "-shared", "-fPIC", path, "-o", library],
                               capture_output=True)
        return ctypes.CDLL(library) if built.returncode == 0 else None


def measured_clock_ghz(iterations: int = 1_000_000, repeats: int = 50) -> float | None:
    """The clock of one core in GHz from the add chain: the best of ``repeats`` runs of about
    2 ms each, short enough that some run whole between other processes' time slices on a
    shared machine (runs of 50 ms all measured 1.9-2.3 GHz there under load, 2 ms runs 3.69);
    None without a working C compiler or off x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    library = load_compiled(_ADD_CHAIN, ("cc", "gcc"), ["-O2"])
    if library is None:
        return None
    chain = library.add_chain
    chain.argtypes = [ctypes.c_uint64]
    chain(iterations // 10)  # warm-up: let the core reach its clock
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chain(iterations)
        best = min(best, time.perf_counter() - start)
    return 8 * iterations / best / 1e9


def fma_lanes_per_cycle(info: dict[str, str]) -> tuple[int, str] | None:
    """float32 FMAs per cycle per core (FMA units × SIMD lanes) and the assumption behind it."""
    flags = set(info.get("flags", "").split())
    vendor, family = info.get("vendor_id", ""), int(info.get("cpu family", "0") or 0)
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family <= 25:
            return 16, ("1 FMA unit × 16 lanes (AVX-512; AMD family 25, Zen 4, runs one 512-bit "
                        "FMA per cycle on two 256-bit pipes)")
        return 32, ("2 FMA units × 16 lanes (AVX-512; assumed 2 512-bit FMA units, as on Xeon "
                    "Scalable Gold/Platinum and AMD Zen 5; some parts have 1)")
    if "fma" in flags and "avx2" in flags:
        return 16, "2 FMA units × 8 lanes (AVX2 + FMA; assumed 2 256-bit FMA units)"
    return None


def fma_peak(threads: int) -> dict | None:
    """{"gflops": the float32 FMA peak of ``threads`` cores in GFLOP/s, "formula": how it was
    estimated, with its assumptions}; None where the CPU has no FMA instructions this knows."""
    info = cpuinfo()
    lanes = fma_lanes_per_cycle(info)
    if lanes is None:
        return None
    per_cycle, assumption = lanes
    physical = physical_cores()
    cores = min(threads, physical) if physical else threads
    reported = float(info.get("cpu MHz", "0") or 0) / 1e3
    clock = measured_clock_ghz()
    if clock is None:
        clock, source = reported, ("reported by /proc/cpuinfo, not measured: no working C "
                                   "compiler or not x86-64")
    else:
        source = f"measured, a dependent-add chain on one core; /proc/cpuinfo reports " \
                 f"{reported:.2f} GHz"
    gflops = cores * clock * per_cycle * 2
    formula = (f"{cores} cores × {clock:.2f} GHz ({source}) × {assumption} × 2 FLOP per FMA "
               f"= {gflops:.0f} GFLOP/s; assumes every core holds that clock under AVX-512/AVX2 "
               f"load")
    return dict(gflops=gflops, formula=formula)
