"""The counter-based Gaussian noise of pyvae, written in plain PyTorch.

Every backend (C++ CPU, CUDA, Triton) generates ``eps`` in its kernels from a 64-bit seed
without ever storing it; this module is the specification and the ground truth they are tested
against (see ``csrc/ops/philox.h`` for the same text next to the C++ code):

* key = (seed & 0xffffffff, seed >> 32); counter = (q, row & 0xffffffff, row >> 32, 0) for
  column group q = col // 4 of a row-major (rows, cols) view;
* (w0, w1, w2, w3) = Philox4x32-10(counter, key);
* u_k = (2·(w_k >> 9) + 1)·2⁻²⁴, strictly inside (0, 1);
* the four columns of group q get sqrt(-2 ln u0)·(cos, sin)(2π u1) and
  sqrt(-2 ln u2)·(cos, sin)(2π u3), in that order.
"""
from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a·b for uint32 values held in int64 (no 64-bit overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    part_hi, part_lo = a_hi * b, a_lo * b  # each < 2^48
    middle = part_hi + (part_lo >> 16)
    return middle >> 16, ((middle & 0xFFFF) << 16) | (part_lo & 0xFFFF)


def philox4x32_10(counter: tuple[torch.Tensor, ...],
                  key: tuple[torch.Tensor | int, torch.Tensor | int]) -> list[torch.Tensor]:
    """Philox4x32 with 10 rounds on int64 tensors (or ints, for the key) holding uint32 values."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


def unit_uniform(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 uniforms in (0, 1), exactly as the kernels do."""
    return ((words >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def philox_normal(seed: torch.Tensor | int, rows: int, cols: int, *, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """The (rows, cols) standard-normal noise that the kernels generate for ``seed``.

    ``seed`` is the one-element int64 tensor the ops draw (or a Python int). The normals are
    computed in float64 from the exact uniforms and rounded once to ``dtype``. No host sync.
    """
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([(seed + 2**63) % 2**64 - 2**63], dtype=torch.int64)
    device = seed.device if device is None else torch.device(device)
    seed = seed.reshape(()).to(device)
    groups = (cols + 3) // 4
    row = torch.arange(rows, dtype=torch.int64, device=device)[:, None].expand(rows, groups)
    group = torch.arange(groups, dtype=torch.int64, device=device)[None, :].expand(rows, groups)
    # Arithmetic shift then mask: the two's-complement words of the signed 64-bit seed.
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    words = philox4x32_10((group, row & _MASK32, row >> 32, torch.zeros_like(row)), key)
    u = [unit_uniform(word).to(torch.float64) for word in words]
    radius_a = torch.sqrt(-2.0 * torch.log(u[0]))
    radius_b = torch.sqrt(-2.0 * torch.log(u[2]))
    angle_a, angle_b = (2.0 * math.pi) * u[1], (2.0 * math.pi) * u[3]
    eps = torch.stack([radius_a * torch.cos(angle_a), radius_a * torch.sin(angle_a),
                       radius_b * torch.cos(angle_b), radius_b * torch.sin(angle_b)], dim=-1)
    return eps.reshape(rows, groups * 4)[:, :cols].to(dtype)
