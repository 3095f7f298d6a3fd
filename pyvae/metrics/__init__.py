"""Metrics of pyvae: information (rate, bits/dim, PSNR, ELBO, importance-weighted bound,
capacity, evaluation of a model over a data set), probes on frozen features, the
disentanglement metrics (β-VAE, FactorVAE, MIG, DCI), the aggregate posterior's covariance
distances (seed 001) and sample quality (FID / inception score with a classifier trained by
pyvae, seed 002).

Units: log-likelihoods, distortions, ELBOs and mutual informations in nats;
rates and bits/dim in bits (nats / ln 2).
"""
from pyvae.metrics.aggregate_posterior import (aggregate_posterior_moments,
                                               covariance_distance_to_identity,
                                               mean_posterior_covariance_distance)
from pyvae.metrics.disentanglement import (beta_vae_score, dci, dci_score, discrete_entropy,
                                           discrete_mutual_info, factor_vae_score,
                                           histogram_discretize, mig, mig_score, sample_codes)
from pyvae.metrics.information import (bits_per_dim, capacity_bits, elbo, evaluate, iwae_bound,
                                       psnr, rate_bits)
from pyvae.metrics.probes import PROBE_KINDS, features_of, linear_probe, make_probe, mean_encoder
from pyvae.metrics.sample_quality import (FeatureClassifier, feature_frechet_distance,
                                          feature_statistics, frechet_distance, inception_score,
                                          train_feature_classifier)

__all__ = [
    "FeatureClassifier", "aggregate_posterior_moments", "covariance_distance_to_identity",
    "feature_frechet_distance", "feature_statistics", "frechet_distance", "inception_score",
    "mean_posterior_covariance_distance", "train_feature_classifier",
    "PROBE_KINDS", "beta_vae_score", "bits_per_dim", "capacity_bits", "dci", "dci_score",
    "discrete_entropy", "discrete_mutual_info", "elbo", "evaluate", "factor_vae_score",
    "features_of", "histogram_discretize", "iwae_bound", "linear_probe", "make_probe",
    "mean_encoder", "mig", "mig_score", "psnr", "rate_bits", "sample_codes",
]
