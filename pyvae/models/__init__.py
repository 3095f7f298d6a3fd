"""pyvae's models: VAE / β-VAE, β-TCVAE, patch VAE p|i, hierarchical VAE, capacity autoencoder."""
from pyvae.models.base import MODELS, BaseVAE, ModelOutput, build_model, register

__all__ = ["MODELS", "BaseVAE", "ModelOutput", "build_model", "register"]
