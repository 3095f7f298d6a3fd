"""Observation models p(x | z) for images with values in [0, 1].

A likelihood turns the decoder's output ("params", (B, C·P, H, W) with P values per subpixel)
into a per-example negative log-likelihood in nats and a reconstruction (the distribution's
mean or mode).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian", "categorical")


class Likelihood(nn.Module):
    """p(x | decoder output) for images (B, C, H, W) in [0, 1].

    Args:
        kind: ``"bernoulli"`` (binary or [0, 1] data; the decoder gives one logit per subpixel;
            the NLL is the binary cross entropy, exact for binary data), ``"gaussian"`` (one
            mean per subpixel, a learned log-scale per channel; a density, so the NLL can be
            negative) or ``"categorical"`` (``num_bins`` logits per subpixel over the levels
            ``round(x · (num_bins - 1))``; a proper discrete likelihood, reported in nats and
            comparable across models as bits/dim).
        channels: C.
        num_bins: K levels for ``"categorical"`` (256: 8-bit images).

    Shapes:
        params (B, C·P, H, W) with P = :attr:`params_per_subpixel`; x (B, C, H, W) -> nll (B,).
    """

    def __init__(self, kind: str, channels: int, num_bins: int = 256) -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ValueError(f"likelihood: unknown kind {kind!r}; choose one of {LIKELIHOODS}")
        self.kind, self.channels, self.num_bins = kind, channels, num_bins
        self.log_scale = (nn.Parameter(torch.full((channels,), math.log(0.1)))
                          if kind == "gaussian" else None)

    @property
    def params_per_subpixel(self) -> int:
        return self.num_bins if self.kind == "categorical" else 1

    def _logits(self, params: torch.Tensor) -> torch.Tensor:
        b, _, h, w = params.shape
        return params.reshape(b, self.channels, self.num_bins, h, w)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each image, summed over its subpixels: (B,) nats."""
        params = params.float()
        x = x.float()
        if self.kind == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        elif self.kind == "gaussian":
            log_scale = self.log_scale.view(1, -1, 1, 1)
            nll = (0.5 * ((x - params) * torch.exp(-log_scale)) ** 2 + log_scale
                   + 0.5 * math.log(2 * math.pi))
        else:
            levels = torch.round(x.clamp(0, 1) * (self.num_bins - 1)).long()
            logits = self._logits(params)
            nll = F.cross_entropy(logits.transpose(1, 2), levels, reduction="none")
        return nll.flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The reconstruction (B, C, H, W) in [0, 1]: the mean (Bernoulli, Gaussian, clamped) or
        the expected level (categorical)."""
        if self.kind == "bernoulli":
            return torch.sigmoid(params)
        if self.kind == "gaussian":
            return params.clamp(0, 1)
        probs = torch.softmax(self._logits(params).float(), dim=2)
        levels = torch.arange(self.num_bins, device=params.device, dtype=probs.dtype)
        return (probs * levels.view(1, 1, -1, 1, 1)).sum(2) / (self.num_bins - 1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, channels={self.channels}" + (
            f", num_bins={self.num_bins}" if self.kind == "categorical" else "")
