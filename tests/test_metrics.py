"""pyvae.metrics: hand-computed values on tiny inputs (rate, bits/dim, PSNR, capacity, mutual
information), the importance-weighted bound against the ELBO, model evaluation, probes on
separable and random labels, and every disentanglement metric on codes whose answer is known."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pyvae import metrics, models
from pyvae.data import Shapes2D

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# A ground-truth "data set" with known factors, and codes whose disentanglement is known


class Toy:
    """Three independent uniform factors of sizes 3, 4, 5; the "image" of a factor row is the
    row itself as a (3, 1, 1) float tensor."""

    factor_sizes = (3, 4, 5)

    @classmethod
    def sample_factors(cls, n, rng):
        return np.stack([rng.integers(0, k, n) for k in cls.factor_sizes], axis=1)

    @staticmethod
    def render(factors):
        return torch.as_tensor(factors, dtype=torch.float32).view(len(factors), 3, 1, 1)


SIZES = np.array(Toy.factor_sizes)
GRID = np.stack(np.meshgrid(*[np.arange(k) for k in SIZES], indexing="ij"), -1).reshape(-1, 3)
# A rotation that mixes every factor into every code dimension (the standardised factors).
ROTATION = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))[0]


def standardised(f):
    f = np.asarray(f, dtype=np.float64)
    return (f - (SIZES - 1) / 2) / np.sqrt((SIZES ** 2 - 1) / 12)


def perfect(x):
    return 0.5 * x.flatten(1)  # code d = factor d, scaled


def repeated(x):
    return x.flatten(1)[:, [0, 0, 1]]  # factor 0 twice, factor 2 omitted


def mixture(x):
    return standardised(x.flatten(1).numpy()) @ ROTATION


def make_noise(seed=3):
    rng = np.random.default_rng(seed)
    return lambda x: torch.as_tensor(rng.normal(size=(len(x), 3)))


# ----------------------------------------------------------------------------------------------
# Information measures: hand-computed values


def test_rate_bits_hand_computed():
    mu = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(4.0), 0.0]])
    expected = torch.tensor([0.0, 1.0, 0.5 * (4.0 - 1.0 - math.log(4.0))]) / LN2  # nats -> bits
    torch.testing.assert_close(metrics.rate_bits(mu, logvar), expected)
    torch.testing.assert_close(metrics.rate_bits(mu, logvar, reduction="mean"), expected.mean())
    torch.testing.assert_close(metrics.rate_bits(mu, logvar, num_pixels=4), expected / 4)
    # A posterior equal to its prior stores nothing; N(1, 1) against N(0, e²): ½(2 − 0 + 2/e² − 1).
    torch.testing.assert_close(metrics.rate_bits(mu, logvar, prior_mu=mu, prior_logvar=logvar),
                               torch.zeros(3))
    one = metrics.rate_bits(torch.ones(1, 1), torch.zeros(1, 1),
                            prior_logvar=torch.full((1, 1), 2.0))
    assert one.item() == pytest.approx(0.5 * (2.0 + 2.0 * math.exp(-2.0) - 1.0) / LN2)
    with pytest.raises(ValueError, match="mu and logvar"):
        metrics.rate_bits(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="reduction"):
        metrics.rate_bits(mu, logvar, reduction="sum")


def test_bits_per_dim_psnr_elbo_capacity_hand_computed():
    assert metrics.bits_per_dim(3.0 * 64 * LN2, 64) == pytest.approx(3.0)
    torch.testing.assert_close(metrics.bits_per_dim(torch.tensor([LN2, 2 * LN2]), 1),
                               torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="num_dims"):
        metrics.bits_per_dim(1.0, 0)

    x = torch.zeros(2, 1, 4, 4)
    x_hat = torch.full_like(x, 0.1)  # MSE 0.01 -> 20 dB
    x_hat[1] = 0.0  # exact -> inf
    p = metrics.psnr(x, x_hat)
    assert p.shape == (2,) and p[0].item() == pytest.approx(20.0) and math.isinf(p[1].item())
    assert metrics.psnr(np.zeros((1, 3)), np.full((1, 3), 25.5), max_value=255.0)[0].item() \
        == pytest.approx(20.0)
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(x, x[:, :, :2])

    torch.testing.assert_close(metrics.elbo(torch.tensor([3.0, 1.0]), torch.tensor([0.5, 0.0])),
                               torch.tensor([-3.5, -1.0]))
    assert metrics.capacity_bits(4, 1.0, 1.0) == pytest.approx(2.0)  # 4/2 · log2(1 + 1)
    assert metrics.capacity_bits(4, 1.0, 1.0) == models.gaussian_channel_capacity_bits(4, 1.0, 1.0)
    with pytest.raises(ValueError, match="noise_std"):
        metrics.capacity_bits(4, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Importance-weighted bound and model evaluation


def small_vae(cls=models.VAE, **kwargs):
    torch.manual_seed(0)
    return cls(2, 1, 8, hidden=16, **kwargs)


def binary_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) < 0.3).float()


def test_iwae_k1_is_the_single_sample_elbo_with_the_same_noise():
    model, x = small_vae(), binary_images(5)
    eps = torch.randn(1, 5, 2, generator=torch.Generator().manual_seed(1))
    bound = metrics.iwae_bound(model, x, k=1, eps=eps)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu + std * eps[0]
        log_px = -model.likelihood.nll(model.decode(z), x)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    assert bound.shape == (5,)
    torch.testing.assert_close(bound, log_px + log_pz - log_qz, rtol=1e-5, atol=1e-4)


def test_iwae_bound_is_above_the_elbo_and_grows_with_k():
    # A posterior twice as wide as the prior, N(mu, 4·I): the ELBO pays about
    # KL(N(0, 4) || N(0, 1)) = 1.6 nats over log p(x) (the untrained decoder hardly depends on
    # z), and importance weighting with such a wide proposal recovers it with little noise.
    model, x = small_vae(), binary_images(8)
    with torch.no_grad():
        model.head.weight[2:] = 0.0
        model.head.bias[2:] = math.log(4.0)
    g = torch.Generator().manual_seed(2)
    samples = 256
    # E[L_1] is the ELBO: the mean of L_1 over many draws matches −E[distortion] − KL (analytic).
    eps = torch.randn(samples, 8, 2, generator=g)
    # One call: L_1 of x repeated `samples` times, draw s of image b at row s·8 + b.
    l1 = metrics.iwae_bound(model, x.repeat(samples, 1, 1, 1), k=1,
                            eps=eps.reshape(1, -1, 2)).view(samples, 8)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        distortion = model.likelihood.nll(model.decode(z.reshape(-1, 2)),
                                          x.repeat(samples, 1, 1, 1)).view(samples, 8)
    kl_nats = metrics.rate_bits(mu, logvar) * LN2
    elbo = metrics.elbo(distortion.mean(0), kl_nats)  # (8,) nats
    stderr = l1.std(0) / math.sqrt(samples)
    assert ((l1.mean(0) - elbo).abs() < 4 * stderr).all()
    # L_k >= ELBO in expectation, and more samples tighten the bound.
    l8 = torch.stack([metrics.iwae_bound(model, x, k=8, generator=g, chunk_size=3)
                      for _ in range(8)]).mean(0)
    l64 = torch.stack([metrics.iwae_bound(model, x, k=64, generator=g) for _ in range(8)]).mean(0)
    assert (l64 > elbo + 1.0).all()
    assert l64.mean() > l8.mean() > elbo.mean() + 1.0


def test_iwae_bound_models_and_errors():
    x = binary_images(3)
    assert metrics.iwae_bound(small_vae(models.BetaTCVAE, dataset_size=100), x, k=4).shape == (3,)
    model = small_vae()
    model.train()
    metrics.iwae_bound(model, x, k=2)
    assert model.training  # the mode is restored
    with pytest.raises(TypeError, match="single-latent"):
        metrics.iwae_bound(models.HierarchicalVAE([2, 2], [1.0, 1.0], 1, 8, hidden=16), x)
    with pytest.raises(ValueError, match="eps"):
        metrics.iwae_bound(model, x, k=2, eps=torch.zeros(3, 3, 2))
    with pytest.raises(ValueError, match="k must be"):
        metrics.iwae_bound(model, x, k=0)


def test_evaluate_matches_the_model_output_and_is_reproducible():
    model, x = small_vae(), binary_images(10)
    result = metrics.evaluate(model, x, batch_size=16, seed=7)  # one batch
    torch.manual_seed(7)
    with torch.no_grad():
        output = model.loss(x)
    assert result["num_examples"] == 10
    assert result["distortion"] == pytest.approx(float(output.distortion.mean()), rel=1e-6)
    assert result["rate_bits"] == pytest.approx(float(output.rate_bits.mean()), rel=1e-6)
    assert result["rate_bits_per_dim"] == pytest.approx(result["rate_bits"] / 64)
    assert result["elbo_nats"] == pytest.approx(-(result["distortion"] + LN2 * result["rate_bits"]))
    # Batches of (image, label) tuples, reproducible, and max_batches.
    data = TensorDataset(x, torch.zeros(10))
    again = metrics.evaluate(model, data, batch_size=4, seed=7)
    assert again == metrics.evaluate(model, data, batch_size=4, seed=7)
    assert metrics.evaluate(model, data, batch_size=4, max_batches=2)["num_examples"] == 8
    loader = [x[:6], (x[6:], None)]
    assert metrics.evaluate(model, loader)["num_examples"] == 10
    with pytest.raises(ValueError, match="no examples"):
        metrics.evaluate(model, [])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        metrics.evaluate(model, x, batch_size=0)


def test_evaluate_reports_layer_rates_and_bits_per_dim():
    torch.manual_seed(0)
    hierarchical = models.HierarchicalVAE([3, 2], [1.0, 1.0], 1, 8, hidden=16)
    result = metrics.evaluate(hierarchical, binary_images(6), batch_size=4)
    assert len(result["layer_rates_bits"]) == 2
    assert sum(result["layer_rates_bits"]) == pytest.approx(result["rate_bits"], rel=1e-5)
    patch = models.PatchVAE(3, 1, 4, 1)
    patches = torch.randint(0, 256, (6, 1, 3, 3)).float() / 255
    result = metrics.evaluate(patch, patches, batch_size=4)
    assert result["bits_per_dim"] == pytest.approx(result["distortion"] / (9 * LN2), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Probes


def separable(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, 2))
    return x, (x @ w > 0).astype(np.int64), rng.integers(0, 2, (n, 1))


@pytest.mark.parametrize("kind", metrics.PROBE_KINDS)
def test_probe_separable_versus_random_labels(kind):
    x, y, noise = separable(600, 5, seed=0)
    labels = np.concatenate([y[:, :1], noise, y[:, 1:]], axis=1)  # separable, random, separable
    result = metrics.linear_probe(x[:400], labels[:400], x[400:], labels[400:], kind=kind)
    assert result["kind"] == kind
    per_label = result["per_label_accuracy"]
    assert len(per_label) == 3 and per_label[0] > 0.85 and per_label[2] > 0.85
    assert abs(per_label[1] - 0.5) < 0.15  # chance on held-out data
    assert result["test_accuracy"] == pytest.approx(np.mean(per_label))
    assert result["train_accuracy"] == pytest.approx(np.mean(result["per_label_train_accuracy"]))


def test_probe_multiclass_feature_maps_and_tensors():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, 300)
    maps = rng.normal(size=(300, 2, 3, 3)) + 3.0 * classes[:, None, None, None]
    result = metrics.linear_probe(torch.as_tensor(maps[:200]), torch.as_tensor(classes[:200]),
                                  maps[200:], classes[200:], kind="logistic", seed=3)
    assert result["train_accuracy"] == 1.0 and result["test_accuracy"] == 1.0
    assert "per_label_accuracy" not in result
    flat = metrics.linear_probe(maps[:200].reshape(200, -1), classes[:200],
                                maps[200:].reshape(100, -1), classes[200:], seed=3)
    assert flat == result


def test_probe_errors():
    x, y, _ = separable(20, 3, seed=0)
    with pytest.raises(ValueError, match="kind"):
        metrics.linear_probe(x, y, x, y, kind="tree")
    with pytest.raises(ValueError, match="train_labels must have 20 rows"):
        metrics.linear_probe(x, y[:10], x, y)
    with pytest.raises(ValueError, match="same number of features"):
        metrics.linear_probe(x, y, x[:, :2], y)
    constant = y.copy()
    constant[:, 1] = 1
    with pytest.raises(ValueError, match="column 1 has a single class"):
        metrics.linear_probe(x, constant, x, constant)


def test_features_of_returns_posterior_means_in_order():
    model, x = small_vae(), binary_images(10)
    with torch.no_grad():
        expected = model.encode(x)[0].numpy()
    features = metrics.features_of(model.encode, TensorDataset(x, torch.arange(10)), batch_size=4)
    assert features.shape == (10, 2) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics.features_of(metrics.mean_encoder(model), x, 3), expected,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="encode_fn must return"):
        metrics.features_of(lambda batch: torch.zeros(2), x)


# ----------------------------------------------------------------------------------------------
# Mutual information and MIG


def test_discrete_mutual_information_and_entropy_hand_computed():
    a = np.array([0, 0, 0, 1])
    b = np.array([0, 0, 1, 1])
    # p(0,0) = 1/2, p(0,1) = 1/4, p(1,1) = 1/4; p(a) = (3/4, 1/4), p(b) = (1/2, 1/2).
    expected = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    mi = metrics.discrete_mutual_info(a, np.stack([b, b, a], axis=1))
    np.testing.assert_allclose(mi, [[expected, expected, 0.75 * math.log(4 / 3)
                                     + 0.25 * math.log(4)]])
    np.testing.assert_allclose(metrics.discrete_entropy(np.array([[0, 0], [0, 1], [1, 2],
                                                                  [1, 3]])),
                               [math.log(2), math.log(4)])
    np.testing.assert_array_equal(
        metrics.histogram_discretize(np.array([[0.0, 5.0], [0.5, 5.0], [1.0, 5.0]]), num_bins=2),
        [[1, 2], [2, 2], [2, 2]])  # a constant column: one bin (np.histogram centres it)


def test_mig_exact_on_the_full_factor_grid():
    # Every combination once: distinct factors are exactly independent, so the plug-in MI of a
    # code dimension with any other factor is exactly 0 and MIG is exactly 1.
    result = metrics.mig(0.5 * GRID, GRID)
    assert result["mig"] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(result["factor_entropy"], np.log(SIZES))
    np.testing.assert_allclose(result["mi_matrix"], np.diag(np.log(SIZES)), atol=1e-12)
    # Factor 0 in two dimensions (gap 0), factor 2 in none (gap 0): MIG = 1/3.
    repeated_grid = metrics.mig(GRID[:, [0, 0, 1]], GRID)
    np.testing.assert_allclose(repeated_grid["per_factor_mig"], [0.0, 1.0, 0.0], atol=1e-12)
    assert repeated_grid["mig"] == pytest.approx(1 / 3)


def test_mig_score_on_known_codes():
    def score(fn):
        return metrics.mig_score(fn, Toy, num_train=2000, seed=0)

    assert score(perfect)["mig"] > 0.99  # 1 minus the plug-in bias of independent pairs
    rep = score(repeated)
    assert rep["per_factor_mig"][0] == pytest.approx(0.0, abs=1e-12)
    assert rep["per_factor_mig"][1] > 0.99 and rep["per_factor_mig"][2] < 0.01
    assert score(make_noise())["mig"] < 0.01
    assert score(mixture)["mig"] < 0.5


def test_mig_errors():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        metrics.mig(GRID[:, :1], GRID)
    with pytest.raises(ValueError, match="constant"):
        metrics.mig(GRID, np.zeros_like(GRID))
    with pytest.raises(ValueError, match="integer values"):
        metrics.mig(GRID, GRID + 0.5)
    with pytest.raises(ValueError, match="factors must have 60 rows"):
        metrics.mig(GRID, GRID[:10])


# ----------------------------------------------------------------------------------------------
# β-VAE and FactorVAE metrics


def test_beta_vae_score_on_known_codes():
    sizes = dict(batch_size=32, num_train=300, num_eval=300, seed=0)
    assert metrics.beta_vae_score(perfect, Toy, **sizes) == {"train_accuracy": 1.0,
                                                            "eval_accuracy": 1.0}
    noise = metrics.beta_vae_score(make_noise(), Toy, **sizes)
    assert abs(noise["eval_accuracy"] - 1 / 3) < 0.1  # chance: 1/K
    assert metrics.beta_vae_score(mixture, Toy, **sizes) == \
        metrics.beta_vae_score(mixture, Toy, **sizes)  # fixed seeds


def test_factor_vae_score_on_known_codes():
    sizes = dict(batch_size=32, num_train=300, num_eval=300, num_variance_estimate=1000, seed=0)
    assert metrics.factor_vae_score(perfect, Toy, **sizes) == {
        "train_accuracy": 1.0, "eval_accuracy": 1.0, "num_active_dims": 3}
    noise = metrics.factor_vae_score(make_noise(), Toy, **sizes)
    assert abs(noise["eval_accuracy"] - 1 / 3) < 0.1 and noise["num_active_dims"] == 3
    # A collapsed (constant) dimension is pruned and never voted for.
    collapsed = metrics.factor_vae_score(
        lambda x: torch.cat([perfect(x), torch.zeros(len(x), 1)], dim=1), Toy, **sizes)
    assert collapsed == {"train_accuracy": 1.0, "eval_accuracy": 1.0, "num_active_dims": 3}
    assert metrics.factor_vae_score(lambda x: 0.01 * x.flatten(1), Toy, **sizes) == {
        "train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}
    # std_threshold=0 (disentanglement_lib's bare default) keeps such small-scale dimensions.
    small = metrics.factor_vae_score(lambda x: 0.01 * x.flatten(1), Toy, std_threshold=0.0,
                                     **sizes)
    assert small["eval_accuracy"] == 1.0 and small["num_active_dims"] == 3
    with pytest.raises(ValueError, match="std_threshold must be >= 0"):
        metrics.factor_vae_score(perfect, Toy, std_threshold=float("nan"), **sizes)


def test_factor_vae_score_prunes_on_std_not_variance():
    # Codes of std ~0.1 (variance ~0.01) carry the factors: disentanglement_lib keeps them
    # (std >= 0.05); a variance threshold of 0.05 would drop every one.
    sizes = dict(batch_size=32, num_train=300, num_eval=300, num_variance_estimate=1000, seed=0)
    scale = torch.as_tensor(0.1 / np.sqrt((SIZES ** 2 - 1) / 12), dtype=torch.float32)
    codes = lambda x: x.flatten(1) * scale  # noqa: E731  (std 0.1 for every factor)
    variances = codes(Toy.render(Toy.sample_factors(1000, np.random.default_rng(0)))).var(0)
    assert bool((variances < 0.05).all()) and bool((variances.sqrt() >= 0.05).all())
    assert metrics.factor_vae_score(codes, Toy, **sizes) == {
        "train_accuracy": 1.0, "eval_accuracy": 1.0, "num_active_dims": 3}


def test_sampling_metric_errors():
    class NoRender:
        factor_sizes = (3, 4)
        sample_factors = Toy.sample_factors

    with pytest.raises(TypeError, match="lacks render"):
        metrics.beta_vae_score(perfect, NoRender(), num_train=2, num_eval=2)
    with pytest.raises(ValueError, match=r"mig_score: encode_fn must return codes of shape"):
        metrics.mig_score(lambda x: torch.zeros(len(x)), Toy, num_train=10)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        metrics.factor_vae_score(perfect, Toy, batch_size=1)
    with pytest.raises(TypeError, match="num_train must be an int"):
        metrics.dci_score(perfect, Toy, num_train=10.5)


# ----------------------------------------------------------------------------------------------
# DCI


def test_dci_on_known_codes():
    def score(fn):
        return metrics.dci_score(fn, Toy, num_train=500, num_test=300, seed=0)

    good = score(perfect)
    assert good["disentanglement"] > 0.99 and good["completeness"] > 0.99
    assert good["informativeness"] == good["informativeness_test"] == 1.0
    assert good["importance_matrix"].shape == (3, 3)
    np.testing.assert_allclose(good["importance_matrix"].sum(0), 1.0)
    mixed = score(mixture)
    assert mixed["disentanglement"] < 0.6 and mixed["completeness"] < 0.6
    assert mixed["informativeness"] > 0.95  # all the information is there, just rotated
    noise = score(make_noise())
    assert noise["disentanglement"] < 0.1 and noise["completeness"] < 0.1
    assert noise["informativeness_test"] < 0.5


def test_dci_hand_built_importances():
    # Two factors, each a function of its own code dimension (an identity map), tested on
    # the full grid: one-hot importances give D = C = 1.
    codes = GRID[:, :2].astype(float)
    result = metrics.dci(codes, GRID[:, :2], codes, GRID[:, :2])
    np.testing.assert_allclose(result["importance_matrix"], np.eye(2), atol=1e-12)
    assert result["disentanglement"] == pytest.approx(1.0, abs=1e-8)
    assert result["completeness"] == pytest.approx(1.0, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2 code dimensions"):
        metrics.dci(codes[:, :1], GRID[:, :2], codes[:, :1], GRID[:, :2])


# ----------------------------------------------------------------------------------------------
# The real ground-truth data set


def test_mig_on_shapes2d_with_a_centroid_encoder():
    """Shapes2D and a hand-made encoder (mass and centre of mass of the image): the position
    factors are each captured by one code dimension, the orientation by none."""
    coords = torch.arange(64, dtype=torch.float32)

    def centroid(x):
        mass = x.sum(dim=(1, 2, 3))
        cx = (x.sum(dim=(1, 2)) * coords).sum(-1) / mass
        cy = (x.sum(dim=(1, 3)) * coords).sum(-1) / mass
        return torch.stack([mass, cx, cy], dim=1)

    result = metrics.mig_score(centroid, Shapes2D, num_train=600, seed=0)
    gaps = dict(zip(Shapes2D.factor_names, result["per_factor_mig"]))
    assert gaps["pos_x"] > 0.5 and gaps["pos_y"] > 0.5
    assert gaps["orientation"] < 0.1
    assert result["mi_matrix"].shape == (3, 5)
