"""Pointwise mutual information between image areas from PixelCNN likelihoods (seed 000 §3).

For two k×k areas a and b of an image, b at offset o = (dy, dx) from a (top-left corners),

    PMI(a, b) = log p(a, b) − log p(a) − log p(b) = log p(a | b) − log p(a)      (seed Eq. 1–2)

in nats. One network, :class:`AreaPixelCNN` — a conditional :class:`pyvae.nn.PixelCNN` over the
k×k area (masked convolutions, :func:`pyvae.ops.masked_conv2d`) whose conditioning features are
computed from (b, o) by a small MLP — gives every term:

- log p̂(a | b, o): the PixelCNN conditioned on b and the offset;
- log p̂(a) and log p̂(b): the same PixelCNN with the condition switched off (b, o set to zero and
  a "present" flag 0; training drops the condition for a fraction of the pairs, so this is a
  trained unconditional model of any k×k area);
- log p̂(a, b) = log p̂(b) + log p̂(a | b, o) (the chain rule).

Hence PMI_est = log p̂(a | b, o) − log p̂(a): log p̂(b) cancels exactly and is not evaluated.
Sharing one network between the conditional and the unconditional term means that, where b
carries no information about a, the two terms come from the same weights and the estimate is
≈ 0 by construction rather than by two separately trained models happening to agree.

The experiment trains the model on random area pairs of the bundled photographs
(:class:`pyvae.data.Photos`, grayscale 64×64 crops), evaluates PMI on held-out crops for every
offset of a grid, draws the map over offsets, and checks the seed's two statements: areas
depend most on their neighbours (PMI falls with distance) and areas with edges share more
information than flat ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from torch import nn

from pyvae import viz
from pyvae.data import Photos
from pyvae.nn import PixelCNN
from pyvae.reproduce._common import LN2, Report, Table, seed_everything, split_indices
from pyvae.reproduce._plots import save_lines

SEED = "000"
SEED_TITLE = "Sixt, *An Investigation into Image Area Dependencies using Unsupervised " \
             "Learning*, MSc thesis, FU Berlin 2018"
TITLE = "Pointwise mutual information between image areas from PixelCNN likelihoods"
SUMMARY = "PMI of two image areas from a conditional PixelCNN: map over offsets, fall with distance"
CLAIM = ("The dependence between two image areas can be measured by their pointwise mutual "
         "information, pmi(x, y) = log p(x | y) − log p(x) (Eq. 1–2), with p(x) and p(x | y) "
         "approximated by PixelCNNs. \"At a smaller scale, image areas are highly dependent on "
         "their neighbors\", and \"patches containing edges share much more information than "
         "patches from the same texture\" (§3, CelebA). The seed reports no PMI values (only "
         "Figure 1, a picture of areas merged by PMI, which it judges not meaningful).")

SIZES = {
    "smoke": dict(area=2, max_offset=3, crop_size=32, grayscale=True, hidden=8, layers=1,
                  kernel_size=3, cond_channels=4, cond_hidden=16, num_bins=256, steps=3,
                  batch_size=32, lr=2e-3, null_fraction=0.25, test_crops=0.2, test_areas=8,
                  edge_quantile=0.25),
    "default": dict(area=4, max_offset=8, crop_size=64, grayscale=True, hidden=32, layers=2,
                    kernel_size=3, cond_channels=16, cond_hidden=256, num_bins=256,
                    steps=5000, batch_size=128, lr=2e-3, null_fraction=0.25, test_crops=0.2,
                    test_areas=256, edge_quantile=0.25),
}


# ---- areas and offsets ---------------------------------------------------------------------------

def offset_grid(max_offset: int, area: int) -> list[tuple[int, int]]:
    """Every offset (dy, dx) with |dy|, |dx| <= ``max_offset`` at which two ``area``×``area``
    squares do not overlap (|dy| >= area or |dx| >= area), in row-major order."""
    if area < 1 or max_offset < area:
        raise ValueError(f"offset_grid: need 1 <= area <= max_offset, got area={area}, "
                         f"max_offset={max_offset}")
    span = range(-max_offset, max_offset + 1)
    return [(dy, dx) for dy in span for dx in span if abs(dy) >= area or abs(dx) >= area]


def start_range(size: int, area: int, shifts) -> tuple[int, int]:
    """The first and last start (row or column) of an area such that the area and its partner,
    shifted by every one of ``shifts`` along this axis, lie inside an image side of ``size``."""
    low, high = max(0, -min(shifts)), size - area - max(0, max(shifts))
    if high < low:
        raise ValueError(f"start_range: an image side of {size} cannot hold {area}-pixel areas "
                         f"shifted by {min(shifts)} .. {max(shifts)}")
    return low, high


def cut_areas(images: torch.Tensor, index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
              area: int) -> torch.Tensor:
    """The ``area``×``area`` squares with top-left corners (ys[n], xs[n]) of images[index[n]].

    Args:
        images: (N, C, H, W).
        index, ys, xs: (M,) int64 tensors.

    Returns:
        (M, C, area, area).
    """
    steps = torch.arange(area, device=images.device)
    rows = (ys[:, None] + steps)[:, :, None]            # (M, k, 1)
    cols = (xs[:, None] + steps)[:, None, :]            # (M, 1, k)
    picked = images.permute(0, 2, 3, 1)[index[:, None, None], rows, cols]  # (M, k, k, C)
    return picked.permute(0, 3, 1, 2).contiguous()


@dataclass
class Pairs:
    """Area pairs: ``a`` and ``b`` (M, C, k, k), b at ``offsets[offset_index]`` from a, and the
    corners of a (``image``, ``y``, ``x``, each (M,))."""

    a: torch.Tensor
    b: torch.Tensor
    offset_index: torch.Tensor
    image: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor


def anchor_positions(images: torch.Tensor, area: int, offsets, count: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``count`` random (image, y, x) corners of area a at which the partner b fits inside the
    image for every offset, so that a has the same distribution whatever the offset."""
    offsets = np.asarray(offsets)
    y_low, y_high = start_range(images.shape[2], area, offsets[:, 0])
    x_low, x_high = start_range(images.shape[3], area, offsets[:, 1])
    image = torch.randint(len(images), (count,), generator=generator)
    y = torch.randint(y_low, y_high + 1, (count,), generator=generator)
    x = torch.randint(x_low, x_high + 1, (count,), generator=generator)
    return image, y, x


def pairs_at(images: torch.Tensor, area: int, offsets, image, y, x,
             offset_index: torch.Tensor) -> Pairs:
    """The pairs with a at (image, y, x) and b at ``offsets[offset_index]`` from it."""
    shift = torch.as_tensor(offsets, dtype=torch.long)[offset_index]
    a = cut_areas(images, image, y, x, area)
    b = cut_areas(images, image, y + shift[:, 0], x + shift[:, 1], area)
    return Pairs(a, b, offset_index, image, y, x)


def random_pairs(images: torch.Tensor, area: int, offsets, count: int,
                 generator: torch.Generator) -> Pairs:
    """``count`` pairs: a at random corners (:func:`anchor_positions`), offsets uniform."""
    image, y, x = anchor_positions(images, area, offsets, count, generator)
    offset_index = torch.randint(len(offsets), (count,), generator=generator)
    return pairs_at(images, area, offsets, image, y, x, offset_index)


def edge_strength(areas: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontally and vertically neighbouring pixels of each
    area, (M, C, k, k) -> (M,), in intensity units ([0, 1] images: 0 for a flat area, 0.5 for
    a 2×2 area whose left column is 0 and right column 1)."""
    dx = (areas[..., :, 1:] - areas[..., :, :-1]).abs().flatten(1)
    dy = (areas[..., 1:, :] - areas[..., :-1, :]).abs().flatten(1)
    return torch.cat([dx, dy], dim=1).mean(dim=1)


# ---- the model -----------------------------------------------------------------------------------

class AreaPixelCNN(nn.Module):
    """log p(a | b, offset) and log p(a) of k×k areas with values in [0, 1], in nats.

    A conditional :class:`pyvae.nn.PixelCNN` over the area a; its per-pixel conditioning
    features (N, cond_channels, k, k) are an MLP of [b centred to [-1, 1] (C·k² values),
    offset / max_offset (2 values), present (1 value)]. ``b=None`` switches the condition off
    (all inputs 0): the same network as an unconditional model of a.

    Args:
        area: k.
        channels: C.
        max_offset: the largest |dy|, |dx| (scales the offset input to [-1, 1]).
        hidden, layers, kernel_size, num_bins: the PixelCNN (width, residual blocks, odd
            kernel, intensity levels).
        cond_channels: conditioning channels per pixel.
        cond_hidden: width of the conditioning MLP.
    """

    def __init__(self, area: int, channels: int, max_offset: int, *, hidden: int, layers: int,
                 kernel_size: int, cond_channels: int, cond_hidden: int, num_bins: int):
        super().__init__()
        self.area, self.channels, self.max_offset = area, channels, max_offset
        self.cond_channels = cond_channels
        self.condition = nn.Sequential(
            nn.Linear(channels * area * area + 3, cond_hidden), nn.ReLU(),
            nn.Linear(cond_hidden, cond_channels * area * area))
        self.pixelcnn = PixelCNN(channels, hidden, layers, kernel_size, color_channels=1,
                                 cond_channels=cond_channels, num_bins=num_bins)

    def _condition_inputs(self, a: torch.Tensor, b: torch.Tensor | None,
                          offsets: torch.Tensor | None,
                          present: torch.Tensor | None) -> torch.Tensor:
        n = len(a)
        if b is None:
            return a.new_zeros(n, self.channels * self.area ** 2 + 3)
        if offsets is None or tuple(offsets.shape) != (n, 2):
            raise ValueError(f"AreaPixelCNN: offsets must be (N, 2) = ({n}, 2) with b, got "
                             f"{None if offsets is None else tuple(offsets.shape)}")
        if b.shape != a.shape:
            raise ValueError(f"AreaPixelCNN: b must have a's shape {tuple(a.shape)}, got "
                             f"{tuple(b.shape)}")
        inputs = torch.cat([(2 * b - 1).flatten(1), offsets.to(a.dtype) / self.max_offset,
                            a.new_ones(n, 1)], dim=1)
        return inputs if present is None else inputs * present.to(a.dtype)[:, None]

    def log_prob(self, a: torch.Tensor, b: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None,
                 present: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) log p̂(a | b, offsets) in nats, or log p̂(a) with ``b=None``.

        Args:
            a, b: (N, C, k, k) areas in [0, 1].
            offsets: (N, 2) offsets (dy, dx) of b from a, in pixels (with ``b``).
            present: optional (N,) bool: False rows get log p̂(a) (the condition switched
                off), True rows log p̂(a | b, offsets).
        """
        k = self.area
        cond = self.condition(self._condition_inputs(a, b, offsets, present))
        return self.pixelcnn.log_prob(a, cond.view(len(a), self.cond_channels, k, k))


def build_model(c: dict, channels: int) -> AreaPixelCNN:
    return AreaPixelCNN(c["area"], channels, c["max_offset"], hidden=c["hidden"],
                        layers=c["layers"], kernel_size=c["kernel_size"],
                        cond_channels=c["cond_channels"], cond_hidden=c["cond_hidden"],
                        num_bins=c["num_bins"])


def pair_loss(model: AreaPixelCNN, pairs: Pairs, offsets: torch.Tensor,
              null_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Mean negative log-likelihood (nats per area) of a given b, with the condition dropped for
    a random ``null_fraction`` of the pairs (they train log p̂(a))."""
    present = torch.rand(len(pairs.a), generator=generator) >= null_fraction
    device = next(model.parameters()).device
    log_p = model.log_prob(pairs.a.to(device), pairs.b.to(device),
                           offsets[pairs.offset_index].to(device), present.to(device))
    return -log_p.mean()


def train_area_model(model: AreaPixelCNN, images: torch.Tensor, offsets, *, steps: int,
                     batch_size: int, lr: float, null_fraction: float, seed: int) -> list[float]:
    """AdamW with cosine decay on fresh random pairs every step; returns the loss (nats per
    area) of every step. The model ends in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.as_tensor(offsets, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    model.train()
    losses = []
    for _ in range(steps):
        pairs = random_pairs(images, model.area, offsets, batch_size, generator)
        loss = pair_loss(model, pairs, shift, null_fraction, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ---- the estimate --------------------------------------------------------------------------------

@dataclass
class PMIEstimate:
    """PMI of ``count`` fixed anchor areas a with their partner at every offset.

    Attributes:
        pmi: (O, count) log p̂(a | b, o) − log p̂(a), nats.
        log_p_a: (count,) log p̂(a), nats.
        log_p_a_given_b: (O, count), nats.
        edges_a, edges_b: (count,) and (O, count) :func:`edge_strength` of a and of each b.
    """

    pmi: np.ndarray
    log_p_a: np.ndarray
    log_p_a_given_b: np.ndarray
    edges_a: np.ndarray
    edges_b: np.ndarray


@torch.no_grad()
def estimate_pmi(model: AreaPixelCNN, images: torch.Tensor, offsets, count: int, seed: int,
                 batch_size: int = 4096) -> PMIEstimate:
    """PMI of ``count`` random anchor areas of ``images`` (the same anchors for every offset)
    with their partner at each of ``offsets``; see :class:`PMIEstimate`."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    image, y, x = anchor_positions(images, model.area, offsets, count, generator)
    a_only = cut_areas(images, image, y, x, model.area)
    log_p_a = torch.cat([model.log_prob(part.to(device)).cpu()
                         for part in a_only.split(batch_size)])
    conditional, edges_b = [], []
    for index in range(len(offsets)):
        pairs = pairs_at(images, model.area, offsets, image, y, x,
                         torch.full((count,), index, dtype=torch.long))
        shift = torch.tensor(offsets[index], dtype=torch.long).expand(count, 2)
        conditional.append(torch.cat([
            model.log_prob(a.to(device), b.to(device), s.to(device)).cpu()
            for a, b, s in zip(pairs.a.split(batch_size), pairs.b.split(batch_size),
                               shift.split(batch_size))]))
        edges_b.append(edge_strength(pairs.b))
    log_p_a_given_b = torch.stack(conditional).double().numpy()
    log_p_a = log_p_a.double().numpy()
    return PMIEstimate(log_p_a_given_b - log_p_a[None], log_p_a, log_p_a_given_b,
                       edge_strength(a_only).numpy(), torch.stack(edges_b).numpy())


def pmi_map(offsets, values, max_offset: int) -> np.ndarray:
    """Values per offset as a (2R+1, 2R+1) map, row dy + R, column dx + R; NaN where the areas
    overlap (offsets not in the grid)."""
    side = 2 * max_offset + 1
    grid = np.full((side, side), np.nan)
    for (dy, dx), value in zip(offsets, values):
        grid[dy + max_offset, dx + max_offset] = value
    return grid


def ring_of(offsets) -> np.ndarray:
    """(O,) Euclidean distance between the area centres of each offset, rounded to pixels."""
    return np.rint(np.hypot(*np.asarray(offsets, float).T)).astype(int)


def ring_profile(offsets, pmi: np.ndarray) -> list[dict]:
    """Mean PMI by the Euclidean distance between the area centres (offsets rounded to whole
    pixels of distance): per ring ``distance``, ``offsets`` (how many), ``mean`` and ``se``.
    The pairs of one anchor are not independent, so ``se`` is the standard error over the
    anchors of each anchor's mean over the ring's offsets (nats)."""
    distance = ring_of(offsets)
    rings = []
    for d in np.unique(distance):
        per_anchor = pmi[distance == d].mean(axis=0)
        rings.append({"distance": int(d), "offsets": int((distance == d).sum()),
                      "mean": float(per_anchor.mean()),
                      "se": float(per_anchor.std(ddof=1) / math.sqrt(len(per_anchor)))})
    return rings


def distance_trend(offsets, mean_pmi: np.ndarray) -> dict:
    """Spearman correlation between each offset's centre distance and its mean PMI."""
    distance = np.hypot(*np.asarray(offsets, float).T)
    rho, p_value = scipy.stats.spearmanr(distance, mean_pmi)
    return {"spearman": float(rho), "p_value": float(p_value)}


def symmetry_gap(offsets, mean_pmi: np.ndarray) -> float:
    """Mean |PMI(o) − PMI(−o)| over the offsets (nats): 0 for an estimator that respects
    PMI(a, b) = PMI(b, a) on stationary images (the grid holds −o for every o)."""
    where = {tuple(o): k for k, o in enumerate(offsets)}
    gaps = [abs(mean_pmi[k] - mean_pmi[where[(-dy, -dx)]]) for k, (dy, dx) in enumerate(offsets)]
    return float(np.mean(gaps))


def edge_contrast(estimate: PMIEstimate, offsets, area: int, quantile: float) -> dict:
    """PMI of each anchor with its touching partners (offsets (0, ±k), (±k, 0): one side
    shared), averaged per anchor so that the anchors are independent samples, against the edge
    strength of that neighbourhood (mean :func:`edge_strength` of a and the partners): the mean
    PMI of the top and bottom ``quantile`` of anchors by edge strength, the standard error of
    their difference and the Spearman correlation of PMI with edge strength."""
    touching = np.array([max(abs(dy), abs(dx)) == area and min(abs(dy), abs(dx)) == 0
                         for dy, dx in offsets])
    pmi = estimate.pmi[touching].mean(axis=0)
    edges = (estimate.edges_a + estimate.edges_b[touching].sum(axis=0)) / (1 + touching.sum())
    low, high = np.quantile(edges, [quantile, 1 - quantile])
    flat, edgy = pmi[edges <= low], pmi[edges >= high]
    rho, p_value = scipy.stats.spearmanr(edges, pmi)
    se = math.sqrt(flat.var(ddof=1) / len(flat) + edgy.var(ddof=1) / len(edgy))
    return {"anchors": int(len(pmi)), "flat_mean": float(flat.mean()),
            "edge_mean": float(edgy.mean()), "difference_se": se,
            "spearman": float(rho), "p_value": float(p_value)}


# ---- the experiment ------------------------------------------------------------------------------

def load_crops(c: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) crops of the bundled photographs, (N, C, S, S) in [0, 1]."""
    photos = Photos(crop_size=c["crop_size"], grayscale=c["grayscale"])
    crops = torch.stack([photos[k] for k in range(len(photos))])
    train_idx, test_idx = split_indices(len(crops), c["test_crops"], seed)
    return crops[train_idx], crops[test_idx]


def judge(trend: dict, rings: list[dict], edges: dict) -> tuple[bool | None, str]:
    """The verdict on the seed's two statements, with the numbers.

    Distance: held iff the Spearman correlation of distance with the per-offset mean PMI is
    negative with p < 0.01 and the nearest ring's mean PMI exceeds the farthest ring's by more
    than twice their combined standard error. Edges: held iff touching pairs in the top
    edge-strength quantile have a mean PMI above the bottom quantile's by more than twice the
    standard error of the difference. Both: True; one: None (mixed); neither: False.
    """
    near, far = rings[0], rings[-1]
    gap_se = math.hypot(near["se"], far["se"])
    falls = (trend["spearman"] < 0 and trend["p_value"] < 0.01
             and near["mean"] - far["mean"] > 2 * gap_se)
    difference = edges["edge_mean"] - edges["flat_mean"]
    edgy = difference > 2 * edges["difference_se"]
    compared = ("more" if edgy else "less" if difference < -2 * edges["difference_se"]
                else "not clearly more")
    held = True if falls and edgy else (False if not (falls or edgy) else None)
    text = (f"PMI {'falls' if falls else 'does not fall clearly'} with distance: Spearman ρ "
            f"between centre distance and per-offset mean PMI = {trend['spearman']:.2f} "
            f"(p = {trend['p_value']:.1g}); mean PMI {near['mean']:.2f} ± {near['se']:.2f} nats at "
            f"distance {near['distance']} against {far['mean']:.2f} ± {far['se']:.2f} at "
            f"distance {far['distance']}. Anchors with strong edges share "
            f"{compared} information with their touching neighbours than flat ones: "
            f"{edges['edge_mean']:.2f} against {edges['flat_mean']:.2f} nats "
            f"(difference ± {edges['difference_se']:.2f}; Spearman ρ of PMI with edge strength "
            f"{edges['spearman']:.2f}).")
    return held, text


def save_ring_profile(path, rings: list[dict]):
    """Mean PMI against distance with ± 2 standard-error bars and the zero line."""
    fig, axes = viz._new_figure(figsize=(5.0, 3.6))
    ax = axes[0, 0]
    ax.errorbar([r["distance"] for r in rings], [r["mean"] for r in rings],
                yerr=[2 * r["se"] for r in rings], fmt="o-", markersize=4, capsize=3)
    ax.axhline(0.0, color="black", linestyle="--", linewidth=0.9)
    viz._style(ax, "mean PMI against distance (bars: ± 2 standard errors)",
               "distance between area centres (pixels)", "PMI (nats)")
    return viz.save_figure(fig, path)


def save_pictures(out, c: dict, offsets, mean_pmi: np.ndarray, rings: list[dict],
                  losses: list[float]) -> list[tuple[str, str]]:
    r = c["max_offset"]
    labels = [str(v) for v in range(-r, r + 1)]
    viz.save_heatmap(out / "pmi_map.png", pmi_map(offsets, mean_pmi, r), labels, labels,
                     f"mean PMI (nats) of {c['area']}×{c['area']} areas by offset of b from a",
                     xlabel="dx (pixels)", ylabel="dy (pixels)", colorbar_label="nats",
                     annotate=False)
    save_ring_profile(out / "pmi_by_distance.png", rings)
    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    save_lines(out / "training_loss.png", steps[window - 1:], {"loss": smooth},
               xlabel="step", ylabel="nats per area",
               title=f"training loss (running mean over {window} steps)", styles={"loss": "-"})
    return [("pmi_map.png", "Mean PMI over held-out anchor areas for every offset (dy, dx) of "
                            "the partner area; blank: the areas overlap."),
            ("pmi_by_distance.png", "Mean PMI by distance between the area centres, with ± 2 "
                                    "standard errors."),
            ("training_loss.png", "Training loss of the area PixelCNN (conditional and "
                                  "unconditional pairs mixed).")]


def run(out, config: dict, *, device, seed: int, work_dir) -> Report:
    c = config
    train_crops, test_crops = load_crops(c, seed)
    offsets = offset_grid(c["max_offset"], c["area"])
    seed_everything(seed)
    model = build_model(c, train_crops.shape[1]).to(device)
    losses = train_area_model(model, train_crops, offsets, steps=c["steps"],
                              batch_size=c["batch_size"], lr=c["lr"],
                              null_fraction=c["null_fraction"], seed=seed)
    estimate = estimate_pmi(model, test_crops, offsets, c["test_areas"], seed + 1)
    mean_pmi = estimate.pmi.mean(axis=1)
    rings = ring_profile(offsets, estimate.pmi)
    trend = distance_trend(offsets, mean_pmi)
    edges = edge_contrast(estimate, offsets, c["area"], c["edge_quantile"])
    held, finding = judge(trend, rings, edges)
    gap = symmetry_gap(offsets, mean_pmi)
    pictures = save_pictures(out, c, offsets, mean_pmi, rings, losses)

    dims = c["area"] ** 2 * train_crops.shape[1]
    marginal = float(-estimate.log_p_a.mean())
    table1 = Table(
        "PMI by distance between the area centres, held-out crops (nats; bits = nats / ln 2)",
        ["distance (px)", "offsets", "mean PMI (nats)", "± SE", "mean PMI (bits)",
         "−log p(a | b) (nats)"],
        [[ring["distance"], ring["offsets"], ring["mean"], ring["se"], ring["mean"] / LN2,
          float(-estimate.log_p_a_given_b[ring_of(offsets) == ring["distance"]].mean())]
         for ring in rings], [None, None, ".3f", ".3f", ".3f", ".2f"])
    table2 = Table(
        "The checks",
        ["quantity", "value"],
        [["−log p̂(a), mean over anchor areas (nats)", marginal],
         ["the same in bits/dim", marginal / (dims * LN2)],
         ["Spearman ρ(distance, mean PMI per offset)", trend["spearman"]],
         ["its p-value", trend["p_value"]],
         ["PMI with the touching partners, flattest quarter of anchors (nats)",
          edges["flat_mean"]],
         ["PMI with the touching partners, edgiest quarter of anchors (nats)",
          edges["edge_mean"]],
         ["standard error of that difference (nats)", edges["difference_se"]],
         ["Spearman ρ(edge strength, PMI with the touching partners)", edges["spearman"]],
         ["symmetry gap: mean |PMI(o) − PMI(−o)| (nats)", gap],
         ["smallest per-offset mean PMI (nats)", float(mean_pmi.min())]])
    notes = [
        "Estimator: one conditional PixelCNN (pyvae.nn.PixelCNN, masked convolutions of "
        "pyvae.ops.masked_conv2d) over the k×k area a, conditioned per pixel on an MLP of "
        "(b, offset, present flag). log p(a | b) = the network given b and the offset; log p(a) "
        "and log p(b) = the same network with the condition switched off (trained on a "
        f"{c['null_fraction']:.0%} share of condition-free pairs); log p(a, b) = log p(b) + "
        "log p(a | b). PMI = log p(a | b) − log p(a); log p(b) cancels and is not evaluated. "
        "This is the seed's Eq. 2 with one network for both terms instead of two PixelCNNs.",
        f"Data: scikit-learn's two sample photographs cut into "
        f"{len(train_crops) + len(test_crops)} non-overlapping {c['crop_size']}×{c['crop_size']} "
        f"crops ({'grayscale' if c['grayscale'] else 'RGB'}, 8-bit, {c['num_bins']} levels); "
        f"{len(train_crops)} for training, {len(test_crops)} held out. The seed used CelebA.",
        f"Areas {c['area']}×{c['area']}; {len(offsets)} offsets with |dy|, |dx| ≤ "
        f"{c['max_offset']} at which the areas do not overlap. Anchor areas a sit where the "
        f"partner fits for every offset, so a has the same distribution at every offset; the "
        f"estimate uses the same {c['test_areas']} held-out anchors for every offset.",
        f"Model: PixelCNN {c['layers']} residual block(s) × {c['hidden']} channels, kernel "
        f"{c['kernel_size']}, {c['cond_channels']} conditioning channels per pixel from an MLP "
        f"of width {c['cond_hidden']}; {c['steps']} AdamW steps (lr {c['lr']}, cosine decay) of "
        f"{c['batch_size']} fresh random pairs, offsets drawn uniformly.",
        "Criteria (stated before the run): distance — Spearman ρ < 0 with p < 0.01 and the "
        "nearest ring above the farthest by more than 2 standard errors (over anchors); edges — "
        "each anchor's mean PMI with its 4 touching partners, the top "
        f"{c['edge_quantile']:.0%} of anchors by edge strength (mean absolute neighbour "
        f"difference in a and the partners) above the bottom {c['edge_quantile']:.0%} by more "
        "than 2 standard errors. Edge strength does not tell edges from texture, which the "
        "seed's statement contrasts. "
        "Held = both, mixed = one. PMI estimates are differences of two model cross entropies, "
        "not bounds: a negative mean at some offset is estimation error.",
    ]
    data = {"offsets": offsets, "mean_pmi": mean_pmi, "rings": rings, "trend": trend,
            "edges": edges, "symmetry_gap": gap, "marginal_nats": marginal,
            "final_loss": float(np.mean(losses[-max(1, len(losses) // 20):])),
            "train_crops": len(train_crops), "test_crops": len(test_crops)}
    return Report([table1, table2], held, finding, pictures, notes, data)

