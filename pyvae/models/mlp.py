"""The fully-connected encoder and decoder Chen et al. (2018) used for the 2-D shapes: two
1200-unit ReLU layers in the encoder, three 1200-unit tanh layers in the decoder, over the
flattened image (the kind of network the β-VAE literature measured disentanglement on for these
shapes).
"""
from __future__ import annotations

import torch
from torch import nn


class MLPEncoder(nn.Module):
    """Image (B, C, H, W) in [0, 1] -> (B, hidden) features: Linear + ReLU, twice."""

    def __init__(self, channels: int, image_size: tuple[int, int], hidden: int = 1200) -> None:
        super().__init__()
        pixels = channels * image_size[0] * image_size[1]
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU())
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """Latent (B, D) -> decoder output (B, out_channels, H, W): three Linear + tanh layers and
    a linear output layer."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: tuple[int, int],
                 hidden: int = 1200) -> None:
        super().__init__()
        self.out_shape = (out_channels, *image_size)
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(3):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(hidden, out_channels * image_size[0] * image_size[1]))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.out_shape)
