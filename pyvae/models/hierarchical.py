"""Hierarchical VAE with a β per latent layer (seed 002), top-down or ladder inference.

Generative model p(z_L) Π_l p(z_l | z_{l+1}) p(x | z_1); inference q(z_L | x) Π_l q(z_l | z_{l+1}, x).
The rate splits into layer rates R_L = KL(q(z_L|x) || N(0, I)) and
R_l = KL(q(z_l|z_{l+1},x) || p(z_l|z_{l+1})) (one sample of z_{l+1}), each from
:func:`pyvae.ops.reparameterize_kl` with a general diagonal prior; the loss is
distortion + Σ_l β_l · R_l.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyvae.models.base import LN2, BaseVAE, ModelOutput, register
from pyvae.models.conv import ConvDecoder, ConvEncoder, check_image_size
from pyvae.models.likelihoods import Likelihood
from pyvae.models.vae import check_images
from pyvae._validate import check_int
from pyvae.ops.reparameterize_kl import reparameterize_kl


def mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features))


def precision_weighted(mu_hat, logvar_hat, prior_mu, prior_logvar):
    """The ladder VAE's combination of a bottom-up estimate N(mu_hat, σ̂²) with the top-down
    prior N(prior_mu, σp²): precisions add, means are precision-weighted (Sønderby et al. 2016).
    Written with sigmoids of log-variance differences so that no precision overflows."""
    logvar = -torch.logaddexp(-logvar_hat, -prior_logvar)
    mu = (mu_hat * torch.sigmoid(prior_logvar - logvar_hat)
          + prior_mu * torch.sigmoid(logvar_hat - prior_logvar))
    return mu, logvar


@register
class HierarchicalVAE(BaseVAE):
    """L-layer VAE with layer-wise β (seed 002); ``inference="ladder"`` gives the LVAE variant.

    Layer order everywhere (``latent_dims``, ``betas``, ``layer_rates_bits`` columns): index 0
    is z_1, the layer next to x; index L-1 is the top layer z_L.

    A convolutional trunk (the :class:`~pyvae.models.VAE` encoder) computes features h of x;
    deterministic bottom-up layers give d_1 … d_L. ``"top-down"`` inference computes
    q(z_l | z_{l+1}, x) from [d_l, z_{l+1}]; ``"ladder"`` combines a bottom-up estimate from d_l
    with the prior p(z_l | z_{l+1}) by precision weighting. The decoder maps z_1 to p(x | z_1).

    Args:
        latent_dims: (D_1, …, D_L), L >= 1.
        betas: (β_1, …, β_L), one weight per layer rate.
        channels, image_size, likelihood, num_bins, hidden: as for :class:`~pyvae.models.VAE`.
        inference: ``"top-down"`` (default) or ``"ladder"``.

    Shapes:
        x (B, C, H, W); ``encode`` -> mu, logvar (B, ΣD): the layers' posterior parameters
        concatenated in layer order, computed with z_{l+1} set to its posterior mean;
        ``decode(z)`` takes such a concatenated code (B, ΣD) and reads z_1; ``loss`` reports
        ``layer_rates_bits`` (B, L) in ``terms`` and their sum as ``rate_bits``.
    """

    def __init__(self, latent_dims: Sequence[int], betas: Sequence[float], channels: int,
                 image_size, inference: str = "top-down", likelihood: str = "bernoulli",
                 num_bins: int = 256, hidden: int = 256) -> None:
        super().__init__()
        owner = type(self).__name__
        latent_dims = [check_int(owner, "latent_dims", d, 1) for d in latent_dims]
        betas = [float(b) for b in betas]
        if not latent_dims or len(betas) != len(latent_dims):
            raise ValueError(f"{owner}: betas must give one β per latent layer: "
                             f"{len(latent_dims)} layers, {len(betas)} betas")
        if inference not in ("top-down", "ladder"):
            raise ValueError(f"{owner}: inference must be 'top-down' or 'ladder', "
                             f"got {inference!r}")
        self.latent_dims, self.betas, self.inference = latent_dims, betas, inference
        self.channels = check_int(owner, "channels", channels, 1)
        self.image_size = check_image_size(owner, image_size)
        self._remember(latent_dims=latent_dims, betas=betas, channels=channels,
                       image_size=list(self.image_size), inference=inference,
                       likelihood=likelihood, num_bins=num_bins, hidden=hidden)
        layers = len(latent_dims)
        self.trunk = ConvEncoder(channels, self.image_size, hidden)
        self.up = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
                                for _ in range(layers))
        self.top = nn.Linear(hidden, 2 * latent_dims[-1])
        # Index l (< L-1): the networks of layer l given layer l+1.
        self.prior_nets = nn.ModuleList(mlp(latent_dims[l + 1], hidden, 2 * latent_dims[l])
                                        for l in range(layers - 1))
        posterior_in = (lambda l: hidden) if inference == "ladder" else (
            lambda l: hidden + latent_dims[l + 1])
        self.posterior_nets = nn.ModuleList(mlp(posterior_in(l), hidden, 2 * latent_dims[l])
                                            for l in range(layers - 1))
        self.likelihood = Likelihood(likelihood, channels, num_bins)
        self.decoder = ConvDecoder(latent_dims[0], channels * self.likelihood.params_per_subpixel,
                                   self.image_size, hidden)

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    def _infer(self, x: torch.Tensor, sample: bool):
        """Posterior parameters, z and KL (nats) of every layer, top layer first computed."""
        check_images(f"{type(self).__name__}.encode", x, self.channels, self.image_size)
        d = [self.trunk(x)]
        for layer in self.up:
            d.append(layer(d[-1]))
        d = d[1:]  # d[l]: bottom-up features of layer l
        L = self.num_layers
        mus, logvars, zs, kls = [None] * L, [None] * L, [None] * L, [None] * L
        mus[-1], logvars[-1] = self.top(d[-1]).chunk(2, dim=-1)
        zs[-1], kls[-1] = (reparameterize_kl(mus[-1], logvars[-1]) if sample
                           else (mus[-1], None))
        for l in reversed(range(L - 1)):
            prior_mu, prior_logvar = self.prior_nets[l](zs[l + 1]).chunk(2, dim=-1)
            if self.inference == "ladder":
                mu_hat, logvar_hat = self.posterior_nets[l](d[l]).chunk(2, dim=-1)
                mus[l], logvars[l] = precision_weighted(mu_hat, logvar_hat, prior_mu,
                                                        prior_logvar)
            else:
                mus[l], logvars[l] = self.posterior_nets[l](
                    torch.cat([d[l], zs[l + 1]], dim=-1)).chunk(2, dim=-1)
            if sample:
                zs[l], kls[l] = reparameterize_kl(mus[l], logvars[l], prior_mu=prior_mu,
                                                  prior_logvar=prior_logvar)
            else:
                zs[l] = mus[l]
        return mus, logvars, zs, kls

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers' posterior parameters (B, ΣD) each, layer order, z_{l+1} at its mean."""
        mus, logvars, _, _ = self._infer(x, sample=False)
        return torch.cat(mus, dim=-1), torch.cat(logvars, dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters (B, C·P, H, W) from a code (B, ΣD) (its z_1 part) or z_1."""
        return self.decoder(z[..., :self.latent_dims[0]])

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0) -> ModelOutput:
        """distortion + Σ_l β_l·R_l, averaged over the batch; per-layer rates in bits."""
        _, _, zs, kls = self._infer(x, sample=True)
        distortion = self.likelihood.nll(self.decode(zs[0]), x)
        rates = torch.stack([kl.float() for kl in kls], dim=1)  # (B, L) nats
        # as_tensor: also a (L,) tensor of betas, e.g. one per model under vmap (fit_grid)
        betas = torch.as_tensor(self.betas, device=rates.device, dtype=rates.dtype)
        loss = (distortion + kl_weight * (rates * betas).sum(1)).mean()
        return ModelOutput(loss=loss, distortion=distortion, rate_bits=rates.sum(1) / LN2,
                           terms={"layer_rates_bits": rates / LN2})

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z_1) with every layer at its posterior mean, (B, C, H, W)."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral samples: z_L ~ N(0, I), z_l ~ p(z_l | z_{l+1}); returns the means of
        p(x | z_1), (n, C, H, W)."""
        z = torch.randn(n, self.latent_dims[-1], generator=generator, device=self.device)
        for l in reversed(range(self.num_layers - 1)):
            prior_mu, prior_logvar = self.prior_nets[l](z).chunk(2, dim=-1)
            noise = torch.randn(prior_mu.shape, generator=generator, device=self.device)
            z = prior_mu + torch.exp(0.5 * prior_logvar) * noise
        return self.likelihood.mean(self.decoder(z))
