"""The memory one call of a benchmarked function needs beyond what was allocated before it.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``). CPU: the peak of the
running sum of the allocations and frees that torch's CPU allocator reports to the profiler
(``torch.profiler.profile(profile_memory=True)``), in call order. That is exact for tensor memory
(every tensor an op, a compiled graph or a C++ kernel allocates through ATen, temporaries freed
inside one op included) and does not depend on what malloc keeps cached, unlike the resident set
size (whose high-water mark stays flat when freed heap pages are reused, and is 0 for a call
smaller than the heap's free pages). Memory a kernel takes outside torch's allocator (a C++
``std::vector`` scratch buffer) is not counted.
"""
from __future__ import annotations

import torch


def cpu_peak_bytes(fn) -> int:
    """Peak bytes of the CPU tensors that ``fn()`` allocates, live at once (0 if it allocates
    nothing). Frees of tensors allocated before the call are not reported to the profiler, so
    they do not lower the count: an upper bound of the call's net growth."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == cpu]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # > 0: an allocation, < 0: a free
        peak = max(peak, live)
    return peak


def peak_memory_mb(fn, device: str) -> float:
    """Memory one call of ``fn`` needs beyond what was allocated before it, in MB (10^6 bytes):
    the CUDA caching allocator's peak on "cuda", :func:`cpu_peak_bytes` on "cpu"."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    if device != "cpu":
        raise ValueError(f"peak_memory_mb: device must be 'cpu' or 'cuda', got {device!r}")
    return cpu_peak_bytes(fn) / 1e6
