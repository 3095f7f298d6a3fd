"""Why kl_decomposition keeps the direct form of its joint term: the accuracy and the cost of the
expanded-square (GEMM) form, measured against the float64 reference.

The joint term sum_d ell_ijd needs sum_d (z_id - mu_jd)^2 a_jd (a = exp(-logvar)). Expanded,
with a centre m_d (the batch mean of mu) subtracted from z and mu,

    sum_d (zc_id^2 a_jd - 2 zc_id muc_jd a_jd + muc_jd^2 a_jd) = [zc^2, zc, 1]_i . [a, -2 muc a, sum_d muc^2 a]_j

is one (B x 2D+1)(2D+1 x B) matrix product. Its three terms are each of size a·spread^2 and cancel
down to a·(z - mu)^2, which is small for the pairs that matter (j near i): the rounding error of
the product is that of the large terms. This script measures, per regime of posteriors, the
largest |log q(z_i)| error in nats of

  * the cpu kernel (the direct form, float32 arithmetic),
  * the expanded form as a float32 matrix product (what tf32x3 or a 3xbf16 split can at best
    reach: they emulate float32 products),
  * the expanded form as a float64 matrix product,

and the time of the cpu kernel's forward against that of the float32 and float64 products alone
(the joint term only, without the per-dimension marginals the kernel also computes).

    python benchmarks/kl_joint_gemm_accuracy.py [--out FILE.md]
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import torch

from pyvae.ops import kl_decomposition, kl_decomposition_reference, use_backend

LOG_2PI = math.log(2 * math.pi)
DATASET_SIZE = 10**5
REGIMES = {  # name: logvar of a (B, D) batch; mu ~ 2 N(0, 1)
    "logvar ~ 0.5 N(0, 1)": lambda mu: 0.5 * torch.randn_like(mu),
    "logvar in [-6, 0] (trained VAE)": lambda mu: -6 * torch.rand_like(mu),
    "logvar in [-12, -8] (narrow)": lambda mu: -8 - 4 * torch.rand_like(mu),
    "logvar in [-20, 20] (extreme)": lambda mu: 40 * torch.rand_like(mu) - 20,
}
SHAPES = [(256, 10), (1024, 32)]


def expanded_joint(z, mu, logvar):
    """(B, B) sum_d ell_ijd as one matrix product of the centred expanded square, in z's dtype."""
    centre = mu.mean(0)
    zc, muc, a = z - centre, mu - centre, torch.exp(-logvar)
    rows = torch.cat([zc * zc, zc, torch.ones_like(zc[:, :1])], 1)
    const = (-0.5 * (LOG_2PI + logvar + a * muc * muc)).sum(1, keepdim=True)
    cols = torch.cat([-0.5 * a, a * muc, const], 1)
    return rows @ cols.T


def log_qz_from_joint(joint, estimator_weights):
    return torch.logsumexp(joint.double() + estimator_weights, 1)


def mss_weights(batch):
    from pyvae.ops.kl_decomposition import mss_log_weights
    return mss_log_weights(batch, DATASET_SIZE)


def seconds(fn, min_time=0.5):
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_time:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def measure(regime, batch, dim, seed=0):
    torch.manual_seed(seed)
    mu = 2 * torch.randn(batch, dim, dtype=torch.float64)
    logvar = REGIMES[regime](mu)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    exact = kl_decomposition_reference(z, mu, logvar, DATASET_SIZE, estimator="mss").log_qz
    f32 = [t.float() for t in (z, mu, logvar)]
    with use_backend("cpu"):
        kernel = kl_decomposition(*f32, DATASET_SIZE, estimator="mss").log_qz
    weights = mss_weights(batch)
    error = lambda log_qz: (log_qz.double() - exact).abs().max().item()  # noqa: E731
    row = dict(regime=regime, shape=f"{batch}x{dim}", kernel=error(kernel),
               gemm32=error(log_qz_from_joint(expanded_joint(*f32), weights)),
               gemm64=error(log_qz_from_joint(expanded_joint(z, mu, logvar), weights)))
    if regime == next(iter(REGIMES)):  # timings do not depend on the values
        def forward():
            with use_backend("cpu"):
                kl_decomposition(*f32, DATASET_SIZE, estimator="mss")
        row.update(kernel_ms=1e3 * seconds(forward),
                   gemm32_ms=1e3 * seconds(lambda: expanded_joint(*f32)),
                   gemm64_ms=1e3 * seconds(lambda: expanded_joint(z, mu, logvar)))
    return row


def report(rows) -> str:
    lines = [f"# The joint term as a GEMM: accuracy and cost ({datetime.date.today()})", "",
             f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} "
             f"threads, torch {torch.__version__}; `python benchmarks/kl_joint_gemm_accuracy.py`. "
             "Largest |log q(z_i)| error against the float64 reference, in nats (MSS, "
             f"N = {DATASET_SIZE}, mu ~ 2 N(0, 1), z drawn from its own posterior).", "",
             "| posteriors | B×D | cpu kernel (direct, float32) | expanded GEMM float32 "
             "| expanded GEMM float64 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['shape']} | {r['kernel']:.1e} | {r['gemm32']:.1e} "
                     f"| {r['gemm64']:.1e} |")
    lines += ["", "Time of the cpu kernel's whole forward (joint and all D marginals) against the "
              "expanded GEMM's joint term alone (torch.mm, same threads):", "",
              "| B×D | cpu kernel forward ms | GEMM float32 ms | GEMM float64 ms |",
              "|---|---|---|---|"]
    for r in rows:
        if "kernel_ms" in r:
            lines.append(f"| {r['shape']} | {r['kernel_ms']:.3f} | {r['gemm32_ms']:.3f} | "
                         f"{r['gemm64_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args()
    rows = [measure(regime, b, d) for regime in REGIMES for b, d in SHAPES]
    text = report(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
