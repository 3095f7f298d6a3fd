"""pyvae's models: VAE / β-VAE, β-TCVAE, patch VAE p|i, hierarchical VAE, capacity autoencoder.

Every model has ``encode(x) -> (mu, logvar)``, ``decode(z)`` and ``loss(x, kl_weight=1.0) ->
ModelOutput`` (loss, per-example distortion in nats and rate in bits, model-specific terms);
``model.config`` and :func:`build_model` rebuild a model from JSON (checkpoints use them).
"""
from pyvae.models.base import MODELS, BaseVAE, ModelOutput, build_model, register
from pyvae.models.capacity import CapacityAE, gaussian_channel_capacity_bits
from pyvae.models.hierarchical import HierarchicalVAE
from pyvae.models.likelihoods import Likelihood
from pyvae.models.patch_vae import PatchVAE
from pyvae.models.vae import VAE, BetaTCVAE, BetaVAE

__all__ = [
    "MODELS", "BaseVAE", "BetaTCVAE", "BetaVAE", "CapacityAE", "HierarchicalVAE", "Likelihood",
    "ModelOutput", "PatchVAE", "VAE", "build_model", "gaussian_channel_capacity_bits",
    "register",
]
