"""Information measures of VAEs: rate, bits/dim, PSNR, ELBO, the importance-weighted bound, the
channel capacity, and the evaluation of a model over a data set.

Conventions: log-densities, distortions and ELBOs are in nats; a *rate* or a
*bits/dim* value is in bits (nats divided by ln 2).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from pyvae._validate import check_int
from pyvae.models.capacity import CapacityAE, gaussian_channel_capacity_bits
from pyvae.models.hierarchical import HierarchicalVAE

LN2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)


def _float_tensor(value) -> torch.Tensor:
    """``value`` as a floating tensor of at least float32 precision."""
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def rate_bits(mu: torch.Tensor, logvar: torch.Tensor, *, prior_mu: torch.Tensor | None = None,
              prior_logvar: torch.Tensor | None = None, num_pixels: int | None = None,
              reduction: str = "none") -> torch.Tensor:
    """The rate KL(q(z|x) || p(z)) of diagonal Gaussian posteriors, in bits (seed 000 §4).

    KL = ½ Σ_d (plv − logvar + (σ² + (mu − pm)²)·exp(−plv) − 1) nats, divided by ln 2; with the
    default standard normal prior (pm = 0, plv = 0) it is ½ Σ_d (mu² + σ² − 1 − logvar).
    The mean over a data set is the information M = E_x[KL(q(z|x) || p(z))] stored in z.

    Args:
        mu, logvar: (..., D) posterior means and log-variances (the last dim is the latent).
        prior_mu, prior_logvar: parameters of a diagonal Gaussian prior, broadcastable to
            ``mu``; ``None`` means 0 (the standard normal prior).
        num_pixels: when given, the rate is divided by it (bits per pixel, or per dim when the
            count is of subpixels).
        reduction: ``"none"`` for one value per example, ``"mean"`` for the mean over all of
            them (M).

    Returns:
        ``"none"``: (...) = ``mu.shape[:-1]``, bits (per pixel with ``num_pixels``);
        ``"mean"``: a 0-d tensor. Float32, or float64 for float64 inputs.
    """
    owner = "rate_bits"
    mu, logvar = _float_tensor(mu), _float_tensor(logvar)
    if mu.shape != logvar.shape or mu.dim() < 1:
        raise ValueError(f"{owner}: mu and logvar must have the same shape (..., D), got "
                         f"{tuple(mu.shape)} and {tuple(logvar.shape)}")
    if reduction not in ("none", "mean"):
        raise ValueError(f"{owner}: reduction must be 'none' or 'mean', got {reduction!r}")
    prior_mu = 0.0 if prior_mu is None else _float_tensor(prior_mu).to(mu.device)
    prior_logvar = (torch.zeros_like(mu) if prior_logvar is None
                    else _float_tensor(prior_logvar).to(mu.device))
    kl = 0.5 * (prior_logvar - logvar
                + (logvar.exp() + (mu - prior_mu).square()) * torch.exp(-prior_logvar)
                - 1.0).sum(-1)
    bits = kl / LN2
    if num_pixels is not None:
        bits = bits / check_int(owner, "num_pixels", num_pixels, 1)
    return bits.mean() if reduction == "mean" else bits


def bits_per_dim(nll_nats, num_dims: int):
    """A negative log-likelihood in nats as bits per dimension: nll / (num_dims · ln 2).

    Args:
        nll_nats: a float, array or tensor of per-example NLLs (nats), any shape.
        num_dims: the number of dimensions (subpixels, C·H·W) each NLL is summed over.

    Returns:
        The same type and shape as ``nll_nats``, in bits/dim.
    """
    return nll_nats / (check_int("bits_per_dim", "num_dims", num_dims, 1) * LN2)


def psnr(x: torch.Tensor, x_hat: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image: 10·log10(max_value² / MSE), in dB.

    Args:
        x, x_hat: (B, ...) originals and reconstructions (tensors or arrays, same shape); the
            MSE of an image is the mean over all its values.
        max_value: the largest possible pixel value (1 for images in [0, 1], 255 for 8 bits).

    Returns:
        (B,) float tensor in dB; ``inf`` where the reconstruction is exact.
    """
    x, x_hat = _float_tensor(x), _float_tensor(x_hat)
    if x.shape != x_hat.shape or x.dim() < 1:
        raise ValueError(f"psnr: x and x_hat must have the same shape (B, ...), got "
                         f"{tuple(x.shape)} and {tuple(x_hat.shape)}")
    if not max_value > 0:
        raise ValueError(f"psnr: max_value must be > 0, got {max_value}")
    mse = (x - x_hat.to(x.device)).square().reshape(len(x), -1).mean(1)
    return 10.0 * torch.log10(max_value ** 2 / mse)


def elbo(distortion: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """The evidence lower bound −distortion − KL, in nats.

    Args:
        distortion: (B,) negative log-likelihoods −log p(x|z) in nats (``ModelOutput.distortion``).
        kl: (B,) KL(q(z|x) || p(z)) in nats (``ModelOutput.rate_bits · ln 2``).

    Returns:
        (B,) ELBO in nats (≤ log p(x) in expectation).
    """
    return -(torch.as_tensor(distortion) + torch.as_tensor(kl))


def capacity_bits(dims: int, signal_std: float, noise_std: float) -> float:
    """Capacity C = k/2 · log2(1 + s²/n²) in bits of k parallel additive Gaussian channels with
    signal standard deviation s and noise standard deviation n (seed 000 §4.1; the bound on the
    information a :class:`~pyvae.models.CapacityAE` code carries).

    Args:
        dims: k >= 0, the number of channels (latent dimensions).
        signal_std: s >= 0.
        noise_std: n > 0.
    """
    dims = check_int("capacity_bits", "dims", dims, 0)
    if not noise_std > 0 or not signal_std >= 0:
        raise ValueError(f"capacity_bits: need signal_std >= 0 and noise_std > 0, got "
                         f"signal_std={signal_std}, noise_std={noise_std}")
    return gaussian_channel_capacity_bits(dims, signal_std, noise_std)


@torch.no_grad()
def iwae_bound(model, x: torch.Tensor, k: int = 64, *, eps: torch.Tensor | None = None,
               generator: torch.Generator | None = None, chunk_size: int = 16) -> torch.Tensor:
    """Importance-weighted bound on log p(x) (Burda et al. 2016), per example, in nats.

    L_k(x) = log (1/k) Σ_i p(x | z_i) p(z_i) / q(z_i | x),  z_i ~ q(z | x) independently,
    with p(z) = N(0, I) and q(z|x) = N(mu, diag σ²) from ``model.encode``. For k = 1 it is the
    single-sample ELBO estimate log p(x|z) + log p(z) − log q(z|x); E[L_k] is non-decreasing in k,
    E[L_1] = ELBO ≤ E[L_k] ≤ log p(x), and L_k → log p(x) as k → ∞.

    For models with one standard-normal latent and a ``likelihood`` head: :class:`~pyvae.models.VAE`
    (β-VAE) and :class:`~pyvae.models.BetaTCVAE` (β only weights the training loss; the bound is
    of the model's p(x)). The model runs in eval mode (restored afterwards), without gradients.

    Args:
        model: has ``encode(x) -> (mu, logvar)`` (B, D), ``decode(z)`` and
            ``likelihood.nll(params, x) -> (B,)`` nats.
        x: (B, C, H, W) images on the model's device.
        k: number of importance samples (>= 1).
        eps: optional standard-normal noise (k, B, D) to use instead of fresh draws
            (z_i = mu + σ·eps[i]).
        generator: ``torch.Generator`` for the draws (on x's device); ignored with ``eps``.
        chunk_size: how many of the k samples are decoded in one call (memory vs speed).

    Returns:
        (B,) float32 tensor of L_k(x), nats.
    """
    owner = "iwae_bound"
    if isinstance(model, (HierarchicalVAE, CapacityAE)) or not all(
            hasattr(model, name) for name in ("encode", "decode", "likelihood")):
        raise TypeError(f"{owner}: model must be a single-latent VAE with encode, decode and "
                        f"likelihood (VAE, BetaTCVAE), got {type(model).__name__}")
    k = check_int(owner, "k", k, 1)
    chunk_size = check_int(owner, "chunk_size", chunk_size, 1)
    was_training = model.training
    model.eval()
    try:
        mu, logvar = (t.float() for t in model.encode(x))
        if eps is None:
            eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device)
        elif tuple(eps.shape) != (k, *mu.shape):
            raise ValueError(f"{owner}: eps must have shape (k, B, D) = "
                             f"{(k, *mu.shape)}, got {tuple(eps.shape)}")
        eps = eps.to(device=mu.device, dtype=torch.float32)
        z = mu + torch.exp(0.5 * logvar) * eps  # (k, B, D)
        # log q(z|x) from eps itself: (z − mu)²/σ² = eps² exactly.
        log_q = -0.5 * (LOG_2PI + logvar + eps.square()).sum(-1)
        log_p = -0.5 * (LOG_2PI + z.square()).sum(-1)
        log_px = []
        for start in range(0, k, chunk_size):
            zs = z[start:start + chunk_size]
            repeats = len(zs)
            xs = x.unsqueeze(0).expand(repeats, *x.shape).reshape(repeats * len(x), *x.shape[1:])
            nll = model.likelihood.nll(model.decode(zs.reshape(-1, zs.shape[-1])), xs)
            log_px.append(-nll.float().view(repeats, len(x)))
        log_w = torch.cat(log_px).double() + log_p.double() - log_q.double()
        return (torch.logsumexp(log_w, dim=0) - math.log(k)).float()
    finally:
        model.train(was_training)


def _model_device(model) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _batches(data, batch_size: int) -> Iterable:
    """Batches of a map-style data set or an (N, ...) tensor, or ``data`` itself (an iterable
    of batches)."""
    if isinstance(data, (Dataset, torch.Tensor)):
        return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_images)
    return data


def collate_images(items: list) -> torch.Tensor:
    """Stack data set items into a (B, C, H, W) batch; an item that is a tuple or list (e.g.
    ``(image, label)``) contributes its first element."""
    images = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
    return torch.stack([torch.as_tensor(image) for image in images])


@torch.no_grad()
def evaluate(model, data, batch_size: int = 256, device: torch.device | str | None = None,
             max_batches: int | None = None, *, seed: int = 0) -> dict:
    """Means over a data set of a model's :class:`~pyvae.models.ModelOutput` fields.

    Runs ``model.loss(x)`` (eval mode, no gradients, ``kl_weight = 1``) on every batch and
    averages each per-example field over all examples. The latent noise comes from the torch
    RNG seeded with ``seed`` inside a forked RNG state, so results are reproducible and the
    caller's RNG is untouched.

    Args:
        model: a pyvae model (``loss(x) -> ModelOutput``).
        data: a map-style ``Dataset`` (items are images or ``(image, label)`` tuples), an
            (N, C, H, W) tensor, or an iterable of batches (a ``DataLoader``, a list of tensors
            or of ``(images, labels)`` tuples; then ``batch_size`` is unused).
        batch_size: examples per batch when ``data`` is a data set or a tensor.
        device: where to run; default the model's device.
        max_batches: stop after this many batches (``None``: the whole data set).
        seed: seed of the latent noise.

    Returns:
        dict of Python numbers:
        ``num_examples``; ``loss`` (the mean training loss); ``distortion`` (nats);
        ``rate_bits`` (M, bits; the channel capacity for a CapacityAE); ``rate_bits_per_dim``
        (``rate_bits`` over the C·H·W dims of one example); ``elbo_nats`` = −(distortion +
        ln 2 · rate_bits) (an ELBO for every model whose rate is a KL, i.e. all but CapacityAE);
        and the mean of every model-specific term, e.g. ``mi``, ``tc``, ``dim_kl`` (nats),
        ``bits_per_dim`` (patch VAE), ``layer_rates_bits`` (hierarchical VAE: a list, index 0 =
        z_1, the layer next to x).
    """
    owner = "evaluate"
    batch_size = check_int(owner, "batch_size", batch_size, 1)
    if max_batches is not None:
        max_batches = check_int(owner, "max_batches", max_batches, 1)
    device = _model_device(model) if device is None else torch.device(device)
    sums: dict[str, torch.Tensor] = {}
    count, num_dims = 0, None
    was_training = model.training
    model.eval()
    fork = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork):
            batches = iter(_batches(data, batch_size))  # a DataLoader draws its seeds here
            torch.manual_seed(seed)
            for index, batch in enumerate(batches):
                if max_batches is not None and index == max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = torch.as_tensor(x).to(device)
                output = model.loss(x, kl_weight=1.0)
                rows = len(x)
                values = {"loss": output.loss.detach().double() * rows,
                          "distortion": output.distortion.detach().double().sum(0),
                          "rate_bits": output.rate_bits.detach().double().sum(0)}
                for name, term in output.terms.items():
                    values[name] = term.detach().double().sum(0)
                for name, value in values.items():
                    sums[name] = value if name not in sums else sums[name] + value
                count += rows
                num_dims = x[0].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{owner}: data yielded no examples")
    result: dict = {"num_examples": count}
    for name, total in sums.items():
        mean = total / count
        result[name] = mean.tolist() if mean.dim() else float(mean)
    result["rate_bits_per_dim"] = result["rate_bits"] / num_dims
    result["elbo_nats"] = -(result["distortion"] + LN2 * result["rate_bits"])
    return result
