"""The capacity autoencoder of seed 000 §4.1: Z = f(X) + ε with a fixed Gaussian noise level.

f is batch-normalised so every latent dimension has variance s² (without it the encoder
could outshout the noise), which bounds the information Z carries about X by the capacity
of an additive white Gaussian noise channel: C = k/2 · log2(1 + s²/n²) bits.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pyvae.models.base import BaseVAE, ModelOutput, register
from pyvae.models.conv import ConvDecoder, ConvEncoder, check_image_size
from pyvae.models.likelihoods import Likelihood
from pyvae.models.vae import check_images
from pyvae._validate import check_int
from pyvae.ops.reparameterize_kl import reparameterize_kl


def gaussian_channel_capacity_bits(dims: int, signal_std: float, noise_std: float) -> float:
    """C = k/2 · log2(1 + s²/n²): the capacity in bits of k parallel Gaussian channels with
    signal variance s² and noise variance n²."""
    return 0.5 * dims * math.log2(1.0 + (signal_std / noise_std) ** 2)


@register
class CapacityAE(BaseVAE):
    """Autoencoder with a fixed-capacity Gaussian bottleneck: z = s · BN(f(x)) + n · ε.

    The loss is the distortion alone (the capacity is fixed by construction); ``rate_bits``
    reports the capacity bound C = k/2 · log2(1 + s²/n²) for every example (also in
    ``terms["capacity_bits"]``). The noise comes from :func:`pyvae.ops.reparameterize_kl`
    with logvar = log n².

    Args:
        latent_dim: k.
        noise_std: n > 0.
        channels, image_size, likelihood, num_bins, hidden: as for :class:`~pyvae.models.VAE`.
        signal_std: s > 0, the standard deviation every latent dimension is normalised to.

    Shapes:
        x (B, C, H, W); ``encode`` -> mu = s·BN(f(x)), logvar = log n² (B, k); ``decode`` ->
        likelihood parameters (B, C·P, H, W).
    """

    def __init__(self, latent_dim: int, noise_std: float, channels: int, image_size,
                 signal_std: float = 1.0, likelihood: str = "bernoulli", num_bins: int = 256,
                 hidden: int = 256) -> None:
        super().__init__()
        owner = type(self).__name__
        self.latent_dim = check_int(owner, "latent_dim", latent_dim, 1)
        self.channels = check_int(owner, "channels", channels, 1)
        self.image_size = check_image_size(owner, image_size)
        if not noise_std > 0 or not signal_std > 0:
            raise ValueError(f"{owner}: noise_std and signal_std must be > 0, got "
                             f"noise_std={noise_std}, signal_std={signal_std}")
        self.noise_std, self.signal_std = float(noise_std), float(signal_std)
        self._remember(latent_dim=latent_dim, noise_std=self.noise_std, channels=channels,
                       image_size=list(self.image_size), signal_std=self.signal_std,
                       likelihood=likelihood, num_bins=num_bins, hidden=hidden)
        self.encoder = nn.Sequential(ConvEncoder(channels, self.image_size, hidden),
                                     nn.Linear(hidden, latent_dim),
                                     # A tiny eps: the variance must be s², not s²·v/(v + eps).
                                     nn.BatchNorm1d(latent_dim, affine=False, eps=1e-8))
        self.likelihood = Likelihood(likelihood, channels, num_bins)
        self.decoder = ConvDecoder(latent_dim, channels * self.likelihood.params_per_subpixel,
                                   self.image_size, hidden)

    @property
    def capacity_bits(self) -> float:
        return gaussian_channel_capacity_bits(self.latent_dim, self.signal_std, self.noise_std)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(f"{type(self).__name__}.encode", x, self.channels, self.image_size)
        mu = self.signal_std * self.encoder(x)
        return mu, torch.full_like(mu, 2.0 * math.log(self.noise_std))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0) -> ModelOutput:
        """The distortion of a noisy code; ``kl_weight`` has no effect (no rate penalty)."""
        mu, logvar = self.encode(x)
        z, _ = reparameterize_kl(mu, logvar)
        distortion = self.likelihood.nll(self.decode(z), x)
        capacity = torch.full_like(distortion, self.capacity_bits)
        return ModelOutput(loss=distortion.mean(), distortion=distortion, rate_bits=capacity,
                           terms={"capacity_bits": capacity})

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))
