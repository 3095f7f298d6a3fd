"""Moments of the aggregate posterior q(z) = (1/N) Σ_i N(mu_i, diag σ_i²) of a data set's
diagonal Gaussian posteriors, and seed 001's Frobenius-norm distances (§5.1, Fig. 5.1): how far
its covariance is from the prior's identity, and the seed's mean distance between each
posterior's covariance and the aggregate one.

All moments are exact for the mixture of the N given posteriors (no sampling): the covariance of
the mixture is the covariance of the means plus the mean of the per-sample variances, both
normalised by N. Float64 numpy results; inputs are numpy arrays or torch tensors.
"""
from __future__ import annotations

import numpy as np

from pyvae.metrics._utils import as_matrix


def _posteriors(owner: str, mu, logvar) -> tuple[np.ndarray, np.ndarray | None]:
    mu = as_matrix(owner, "mu", mu)
    if len(mu) < 1:
        raise ValueError(f"{owner}: mu needs at least one row (N >= 1)")
    if logvar is None:
        return mu, None
    logvar = as_matrix(owner, "logvar", logvar, rows=len(mu))
    if logvar.shape != mu.shape:
        raise ValueError(f"{owner}: mu and logvar must have the same shape (N, D), got "
                         f"{mu.shape} and {logvar.shape}")
    return mu, np.exp(logvar)


def aggregate_posterior_moments(mu, logvar=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of the aggregate posterior q(z) = (1/N) Σ_i q(z | x_i).

        E[z] = (1/N) Σ_i mu_i,
        Cov[z] = (1/N) Σ_i (mu_i − E[z])(mu_i − E[z])ᵀ + (1/N) Σ_i diag(σ_i²)

    (law of total covariance; the first term alone, ``logvar=None``, is the covariance of the
    posterior means).

    Args:
        mu: (N, D) posterior means; logvar: (N, D) posterior log-variances, or None.
    """
    return _moments(*_posteriors("aggregate_posterior_moments", mu, logvar))


def _moments(mu: np.ndarray, var: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    mean = mu.mean(0)
    centred = mu - mean
    cov = centred.T @ centred / len(mu)
    if var is not None:
        cov += np.diag(var.mean(0))
    return mean, cov


def covariance_distance_to_identity(mu, logvar=None) -> float:
    """‖Cov[q(z)] − I‖_F: the Frobenius distance of the aggregate posterior's covariance
    (:func:`aggregate_posterior_moments`, the mixture's, per-sample variances included unless
    ``logvar`` is None) from the identity, the covariance of the prior N(0, I). 0 when q(z)
    has the prior's second moments about its mean.

    Args:
        mu, logvar: (N, D) posterior means and log-variances (``logvar`` None: the means only).
    """
    _, cov = aggregate_posterior_moments(mu, logvar)
    return float(np.linalg.norm(cov - np.eye(len(cov))))


def mean_posterior_covariance_distance(mu, logvar) -> float:
    """Seed 001's metric (§5.1, Fig. 5.1): F̃ = (1/N) Σ_i ‖Σ_i − Σ̃‖_F, the mean Frobenius
    distance between each posterior's covariance Σ_i = diag(σ_i²) and the covariance Σ̃ of the
    aggregate posterior (the seed estimates Σ̃ from samples z ~ q(z|x) over the data set; here it
    is the mixture's exact covariance, :func:`aggregate_posterior_moments`, which those sample
    covariances converge to).

    It is 0 exactly when every posterior has the aggregate's covariance (e.g. every posterior
    equal to the prior) and grows with the spread of the means relative to the posteriors'
    widths.

    Args:
        mu, logvar: (N, D) posterior means and log-variances.
    """
    mu, var = _posteriors("mean_posterior_covariance_distance", mu, logvar)
    if var is None:
        raise ValueError("mean_posterior_covariance_distance: logvar is required")
    _, cov = _moments(mu, var)
    # ‖diag(σ_i²) − Σ̃‖_F² = (off-diagonal part of ‖Σ̃‖_F²) + Σ_d (σ_id² − Σ̃_dd)²: O(N·D).
    diagonal = np.diag(cov)
    off_diagonal = float(np.sum(cov ** 2) - np.sum(diagonal ** 2))
    squared = np.maximum(off_diagonal + np.sum((var - diagonal) ** 2, axis=1), 0.0)
    return float(np.sqrt(squared).mean())
