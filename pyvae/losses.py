"""VAE training objectives built on pyvae's ops."""
from __future__ import annotations

from typing import NamedTuple

import torch

from pyvae.ops.kl_decomposition import kl_decomposition


class BetaTCVAELoss(NamedTuple):
    """The β-TCVAE objective and the batch means of its KL terms (nats)."""

    loss: torch.Tensor    # scalar: mean over the batch of recon_nll + α·mi + β·tc + γ·dim_kl
    mi: torch.Tensor      # scalar: mean index-code mutual information
    tc: torch.Tensor      # scalar: mean total correlation
    dim_kl: torch.Tensor  # scalar: mean dimension-wise KL


class TCPenalty(NamedTuple):
    """The KL part of the β-TCVAE objective per sample, shape (R,), nats."""

    penalty: torch.Tensor  # α·mi + β·tc + γ·dim_kl
    mi: torch.Tensor
    tc: torch.Tensor
    dim_kl: torch.Tensor


def tc_penalty(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int,
               alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0,
               estimator: str = "mss", rows: slice = slice(None)) -> TCPenalty:
    """α·MI + β·TC + γ·dimension-wise KL of each sample, estimated from the batch (z, mu, logvar)
    of shape (B, D) with :func:`pyvae.ops.kl_decomposition`; the samples ``rows`` of it (default
    all; under DDP, a rank's own rows of the gathered global batch). float32 (float64 for float64
    inputs)."""
    terms = kl_decomposition(z, mu, logvar, dataset_size, estimator=estimator)
    mi, tc, dim_kl = terms.mi[rows], terms.tc[rows], terms.dim_kl[rows]
    return TCPenalty(penalty=alpha * mi + beta * tc + gamma * dim_kl, mi=mi, tc=tc,
                     dim_kl=dim_kl)


def beta_tcvae(recon_nll: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
               dataset_size: int, alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0,
               estimator: str = "mss") -> BetaTCVAELoss:
    """The β-TCVAE loss (Chen et al. 2018): reconstruction + α·MI + β·TC + γ·dimension-wise KL.

    With α = β = γ it is the β-VAE loss (the three terms sum to the KL to the prior, estimated
    from the batch); α = γ = 1 and β > 1 penalise only the total correlation harder.

    Args:
        recon_nll: per-sample reconstruction negative log-likelihood, shape (B,), nats.
        z: the reparameterised samples ``z_i ~ q(z | x_i)``, shape (B, D).
        mu, logvar: the batch's posterior means and log-variances, shape (B, D).
        dataset_size: N, the size of the training set the batch is drawn from (int >= B).
        alpha, beta, gamma: weights of MI, TC and dimension-wise KL.
        estimator: ``"mss"`` (minibatch-stratified sampling, default) or ``"mws"``; see
            :func:`pyvae.ops.kl_decomposition`.

    Returns:
        :class:`BetaTCVAELoss` of scalars: the loss (mean over the batch) and the batch means
        of mi, tc and dim_kl, float32 (float64 for float64 inputs).
    """
    if not isinstance(recon_nll, torch.Tensor) or recon_nll.shape != z.shape[:1]:
        shape = tuple(recon_nll.shape) if isinstance(recon_nll, torch.Tensor) else None
        raise ValueError(f"beta_tcvae: recon_nll must be a tensor of shape ({z.shape[0]},) "
                         f"(one value per sample), got {shape}")
    kl = tc_penalty(z, mu, logvar, dataset_size, alpha, beta, gamma, estimator)
    per_sample = recon_nll.to(kl.penalty.dtype) + kl.penalty
    return BetaTCVAELoss(loss=per_sample.mean(), mi=kl.mi.mean(), tc=kl.tc.mean(),
                         dim_kl=kl.dim_kl.mean())
