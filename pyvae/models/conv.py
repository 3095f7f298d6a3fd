"""The convolutional encoder and decoder of Higgins et al. (2017), adapted to any image size.

For 64×64 images this is exactly the β-VAE paper's network: four 4×4 stride-2 convolutions
(32, 32, 64, 64 channels), a 256-unit layer, and the mirror image for the decoder. Smaller images
use fewer stride-2 layers (one per halving until the map is at most 4×4), larger ones more.
"""
from __future__ import annotations

import torch
from torch import nn

WIDTHS = (32, 32, 64, 64, 64, 64, 64, 64)


def check_image_size(owner: str, image_size) -> tuple[int, int]:
    """``image_size`` as (H, W) from an int or a pair, with a clear error."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"{owner}: image_size must be a positive int or (H, W), "
                         f"got {image_size!r}")
    return size


def feature_sizes(image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 layer: halve (floor) while both sides exceed 4."""
    sizes = [image_size]
    while min(sizes[-1]) > 4 and len(sizes) <= len(WIDTHS):
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    return sizes


class ConvEncoder(nn.Module):
    """Image (B, C, H, W) in [0, 1] -> (B, hidden) features, ReLU after every layer."""

    def __init__(self, channels: int, image_size: tuple[int, int], hidden: int = 256) -> None:
        super().__init__()
        sizes = feature_sizes(image_size)
        layers: list[nn.Module] = []
        in_ch = channels
        for index in range(len(sizes) - 1):
            layers += [nn.Conv2d(in_ch, WIDTHS[index], 4, stride=2, padding=1), nn.ReLU()]
            in_ch = WIDTHS[index]
        h, w = sizes[-1]
        layers += [nn.Flatten(), nn.Linear(in_ch * h * w, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centred input: zero padding then reads as mid-grey.
        return self.net(2.0 * x - 1.0)


class ConvDecoder(nn.Module):
    """Latent (B, D) -> decoder output (B, out_channels, H, W), the mirror of ConvEncoder.

    Transposed 4×4 stride-2 convolutions double the size; ``output_padding`` restores the odd
    sizes the encoder floored away, so the output is exactly ``image_size``.
    """

    def __init__(self, latent_dim: int, out_channels: int, image_size: tuple[int, int],
                 hidden: int = 256) -> None:
        super().__init__()
        sizes = feature_sizes(image_size)
        depth = len(sizes) - 1
        widths = list(WIDTHS[:depth])
        h, w = sizes[-1]
        first = widths[-1] if widths else out_channels
        self.start_shape = (first, h, w)
        layers: list[nn.Module] = [nn.Linear(latent_dim, hidden), nn.ReLU(),
                                   nn.Linear(hidden, first * h * w)]
        self.fc = nn.Sequential(*layers)
        ups: list[nn.Module] = []
        for index in reversed(range(depth)):
            out_ch = widths[index - 1] if index > 0 else out_channels
            target_h, target_w = sizes[index]
            src_h, src_w = sizes[index + 1]
            ups += [nn.ReLU(), nn.ConvTranspose2d(
                widths[index], out_ch, 4, stride=2, padding=1,
                output_padding=(target_h - 2 * src_h, target_w - 2 * src_w))]
        self.up = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.fc(z).view(-1, *self.start_shape))
