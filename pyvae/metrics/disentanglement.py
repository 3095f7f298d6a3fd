"""Disentanglement metrics on data with known generative factors (seeds 001, 003, 004).

The definitions and default sizes follow disentanglement_lib (Locatello et al. 2019), so that
scores compare with the literature:

* :func:`beta_vae_score` — Higgins et al. 2017;
* :func:`factor_vae_score` — Kim & Mnih 2018;
* :func:`mig` / :func:`mig_score` — the mutual information gap of Chen et al. 2018;
* :func:`dci` / :func:`dci_score` — disentanglement, completeness, informativeness of
  Eastwood & Williams 2018 with gradient-boosted trees.

The sampling metrics take ``(encode_fn, dataset, ..., seed)``:

* ``encode_fn`` maps a batch of observations (a (B, C, H, W) float tensor) to codes (B, D) —
  a numpy array or tensor of posterior means (a tuple ``(mu, logvar)`` is also accepted, its
  first element is used); :func:`pyvae.metrics.mean_encoder` makes one from a model. It is called
  without gradients.
* ``dataset`` is any object with ``factor_sizes`` (K ints), ``sample_factors(n, rng)`` (int
  array (n, K) drawn with the numpy ``Generator`` rng) and ``render(factors)`` (the observations
  of factor rows), e.g. :class:`pyvae.data.Shapes2D`.
* every random draw comes from ``np.random.default_rng(seed)``; classifiers get ``seed`` as
  their ``random_state``.

Mutual informations and entropies are in nats; MIG is a ratio and so unit-free.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.stats
import torch
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score

from pyvae._validate import check_int
from pyvae.metrics._utils import as_discrete, as_matrix, to_numpy

# ----------------------------------------------------------------------------------------------
# Sampling from a ground-truth data set


def _check_dataset(owner: str, dataset) -> tuple[int, ...]:
    """The factor sizes of ``dataset``, after checking it has the methods the metrics use."""
    missing = [name for name in ("factor_sizes", "sample_factors", "render")
               if not hasattr(dataset, name)]
    if missing:
        raise TypeError(f"{owner}: dataset must have factor_sizes, sample_factors(n, rng) and "
                        f"render(factors) (like pyvae.data.Shapes2D); {type(dataset).__name__} "
                        f"lacks {', '.join(missing)}")
    sizes = tuple(int(k) for k in dataset.factor_sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"{owner}: dataset.factor_sizes must list at least two factors of "
                         f"size >= 1, got {dataset.factor_sizes}")
    return sizes


def _encode(owner: str, encode_fn: Callable, dataset, factors: np.ndarray) -> np.ndarray:
    """Codes (n, D) float64 of the observations of ``factors`` (n, K)."""
    observations = dataset.render(factors)
    if isinstance(observations, np.ndarray):
        observations = torch.from_numpy(observations)
    with torch.no_grad():
        out = encode_fn(observations)
    codes = to_numpy(owner, "encode_fn output", out[0] if isinstance(out, (tuple, list)) else out)
    if codes.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"{owner}: encode_fn must return codes of shape (B, D) for a batch of "
                         f"{len(factors)} observations, got shape {codes.shape}")
    codes = codes.astype(np.float64)
    if not np.isfinite(codes).all():
        raise ValueError(f"{owner}: encode_fn returned NaN or infinite codes")
    return codes


def _sample_factors(owner: str, dataset, n: int, rng: np.random.Generator,
                    num_factors: int) -> np.ndarray:
    factors = np.array(dataset.sample_factors(n, rng), dtype=np.int64)
    if factors.shape != (n, num_factors):
        raise ValueError(f"{owner}: dataset.sample_factors({n}, rng) must return an array of "
                         f"shape ({n}, {num_factors}), got {factors.shape}")
    return factors


def sample_codes(encode_fn: Callable, dataset, num_points: int, rng: np.random.Generator, *,
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_points`` factor combinations with ``rng`` and encode their observations.

    Args:
        encode_fn, dataset: see the module docstring.
        num_points: number of examples (>= 1).
        rng: a ``numpy.random.Generator`` (advanced in place).
        batch_size: observations rendered and encoded per call (does not change the draws'
            distribution, only the speed).

    Returns:
        ``(codes, factors)``: float64 array (num_points, D) and int64 array (num_points, K).
    """
    return _sample_codes("sample_codes", encode_fn, dataset, num_points, rng, batch_size)


def _sample_codes(owner: str, encode_fn: Callable, dataset, num_points: int,
                  rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_codes` with errors naming the public function ``owner``."""
    num_factors = len(_check_dataset(owner, dataset))
    num_points = check_int(owner, "num_points", num_points, 1)
    batch_size = check_int(owner, "batch_size", batch_size, 1)
    codes, factors = [], []
    for start in range(0, num_points, batch_size):
        batch = _sample_factors(owner, dataset, min(batch_size, num_points - start), rng,
                                num_factors)
        codes.append(_encode(owner, encode_fn, dataset, batch))
        factors.append(batch)
    return np.concatenate(codes), np.concatenate(factors)


# ----------------------------------------------------------------------------------------------
# β-VAE metric


def beta_vae_score(encode_fn: Callable, dataset, *, batch_size: int = 64, num_train: int = 10000,
                   num_eval: int = 5000, seed: int = 0) -> dict:
    """The β-VAE disentanglement metric (Higgins et al. 2017), as in disentanglement_lib.

    Each point: draw a factor k uniformly, ``batch_size`` pairs of factor rows that share
    factor k (all other factors drawn independently), encode both sides; the point's feature is
    the mean over the pairs of |z₁ − z₂| (D,) and its label is k. A logistic regression
    (scikit-learn's, ``random_state=seed``, up to 1000 iterations) is fitted on ``num_train``
    points and scored on ``num_eval`` fresh points. A disentangled code has a near-zero feature
    on the dimension of factor k, which a linear classifier reads off.

    (disentanglement_lib ran scikit-learn's then-default liblinear one-vs-rest logistic
    regression; the current default is the multinomial lbfgs one, used here.)

    Args:
        encode_fn, dataset: see the module docstring.
        batch_size: pairs averaged per point (L = 64 in the paper).
        num_train, num_eval: training and evaluation points.
        seed: seed of every draw and of the classifier.

    Returns:
        dict: ``train_accuracy``, ``eval_accuracy`` (fractions; chance is 1 / K).
    """
    owner = "beta_vae_score"
    sizes = _check_dataset(owner, dataset)
    batch_size = check_int(owner, "batch_size", batch_size, 1)
    num_train = check_int(owner, "num_train", num_train, 1)
    num_eval = check_int(owner, "num_eval", num_eval, 1)
    rng = np.random.default_rng(check_int(owner, "seed", seed, 0))

    def points(n: int) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], np.empty(n, dtype=np.int64)
        for i in range(n):
            k = int(rng.integers(len(sizes)))
            first = _sample_factors(owner, dataset, batch_size, rng, len(sizes))
            second = _sample_factors(owner, dataset, batch_size, rng, len(sizes))
            second[:, k] = first[:, k]
            codes = _encode(owner, encode_fn, dataset, np.concatenate([first, second]))
            features.append(np.abs(codes[:batch_size] - codes[batch_size:]).mean(0))
            labels[i] = k
        return np.stack(features), labels

    train_x, train_y = points(num_train)
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"{owner}: num_train={num_train} points drew a single factor; use more")
    model = LogisticRegression(max_iter=1000, random_state=seed).fit(train_x, train_y)
    eval_x, eval_y = points(num_eval)
    return {"train_accuracy": float(model.score(train_x, train_y)),
            "eval_accuracy": float(model.score(eval_x, eval_y))}


# ----------------------------------------------------------------------------------------------
# FactorVAE metric


def factor_vae_score(encode_fn: Callable, dataset, *, batch_size: int = 64,
                     num_train: int = 10000, num_eval: int = 5000,
                     num_variance_estimate: int = 10000, std_threshold: float = 0.05,
                     seed: int = 0) -> dict:
    """The FactorVAE disentanglement metric (Kim & Mnih 2018), as in disentanglement_lib.

    1. The global variance of every code dimension is estimated (ddof = 1) on the codes of
       ``num_variance_estimate`` random observations; dimensions whose global standard
       deviation is below ``std_threshold`` have collapsed to the prior and are pruned.
    2. Each vote: draw a factor k uniformly, ``batch_size`` factor rows that all share one value
       of factor k, encode them; the vote goes to (k, d) for the active dimension d with the
       smallest variance over the batch relative to its global variance.
    3. The majority-vote classifier maps each dimension to the factor that most of the
       ``num_train`` training votes gave it; the accuracy is the fraction of votes it predicts,
       on the training votes and on ``num_eval`` fresh votes.

    (As disentanglement_lib's ``_prune_dims``, the threshold applies to the standard deviation,
    not the variance; 0.05 is the value of its published FactorVAE-metric configuration, and
    ``std_threshold=0`` keeps every dimension, as its bare function default does. Codes whose
    scale is far from the N(0, I) prior's may need a different threshold.)

    Args:
        encode_fn, dataset: see the module docstring.
        batch_size: observations per vote (>= 2).
        num_train, num_eval: training and evaluation votes.
        num_variance_estimate: observations for the global variances (>= 2).
        std_threshold: dimensions with a smaller global standard deviation are pruned.
        seed: seed of every draw.

    Returns:
        dict: ``train_accuracy``, ``eval_accuracy`` (fractions; chance is about 1 / K; both 0
        when every dimension is pruned), ``num_active_dims`` (dimensions kept).
    """
    owner = "factor_vae_score"
    sizes = _check_dataset(owner, dataset)
    batch_size = check_int(owner, "batch_size", batch_size, 2)
    num_train = check_int(owner, "num_train", num_train, 1)
    num_eval = check_int(owner, "num_eval", num_eval, 1)
    num_variance_estimate = check_int(owner, "num_variance_estimate", num_variance_estimate, 2)
    if not std_threshold >= 0:  # also refuses NaN
        raise ValueError(f"{owner}: std_threshold must be >= 0, got {std_threshold}")
    rng = np.random.default_rng(check_int(owner, "seed", seed, 0))

    codes, _ = _sample_codes(owner, encode_fn, dataset, num_variance_estimate, rng, 64)
    global_variances = np.var(codes, axis=0, ddof=1)
    active = np.flatnonzero(np.sqrt(global_variances) >= std_threshold)
    if len(active) == 0:
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}

    def votes(n: int) -> np.ndarray:
        counts = np.zeros((len(sizes), codes.shape[1]), dtype=np.int64)
        for _ in range(n):
            k = int(rng.integers(len(sizes)))
            factors = _sample_factors(owner, dataset, batch_size, rng, len(sizes))
            factors[:, k] = factors[0, k]
            local = np.var(_encode(owner, encode_fn, dataset, factors), axis=0, ddof=1)
            counts[k, active[np.argmin(local[active] / global_variances[active])]] += 1
        return counts

    train_votes = votes(num_train)
    classifier = np.argmax(train_votes, axis=0)  # the factor each dimension predicts
    dims = np.arange(codes.shape[1])
    eval_votes = votes(num_eval)
    return {"train_accuracy": float(train_votes[classifier, dims].sum() / num_train),
            "eval_accuracy": float(eval_votes[classifier, dims].sum() / num_eval),
            "num_active_dims": int(len(active))}


# ----------------------------------------------------------------------------------------------
# Mutual information gap


def histogram_discretize(codes, num_bins: int = 20) -> np.ndarray:
    """Discretise every column into ``num_bins`` equal-width bins over its own range
    (disentanglement_lib's ``_histogram_discretize``).

    Args:
        codes: (N, D) array or tensor.
        num_bins: bins per column.

    Returns:
        int64 array (N, D) of bin labels in 1 .. num_bins (the column's maximum falls in bin
        ``num_bins``; a constant column is all in one bin).
    """
    owner = "histogram_discretize"
    codes = as_matrix(owner, "codes", codes)
    num_bins = check_int(owner, "num_bins", num_bins, 1)
    out = np.empty(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram(codes[:, d], num_bins)[1]
        out[:, d] = np.digitize(codes[:, d], edges[:-1])
    return out


def discrete_mutual_info(a, b) -> np.ndarray:
    """Plug-in mutual information I(a_i; b_j) between every column of two discrete arrays, nats.

    Args:
        a: (N, Da) and b: (N, Db) integer arrays (or (N,)), e.g. discretised codes and factors.

    Returns:
        float64 array (Da, Db).
    """
    owner = "discrete_mutual_info"
    a = as_discrete(owner, "a", a)
    b = as_discrete(owner, "b", b, rows=len(a))
    return np.array([[mutual_info_score(b[:, j], a[:, i]) for j in range(b.shape[1])]
                     for i in range(a.shape[1])]).reshape(a.shape[1], b.shape[1])


def discrete_entropy(a) -> np.ndarray:
    """Plug-in entropy H(a_j) = I(a_j; a_j) of every column of a discrete (N, K) array, nats:
    float64 array (K,)."""
    a = as_discrete("discrete_entropy", "a", a)
    return np.array([mutual_info_score(a[:, j], a[:, j]) for j in range(a.shape[1])])


def mig(codes, factors, *, num_bins: int = 20) -> dict:
    """Mutual information gap (Chen et al. 2018) of codes against known discrete factors.

    Each code dimension is discretised into ``num_bins`` equal-width bins
    (:func:`histogram_discretize`); the plug-in mutual information I(z_d; v_k) of every code
    dimension d and factor k and the entropy H(v_k) give

        MIG = 1/K Σ_k (I(z_(1); v_k) − I(z_(2); v_k)) / H(v_k),

    with z_(1), z_(2) the dimensions of largest and second-largest information about v_k.
    1 means every factor is captured by one dimension alone; 0 means no dimension stands out.

    Args:
        codes: (N, D) codes (array or tensor), D >= 2.
        factors: (N, K) integer factor values.
        num_bins: bins per code dimension.

    Returns:
        dict: ``mig`` (float), ``per_factor_mig`` (K,) the normalised gaps, ``mi_matrix``
        (D, K) nats, ``factor_entropy`` (K,) nats.

    Raises:
        ValueError: fewer than 2 code dimensions, or a constant factor (entropy 0).
    """
    owner = "mig"
    codes = as_matrix(owner, "codes", codes)
    factors = as_discrete(owner, "factors", factors, rows=len(codes))
    if codes.shape[1] < 2:
        raise ValueError(f"{owner}: codes must have at least 2 dimensions, got {codes.shape[1]}")
    mi = discrete_mutual_info(histogram_discretize(codes, num_bins), factors)
    entropy = discrete_entropy(factors)
    if (entropy <= 0).any():
        raise ValueError(f"{owner}: factors column(s) {np.flatnonzero(entropy <= 0).tolist()} "
                         "are constant (entropy 0); MIG is undefined for them")
    top = np.sort(mi, axis=0)[::-1]
    gaps = (top[0] - top[1]) / entropy
    return {"mig": float(gaps.mean()), "per_factor_mig": gaps, "mi_matrix": mi,
            "factor_entropy": entropy}


def mig_score(encode_fn: Callable, dataset, *, num_train: int = 10000, num_bins: int = 20,
              batch_size: int = 64, seed: int = 0) -> dict:
    """:func:`mig` on the codes of ``num_train`` random observations of ``dataset`` (module
    docstring: ``encode_fn``, ``dataset``); returns :func:`mig`'s dict."""
    owner = "mig_score"
    num_train = check_int(owner, "num_train", num_train, 1)
    rng = np.random.default_rng(check_int(owner, "seed", seed, 0))
    codes, factors = _sample_codes(owner, encode_fn, dataset, num_train, rng, batch_size)
    return mig(codes, factors, num_bins=num_bins)


# ----------------------------------------------------------------------------------------------
# DCI


def _one_minus_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """1 − entropy (in base = the axis length) of the importances along ``axis``, normalised
    to sum to one (the 1e-11 keeps all-zero slices defined, as in disentanglement_lib)."""
    return 1.0 - scipy.stats.entropy(p + 1e-11, base=p.shape[axis], axis=axis)


def dci(codes_train, factors_train, codes_test, factors_test, *, seed: int = 0) -> dict:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018) with
    gradient-boosted trees, as in disentanglement_lib.

    For every factor k a ``GradientBoostingClassifier`` (scikit-learn defaults: 100 trees of
    depth 3; ``random_state=seed``) predicts v_k from the codes; its feature importances form
    column k of the importance matrix R (D, K) (each column sums to one).

    * disentanglement = Σ_d ρ_d (1 − H_K(R_d·)), ρ_d = Σ_k R_dk / Σ R: each code dimension's
      importance concentrated on few factors, weighted by the dimension's share of importance;
    * completeness = Σ_k ρ_k (1 − H_D(R_·k)), ρ_k = Σ_d R_dk / Σ R (= 1/K, so the mean over
      factors, since the columns sum to one): each factor captured by few dimensions;
    * informativeness = the classifiers' mean accuracy on the test set (and on the training
      set),

    where H_K and H_D are entropies in base K and D of the normalised rows and columns.

    Args:
        codes_train, codes_test: (N, D) and (M, D) codes, D >= 2.
        factors_train, factors_test: (N, K) and (M, K) integer factors, K >= 2.
        seed: ``random_state`` of the classifiers.

    Returns:
        dict: ``disentanglement``, ``completeness``, ``informativeness`` (= test accuracy),
        ``informativeness_train``, ``informativeness_test`` (floats), ``importance_matrix``
        (D, K), ``per_code_disentanglement`` (D,), ``per_factor_completeness`` (K,).
    """
    owner = "dci"
    x_train = as_matrix(owner, "codes_train", codes_train)
    y_train = as_discrete(owner, "factors_train", factors_train, rows=len(x_train))
    x_test = as_matrix(owner, "codes_test", codes_test)
    y_test = as_discrete(owner, "factors_test", factors_test, rows=len(x_test))
    seed = check_int(owner, "seed", seed, 0)
    num_codes, num_factors = x_train.shape[1], y_train.shape[1]
    if num_codes < 2 or num_factors < 2:
        raise ValueError(f"{owner}: need at least 2 code dimensions and 2 factors, got "
                         f"codes_train with {num_codes} and factors_train with {num_factors}")
    if x_test.shape[1] != num_codes or y_test.shape[1] != num_factors:
        raise ValueError(f"{owner}: codes_test/factors_test must have {num_codes}/{num_factors} "
                         f"columns like the training arrays, got {x_test.shape[1]}/"
                         f"{y_test.shape[1]}")
    importance = np.zeros((num_codes, num_factors))
    train_accuracy, test_accuracy = [], []
    for k in range(num_factors):
        if len(np.unique(y_train[:, k])) < 2:
            raise ValueError(f"{owner}: factors_train column {k} is constant; every factor "
                             "needs at least two values")
        model = GradientBoostingClassifier(random_state=seed).fit(x_train, y_train[:, k])
        importance[:, k] = np.abs(model.feature_importances_)
        train_accuracy.append(float(np.mean(model.predict(x_train) == y_train[:, k])))
        test_accuracy.append(float(np.mean(model.predict(x_test) == y_test[:, k])))
    per_code = _one_minus_entropy(importance, axis=1)
    per_factor = _one_minus_entropy(importance, axis=0)
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    code_weights = weights.sum(1) / weights.sum()
    factor_weights = weights.sum(0) / weights.sum()
    informativeness = float(np.mean(test_accuracy))
    return {"disentanglement": float(np.sum(per_code * code_weights)),
            "completeness": float(np.sum(per_factor * factor_weights)),
            "informativeness": informativeness,
            "informativeness_train": float(np.mean(train_accuracy)),
            "informativeness_test": informativeness,
            "importance_matrix": importance,
            "per_code_disentanglement": per_code,
            "per_factor_completeness": per_factor}


def dci_score(encode_fn: Callable, dataset, *, num_train: int = 10000, num_test: int = 5000,
              batch_size: int = 64, seed: int = 0) -> dict:
    """:func:`dci` on the codes of ``num_train`` then ``num_test`` random observations of
    ``dataset`` (module docstring: ``encode_fn``, ``dataset``); returns :func:`dci`'s dict.
    Gradient boosting on the default 10,000 points takes minutes per factor on a few CPU cores."""
    owner = "dci_score"
    num_train = check_int(owner, "num_train", num_train, 1)
    num_test = check_int(owner, "num_test", num_test, 1)
    rng = np.random.default_rng(check_int(owner, "seed", seed, 0))
    codes_train, factors_train = _sample_codes(owner, encode_fn, dataset, num_train, rng,
                                               batch_size)
    codes_test, factors_test = _sample_codes(owner, encode_fn, dataset, num_test, rng, batch_size)
    return dci(codes_train, factors_train, codes_test, factors_test, seed=seed)
