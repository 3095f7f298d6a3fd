"""What every pyvae model shares: the loss output, the config round trip and the registry that
checkpoints use to rebuild a model from its JSON config."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

LN2 = math.log(2.0)

MODELS: dict[str, type[BaseVAE]] = {}


@dataclass
class ModelOutput:
    """What ``model.loss(x)`` returns.

    Attributes:
        loss: the scalar to minimise (mean over the batch).
        distortion: (B,) per-example negative log-likelihood of x, nats.
        rate_bits: (B,) per-example rate KL(q(z|x) || p(z)) in bits (for hierarchical models
            the sum over layers; for the capacity autoencoder the channel capacity bound).
        terms: model-specific per-example terms, e.g. ``mi``, ``tc``, ``dim_kl`` (B,) in nats,
            ``layer_rates_bits`` (B, L), ``bits_per_dim`` (B,).
        recon: the reconstruction (mean of p(x|z)) when the model computed one, else None.
    """

    loss: torch.Tensor
    distortion: torch.Tensor
    rate_bits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    recon: torch.Tensor | None = None

    def metrics(self) -> dict[str, float | list[float]]:
        """Batch means as Python floats (per-layer terms as lists), for logs and progress bars."""
        values: dict[str, float | list[float]] = {
            "loss": float(self.loss.detach()),
            "distortion": float(self.distortion.detach().float().mean()),
            "rate_bits": float(self.rate_bits.detach().float().mean()),
        }
        for name, value in self.terms.items():
            value = value.detach().float()
            values[name] = (value.mean(0).tolist() if value.dim() > 1 else float(value.mean()))
        return values


def register(cls: type[BaseVAE]) -> type[BaseVAE]:
    """Class decorator: make ``cls`` rebuildable from ``{"name": cls.__name__, **config}``."""
    MODELS[cls.__name__] = cls
    return cls


def build_model(config: dict) -> BaseVAE:
    """Rebuild a model from :attr:`BaseVAE.config` (``{"name": ..., **constructor kwargs}``)."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model name {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**config)


class BaseVAE(nn.Module):
    """Base of pyvae's models.

    A subclass stores its constructor keyword arguments with :meth:`_remember` so that
    :attr:`config` (JSON-serialisable) and :func:`build_model` rebuild it, and implements
    ``encode``, ``decode`` and ``loss``.

    ``loss(x, kl_weight=1.0)`` multiplies every rate penalty by ``kl_weight`` (the β warm-up
    or annealing factor the training loop schedules); the reported terms are never weighted.
    """

    def _remember(self, **kwargs) -> None:
        self._config = {"name": type(self).__name__, **kwargs}

    @property
    def config(self) -> dict:
        """The JSON-serialisable constructor arguments, with the class under ``"name"``."""
        return dict(self._config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0) -> ModelOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, kl_weight: float = 1.0) -> ModelOutput:
        """The same as :meth:`loss`, so that DistributedDataParallel wraps the loss."""
        return self.loss(x, kl_weight=kl_weight)
