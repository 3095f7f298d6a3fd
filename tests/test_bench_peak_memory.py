"""benchmarks/peak_memory.py: the CPU peak of tensor memory one call allocates."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "bench_peak_memory", os.path.join(ROOT, "benchmarks", "peak_memory.py"))
peak_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peak_memory)

N = 1_000_000  # float32 elements: 4 MB a tensor


def test_peak_counts_tensors_live_at_once():
    def fn():
        a = torch.ones(N)
        b = a + 1          # a and b live together: 8 MB
        del a
        c = b * 2          # b and c: 8 MB again, never 12
        del b, c
    assert peak_memory.cpu_peak_bytes(fn) == pytest.approx(8e6, abs=4096)


def test_peak_sees_a_temporary_freed_inside_the_call():
    assert peak_memory.cpu_peak_bytes(lambda: torch.ones(N).sum()) >= 4e6


def test_peak_counts_only_the_calls_own_allocations():
    before = [torch.ones(N)]

    def fn():
        before.pop()       # a tensor allocated before the call: its free is not seen
        torch.ones(N // 2)
    assert peak_memory.cpu_peak_bytes(fn) == pytest.approx(2e6, abs=4096)
    assert 0 <= peak_memory.cpu_peak_bytes(lambda: None) <= 4096


def test_peak_memory_mb_is_in_megabytes_and_names_a_bad_device():
    assert peak_memory.peak_memory_mb(lambda: torch.ones(N), "cpu") == pytest.approx(4.0, abs=0.01)
    with pytest.raises(ValueError, match="device"):
        peak_memory.peak_memory_mb(lambda: None, "mps")
