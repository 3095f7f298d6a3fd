"""Procedural 2-D shapes: pyvae's own re-creation of the dSprites set (Matthey et al. 2017).

Five independent generative factors, every combination rendered once:

=========== ===== =========================================================================
factor      size  meaning
=========== ===== =========================================================================
shape       3     0 = square, 1 = ellipse (axes 2:1), 2 = heart
scale       6     ``linspace(0.5, 1, 6)`` of the base size (circumradius 15.5 px at scale 1)
orientation 40    ``k / 40`` of the shape's symmetry period, counter-clockwise (see below)
pos_x       32    the shape moves right by one pixel per step
pos_y       32    the shape moves down by one pixel per step
=========== ===== =========================================================================

Orientation covers one *symmetry period* per shape: a square rotated by 90° and an ellipse rotated
by 180° are the same image, so the square turns through [0, π/2), the ellipse through [0, π) and
the heart through [0, 2π). Each of the 40 steps therefore gives a different image.

Images are 64×64, one channel, float32 in [0, 1]: the value of a pixel is the fraction of it the
shape covers (8×8 supersampling), so even sub-pixel rotations of the smallest shapes change the
image. The shape's centre lies on a pixel centre and moves by whole pixels, and at every scale and
orientation the shape lies strictly inside the canvas (it is never clipped). Together these make
the 737,280 combinations 737,280 distinct images (also after quantisation to 8 bits).

Rendering is cheap: the 3·6·40 = 720 centred sprites are rendered once per process (about a
second), and an image is a sprite pasted at its position.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pyvae._validate import check_int

_CANVAS = 64
# A sprite is a 33×33 patch whose centre is the centre of its pixel 16; pos = j puts the patch's
# top-left pixel at j, so positions 0..31 keep it inside the 64-pixel canvas.
_SPRITE = 33
# Circumradius (px) of every shape at scale 1: 15.5 < 16.5 leaves an empty 1-pixel border in the
# sprite at every orientation, which is what keeps shapes unclipped.
_RADIUS = 15.5
_SUPERSAMPLE = 8
# The heart (x² + y² − 1)³ − x²y³ ≤ 0 has its smallest enclosing circle centred at (0, 0.25) with
# radius 1.25 (the circle touches the bottom tip and both lobes).
_HEART_CENTER_Y = 0.25
_HEART_RADIUS = 1.25


def _inside(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether points (u right, v up, in units of the circumradius) lie inside shape ``shape``."""
    if shape == 0:  # square of circumradius 1
        half = 1 / math.sqrt(2)
        return (u.abs() <= half) & (v.abs() <= half)
    if shape == 1:  # ellipse, semi-axes 1 (along u) and 0.5
        return u.square() + (2 * v).square() <= 1
    x = u * _HEART_RADIUS
    y = v * _HEART_RADIUS + _HEART_CENTER_Y
    r = x.square() + y.square() - 1
    return r * r * r - x.square() * y * y * y <= 0


@functools.lru_cache(maxsize=None)
def _sprites() -> torch.Tensor:
    """All centred sprites, shape (3, 6, 40, 33, 33), float32 coverage in [0, 1]."""
    n_shapes, n_scales, n_orient = Shapes2D.factor_sizes[:3]
    s, centre = _SUPERSAMPLE, _SPRITE // 2
    sprites = torch.zeros(n_shapes, n_scales, n_orient, _SPRITE, _SPRITE)
    for k, scale in enumerate(Shapes2D.scales):
        radius = _RADIUS * scale
        # Only the centre pixel ± m can be touched by a shape of this circumradius.
        m = math.ceil(radius - 0.5)
        # Sample offsets from the centre of the middle pixel, in units of the circumradius.
        t = ((torch.arange((2 * m + 1) * s) + 0.5) / s - (m + 0.5)) / radius
        dx, dy = t.view(1, 1, -1), -t.view(1, -1, 1)  # right, up (rows grow downwards)
        for shape in range(n_shapes):
            theta = Shapes2D.orientation_periods[shape] / n_orient * torch.arange(n_orient)
            cos, sin = theta.cos().view(-1, 1, 1), theta.sin().view(-1, 1, 1)
            # Turning the shape counter-clockwise by θ = sampling it at points turned by −θ.
            hits = _inside(shape, cos * dx + sin * dy, cos * dy - sin * dx)
            coverage = hits.float().view(n_orient, 2 * m + 1, s, 2 * m + 1, s).mean(dim=(2, 4))
            sprites[shape, k, :, centre - m:centre + m + 1, centre - m:centre + m + 1] = coverage
    return sprites


class Shapes2D(Dataset):
    """The 2-D shapes set: 737,280 images of a square, ellipse or heart at every combination of
    6 scales, 40 orientations and 32 × 32 positions (see the module docstring for the geometry).

    ``dataset[i]`` is the image of flat factor index ``i`` (``np.unravel_index`` order over
    :attr:`factor_sizes`: position y varies fastest), a float32 tensor of shape (1, 64, 64) with
    values in [0, 1]. With ``size`` the data set is instead a fixed random subset of ``size``
    distinct combinations, in random order, drawn with ``seed``.

    Args:
        size: number of combinations to keep (1 .. 737,280), or ``None`` for all of them.
        seed: seed of the subset draw (ignored without ``size``).

    Attributes:
        factors: int64 array (len, 5), the factor indices of every item (computed on first use).
        targets: the same array as :attr:`factors`.
        indices: int64 array (len,) of the items' flat indices, or ``None`` for the full set.
    """

    factor_names = ("shape", "scale", "orientation", "pos_x", "pos_y")
    factor_sizes = (3, 6, 40, 32, 32)
    shape_names = ("square", "ellipse", "heart")
    #: Relative size of each scale step (of the 15.5-pixel circumradius).
    scales = tuple(np.linspace(0.5, 1.0, 6).tolist())
    #: Orientation k of shape s is ``orientation_periods[s] * k / 40`` radians.
    orientation_periods = (math.pi / 2, math.pi, 2 * math.pi)
    image_shape = (1, _CANVAS, _CANVAS)
    num_combinations = int(np.prod(factor_sizes))

    def __init__(self, size: int | None = None, seed: int = 0):
        seed = check_int(None, "seed", seed, 0)
        if size is None:
            self.indices = None
        else:
            size = check_int(None, "size", size, 1, self.num_combinations)
            rng = np.random.default_rng(seed)
            self.indices = rng.choice(self.num_combinations, size, replace=False).astype(np.int64)

    def __len__(self) -> int:
        return self.num_combinations if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.render(self.factors_of([index]))[0]

    def factors_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Factor indices of the items at dataset positions ``indices``: int64 array (n, 5)."""
        positions = np.asarray(indices)
        if positions.ndim != 1 or (positions.size and positions.dtype.kind not in "iu"):
            raise TypeError(f"indices must be a 1-D sequence of ints, got {indices!r}")
        n = len(self)
        if positions.size and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"indices out of range for a data set of {n} items: {indices!r}")
        positions = positions.astype(np.int64) % n  # negative positions count from the end
        flat = positions if self.indices is None else self.indices[positions]
        return np.stack(np.unravel_index(flat, self.factor_sizes), axis=1).astype(np.int64)

    @functools.cached_property
    def factors(self) -> np.ndarray:
        """int64 array (len, 5) of the factor indices of every item, in dataset order."""
        return self.factors_of(np.arange(len(self)))

    @property
    def targets(self) -> np.ndarray:
        """The generative factors as labels: :attr:`factors`, int64 array (len, 5)."""
        return self.factors

    @classmethod
    def flat_index(cls, factors: np.ndarray) -> np.ndarray:
        """Flat indices (int64, shape (n,)) of factor rows of shape (n, 5): inverse of unravel."""
        factors = cls._check_factors(factors)
        return np.ravel_multi_index(tuple(factors.T), cls.factor_sizes).astype(np.int64)

    @classmethod
    def sample_factors(cls, n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``n`` factor combinations drawn uniformly and independently: int64 array (n, 5).

        Args:
            n: number of rows (>= 0).
            rng: a ``numpy.random.Generator`` (advanced in place), a seed, or ``None`` (fresh
                entropy).
        """
        n = check_int(None, "n", n, 0)
        rng = np.random.default_rng(rng)
        columns = [rng.integers(0, k, size=n, dtype=np.int64) for k in cls.factor_sizes]
        return np.stack(columns, axis=1)

    @classmethod
    def render(cls, factors: np.ndarray) -> torch.Tensor:
        """Images of factor rows ``factors`` (int array (n, 5)): float32 tensor (n, 1, 64, 64)
        with values in [0, 1]."""
        factors = torch.from_numpy(cls._check_factors(factors))
        sprites = _sprites()[factors[:, 0], factors[:, 1], factors[:, 2]]
        n = len(factors)
        offsets = torch.arange(_SPRITE)
        rows = (factors[:, 4, None] + offsets)[:, :, None]
        cols = (factors[:, 3, None] + offsets)[:, None, :]
        images = torch.zeros(n, _CANVAS, _CANVAS)
        images[torch.arange(n)[:, None, None], rows, cols] = sprites
        return images.unsqueeze(1)

    @classmethod
    def _check_factors(cls, factors) -> np.ndarray:
        factors = np.asarray(factors)
        if factors.ndim != 2 or factors.shape[1] != len(cls.factor_sizes) or (
                factors.size and factors.dtype.kind not in "iu"):
            raise ValueError(f"factors must be an int array of shape (n, {len(cls.factor_sizes)}), "
                             f"got {factors.dtype} array of shape {factors.shape}")
        factors = factors.astype(np.int64)
        for column, (name, k) in enumerate(zip(cls.factor_names, cls.factor_sizes)):
            values = factors[:, column]
            if values.size and (values.min() < 0 or values.max() >= k):
                raise ValueError(f"factors[:, {column}] ({name}) must lie in [0, {k - 1}], "
                                 f"got values in [{values.min()}, {values.max()}]")
        return factors
