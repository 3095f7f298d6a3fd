"""Sample quality of a generative model (seed 002 §5.5): the Fréchet distance between the feature
statistics of samples and of real images (FID), and the inception score with its split into
diversity and sharpness (Barratt & Sharma 2018, the seed's Eq. 12).

The published FID and IS use Inception-v3, whose weights would have to be downloaded. pyvae
instead trains a small classifier on the data the samples imitate (:class:`FeatureClassifier`,
:func:`train_feature_classifier`): its penultimate layer is the feature space of the Fréchet
distance and its softmax the p(y | x) of the inception score. **It is not Inception**: the numbers
compare models scored with the same trained classifier and are not comparable with published
FIDs or inception scores.

The maths (:func:`feature_statistics`, :func:`frechet_distance`, :func:`inception_score`) takes
numpy arrays or torch tensors and computes in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pyvae._device import check_device
from pyvae._validate import check_int
from pyvae.metrics._utils import as_discrete, as_matrix, to_numpy
from pyvae.models.conv import ConvEncoder, check_image_size


# ---- the maths --------------------------------------------------------------------------------

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """The mean (F,) and the unbiased covariance (F, F) (normalised by N − 1) of (N, F)
    features, N >= 2; (N, ...) inputs are flattened to N rows. Float64."""
    features = as_matrix("feature_statistics", "features", features)
    if len(features) < 2:
        raise ValueError(f"feature_statistics: features needs at least 2 rows for a "
                         f"covariance, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1],
                                                                       features.shape[1])


def _mean_and_covariance(owner: str, which: str, mu, cov) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(to_numpy(owner, f"mu{which}", mu), dtype=np.float64)
    cov = np.asarray(to_numpy(owner, f"cov{which}", cov), dtype=np.float64)
    if mu.ndim != 1 or cov.shape != (len(mu), len(mu)):
        raise ValueError(f"{owner}: mu{which} must be (F,) and cov{which} (F, F), got shapes "
                         f"{mu.shape} and {cov.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        raise ValueError(f"{owner}: mu{which} and cov{which} must be finite")
    scale = max(1.0, float(np.abs(cov).max(initial=0.0)))
    if not np.allclose(cov, cov.T, rtol=0, atol=1e-8 * scale):
        raise ValueError(f"{owner}: cov{which} must be symmetric")
    return mu, (cov + cov.T) / 2


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues
    that rounding pushed below 0 are taken as 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The Fréchet (2-Wasserstein²) distance between N(mu1, cov1) and N(mu2, cov2):

        ‖mu1 − mu2‖² + tr(cov1) + tr(cov2) − 2 tr((cov1^½ · cov2 · cov1^½)^½).

    (cov1^½ cov2 cov1^½ has the eigenvalues of cov1·cov2, so the last trace is the usual
    tr((cov1·cov2)^½).) The inner matrix is symmetric positive semi-definite, so its square root
    comes from a symmetric eigendecomposition: no complex parts and no ε added to the
    diagonal, also for the singular covariances of fewer samples than features.

    Args:
        mu1, mu2: (F,) means; cov1, cov2: (F, F) symmetric positive semi-definite
            covariances (e.g. from :func:`feature_statistics`). Arrays or tensors.

    Returns:
        The distance in squared feature units (float, >= 0; rounding below 0 is returned as 0).
    """
    owner = "frechet_distance"
    mu1, cov1 = _mean_and_covariance(owner, "1", mu1, cov1)
    mu2, cov2 = _mean_and_covariance(owner, "2", mu2, cov2)
    if len(mu1) != len(mu2):
        raise ValueError(f"{owner}: the two distributions have {len(mu1)} and {len(mu2)} "
                         f"features")
    root1 = _psd_sqrt(cov1)
    inner = root1 @ cov2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)
    return max(value, 0.0)


def feature_frechet_distance(features1, features2) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two sets of (N, F) features
    (e.g. classifier features of samples and of real images): FID in the feature space used."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of probabilities (0·log 0 = 0)."""
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def inception_score(probs) -> dict:
    """The inception score of class probabilities p(y | x) of N samples (Salimans et al. 2016)
    and its two factors (Barratt & Sharma 2018; seed 002 Eq. 12):

        IS = exp(E_x KL(p(y|x) ‖ p(y))) = exp(H[p(y)]) · exp(−E_x H[p(y|x)])
           = diversity · sharpness,   p(y) = E_x p(y|x).

    Computed over the whole sample (the seed's form), not as the mean over 10 splits that the
    original Inception code reports. With K classes: IS, diversity ∈ [1, K], sharpness ∈ [1/K, 1];
    uniform predictions give IS = 1, confident predictions spread evenly over the classes IS = K.

    Args:
        probs: (N, K) non-negative rows summing to 1 (softmax outputs), N >= 1, K >= 2.

    Returns:
        dict: ``inception_score``, ``diversity`` (exp of the marginal's entropy), ``sharpness``
        (exp of minus the mean conditional entropy), ``marginal_entropy_nats`` and
        ``conditional_entropy_nats``.
    """
    owner = "inception_score"
    probs = as_matrix(owner, "probs", probs)
    if probs.shape[0] < 1 or probs.shape[1] < 2:
        raise ValueError(f"{owner}: probs must be (N, K) with N >= 1 and K >= 2 classes, got "
                         f"shape {probs.shape}")
    if (probs < 0).any() or not np.allclose(probs.sum(1), 1.0, rtol=0, atol=1e-4):
        raise ValueError(f"{owner}: every row of probs must be non-negative and sum to 1 "
                         f"(class probabilities, e.g. a softmax)")
    marginal = _entropy(probs.mean(0))
    conditional = float(_entropy(probs).mean())
    return {"inception_score": math.exp(marginal - conditional),
            "diversity": math.exp(marginal), "sharpness": math.exp(-conditional),
            "marginal_entropy_nats": float(marginal), "conditional_entropy_nats": conditional}


# ---- the feature extractor --------------------------------------------------------------------

class FeatureClassifier(nn.Module):
    """A small image classifier whose penultimate layer is the feature space for
    :func:`feature_frechet_distance` and whose softmax is the p(y | x) of
    :func:`inception_score` — a stand-in for Inception-v3 that pyvae trains on the data set at
    hand (:func:`train_feature_classifier`); numbers from it are not comparable with published
    FIDs.

    The trunk is :class:`pyvae.models.conv.ConvEncoder` (the VAE encoder's network: 4×4
    stride-2 convolutions down to at most 4×4, a ReLU layer of ``feature_dim`` units), followed
    by a linear layer to the class logits.

    Shapes: x (B, C, H, W) in [0, 1]; ``features(x)`` (B, feature_dim); ``forward(x)`` logits
    (B, num_classes).
    """

    def __init__(self, channels: int, image_size, num_classes: int, feature_dim: int = 64):
        super().__init__()
        owner = type(self).__name__
        self.trunk = ConvEncoder(check_int(owner, "channels", channels, 1),
                                 check_image_size(owner, image_size),
                                 check_int(owner, "feature_dim", feature_dim, 1))
        self.head = nn.Linear(feature_dim, check_int(owner, "num_classes", num_classes, 2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, batch_size: int = 1024
                ) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, feature_dim) and class probabilities (N, num_classes) of ``images``
        (N, C, H, W) in [0, 1], in batches, as float64 numpy arrays; eval mode."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        features, probs = [], []
        try:
            for part in torch.as_tensor(images).split(batch_size):
                h = self.trunk(part.to(device).float())
                features.append(h.double().cpu())
                probs.append(torch.softmax(self.head(h).double(), dim=-1).cpu())
        finally:
            self.train(was_training)
        return torch.cat(features).numpy(), torch.cat(probs).numpy()


def train_feature_classifier(images: torch.Tensor, labels, *, num_classes: int | None = None,
                             feature_dim: int = 64, steps: int = 1000, batch_size: int = 128,
                             lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                             device=None) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` on labelled images with AdamW and cross entropy.

    Seeded and self-contained: initialisation and batches draw from their own generator, and
    the caller's global RNG is left as it was.

    Args:
        images: (N, C, H, W) float images in [0, 1] (the real data the samples imitate).
        labels: (N,) integer class labels in [0, num_classes).
        num_classes: default: max(labels) + 1.
        feature_dim, steps, batch_size, lr, weight_decay: the network and its training.
        seed: initialisation and batch order.
        device: where to train (default: the images' device).

    Returns:
        The trained classifier in eval mode, on ``device``.
    """
    owner = "train_feature_classifier"
    images = torch.as_tensor(images)
    if images.dim() != 4 or not images.is_floating_point() or len(images) < 1:
        raise ValueError(f"{owner}: images must be a float tensor (N, C, H, W) with N >= 1, "
                         f"got {images.dtype} of shape {tuple(images.shape)}")
    targets = as_discrete(owner, "labels", labels, rows=len(images))
    if targets.shape[1] != 1 or targets.min() < 0:
        raise ValueError(f"{owner}: labels must be (N,) non-negative class indices")
    targets = torch.as_tensor(targets[:, 0])
    num_classes = (int(targets.max()) + 1 if num_classes is None
                   else check_int(owner, "num_classes", num_classes, 2))
    if int(targets.max()) >= num_classes:
        raise ValueError(f"{owner}: labels go up to {int(targets.max())}, but num_classes is "
                         f"{num_classes}")
    steps = check_int(owner, "steps", steps, 0)
    batch_size = check_int(owner, "batch_size", batch_size, 1)
    seed = check_int(owner, "seed", seed, 0)
    device = images.device if device is None else check_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(images.shape[1], tuple(images.shape[2:]), num_classes,
                                  feature_dim).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        logits = model(images[batch].to(device).float())
        loss = nn.functional.cross_entropy(logits, targets[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
