"""The seed-000 experiments area_pmi and layer_probes: their smoke runs, and the estimators on
data with a known answer (areas independent by construction or copies of each other; layer
outputs that must equal the encoder's code; a linearly separable toy set)."""
import json
import math

import numpy as np
import pytest
import torch

from pyvae import reproduce
from pyvae.encode import encode_patches
from pyvae.models import VAE, PatchVAE
from pyvae.reproduce import area_pmi, layer_probes

PNG = b"\x89PNG\r\n\x1a\n"


# ---- area_pmi: pure functions ----------------------------------------------------------------------

def test_offset_grid_leaves_out_exactly_the_overlapping_offsets():
    offsets = area_pmi.offset_grid(5, 2)
    assert len(offsets) == 11 ** 2 - 3 ** 2
    assert all(abs(dy) >= 2 or abs(dx) >= 2 for dy, dx in offsets)
    assert (0, 2) in offsets and (-2, -2) in offsets and (1, 1) not in offsets
    assert set(offsets) == {(-dy, -dx) for dy, dx in offsets}   # closed under o -> -o
    with pytest.raises(ValueError, match="max_offset"):
        area_pmi.offset_grid(1, 2)


def test_start_range_and_cut_areas():
    assert area_pmi.start_range(10, 2, [-3, 0, 4]) == (3, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        area_pmi.start_range(6, 2, [-3, 4])
    images = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).view(2, 3, 6, 7)
    index, ys, xs = torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor([4, 1])
    cut = area_pmi.cut_areas(images, index, ys, xs, 3)
    assert cut.shape == (2, 3, 3, 3)
    assert torch.equal(cut[0], images[1, :, 2:5, 4:7])
    assert torch.equal(cut[1], images[0, :, 0:3, 1:4])


def test_pairs_put_b_at_the_offset_and_a_where_every_offset_fits():
    images = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    offsets = area_pmi.offset_grid(4, 2)
    pairs = area_pmi.random_pairs(images, 2, offsets, 200, torch.Generator().manual_seed(1))
    assert pairs.y.min() >= 4 and pairs.y.max() <= 12 - 2 - 4
    for n in range(0, 200, 37):
        dy, dx = offsets[pairs.offset_index[n]]
        y, x = int(pairs.y[n]) + dy, int(pairs.x[n]) + dx
        assert torch.equal(pairs.b[n], images[pairs.image[n], :, y:y + 2, x:x + 2])


def test_edge_strength():
    flat = torch.full((1, 1, 2, 2), 0.3)
    step = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert area_pmi.edge_strength(flat).item() == pytest.approx(0.0)
    assert area_pmi.edge_strength(step).item() == pytest.approx(0.5)


def test_map_rings_and_symmetry_gap():
    offsets = area_pmi.offset_grid(3, 2)
    values = np.array([float(dy) for dy, _ in offsets])   # antisymmetric in dy
    grid = area_pmi.pmi_map(offsets, values, 3)
    assert grid.shape == (7, 7) and np.isnan(grid[3, 3]) and grid[0, 3] == -3
    assert area_pmi.symmetry_gap(offsets, np.ones(len(offsets))) == 0
    assert area_pmi.symmetry_gap(offsets, values) == pytest.approx(
        np.mean([2 * abs(dy) for dy, _ in offsets]))
    pmi = np.repeat(area_pmi.ring_of(offsets)[:, None], 4, axis=1).astype(float)
    rings = area_pmi.ring_profile(offsets, pmi)
    assert [r["distance"] for r in rings] == sorted({r["distance"] for r in rings})
    assert all(r["mean"] == r["distance"] and r["se"] == 0 for r in rings)
    assert sum(r["offsets"] for r in rings) == len(offsets)


def test_judge_needs_both_statements():
    trend = {"spearman": -0.8, "p_value": 1e-9}
    rings = [{"distance": 2, "mean": 3.0, "se": 0.1}, {"distance": 4, "mean": 1.0, "se": 0.1}]
    edges = {"edge_mean": 4.0, "flat_mean": 2.0, "difference_se": 0.2, "spearman": 0.5}
    assert area_pmi.judge(trend, rings, edges)[0] is True
    reversed_edges = dict(edges, edge_mean=1.0)
    held, text = area_pmi.judge(trend, rings, reversed_edges)
    assert held is None and "share less information" in text
    flat_rings = [dict(rings[0], mean=1.1), rings[1]]                 # within 2 SE
    assert area_pmi.judge(trend, flat_rings, reversed_edges)[0] is False


# ---- area_pmi: the estimator on areas with a known PMI ---------------------------------------------

def _half_images(copy: bool, n: int, seed: int) -> torch.Tensor:
    """(n, 1, 2, 4) images of 4 levels: the right 2×2 half a copy of the left one or drawn
    independently. The true mean PMI of the halves is 4·log 4 nats or 0."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randint(0, 4, (n, 1, 2, 2), generator=generator).float() / 3
    right = left.clone() if copy else torch.randint(0, 4, (n, 1, 2, 2),
                                                    generator=generator).float() / 3
    return torch.cat([left, right], dim=3)


@pytest.fixture
def one_thread():
    """The tiny models below gain nothing from threads and slow down badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("copy", [False, True])
def test_pmi_of_independent_halves_is_zero_and_of_copies_their_entropy(copy, one_thread):
    torch.manual_seed(0)
    model = area_pmi.AreaPixelCNN(2, 1, 2, hidden=8, layers=1, kernel_size=3, cond_channels=8,
                                  cond_hidden=32, num_bins=4)
    area_pmi.train_area_model(model, _half_images(copy, 2000, 0), [(0, 2)], steps=250,
                              batch_size=128, lr=1e-2, null_fraction=0.5, seed=0)
    estimate = area_pmi.estimate_pmi(model, _half_images(copy, 400, 1), [(0, 2)], 400, seed=2)
    entropy = 4 * math.log(4)
    assert -estimate.log_p_a.mean() == pytest.approx(entropy, abs=0.3)  # log p(a): 4 levels
    if copy:
        assert estimate.pmi.mean() == pytest.approx(entropy, abs=0.6)
    else:
        assert abs(estimate.pmi.mean()) < 0.3


def test_area_model_checks_its_condition():
    model = area_pmi.AreaPixelCNN(2, 1, 2, hidden=4, layers=0, kernel_size=3, cond_channels=2,
                                  cond_hidden=4, num_bins=4)
    a = torch.rand(3, 1, 2, 2)
    with pytest.raises(ValueError, match="offsets must be"):
        model.log_prob(a, a)
    with pytest.raises(ValueError, match="b must have"):
        model.log_prob(a, a[:, :, :1], torch.zeros(3, 2))
    off = model.log_prob(a, a, torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(off, model.log_prob(a))   # present=False is the unconditional model


# ---- layer_probes: pure functions ------------------------------------------------------------------

def test_patch_layers_are_every_conv_output_and_end_in_encode_patches():
    torch.manual_seed(0)
    model = PatchVAE(9, 3, 4, 1, hidden_channels=6, cond_channels=4, decoder_hidden=8,
                     pixelcnn_hidden=4, pixelcnn_layers=0).eval()
    images = torch.rand(5, 1, 16, 16)
    layers = layer_probes.patch_encoder_layers(model, images)
    assert [name for name, _ in layers] == ["conv1", "conv2", "conv3", "code μ"]
    assert [tuple(out.shape) for _, out in layers] == [(5, 6, 14, 14), (5, 6, 12, 12),
                                                       (5, 6, 10, 10), (5, 4, 8, 8)]
    assert torch.allclose(layers[-1][1], encode_patches(model, images), atol=1e-5)
    # conv1 at stride 1 is the first convolution + ReLU on the centred image.
    first = torch.relu(model.encoder[0](2 * images - 1))
    assert torch.allclose(layers[0][1], first, atol=1e-5)


def test_global_layers_end_in_the_posterior_means():
    torch.manual_seed(0)
    model = VAE(3, 1, 16).eval()
    images = torch.rand(4, 1, 16, 16)
    layers = layer_probes.global_encoder_layers(model, images)
    assert [name for name, _ in layers] == ["conv1", "conv2", "fc", "code μ"]
    assert tuple(layers[0][1].shape) == (4, 32, 8, 8) and tuple(layers[2][1].shape) == (4, 256)
    with torch.no_grad():
        assert torch.allclose(layers[-1][1], model.encode(images)[0], atol=1e-6)


def test_as_features_pools_maps_and_keeps_vectors():
    maps = torch.rand(3, 2, 8, 8)
    assert layer_probes.as_features(maps, None).shape == (3, 128)
    pooled = layer_probes.as_features(maps, 2)
    assert pooled.shape == (3, 8)
    assert pooled[0, 0] == pytest.approx(maps[0, 0, :4, :4].mean().item(), rel=1e-5)
    assert layer_probes.as_features(torch.rand(3, 5), 2).shape == (3, 5)


def test_probe_on_a_separable_toy_set_and_on_shuffled_labels():
    """Class k lights pixel k: a linear probe on raw pixels is perfect; with labels shuffled
    it falls to about chance."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    images = torch.rand(400, 1, 4, 4) * 0.2
    images.view(400, -1)[torch.arange(400), torch.as_tensor(labels)] += 1.0
    train, test = np.arange(300), np.arange(300, 400)
    [separable] = layer_probes.probe_layers([("pixels", images)], train, test, labels,
                                            pool=None, seed=0, max_iter=500)
    assert separable["test_accuracy"] == 1.0 and separable["dims"] == 16
    [shuffled] = layer_probes.probe_layers([("pixels", images)], train, test,
                                           rng.permutation(labels), pool=None, seed=0,
                                           max_iter=500)
    assert shuffled["test_accuracy"] < 0.45


def test_accuracy_gap_and_judge():
    assert layer_probes.accuracy_gap(0.98, 0.90, 500)["verdict"] == "earlier"
    assert layer_probes.accuracy_gap(0.90, 0.98, 500)["verdict"] == "code"
    tie = layer_probes.accuracy_gap(0.95, 0.94, 500)
    assert tie["verdict"] == "tie"
    assert tie["se"] == pytest.approx(math.sqrt((0.95 * 0.05 + 0.94 * 0.06) / 500))
    rows = lambda verdict: {"encoder": "e", "features": "f", "gap": 0.1, "se": 0.01,
                            "verdict": verdict}
    assert layer_probes.judge([rows("earlier"), rows("earlier")])[0] is True
    assert layer_probes.judge([rows("earlier"), rows("tie")])[0] is None
    assert layer_probes.judge([rows("code"), rows("tie")])[0] is False
    assert layer_probes.depth_trend([{"test_accuracy": a} for a in (0.9, 0.8, 0.7)]) == -1


# ---- both smoke runs ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["area_pmi", "layer_probes"])
def test_smoke_run(name, tmp_path):
    results = reproduce.run(name, tmp_path, "smoke", device="cpu", verbose=False)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(
        json.dumps(results))
    for picture in results["pictures"]:
        assert (tmp_path / picture["file"]).read_bytes()[:8] == PNG
    data = results["data"]
    if name == "area_pmi":
        config = results["config"]
        offsets = area_pmi.offset_grid(config["max_offset"], config["area"])
        assert [tuple(o) for o in data["offsets"]] == offsets
        assert len(data["mean_pmi"]) == len(offsets)
        assert all(math.isfinite(v) for v in data["mean_pmi"])
        assert sum(r["offsets"] for r in data["rings"]) == len(offsets)
        assert {"pmi_map.png", "pmi_by_distance.png"} <= {p["file"] for p in results["pictures"]}
    else:
        probes = data["probes"]
        assert set(probes) == {"flattened", "pooled to 2×2"}
        assert [r["layer"] for r in probes["flattened"]["patch VAE"]] == [
            "conv1", "conv2", "conv3", "code μ"]
        assert [r["layer"] for r in probes["flattened"]["global VAE"]][-1] == "code μ"
        assert len(data["comparisons"]) == 4
        assert all(0 <= r["test_accuracy"] <= 1 for rows in probes["flattened"].values()
                   for r in rows)
