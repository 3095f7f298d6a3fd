"""pyvae: fast, trustworthy VAE kernels and models for PyTorch."""
from pyvae import losses, nn, ops

__version__ = "0.1.0"
__all__ = ["losses", "nn", "ops", "__version__"]
