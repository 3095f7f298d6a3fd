"""Global VAEs on whole images: the VAE / β-VAE of Higgins et al. and the β-TCVAE of Chen et al.

The hot paths run on pyvae's ops: :func:`pyvae.ops.reparameterize_kl` draws z and its KL in one
kernel, and :func:`pyvae.ops.kl_decomposition` estimates MI, TC and dimension-wise KL for the
β-TCVAE.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pyvae.models.base import LN2, BaseVAE, ModelOutput, register
from pyvae.models.conv import ConvDecoder, ConvEncoder, check_image_size
from pyvae.models.likelihoods import Likelihood
from pyvae.models.mlp import MLPDecoder, MLPEncoder
from pyvae._distributed import gather_batch
from pyvae._validate import check_int
from pyvae.losses import tc_penalty
from pyvae.ops.reparameterize_kl import reparameterize_kl


def check_images(owner: str, x: torch.Tensor, channels: int, size: tuple[int, int]) -> None:
    """A clear error unless ``x`` is a floating (B, channels, *size) batch."""
    expected = (channels, *size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner}: x must have shape (B, {', '.join(map(str, expected))}), "
                         f"got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating tensor with values in [0, 1], "
                        f"got dtype {x.dtype}")


#: architecture -> (encoder class, decoder class, default hidden width)
NETWORKS = {"conv": (ConvEncoder, ConvDecoder, 256), "mlp": (MLPEncoder, MLPDecoder, 1200)}


@register
class VAE(BaseVAE):
    """VAE (β-VAE when ``beta`` ≠ 1) with the networks of Higgins et al. 2017.

    loss = mean over the batch of  distortion + β · KL(q(z|x) || N(0, I)).

    Args:
        latent_dim: D.
        channels: C of the images.
        image_size: H (square) or (H, W); 64 gives the paper's network, other sizes use one
            stride-2 layer per halving (see :mod:`pyvae.models.conv`).
        beta: weight of the KL term (1: the VAE; > 1: β-VAE).
        likelihood: ``"bernoulli"`` (binary data, default), ``"gaussian"`` or ``"categorical"``
            (8-bit natural images), see :class:`pyvae.models.likelihoods.Likelihood`.
        num_bins: levels of the categorical likelihood.
        hidden: width of the fully-connected layers (default: 256 for ``"conv"``, the
            paper's, and 1200 for ``"mlp"``).
        architecture: ``"conv"`` (stride-2 convolutions, :mod:`pyvae.models.conv`) or
            ``"mlp"`` (the fully-connected networks Chen et al. used for 2-D shapes,
            :mod:`pyvae.models.mlp`).

    Shapes:
        x (B, C, H, W) in [0, 1]; ``encode`` -> mu, logvar (B, D); ``decode`` -> likelihood
        parameters (B, C·P, H, W); ``loss`` -> :class:`ModelOutput` with (B,) distortion (nats)
        and rate_bits (bits).
    """

    def __init__(self, latent_dim: int, channels: int, image_size, beta: float = 1.0,
                 likelihood: str = "bernoulli", num_bins: int = 256, hidden: int | None = None,
                 architecture: str = "conv") -> None:
        super().__init__()
        owner = type(self).__name__
        self.latent_dim = check_int(owner, "latent_dim", latent_dim, 1)
        self.channels = check_int(owner, "channels", channels, 1)
        self.image_size = check_image_size(owner, image_size)
        if architecture not in NETWORKS:
            raise ValueError(f"{owner}: architecture must be one of {tuple(NETWORKS)}, got "
                             f"{architecture!r}")
        encoder_class, decoder_class, default_hidden = NETWORKS[architecture]
        hidden = check_int(owner, "hidden", default_hidden if hidden is None else hidden, 1)
        self.architecture, self.hidden = architecture, hidden
        self.beta = float(beta)
        self._remember(latent_dim=latent_dim, channels=channels, image_size=list(self.image_size),
                       beta=self.beta, likelihood=likelihood, num_bins=num_bins, hidden=hidden,
                       architecture=architecture)
        self.likelihood = Likelihood(likelihood, channels, num_bins)
        self.encoder = encoder_class(channels, self.image_size, hidden)
        self.head = nn.Linear(hidden, 2 * latent_dim)
        self.decoder = decoder_class(latent_dim, channels * self.likelihood.params_per_subpixel,
                                     self.image_size, hidden)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters: mu, logvar of shape (B, D)."""
        check_images(f"{type(self).__name__}.encode", x, self.channels, self.image_size)
        return self.head(self.encoder(x)).chunk(2, dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters (B, C·P, H, W) of p(x | z) for z of shape (B, D)."""
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z = posterior mean), (B, C, H, W) in [0, 1]."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Means of p(x | z) for n prior draws z ~ N(0, I): (n, C, H, W) in [0, 1]."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.likelihood.mean(self.decode(z))

    def _sample_and_score(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z, kl = reparameterize_kl(mu, logvar)
        distortion = self.likelihood.nll(self.decode(z), x)
        return mu, logvar, z, kl.float(), distortion

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0) -> ModelOutput:
        """Negative ELBO with a β-weighted KL, averaged over the batch."""
        _, _, _, kl, distortion = self._sample_and_score(x)
        loss = (distortion + kl_weight * self.beta * kl).mean()
        return ModelOutput(loss=loss, distortion=distortion, rate_bits=kl / LN2)


BetaVAE = VAE


@register
class BetaTCVAE(VAE):
    """β-TCVAE (Chen et al. 2018): the KL is split into index-code mutual information, total
    correlation and dimension-wise KL, each with its own weight:

    loss = mean of  distortion + α·MI + β·TC + γ·DW-KL   (α = β = γ gives the β-VAE).

    The terms come from :func:`pyvae.ops.kl_decomposition` (the fused, streaming estimator).
    Under ``torch.distributed`` with ``gather_global_batch = True`` (set by ``fit(...,
    gather_global_batch=True)``) each rank gathers every rank's (z, mu, logvar), with
    gradients, so the estimator sees the global batch.

    Args:
        latent_dim, channels, image_size, likelihood, num_bins, hidden, architecture: as for
            :class:`VAE`.
        dataset_size: N, the size of the training set (the estimators' importance weights).
        alpha, beta, gamma: weights of MI, TC and dimension-wise KL.
        estimator: ``"mss"`` (minibatch-stratified sampling) or ``"mws"``.

    The output's ``terms`` hold per-example ``mi``, ``tc`` and ``dim_kl`` in nats; ``rate_bits``
    is the exact KL(q(z|x) || N(0, I)) in bits.
    """

    def __init__(self, latent_dim: int, channels: int, image_size, dataset_size: int,
                 alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0,
                 estimator: str = "mss", likelihood: str = "bernoulli", num_bins: int = 256,
                 hidden: int | None = None, architecture: str = "conv") -> None:
        super().__init__(latent_dim, channels, image_size, beta=beta, likelihood=likelihood,
                         num_bins=num_bins, hidden=hidden, architecture=architecture)
        self.dataset_size = check_int(type(self).__name__, "dataset_size", dataset_size, 1)
        if estimator not in ("mss", "mws"):
            raise ValueError(f"BetaTCVAE: estimator must be 'mss' or 'mws', got {estimator!r}")
        self.alpha, self.gamma, self.estimator = float(alpha), float(gamma), estimator
        self.gather_global_batch = False
        self._remember(latent_dim=latent_dim, channels=channels, image_size=list(self.image_size),
                       dataset_size=dataset_size, alpha=self.alpha, beta=self.beta,
                       gamma=self.gamma, estimator=estimator, likelihood=likelihood,
                       num_bins=num_bins, hidden=self.hidden, architecture=architecture)

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0) -> ModelOutput:
        mu, logvar, z, kl, distortion = self._sample_and_score(x)
        start, rows = 0, x.shape[0]
        if self.gather_global_batch and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            (z, mu, logvar), start = gather_batch(z, mu, logvar)
        tc = tc_penalty(z, mu, logvar, self.dataset_size, self.alpha, self.beta, self.gamma,
                        self.estimator, rows=slice(start, start + rows))
        loss = (distortion + kl_weight * tc.penalty.float()).mean()
        return ModelOutput(loss=loss, distortion=distortion, rate_bits=kl / LN2,
                           terms={"mi": tc.mi.float(), "tc": tc.tc.float(),
                                  "dim_kl": tc.dim_kl.float()})
