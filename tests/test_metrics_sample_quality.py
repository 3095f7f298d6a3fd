"""pyvae.metrics.sample_quality and pyvae.metrics.aggregate_posterior against closed forms: the
Fréchet distance of Gaussians with known distance, the inception score of uniform and one-hot
predictions, the aggregate posterior's exact mixture moments and seed 001's Frobenius distances;
the feature classifier learns a separable toy set."""
import math

import numpy as np
import pytest
import torch

from pyvae import metrics


def rotation(d, seed):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]


# ---- Fréchet distance ---------------------------------------------------------------------------

def test_frechet_distance_of_gaussians_with_known_distance():
    d = 6
    mu1, mu2 = np.zeros(d), np.arange(d, dtype=float)
    # Identical covariances: only the means count.
    a = rotation(d, 0) @ np.diag(np.linspace(0.5, 3.0, d)) @ rotation(d, 0).T
    assert metrics.frechet_distance(mu1, a, mu2, a) == pytest.approx(np.sum(mu2 ** 2), rel=1e-10)
    # Commuting covariances (same eigenvectors): Σ_k (√λ_k − √κ_k)².
    lam, kap = np.linspace(0.1, 4.0, d), np.linspace(5.0, 0.2, d)
    r = rotation(d, 1)
    expected = np.sum(mu2 ** 2) + np.sum((np.sqrt(lam) - np.sqrt(kap)) ** 2)
    assert metrics.frechet_distance(mu1, r @ np.diag(lam) @ r.T, mu2,
                                    r @ np.diag(kap) @ r.T) == pytest.approx(expected, rel=1e-9)
    # Isotropic: d·(s1 − s2)²; symmetric in its arguments; zero against itself.
    assert metrics.frechet_distance(mu1, 4 * np.eye(d), mu1, np.eye(d)) == pytest.approx(d)
    b = rotation(d, 2) @ np.diag(kap) @ rotation(d, 2).T
    assert metrics.frechet_distance(mu1, a, mu2, b) == pytest.approx(
        metrics.frechet_distance(mu2, b, mu1, a), rel=1e-9)
    assert metrics.frechet_distance(mu2, b, mu2, b) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_matches_scipy_and_handles_singular_covariances():
    import scipy.linalg
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 5)), rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)) + 1
    (m1, c1), (m2, c2) = metrics.feature_statistics(x), metrics.feature_statistics(y)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    reference = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * root)
    assert metrics.frechet_distance(m1, c1, m2, c2) == pytest.approx(reference, rel=1e-8)
    assert metrics.feature_frechet_distance(x, y) == pytest.approx(reference, rel=1e-8)
    # Rank-1 covariances (all points on one line): W2² between two 1-D Gaussians on one axis.
    u = np.ones(4) / 2
    c_a, c_b = 4.0 * np.outer(u, u), 1.0 * np.outer(u, u)
    assert metrics.frechet_distance(np.zeros(4), c_a, np.zeros(4), c_b) == pytest.approx(1.0)
    # Fewer samples than features: still finite and >= 0.
    assert metrics.feature_frechet_distance(rng.normal(size=(3, 8)), rng.normal(size=(4, 8))) > 0


def test_feature_statistics_and_fid_of_samples_converge():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20000, 3)) * [1.0, 2.0, 3.0]
    y = rng.normal(size=(20000, 3)) * [1.0, 2.0, 3.0] + [1.0, 0, 0]
    mean, cov = metrics.feature_statistics(torch.as_tensor(x))
    assert mean == pytest.approx(x.mean(0)) and cov == pytest.approx(np.cov(x.T))
    assert metrics.feature_frechet_distance(x, y) == pytest.approx(1.0, abs=0.05)


def test_frechet_distance_errors():
    eye = np.eye(2)
    with pytest.raises(ValueError, match="mu1 must be"):
        metrics.frechet_distance(np.zeros(3), eye, np.zeros(2), eye)
    with pytest.raises(ValueError, match="cov2 must be symmetric"):
        metrics.frechet_distance(np.zeros(2), eye, np.zeros(2), np.array([[1.0, 1.0], [0, 1]]))
    with pytest.raises(ValueError, match="2 and 3 features"):
        metrics.frechet_distance(np.zeros(2), eye, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="finite"):
        metrics.frechet_distance(np.array([np.nan, 0]), eye, np.zeros(2), eye)
    with pytest.raises(ValueError, match="at least 2 rows"):
        metrics.feature_statistics(np.zeros((1, 4)))


# ---- inception score ----------------------------------------------------------------------------

def test_inception_score_of_uniform_and_one_hot_predictions():
    k = 10
    uniform = metrics.inception_score(np.full((50, k), 1 / k))
    assert uniform["inception_score"] == pytest.approx(1.0)
    assert uniform["diversity"] == pytest.approx(k) and uniform["sharpness"] == pytest.approx(1 / k)
    # Confident and evenly spread over the classes: IS = K; all the same class: IS = 1.
    spread = metrics.inception_score(np.eye(k)[np.arange(100) % k])
    assert spread["inception_score"] == pytest.approx(k)
    assert spread["sharpness"] == pytest.approx(1.0) and spread["diversity"] == pytest.approx(k)
    same = metrics.inception_score(np.eye(k)[np.zeros(30, int)])
    assert same["inception_score"] == pytest.approx(1.0) and same["diversity"] == pytest.approx(1)
    # Confident on 4 of 10 classes, evenly: IS = 4 = diversity; IS = diversity · sharpness always.
    four = metrics.inception_score(torch.eye(k)[torch.arange(40) % 4])
    assert four["inception_score"] == pytest.approx(4.0)
    p = np.random.default_rng(0).dirichlet(np.ones(k) * 0.3, size=200)
    mixed = metrics.inception_score(p)
    assert mixed["inception_score"] == pytest.approx(mixed["diversity"] * mixed["sharpness"])
    kl = np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1))
    assert mixed["inception_score"] == pytest.approx(math.exp(kl))
    assert 1 < mixed["inception_score"] < k


def test_inception_score_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.inception_score(np.full((5, 4), 0.3))
    with pytest.raises(ValueError, match="non-negative"):
        metrics.inception_score(np.array([[1.5, -0.5]]))
    with pytest.raises(ValueError, match="K >= 2"):
        metrics.inception_score(np.ones((5, 1)))


# ---- the feature classifier ---------------------------------------------------------------------

def test_feature_classifier_learns_a_separable_set_and_feeds_the_metrics():
    # Class c: a bright c-th row on an 8×8 image, with noise.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    images = 0.1 * torch.rand(200, 1, 8, 8, generator=generator)
    images[torch.arange(200), 0, 2 * labels] += 0.8
    state = torch.random.get_rng_state()
    model = metrics.train_feature_classifier(images, labels, steps=150, batch_size=64, seed=0,
                                             feature_dim=16)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    features, probs = model.outputs(images)
    assert features.shape == (200, 16) and probs.shape == (200, 4)
    assert (probs.argmax(1) == labels.numpy()).mean() > 0.95
    real = metrics.inception_score(probs)
    assert real["inception_score"] > 3.0  # confident and even over 4 classes
    # One class only: a low score and a large Fréchet distance to the real features.
    one_class = images[labels == 0]
    f1, p1 = model.outputs(one_class)
    assert metrics.inception_score(p1)["inception_score"] < 1.5
    half = len(images) // 2
    assert (metrics.feature_frechet_distance(f1, features)
            > 5 * metrics.feature_frechet_distance(features[:half], features[half:]))
    again = metrics.train_feature_classifier(images, labels, steps=150, batch_size=64, seed=0,
                                             feature_dim=16)
    assert np.array_equal(again.outputs(images)[1], probs)  # seeded


def test_train_feature_classifier_errors():
    images = torch.rand(10, 1, 8, 8)
    with pytest.raises(ValueError, match="images must be"):
        metrics.train_feature_classifier(images[0], torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="must have 10 rows"):
        metrics.train_feature_classifier(images, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes is 2"):
        metrics.train_feature_classifier(images, torch.arange(10) % 3, num_classes=2)
    with pytest.raises(TypeError, match="steps must be an int"):
        metrics.train_feature_classifier(images, torch.arange(10) % 2, steps=1.5)


# ---- aggregate posterior (seed 001) -------------------------------------------------------------

def test_aggregate_posterior_moments_closed_form():
    # Means ±a on axis 0 (half each), b·(±1) on axis 1 in step with axis 0, variance s² and t².
    a, b, s2, t2 = 2.0, 0.5, 0.3, 1.7
    sign = np.repeat([1.0, -1.0], 50)
    mu = np.stack([a * sign, b * sign], 1) + [1.0, -1.0]
    logvar = np.log(np.tile([s2, t2], (100, 1)))
    mean, cov = metrics.aggregate_posterior_moments(mu, torch.as_tensor(logvar))
    expected = np.array([[a * a + s2, a * b], [a * b, b * b + t2]])
    assert mean == pytest.approx([1.0, -1.0]) and cov == pytest.approx(expected)
    _, means_only = metrics.aggregate_posterior_moments(mu)
    assert means_only == pytest.approx(np.array([[a * a, a * b], [a * b, b * b]]))
    assert metrics.covariance_distance_to_identity(mu, logvar) == pytest.approx(
        np.linalg.norm(expected - np.eye(2)))
    assert metrics.covariance_distance_to_identity(mu) == pytest.approx(
        math.sqrt((a * a - 1) ** 2 + 2 * (a * b) ** 2 + (b * b - 1) ** 2))
    # Seed 001's F̃: every Σ_i = diag(s², t²), so ‖Σ_i − Σ̃‖_F = ‖diag(a², b²) + offdiag ab‖_F.
    assert metrics.mean_posterior_covariance_distance(mu, logvar) == pytest.approx(
        math.sqrt(a ** 4 + b ** 4 + 2 * (a * b) ** 2))


def test_aggregate_posterior_metrics_are_zero_at_the_prior_and_match_sampling():
    rng = np.random.default_rng(0)
    zeros = np.zeros((30, 3))
    assert metrics.covariance_distance_to_identity(zeros, zeros) == pytest.approx(0)
    assert metrics.mean_posterior_covariance_distance(zeros, zeros) == pytest.approx(0)
    # Varying per-sample variances: F̃ is the mean of per-sample distances (checked directly),
    # and the exact mixture covariance is what samples z ~ q(z|x) estimate.
    mu, logvar = rng.normal(size=(400, 3)), rng.normal(size=(400, 3)) - 1
    _, cov = metrics.aggregate_posterior_moments(mu, logvar)
    direct = np.mean([np.linalg.norm(np.diag(np.exp(lv)) - cov) for lv in logvar])
    assert metrics.mean_posterior_covariance_distance(mu, logvar) == pytest.approx(direct)
    z = (mu[None] + np.exp(logvar / 2)[None] * rng.normal(size=(500, *mu.shape))).reshape(-1, 3)
    assert np.cov(z.T) == pytest.approx(cov, abs=0.02)


def test_aggregate_posterior_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.aggregate_posterior_moments(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="must have 4 rows"):
        metrics.covariance_distance_to_identity(np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="logvar is required"):
        metrics.mean_posterior_covariance_distance(np.zeros((4, 2)), None)
    with pytest.raises(ValueError, match="NaN"):
        metrics.aggregate_posterior_moments(np.full((4, 2), np.nan))
