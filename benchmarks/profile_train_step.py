"""Where a training step's time goes: forward, backward and AdamW of each pyvae model on the
`cpu` backend (or `cuda` with --device cuda), with torch.profiler's self time of every op summed
by kind (pyvae's three ops, convolutions, matrix products, elementwise and the rest).

    python benchmarks/profile_train_step.py [--device cpu] [--steps 3] [--out FILE.md]

Prints a markdown table per model and writes them to --out. Times are means over --steps
profiled steps after one warm-up step; the shares are of the profiled (forward + backward)
self time, the optimizer's share of the whole step.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train import batch_for, model_cases
from pyvae.ops import use_backend

KINDS = [  # (kind, predicate on the op name), first match wins
    ("pyvae masked_conv2d", lambda n: n.startswith("pyvae::masked_conv2d")),
    ("pyvae reparameterize_kl", lambda n: n.startswith("pyvae::reparameterize_kl")),
    ("pyvae kl_decomposition", lambda n: n.startswith("pyvae::kl_decomposition")),
    ("conv2d (ATen/oneDNN)", lambda n: "convolution" in n or "conv2d" in n or "mkldnn" in n),
    ("matmul / linear", lambda n: n in {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul",
                                         "aten::linear"}),
    ("log_softmax / losses", lambda n: "softmax" in n or "nll" in n or "cross_entropy" in n
     or "binary_cross" in n),
]
OTHER = "elementwise, reductions, copies, autograd"


def kind_of(name: str) -> str:
    return next((kind for kind, match in KINDS if match(name)), OTHER)


def profile_model(name, make, shape, device: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = make().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = batch_for(shape).to(device)
    backend = "cuda" if device == "cuda" else "cpu"

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        model.loss(x).loss.backward()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with use_backend(backend):
        forward_backward()
        optimizer.step()  # warm-up
        sync()
        step_seconds, optimizer_seconds = 0.0, 0.0
        for _ in range(steps):
            start = time.perf_counter()
            forward_backward()
            sync()
            middle = time.perf_counter()
            optimizer.step()
            sync()
            step_seconds += time.perf_counter() - start
            optimizer_seconds += time.perf_counter() - middle
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda"
                                                else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                forward_backward()
            sync()
    by_kind: dict[str, float] = defaultdict(float)
    other: dict[str, float] = {}
    for event in prof.key_averages():
        self_time = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        ms = self_time / 1e3 / steps  # per step
        by_kind[kind_of(event.key)] += ms
        if kind_of(event.key) == OTHER:
            other[event.key] = ms
    top_other = sorted(other.items(), key=lambda item: -item[1])[:5]
    return {"name": name, "batch": shape[0], "step_ms": 1e3 * step_seconds / steps,
            "optimizer_ms": 1e3 * optimizer_seconds / steps, "by_kind": dict(by_kind),
            "top_other": top_other}


def markdown(result: dict) -> str:
    total = sum(result["by_kind"].values())
    lines = [f"**{result['name']}**, batch {result['batch']}: {result['step_ms']:.0f} ms per step, "
             f"of which AdamW {result['optimizer_ms']:.1f} ms "
             f"({100 * result['optimizer_ms'] / result['step_ms']:.0f}%)", "",
             "| forward + backward, by op kind | ms per step | share |", "|---|---|---|"]
    for kind, ms in sorted(result["by_kind"].items(), key=lambda item: -item[1]):
        if ms >= 0.005 * total:
            lines.append(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")
    lines += ["", f"largest of '{OTHER}': " + ", ".join(
        f"{op} {100 * ms / total:.0f}%" for op, ms in result["top_other"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="*", help="model names (default: all)")
    parser.add_argument("--out", help="write the tables to this markdown file")
    args = parser.parse_args()
    header = (f"Training-step profile, {args.device}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
              f"{torch.get_num_threads()} threads, load average at start "
              f"{os.getloadavg()[0]:.1f}, {datetime.date.today()}.")
    parts = [header]
    for name, make, shape in model_cases():
        if args.models and name not in args.models:
            continue
        parts.append(markdown(profile_model(name, make, shape, args.device, args.steps)))
        print(parts[-1] + "\n", flush=True)
    if args.out:
        with open(args.out, "w") as file:
            file.write("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
