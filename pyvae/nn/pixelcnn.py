"""A conditional PixelCNN (van den Oord et al. 2016) with a discrete (categorical) likelihood.

This is the autoregressive decoder of the patch VAE p|i (seed 000 §5): each i×i
block is modelled pixel by pixel, channel group by channel group, conditioned on per-pixel
features that the VAE decoder computes from z. All log-likelihoods are in nats;
:func:`bits_per_dim` converts them to bits per dimension.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyvae._validate import check_int
from pyvae.nn.masked_conv import MaskedConv2d, check_groups, check_kernel_size


def bits_per_dim(log_prob: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Negative log-likelihood in bits per dimension: ``-log_prob / (num_dims · ln 2)``.

    Args:
        log_prob: log-likelihoods in nats, any shape (e.g. (N,) from :meth:`PixelCNN.log_prob`).
        num_dims: the number of dimensions (subpixels) each log-likelihood covers, C·H·W.

    Returns:
        A tensor of ``log_prob``'s shape, in bits per dimension.
    """
    num_dims = check_int("bits_per_dim", "num_dims", num_dims, 1)
    return -log_prob / (num_dims * math.log(2.0))


class PixelCNNBlock(nn.Module):
    """Residual block of type-B masked convolutions with optional per-pixel conditioning.

    ``h + conv1x1(relu(conv_kxk(relu(h)) + cond_features))``: both convolutions are type B, so
    hidden channel group g at a pixel still depends only on earlier pixels and on the input
    channel groups before g at the same pixel (the type-A first layer excluded group g itself).

    Args:
        channels: F, hidden channels, a multiple of ``color_channels``.
        kernel_size: odd k of the spatial convolution.
        color_channels: G, the number of channel groups.

    Shapes:
        h (N, F, H, W), cond_features None or broadcastable to (N, F, H, W) -> (N, F, H, W).
    """

    def __init__(self, channels: int, kernel_size: int, *, color_channels: int) -> None:
        super().__init__()
        self.conv = MaskedConv2d(channels, channels, kernel_size, mask_type="B",
                                 color_channels=color_channels)
        self.mix = MaskedConv2d(channels, channels, 1, mask_type="B",
                                color_channels=color_channels)

    def forward(self, h: torch.Tensor, cond_features: torch.Tensor | None = None) -> torch.Tensor:
        t = self.conv(F.relu(h))
        if cond_features is not None:
            t = t + cond_features
        return h + self.mix(F.relu(t))


class PixelCNN(nn.Module):
    """Conditional PixelCNN over images with values in [0, 1] quantised to ``num_bins`` levels.

    Architecture: a type-A k×k masked convolution (C -> F), ``num_layers``
    :class:`PixelCNNBlock` residual blocks (type-B k×k then 1×1), and a type-B 1×1 output
    convolution (F -> C·num_bins) after a ReLU. Optional conditioning features ``cond`` (N,
    cond_channels, H, W) are projected by one 1×1 :class:`torch.nn.Conv2d` and added after the
    first layer and inside every block; they are not masked, because they are computed from
    z, not from the pixels being modelled.

    Ordering: raster order over pixels; at a pixel, the C channels are split into
    G = ``color_channels`` contiguous groups (R, G, B for G = C = 3), generated in order. The
    logits of a channel in group g at pixel (h, w) depend only on the pixels before (h, w) in
    raster order and on the channels of groups < g at (h, w) itself; the channels of one group
    (all C of them for G = 1) are conditionally independent given that context. Hidden and
    output channel counts are split into the same G groups so that the masks carry this
    ordering through the network; output group g holds the logits of input group g. As in the
    original PixelCNN, stacked masked convolutions leave a blind spot (part of the context
    above and to the right is never seen); this costs likelihood, not correctness.

    ``forward`` is a fixed number of convolutions over the whole batch (no per-pixel loops), so
    tiny images (3×3, 5×5 patch blocks) with batches of hundreds of thousands cost a few
    large convolutions; only :meth:`sample` iterates over pixels.

    Args:
        in_channels: C, channels of the modelled images, a multiple of ``color_channels``.
        hidden_channels: F, width of the network, a multiple of ``color_channels``.
        num_layers: number of residual blocks after the first layer (>= 0).
        kernel_size: odd k of the first layer and of the blocks' spatial convolutions.
        color_channels: G, the number of channel groups modelled autoregressively within a
            pixel (keyword only, required: 1 for grey or for independent channels, 3 for RGB).
        cond_channels: channels of the conditioning features; 0 (default) for none.
        num_bins: K >= 2, the number of intensity levels; value v in [0, 1] is level
            ``round(v · (K - 1))`` (K = 256: 8-bit images).

    Shapes:
        x (N, C, H, W) in [0, 1], cond (N, cond_channels, H, W) -> logits (N, C, K, H, W).
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_layers: int,
                 kernel_size: int, *, color_channels: int, cond_channels: int = 0,
                 num_bins: int = 256) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_int(owner, "in_channels", in_channels, 1)
        self.hidden_channels = check_int(owner, "hidden_channels", hidden_channels, 1)
        self.num_layers = check_int(owner, "num_layers", num_layers, 0)
        self.kernel_size = check_kernel_size(owner, kernel_size)
        self.color_channels = check_groups(owner, color_channels, in_channels=in_channels,
                                           hidden_channels=hidden_channels)
        self.cond_channels = check_int(owner, "cond_channels", cond_channels, 0)
        self.num_bins = check_int(owner, "num_bins", num_bins, 2)
        k, groups = self.kernel_size, self.color_channels

        self.input_conv = MaskedConv2d(in_channels, hidden_channels, k, mask_type="A",
                                       color_channels=groups)
        self.blocks = nn.ModuleList(
            PixelCNNBlock(hidden_channels, k, color_channels=groups) for _ in range(num_layers))
        # Output channel o = c·K + b holds the logit of level b of input channel c, so the
        # contiguous group g of the C·K outputs is exactly the logits of input group g.
        self.output_conv = MaskedConv2d(hidden_channels, in_channels * num_bins, 1,
                                        mask_type="B", color_channels=groups)
        # One projection for the first layer and every block: a single GEMM over the batch.
        self.cond_proj = (nn.Conv2d(cond_channels, hidden_channels * (num_layers + 1), 1)
                          if cond_channels else None)

    @property
    def receptive_rows(self) -> int:
        """How many rows above a pixel its logits can depend on: k // 2 per k×k layer."""
        return (self.num_layers + 1) * (self.kernel_size // 2)

    def _check_inputs(self, method: str, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        owner = f"{type(self).__name__}.{method}"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{owner}: x must have shape (N, {self.in_channels}, H, W), "
                             f"got {shape}")
        self._check_cond(owner, cond, x.shape[0], x.shape[2], x.shape[3])

    def _check_cond(self, owner: str, cond: torch.Tensor | None, n: int, h: int, w: int) -> None:
        if self.cond_channels == 0:
            if cond is not None:
                raise ValueError(f"{owner}: got cond but the model was built with "
                                 f"cond_channels=0")
            return
        expected = (n, self.cond_channels, h, w)
        if cond is None:
            raise ValueError(f"{owner}: the model was built with cond_channels="
                             f"{self.cond_channels}; pass cond of shape {expected}")
        if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != expected:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"{owner}: cond must have shape {expected} (N, cond_channels, H, "
                             f"W), got {shape}")

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every subpixel given the ones before it.

        Args:
            x: images (N, C, H, W) with values in [0, 1], normally quantised (level / (K - 1)),
                in the parameters' dtype.
            cond: conditioning features (N, cond_channels, H, W), required iff
                ``cond_channels > 0``.

        Returns:
            Unnormalised log-probabilities (N, C, K, H, W) of the K levels of each subpixel.
        """
        return self.forward_head(self.forward_features(x, cond))

    def forward_features(self, x: torch.Tensor, cond: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """The causal hidden features that the output layer reads, (N, F, H, W), after ReLU.

        Same arguments as :meth:`forward`. Feature group g at a pixel depends on the earlier
        pixels and on the input channel groups < g of the pixel itself.
        """
        self._check_inputs("forward", x, cond)
        # Centre the input so that zero padding reads as mid-grey rather than as black.
        h = self.input_conv(2.0 * x - 1.0)
        if self.cond_proj is not None:
            cond_features = self.cond_proj(cond).chunk(self.num_layers + 1, dim=1)
            h = h + cond_features[0]
        for index, block in enumerate(self.blocks):
            h = block(h, None if self.cond_proj is None else cond_features[index + 1])
        return F.relu(h)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, K, H', W') from features (N, F, H', W') of any H' × W' crop: the output
        layer is 1×1, so :meth:`sample` applies it to the one pixel it draws."""
        n, _, height, width = features.shape
        logits = self.output_conv(features)
        return logits.reshape(n, self.in_channels, self.num_bins, height, width)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The int64 levels ``round(x · (K - 1))`` of ``x``, clamped to [0, 1] first."""
        return torch.round(x.clamp(0.0, 1.0) * (self.num_bins - 1)).long()

    def log_prob(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood of each image under the model, in nats.

        ``x`` is quantised to levels ``round(x · (K - 1))``, the model reads the quantised
        image, and the result is the sum over all C·H·W subpixels of the categorical
        log-probability of the observed level. Differentiable with respect to the parameters
        (and ``cond``), not ``x``.

        Args:
            x: images (N, C, H, W) with values in [0, 1].
            cond: conditioning features (N, cond_channels, H, W), required iff
                ``cond_channels > 0``.

        Returns:
            (N,) log-likelihoods in nats (use :func:`bits_per_dim` with C·H·W for bits/dim).
        """
        self._check_inputs("log_prob", x, cond)
        levels = self.quantize(x)
        x_q = levels.to(self.input_conv.weight.dtype) / (self.num_bins - 1)
        logits = self(x_q, cond)
        # cross_entropy takes the classes on dim 1: (N·C, K, H, W) is a view of the logits.
        nll = F.cross_entropy(logits.flatten(0, 1), levels.flatten(0, 1), reduction="none")
        return -nll.unflatten(0, levels.shape[:2]).sum(dim=(1, 2, 3))

    bits_per_dim = staticmethod(bits_per_dim)

    @torch.no_grad()
    def sample(self, shape: Sequence[int], cond: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw images from the model, pixel by pixel in raster order, group by group.

        Every step runs :meth:`forward_features` on the rows that can influence the current
        row (the last ``receptive_rows + 1``) and :meth:`forward_head` on the current pixel
        only, so a step costs O(receptive_rows · W) pixels of work, not O(H · W); the logits
        are exactly those of the full image because the network is causal.

        Args:
            shape: (N, C, H, W) with C = ``in_channels``.
            cond: conditioning features (N, cond_channels, H, W), required iff
                ``cond_channels > 0``.
            generator: optional :class:`torch.Generator` on the parameters' device, for
                reproducible samples.

        Returns:
            (N, C, H, W) images in the parameters' dtype with values ``level / (K - 1)`` in
            [0, 1] (feed them to :meth:`log_prob` to score them).
        """
        owner = f"{type(self).__name__}.sample"
        shape = tuple(shape)
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"{owner}: shape must be (N, {self.in_channels}, H, W), "
                             f"got {shape}")
        n, c, height, width = (check_int(owner, "shape", s, 0) for s in shape)
        self._check_cond(owner, cond, n, height, width)
        weight = self.input_conv.weight
        x = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        if x.numel() == 0:
            return x
        per_group = c // self.color_channels
        for i in range(height):
            rows = slice(max(0, i - self.receptive_rows), i + 1)
            cond_rows = None if cond is None else cond[:, :, rows]
            for j in range(width):
                for g in range(self.color_channels):
                    channels = slice(g * per_group, (g + 1) * per_group)
                    features = self.forward_features(x[:, :, rows], cond_rows)
                    logits = self.forward_head(features[:, :, -1:, j:j + 1])
                    logits = logits[:, channels, :, 0, 0]  # (N, C / G, K)
                    probs = torch.softmax(logits.float(), dim=-1).reshape(-1, self.num_bins)
                    levels = torch.multinomial(probs, 1, generator=generator)
                    x[:, channels, i, j] = levels.view(n, per_group).to(x.dtype) / (
                        self.num_bins - 1)
        return x

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, hidden_channels={self.hidden_channels}, "
                f"num_layers={self.num_layers}, kernel_size={self.kernel_size}, "
                f"color_channels={self.color_channels}, cond_channels={self.cond_channels}, "
                f"num_bins={self.num_bins}")
