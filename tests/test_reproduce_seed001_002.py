"""The sample-quality part of `layer_rates` (seed 002) and the covariance distances of
`beta_sweep` (seed 001) at smoke size: the new table, data and pictures are written and agree
with pyvae.metrics on the numbers they report."""
import json

import numpy as np
import pytest

from pyvae import metrics, reproduce

PNG = b"\x89PNG\r\n\x1a\n"


def _pictures(results, out):
    files = [p["file"] for p in results["pictures"]]
    for file in files:
        assert (out / file).read_bytes()[:8] == PNG
    return files


@pytest.mark.slow
def test_layer_rates_scores_the_samples(tmp_path):
    results = reproduce.run("layer_rates", tmp_path, "smoke", device="cpu", verbose=False)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    config = reproduce.experiment("layer_rates").SIZES["smoke"]
    cells = len(config["betas1"]) * len(config["betas2"])

    # The first table is the one the committed results had; the second is sample quality.
    first, quality = results["tables"]
    assert first["columns"][:4] == ["β₁", "β₂", "R₁", "R₂"] and len(first["rows"]) == cells
    assert quality["columns"][6:10] == ["FID", "IS", "diversity", "sharpness"]
    assert len(quality["rows"]) == cells + 2 and quality["rows"][-1][-1] == "real"
    assert "not Inception" in quality["caption"]

    for cell in results["data"]["grid"]:
        assert cell["fid"] >= 0 and np.isfinite(cell["fid"])
        assert 1 - 1e-9 <= cell["inception_score"] <= 10 + 1e-9
        assert cell["inception_score"] == pytest.approx(cell["diversity"] * cell["sharpness"])
        assert 1 - 1e-9 <= cell["diversity"] <= 10 + 1e-9 and 0.1 - 1e-9 <= cell["sharpness"] <= 1
    real = results["data"]["real_digits"]
    # The held-out digits against their own statistics: distance 0.
    assert real["test_digits"]["fid"] == pytest.approx(0, abs=1e-6)
    assert real["train_digits"]["fid"] > 0
    assert 0 <= results["data"]["classifier_test_accuracy"] <= 1
    assert {"inception_score_vs_R1", "sharpness_vs_R2", "fid_vs_total_rate"} <= set(
        results["data"]["spearman"])

    files = _pictures(results, tmp_path)
    assert {"samples.png", "sample_quality_curves.png", "sample_quality_rate_plane.png",
            "is_heatmap.png", "fid_heatmap.png"} <= set(files)
    markdown = (tmp_path / "results.md").read_text()
    assert "Sample quality" in markdown and "NOT Inception-v3" in markdown
    assert results["finding"]["held"] in (True, False, None)


@pytest.mark.slow
def test_beta_sweep_reports_the_covariance_distances(tmp_path):
    results = reproduce.run("beta_sweep", tmp_path, "smoke", device="cpu", verbose=False,
                            overrides={"steps": 2})
    table = results["tables"][0]
    assert {"‖Cov(q(z)) − I‖_F", "seed's F̃"} <= set(table["columns"])
    per_beta = results["data"]["per_beta"]
    assert len(per_beta) == len(table["rows"]) == 3
    for row, r in zip(table["rows"], per_beta):
        cov = np.array(r["aggregate_cov"])
        # The reported distance is the one of the reported (exact, mixture) covariance.
        assert r["frobenius_cov_minus_identity"] == pytest.approx(
            np.linalg.norm(cov - np.eye(2)))
        assert r["seed_frobenius"] >= 0
        assert row[table["columns"].index("‖Cov(q(z)) − I‖_F")] == r[
            "frobenius_cov_minus_identity"]
    assert set(results["data"]["spearman_beta_vs_frobenius"]) == {
        "frobenius_cov_minus_identity", "seed_frobenius"}
    assert "covariance_distances.png" in _pictures(results, tmp_path)
    assert "F̃" in (tmp_path / "results.md").read_text()


def test_beta_sweep_gaussian_fit_kl_closed_form():
    from pyvae.reproduce.beta_sweep import gaussian_fit_kl
    assert gaussian_fit_kl(np.zeros(2), np.eye(2)) == pytest.approx(0)
    # KL(N(m, diag(s)) || N(0, I)) = ½ Σ (s + m² − 1 − log s).
    m, s = np.array([1.0, -2.0]), np.array([4.0, 0.25])
    assert gaussian_fit_kl(m, np.diag(s)) == pytest.approx(
        0.5 * np.sum(s + m ** 2 - 1 - np.log(s)))
    mean, cov = metrics.aggregate_posterior_moments(np.zeros((5, 2)), np.zeros((5, 2)))
    assert gaussian_fit_kl(mean, cov) == pytest.approx(0)
