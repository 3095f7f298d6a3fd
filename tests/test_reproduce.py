"""pyvae.reproduce and `pyvae reproduce`: every experiment runs end to end at size "smoke" and
writes its table, results.md, results.json and pictures. These check the machinery, not the
findings (the smoke models are trained for a few steps)."""
import json
import math

import numpy as np
import pytest
import torch

from pyvae import reproduce
from pyvae.cli import main
from pyvae.reproduce.tcvae_decomposition import (exact_terms, exact_terms_reference,
                                                  gaussian_tc_closed_form, minibatch_terms)

PNG = b"\x89PNG\r\n\x1a\n"


def test_registry():
    assert reproduce.names() == ["beta_vae_metric", "patch_vaes", "tcvae_decomposition",
                                 "layer_rates", "beta_sweep", "area_pmi", "layer_probes"]
    for name in reproduce.names():
        module = reproduce.experiment(name)
        assert set(module.SIZES) == {"smoke", "default"}
        assert set(module.SIZES["smoke"]) == set(module.SIZES["default"])
        for attribute in ("SEED", "SEED_TITLE", "TITLE", "SUMMARY", "CLAIM"):
            assert isinstance(getattr(module, attribute), str) and getattr(module, attribute)
        assert callable(module.run)
        assert name in reproduce.describe(name) and module.SEED in reproduce.describe(name)
    with pytest.raises(ValueError, match="unknown experiment"):
        reproduce.experiment("nope")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["beta_vae_metric", "patch_vaes", "tcvae_decomposition",
                                  "layer_rates", "beta_sweep", "area_pmi", "layer_probes"])
def test_smoke_run_writes_the_report(name, tmp_path, capsys):
    out = tmp_path / name
    results = reproduce.run(name, out, "smoke", device="cpu")
    printed = capsys.readouterr().out

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["experiment"] == name and results["size"] == "smoke"
    assert results["config"] == reproduce.experiment(name).SIZES["smoke"]
    assert results["finding"]["held"] in (True, False, None) and results["finding"]["text"]
    assert results["seconds"] > 0 and results["device"] == "cpu" and results["machine"]

    assert results["tables"]
    for table in results["tables"]:
        assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])
        numbers = [v for row in table["rows"] for v in row if isinstance(v, (int, float))]
        assert numbers and all(math.isfinite(v) for v in numbers)

    markdown = (out / "results.md").read_text()
    assert markdown.startswith(f"# {results['title']}")
    assert "**Finding:" in markdown and "## Setup" in markdown
    assert f"pyvae reproduce {name} --size smoke" in markdown
    for table in results["tables"]:
        assert table["caption"] in markdown and table["caption"] in printed
        for column in table["columns"]:
            escaped = column.replace("|", "\\|")  # markdown cells escape the pipe
            assert f"| {escaped} " in markdown and f"| {escaped} " in printed
    assert "Finding" in printed

    assert results["pictures"]
    for picture in results["pictures"]:
        assert f"]({picture['file']})" in markdown
        assert (out / picture["file"]).read_bytes()[:8] == PNG
    # Only the report lands in the output folder: no checkpoints or training logs.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.md", "results.json"] + [p["file"] for p in results["pictures"]])


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    tiny = {"betas": [1.0, 100.0], "steps": 2}
    first = reproduce.run("beta_sweep", tmp_path / "a", "smoke", device="cpu", overrides=tiny,
                          verbose=False)
    second = reproduce.run("beta_sweep", tmp_path / "b", "smoke", device="cpu", overrides=tiny,
                           verbose=False)
    assert first["tables"] == second["tables"]
    assert first["config"]["betas"] == [1.0, 100.0]
    other = reproduce.run("beta_sweep", tmp_path / "c", "smoke", device="cpu", overrides=tiny,
                          seed=1, verbose=False)
    assert other["tables"] != first["tables"]


@pytest.mark.slow
def test_render_markdown_rebuilds_the_report(tmp_path):
    reproduce.run("beta_sweep", tmp_path, "smoke", device="cpu",
                  overrides={"betas": [1.0, 100.0], "steps": 1}, verbose=False)
    written = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    assert reproduce.render_markdown(tmp_path) == tmp_path / "results.md"
    assert (tmp_path / "results.md").read_text() == written


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown configuration keys"):
        reproduce.run("beta_sweep", tmp_path, "smoke", overrides={"nope": 1})
    with pytest.raises(ValueError, match="size must be one of"):
        reproduce.run("beta_sweep", tmp_path, "huge")


def test_cli_list_and_errors(capsys):
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == reproduce.names()
    assert main(["reproduce"]) == 2
    assert "--list" in capsys.readouterr().err
    assert main(["reproduce", "beta_sweep", "--set", "nope=1", "--size", "smoke"]) == 2
    assert "unknown configuration keys" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "not_an_experiment"])


@pytest.mark.slow
def test_cli_runs_an_experiment(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["reproduce", "beta_sweep", "--size", "smoke", "--out", str(out), "--device",
                 "cpu", "--set", "steps=1", "--set", "betas=[0.01, 10]"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["steps"] == 1 and results["config"]["betas"] == [0.01, 10]
    assert str(out / "results.md") in capsys.readouterr().out


# ---- the estimators of tcvae_decomposition ------------------------------------------------------

def _metric_scores(vae, beta_vae, raw=0.76):
    """Per-seed β-VAE metric results (in %) in the shape beta_vae_metric's run() collects."""
    codes = lambda values: [{"eval_accuracy": v / 100, "mig": 0.1} for v in values]
    return {"raw pixels": [{"eval_accuracy": raw}], "PCA": codes([98.5]),
            "VAE untrained": codes([26.2] * len(vae)), "VAE (β=1)": codes(vae),
            "β-VAE": codes(beta_vae)}


@pytest.mark.parametrize("vae, beta_vae, held", [
    ([89.0, 82.8], [91.8, 98.5], True),   # wins in both seeds by more than the spread
    ([89.0, 82.8, 97.2, 97.8, 98.8], [91.8, 98.5, 87.2, 93.0, 96.2], False),  # +0.2: a tie
    ([95.0, 96.0, 94.0], [96.0, 95.5, 95.0], False),  # wins 2 of 3, gap within the spread
    ([90.0, 91.0, 92.0], [97.0, 98.0, 80.0], False),  # one bad seed: spread 8 > gap 0.7 ...
    ([90.0, 91.0, 92.0], [97.0, 98.0, 99.0], True),   # ... without it, far apart
    ([80.0], [90.0], True),                           # one seed: the means decide
    ([90.0], [80.0], False),
    ([70.0, 71.0], [97.0, 98.0], False),              # VAE below raw pixels (76 %)
])
def test_beta_vae_metric_judges_ties_as_ties(vae, beta_vae, held):
    from pyvae.reproduce.beta_vae_metric import judge
    verdict, text = judge(_metric_scores(vae, beta_vae))
    assert verdict is held
    assert ("does not hold" in text) is (not held)
    if len(vae) > 1:
        assert f"in {sum(b > v for b, v in zip(beta_vae, vae))} of {len(vae)} seeds" in text


def test_exact_decomposition_matches_its_reference():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(300, 5, generator=generator)
    logvar = torch.randn(300, 5, generator=generator) - 2
    z = mu + torch.exp(0.5 * logvar) * torch.randn(300, 5, generator=generator)
    fast, slow = exact_terms(z, mu, logvar), exact_terms_reference(z, mu, logvar)
    for key in ("mi", "tc", "dim_kl"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-4)
    assert slow["mi"] > 0 and slow["tc"] > 0


def test_estimators_on_posteriors_equal_to_the_prior():
    """Every posterior is N(0, I): q(z) is the prior, so MI = TC = DW-KL = 0 exactly; MSS's
    weights sum to one and agree, MWS's 1/(N·M) are off by log N per density."""
    n, d = 512, 4
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    mu, logvar = torch.zeros(n, d), torch.zeros(n, d)
    exact = exact_terms(z, mu, logvar)
    mss = minibatch_terms(z, mu, logvar, 64, "mss", n, seed=0)
    mws = minibatch_terms(z, mu, logvar, 64, "mws", n, seed=0)
    for key in ("mi", "tc", "dim_kl"):
        assert exact[key] == pytest.approx(0, abs=1e-4)
        assert mss[key] == pytest.approx(0, abs=1e-4)
    assert mws["mi"] == pytest.approx(math.log(n), abs=1e-3)
    assert mws["tc"] == pytest.approx((d - 1) * math.log(n), abs=1e-3)
    assert mws["dim_kl"] == pytest.approx(-d * math.log(n), abs=1e-3)
    # TC of N(0, Σ): zero for a diagonal Σ, ½ log(1 / (1 − ρ²)) for a 2-D correlation ρ.
    assert gaussian_tc_closed_form(np.diag([1.0, 4.0])) == pytest.approx(0)
    assert gaussian_tc_closed_form(np.array([[1, 0.6], [0.6, 1]])) == pytest.approx(
        -0.5 * math.log(1 - 0.36))


# ---- many training seeds through fit_grid (--seeds N) -------------------------------------------

@pytest.mark.slow
def test_layer_rates_with_seeds_trains_one_grid(tmp_path, capsys):
    out = tmp_path / "layer_rates"
    assert main(["reproduce", "layer_rates", "--size", "smoke", "--seeds", "2", "--out",
                 str(out), "--device", "cpu", "--set", "steps=2", "--set", "betas2=[1.0]",
                 "--set", "classifier_steps=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seeds"] == 2 and results["config"]["seed_grid"] is True
    markdown = (out / "results.md").read_text()
    assert "pyvae reproduce layer_rates --size smoke --seeds 2" in markdown
    assert results["versions"]["torch"] == torch.__version__
    assert f"Started {results['date']}; python " in markdown
    per_seed, cells = results["data"]["per_seed"], results["data"]["grid"]
    assert len(per_seed) == 2 and [len(s) for s in per_seed] == [2, 2]
    # the two seeds are two different models per cell, and the table is their mean ± s.e.
    assert per_seed[0][0]["rate1_bits"] != per_seed[1][0]["rate1_bits"]
    for i, cell in enumerate(cells):
        values = [s[i]["psnr_db"] for s in per_seed]
        assert cell["psnr_db"] == pytest.approx(np.mean(values))
        assert cell["se"]["psnr_db"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
    first, over_seeds = results["tables"][:2]
    assert "mean ± standard error over 2 training seeds" in first["caption"]
    assert first["rows"][0][6] == f"{cells[0]['psnr_db']:.2f} ± {cells[0]['se']['psnr_db']:.2f}"
    assert over_seeds["rows"][0][1].endswith(" of 2")
    assert set(results["data"]["best_cell_separation"]) == {
        "psnr_db", "probe_z2", "sample_probe_z2", "inception_score", "fid"}
    with pytest.raises(ValueError, match="seed_grid=true"):
        reproduce.run("layer_rates", tmp_path / "x", "smoke", overrides={"seeds": 2},
                      verbose=False)
    assert main(["reproduce", "layer_rates", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_beta_vae_metric_with_seeds_trains_one_grid(tmp_path):
    results = reproduce.run("beta_vae_metric", tmp_path, "smoke", device="cpu", verbose=False,
                            overrides={"seeds": 2, "seed_grid": True, "steps": 2})
    scores = results["data"]["scores"]
    assert [len(scores[name]) for name in ("VAE untrained", "VAE (β=1)", "β-VAE")] == [2, 2, 2]
    assert list(results["data"]["training_seconds"]) == ["all trained models in one grid"]
    # the untrained VAE of a seed is the grid's initialisation of that seed: it differs by seed
    assert scores["VAE untrained"][0]["rate_bits"] != scores["VAE untrained"][1]["rate_bits"]
    assert "standard error over 2 training seeds" in results["tables"][0]["caption"]
    assert "same-seed difference" in results["finding"]["text"]


@pytest.mark.parametrize("vae, beta_vae, held", [
    ([90.0 + (k % 5) for k in range(20)], [91.0 + (k % 5) for k in range(20)], True),
    ([90.0 + 5 * (k % 3) for k in range(20)], [90.0 + 5 * ((k + 1) % 3) for k in range(20)],
     False),  # the same spread of scores, reshuffled over the seeds: a tie
    ([89.0, 82.8], [91.8, 98.5], False),  # +9 ± 6.5 points: within two standard errors
])
def test_beta_vae_metric_standard_error_verdict(vae, beta_vae, held):
    from pyvae.reproduce.beta_vae_metric import judge
    verdict, text = judge(_metric_scores(vae, beta_vae), standard_error=True)
    assert verdict is held
    assert ("the two separate, the β-VAE above" in text) is held
    assert (": a tie" in text) is (not held)
