"""The device's exponential throughput, the limit of kl_decomposition's B²·D pair exponentials.

CPU: measured. The kernel's own exp2 polynomial (csrc/ops/cpu/vec_math.h) runs in the loop of
the kernel's logsumexp (sum += exp2(x[j] - shift)) over an L1-resident buffer, in one thread per
core torch uses, compiled with the system C++ compiler for the host (-O3 -march=native): the most
exponentials per second the kernel's second pass could reach. It is a peak for that polynomial,
not for the hardware; None without a compiler.

CUDA: a formula, not a measurement: SMs × 16 MUFU.EX2 results per clock per SM (the
special-function units of compute capability 7.x-9.x, CUDA C Programming Guide, "Arithmetic
Instructions") × the SM clock that NVML reports as the maximum.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

from cpu_peak import load_compiled, physical_cores

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SHIFTED_SUM = r"""
#include "ops/cpu/vec_math.h"
/* reps passes of the kernel's shifted sum over n floats; the sum is returned so that nothing
   is optimised away. */
extern "C" float shifted_sum(const float* x, long n, long reps) {
  float total = 0.0f;
  for (long r = 0; r < reps; ++r) {
    float lane[16] = {};
    for (long j = 0; j + 16 <= n; j += 16)
      for (int k = 0; k < 16; ++k) lane[k] += pyvae::cpu::exp2_f32(x[j + k] - 1.0f);
    for (int k = 0; k < 16; ++k) total += lane[k];
  }
  return total;
}
"""


def cpu_exp_peak(threads: int, *, n: int = 2048, reps: int = 2000, repeats: int = 5) -> dict | None:
    """{"gexps": exp2 per second (×1e9) of ``threads`` concurrent shifted-sum loops (at most one per
    physical core), "formula": how}; None without a working C++ compiler."""
    library = load_compiled(_SHIFTED_SUM, ("c++", "g++"),
                            ["-O3", "-march=native", "-I", os.path.join(_ROOT, "csrc")], ".cpp")
    if library is None:
        return None
    physical = physical_cores()
    cores = min(threads, physical) if physical else threads
    shifted_sum = library.shifted_sum  # ctypes releases the GIL during a call
    shifted_sum.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    shifted_sum.restype = ctypes.c_float
    buffers = [(ctypes.c_float * n)(*[-(j % 97) / 7.0 for j in range(n)]) for _ in range(cores)]
    shifted_sum(buffers[0], n, reps // 10)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=shifted_sum, args=(b, n, reps)) for b in buffers]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    gexps = cores * n * reps / best / 1e9
    return dict(gexps=gexps, formula=(
        f"measured: the kernel's exp2 polynomial (vec_math.h) in its shifted-sum loop over "
        f"L1-resident data, {cores} thread(s) = {gexps:.1f} G exp/s"))


def cuda_exp_peak() -> dict | None:
    """{"gexps", "formula"} from the SM count and NVML's maximum SM clock; None without NVML."""
    import torch
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        clock_ghz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) / 1e3
    except Exception:  # no NVML binding or no NVML: no clock to put in the formula
        return None
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    gexps = sms * 16 * clock_ghz
    return dict(gexps=gexps, formula=(
        f"formula, not measured: {sms} SMs × 16 MUFU.EX2 per clock × {clock_ghz:.2f} GHz "
        f"(NVML max SM clock) = {gexps:.0f} G exp/s"))


def exp_peak(device: str, threads: int) -> dict | None:
    return cuda_exp_peak() if device == "cuda" else cpu_exp_peak(threads)
