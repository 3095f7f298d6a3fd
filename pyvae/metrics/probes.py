"""Probes on frozen features (seed 000 §6): how well a simple classifier predicts labels from a
representation, and the posterior means of a whole data set as features.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from torch.utils.data import DataLoader

from pyvae._validate import check_int
from pyvae.metrics._utils import as_discrete, as_matrix, to_numpy
from pyvae.metrics.information import collate_images

PROBE_KINDS = ("logistic", "linear_svm", "rbf_svm", "knn")


def make_probe(kind: str = "logistic", *, seed: int = 0, standardize: bool = True,
               max_iter: int = 1000, C: float = 1.0, n_neighbors: int = 5) -> Pipeline:
    """An unfitted scikit-learn pipeline: ``StandardScaler`` (if ``standardize``) + classifier.

    Args:
        kind: ``"logistic"`` (``LogisticRegression``: multinomial cross entropy for several
            classes, binary cross entropy for two), ``"linear_svm"`` (``LinearSVC``),
            ``"rbf_svm"`` (``SVC(kernel="rbf")``) or ``"knn"`` (``KNeighborsClassifier``).
        seed: ``random_state`` of the classifier.
        standardize: scale every feature to zero mean and unit variance on the training set.
        max_iter: iteration limit of ``"logistic"`` and ``"linear_svm"`` (the RBF SVM runs to
            convergence).
        C: inverse regularisation strength of ``"logistic"``, ``"linear_svm"``, ``"rbf_svm"``.
        n_neighbors: k of ``"knn"``.
    """
    owner = "make_probe"
    seed = check_int(owner, "seed", seed, 0)
    max_iter = check_int(owner, "max_iter", max_iter, 1)
    n_neighbors = check_int(owner, "n_neighbors", n_neighbors, 1)
    if not C > 0:
        raise ValueError(f"{owner}: C must be > 0, got {C}")
    if kind == "logistic":
        classifier = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    elif kind == "linear_svm":
        classifier = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
    elif kind == "rbf_svm":
        classifier = SVC(kernel="rbf", C=C, random_state=seed)
    elif kind == "knn":
        classifier = KNeighborsClassifier(n_neighbors=n_neighbors)
    else:
        raise ValueError(f"{owner}: kind must be one of {PROBE_KINDS}, got {kind!r}")
    steps = [("scale", StandardScaler())] if standardize else []
    return Pipeline(steps + [("classifier", classifier)])


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 kind: str = "logistic", seed: int = 0, standardize: bool = True,
                 max_iter: int = 1000, C: float = 1.0, n_neighbors: int = 5) -> dict:
    """Fit a probe on frozen training features and report its accuracies.

    Multi-class labels (N,) get one classifier; multi-label attributes (N, K) (e.g. CelebA's
    40 binary attributes) get one independent classifier per column (for ``"logistic"``: a
    binary cross entropy per attribute).

    Args:
        train_features, test_features: (N, D) features, or (N, D, H, W) stride-1 feature maps
            (flattened to N rows of D·H·W values); numpy arrays or torch tensors.
        train_labels, test_labels: (N,) class labels or (N, K) per-column labels (ints).
        kind, seed, standardize, max_iter, C, n_neighbors: the probe, see :func:`make_probe`.

    Returns:
        dict: ``kind``; ``train_accuracy`` and ``test_accuracy`` (fraction correct; for
        multi-label the mean over labels); for multi-label also ``per_label_accuracy`` and
        ``per_label_train_accuracy`` (lists of K floats, test and train).

    Raises:
        ValueError: mismatched rows or feature sizes, or a label (column) with a single class
            in the training set.
    """
    owner = "linear_probe"
    probe = make_probe(kind, seed=seed, standardize=standardize, max_iter=max_iter, C=C,
                       n_neighbors=n_neighbors)
    x_train = as_matrix(owner, "train_features", train_features)
    x_test = as_matrix(owner, "test_features", test_features)
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"{owner}: train_features and test_features must have the same number "
                         f"of features, got {x_train.shape[1]} and {x_test.shape[1]}")
    multi_label = to_numpy(owner, "train_labels", train_labels).ndim == 2
    y_train = as_discrete(owner, "train_labels", train_labels, rows=len(x_train))
    y_test = as_discrete(owner, "test_labels", test_labels, rows=len(x_test))
    if y_train.shape[1] != y_test.shape[1]:
        raise ValueError(f"{owner}: train_labels and test_labels must have the same number of "
                         f"labels, got {y_train.shape[1]} and {y_test.shape[1]}")
    train_accuracy, test_accuracy = [], []
    for column in range(y_train.shape[1]):
        classes = np.unique(y_train[:, column])
        if len(classes) < 2:
            where = f" column {column}" if multi_label else ""
            raise ValueError(f"{owner}: train_labels{where} has a single class "
                             f"({classes.tolist()}); a probe needs at least two")
        model = clone(probe).fit(x_train, y_train[:, column])
        train_accuracy.append(float(model.score(x_train, y_train[:, column])))
        test_accuracy.append(float(model.score(x_test, y_test[:, column])))
    result = {"kind": kind, "train_accuracy": float(np.mean(train_accuracy)),
              "test_accuracy": float(np.mean(test_accuracy))}
    if multi_label:
        result["per_label_accuracy"] = test_accuracy
        result["per_label_train_accuracy"] = train_accuracy
    return result


def mean_encoder(model, device: torch.device | str | None = None) -> Callable:
    """An ``encode_fn`` for :func:`features_of` and the disentanglement metrics: maps a batch
    (B, C, H, W) to the posterior means ``model.encode(x)[0]`` (B, D), computed on ``device``
    (default the model's) in eval mode without gradients, returned on the CPU."""
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def encode(x: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            mu = model.encode(torch.as_tensor(x).to(device))[0]
        finally:
            model.train(was_training)
        return mu.float().cpu()

    return encode


@torch.no_grad()
def features_of(encode_fn: Callable, dataset, batch_size: int = 256, *,
                device: torch.device | str | None = None) -> np.ndarray:
    """Encode a whole data set: the posterior means of every item, in order.

    Args:
        encode_fn: maps an image batch (B, C, H, W) to ``(mu, logvar)`` or to ``mu`` (B, D) or
            (B, D, H', W') (tensor or array), e.g. ``model.encode`` or
            :func:`mean_encoder` ``(model)``.
        dataset: a map-style data set whose items are images or ``(image, label)`` tuples, or
            an (N, C, H, W) tensor.
        batch_size: images per ``encode_fn`` call.
        device: where batches are moved before ``encode_fn`` (default: left on the CPU).

    Returns:
        float32 numpy array (N, D) (or (N, D, H', W') for feature maps).
    """
    owner = "features_of"
    batch_size = check_int(owner, "batch_size", batch_size, 1)
    if not callable(encode_fn):
        raise TypeError(f"{owner}: encode_fn must be callable, got {type(encode_fn).__name__}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_images)
    chunks = []
    for x in loader:
        out = encode_fn(x if device is None else x.to(device))
        mu = out[0] if isinstance(out, (tuple, list)) else out
        mu = to_numpy(owner, "encode_fn output", mu)
        if mu.ndim < 2 or len(mu) != len(x):
            raise ValueError(f"{owner}: encode_fn must return (B, D) codes (or a tuple whose first "
                             f"element they are) for a batch of {len(x)}, got shape {mu.shape}")
        chunks.append(mu.astype(np.float32, copy=False))
    if not chunks:
        raise ValueError(f"{owner}: dataset is empty")
    return np.concatenate(chunks)
