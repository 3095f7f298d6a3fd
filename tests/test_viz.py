"""pyvae.viz pictures and pyvae.report (``pyvae report``) on tiny real training runs."""
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pyvae import viz  # noqa: E402
from pyvae.cli import main  # noqa: E402
from pyvae.models import VAE, HierarchicalVAE, PatchVAE  # noqa: E402
from pyvae.report import report  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 200, path
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # atomic: no leftovers


@pytest.fixture(autouse=True)
def no_figure_left_open():
    before = len(plt.get_fignums())
    yield
    assert len(plt.get_fignums()) == before


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(3, 1, 8, hidden=16).eval()


# ---- pictures ----------------------------------------------------------------------------------

def test_existing_pictures(tmp_path):
    images = torch.rand(5, 3, 8, 8)
    assert_png(viz.save_reconstructions(tmp_path / "r.png", images, images.flip(0), title="t"))
    assert_png(viz.save_image_rows(tmp_path / "rows.png", [images, images[:2], images[:3]],
                                   ["a", "b", "c"], columns=3))
    records = [{"split": "train", "step": s, "loss": 10.0 / s, "rate_bits": 1.0 + s,
                "layer_rates_bits": [1.0, 2.0]} for s in range(1, 6)]
    records.append({"split": "eval", "step": 5, "loss": 2.5, "rate_bits": 6.0})
    keys = ("loss", "distortion", "rate_bits", "mi", "tc", "dim_kl")
    path = viz.save_training_curves(tmp_path / "sub" / "curves.png", records, keys)
    assert path == tmp_path / "sub" / "curves.png"
    assert_png(path)
    assert_png(viz.save_training_curves(tmp_path / "none.png", records, ("bits_per_dim",)))


def test_samples(tmp_path):
    path = viz.save_samples(tmp_path / "s.png", torch.rand(10, 3, 5, 5), 4)
    assert path == tmp_path / "s.png"
    assert_png(path)
    assert_png(viz.save_samples(tmp_path / "u8.png", np.zeros((3, 1, 4, 4), np.uint8), 8,
                                title="uint8"))


def test_traversals(tmp_path, vae):
    assert_png(viz.save_traversals(tmp_path / "one.png", vae, torch.rand(1, 8, 8)))
    assert_png(viz.save_traversals(tmp_path / "few.png", vae, torch.rand(2, 1, 8, 8), dims=[2, 0],
                                   values=np.linspace(-1, 1, 3), relative=True))
    wide = VAE(12, 1, 8, hidden=16).eval()  # D > max_dims: the most used dims
    assert_png(viz.save_traversals(tmp_path / "wide.png", wide, np.random.rand(1, 8, 8),
                                   max_dims=4))
    hvae = HierarchicalVAE([2, 3], [1.0, 1.0], 1, 8, hidden=16).eval()  # dims index z_1
    assert_png(viz.save_traversals(tmp_path / "h.png", hvae, torch.rand(1, 1, 8, 8)))
    assert not vae.training


def test_aggregate_posterior(tmp_path):
    rng = np.random.default_rng(0)
    mu, logvar = rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) - 2
    digits = rng.integers(0, 10, 300)
    assert_png(viz.save_aggregate_posterior(tmp_path / "a.png", mu))
    assert_png(viz.save_aggregate_posterior(tmp_path / "b.png", torch.tensor(mu),
                                            torch.tensor(logvar), labels=digits,
                                            num_samples_per_point=3, title="β=4"))
    wide = rng.normal(size=(200, 6))
    for projection in ("pca", "first"):
        assert_png(viz.save_aggregate_posterior(tmp_path / f"{projection}.png", wide,
                                                labels=np.array(["a", "b"] * 100),
                                                projection=projection))
    assert_png(viz.save_aggregate_posterior(tmp_path / "c.png", wide, labels=rng.normal(size=200)))


def test_rate_distortion_layer_rates_probes_heatmap(tmp_path):
    assert_png(viz.save_rate_distortion(tmp_path / "rd.png", [[10, 200], [4, 260], [20, 150]],
                                        ["β=1", "β=4", "β=0.5"]))
    assert_png(viz.save_rate_distortion(tmp_path / "rd1.png", np.array([[1.0, 2.0]])))
    assert_png(viz.save_layer_rates(tmp_path / "steps.png", np.arange(0, 50, 10),
                                    np.random.rand(5, 3)))
    assert_png(viz.save_layer_rates(tmp_path / "bars.png", ["β=(1,1)", "β=(1,4)"],
                                    [[1.0, 2.0], [3.0, 0.5]], layer_names=["bottom", "top"]))
    names = [f"attribute {k}" for k in range(12)]
    accuracies = {"3|1": np.random.rand(12), "9|1": np.random.rand(12), "PIXEL": [0.5] * 12}
    assert_png(viz.save_probe_accuracy(tmp_path / "probe.png", names, accuracies,
                                       baseline=np.full(12, 0.4)))
    assert_png(viz.save_probe_accuracy(tmp_path / "probe1.png", ["a", "b"], [0.7, 0.9],
                                       baseline=0.5))
    grid = np.arange(12.0).reshape(3, 4)
    grid[1, 2] = np.nan
    assert_png(viz.save_heatmap(tmp_path / "hm.png", grid, ["0.1", "1", "10", "100"],
                                ["β2=0.1", "β2=1", "β2=10"], "PSNR (dB)", xlabel="β1"))


@pytest.mark.parametrize("call, message", [
    (lambda p, m: viz.save_traversals(p, PatchVAE(3, 1, 2, 1), torch.rand(1, 1, 3, 3)),
     "no likelihood"),
    (lambda p, m: viz.save_traversals(p, m, torch.rand(8, 8)), r"\(C, H, W\)"),
    (lambda p, m: viz.save_traversals(p, m, torch.rand(1, 8, 8), dims=[3]), r"\[0, 3\)"),
    (lambda p, m: viz.save_traversals(p, m, torch.rand(1, 8, 8), values=[]), "at least one"),
    (lambda p, m: viz.save_samples(p, torch.rand(3, 8, 8), 2), r"\(N, C, H, W\)"),
    (lambda p, m: viz.save_samples(p, torch.rand(3, 1, 8, 8), 0), "columns"),
    (lambda p, m: viz.save_image_rows(p, [torch.rand(2, 1, 4, 4)], ["a", "b"]), "1 labels"),
    (lambda p, m: viz.save_aggregate_posterior(p, np.zeros(5)), "2-D"),
    (lambda p, m: viz.save_aggregate_posterior(p, np.zeros((5, 1))), "D >= 2"),
    (lambda p, m: viz.save_aggregate_posterior(p, np.zeros((5, 2)), labels=[1, 2]),
     r"labels must have shape \(5,\)"),
    (lambda p, m: viz.save_aggregate_posterior(p, np.zeros((5, 2)), np.zeros((5, 3))),
     "logvar must have mu's shape"),
    (lambda p, m: viz.save_aggregate_posterior(p, np.zeros((5, 3)), projection="tsne"),
     "projection"),
    (lambda p, m: viz.save_aggregate_posterior(p, np.zeros((5, 2)), np.zeros((5, 2)),
                                               num_samples_per_point=0),
     "num_samples_per_point"),
    (lambda p, m: viz.save_rate_distortion(p, np.zeros((3, 3))), r"\(M, 2\)"),
    (lambda p, m: viz.save_rate_distortion(p, np.zeros((3, 2)), ["a"]), "3 labels"),
    (lambda p, m: viz.save_layer_rates(p, [1, 2, 3], np.zeros((2, 2))), "one row per entry"),
    (lambda p, m: viz.save_layer_rates(p, [1, "b"], np.zeros((2, 2))), "all numbers"),
    (lambda p, m: viz.save_layer_rates(p, [1, 2], np.zeros((2, 2)), layer_names=["a"]),
     "layer_names"),
    (lambda p, m: viz.save_probe_accuracy(p, ["a", "b"], {"x": [0.5]}), "1 values for 2 names"),
    (lambda p, m: viz.save_probe_accuracy(p, ["a", "b"], [0.5, 0.6], baseline=[0.1]),
     "baseline"),
    (lambda p, m: viz.save_probe_accuracy(p, "ab", [0.5, 0.6]), "names"),
    (lambda p, m: viz.save_heatmap(p, np.zeros((2, 3)), ["a", "b"], ["c", "d"], "t"),
     "x_labels must be a sequence of 3"),
    (lambda p, m: viz.save_heatmap(p, np.zeros(3), ["a"], ["b"], "t"), "2-D"),
    (lambda p, m: viz.save_heatmap(p, [["x"]], ["a"], ["b"], "t"), "numbers"),
])
def test_argument_errors(tmp_path, vae, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "bad.png", vae)
    assert not list(tmp_path.iterdir())


# ---- pyvae report ------------------------------------------------------------------------------

def train_cli(out, model, *args):
    code = main(["train", "--model", model, "--data", "digits", "--steps", "4",
                 "--batch-size", "32", "--log-every", "2", "--no-progress", "--out", str(out),
                 "--model-arg", "hidden=16", *args])
    assert code == 0


def pictures_of(markdown_path):
    """The PNGs report.md references (relative paths), checked to exist and be PNGs."""
    text = markdown_path.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for ref in refs:
        assert not ref.startswith("/")
        assert_png(markdown_path.parent / ref)
    return {ref.removesuffix(".png") for ref in refs}, text


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "vae"
    train_cli(run, "VAE", "--model-arg", "latent_dim=2", "--eval-fraction", "0.1",
              "--eval-every", "2")
    return run


def test_report_of_a_vae_run(vae_run):
    path = report(vae_run, num_images=6)
    assert path == vae_run / "report" / "report.md"
    pictures, text = pictures_of(path)
    assert {"training_curves", "schedules", "reconstructions", "samples", "traversals",
            "aggregate_posterior"} <= pictures
    assert "layer_rates" not in pictures and "## Notes" not in text
    assert "held-out split" in text and "last eval record (step 4)" in text
    assert "| psnr_db |" in text and '"latent_dim": 2' in text


def test_report_cli(vae_run, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main(["report", str(vae_run), "--out", str(out), "--num-images", "3"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    pictures, _ = pictures_of(out / "report.md")
    assert "reconstructions" in pictures
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    assert "RUN_DIR" in capsys.readouterr().out


def test_report_of_hierarchical_and_tc_runs(tmp_path):
    train_cli(tmp_path / "hvae", "HierarchicalVAE", "--model-arg", "latent_dims=[3,2]",
              "--model-arg", "betas=[1,2]")
    pictures, text = pictures_of(report(tmp_path / "hvae", num_images=4))
    assert {"layer_rates", "reconstructions", "samples", "traversals",
            "aggregate_posterior"} <= pictures
    assert "| layer_rates_bits |" in text and "(top latent layer)" in text
    train_cli(tmp_path / "tc", "BetaTCVAE", "--model-arg", "latent_dim=3")
    pictures, _ = pictures_of(report(tmp_path / "tc", num_images=4))
    assert {"kl_decomposition", "traversals", "aggregate_posterior"} <= pictures


def test_report_when_the_data_cannot_be_loaded(tmp_path):
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).random((64, 8, 8), dtype=np.float32))
    assert main(["train", "--model", "VAE", "--data", str(data), "--model-arg", "latent_dim=2",
                 "--model-arg", "hidden=16", "--steps", "2", "--batch-size", "16",
                 "--log-every", "1", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    data.unlink()
    pictures, text = pictures_of(report(tmp_path / "run", num_images=4))
    assert {"training_curves", "samples"} <= pictures
    assert not pictures & {"reconstructions", "traversals", "aggregate_posterior"}
    assert "## Notes" in text and "could not be loaded" in text and str(data) in text


def test_report_of_a_patch_run_and_of_a_run_without_data_spec(tmp_path):
    from pyvae.data import Digits, RandomPatches
    from pyvae.train import fit
    torch.manual_seed(0)
    model = PatchVAE(3, 1, 2, 1, hidden_channels=8, cond_channels=4, decoder_hidden=16)
    fit(model, RandomPatches(Digits(), 3, 1), out_dir=tmp_path / "patch", steps=2,
        batch_size=16, log_every=1, progress=False, extra_config={"data": {"spec": "digits"}})
    pictures, text = pictures_of(report(tmp_path / "patch", num_images=3))
    assert {"training_curves", "reconstructions", "samples"} <= pictures
    assert "traversals" not in pictures and "global models only" in text
    assert "| bits_per_dim |" in text and "2×2 non-overlapping 3×3 patches" in text

    fit(VAE(2, 1, 8, hidden=16), Digits(), out_dir=tmp_path / "bare", steps=2, batch_size=16,
        log_every=1, progress=False)
    pictures, text = pictures_of(report(tmp_path / "bare", num_images=3))
    assert {"training_curves", "samples"} <= pictures and "reconstructions" not in pictures
    assert "records no data spec" in text


def test_report_of_metrics_only_and_bad_arguments(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"split": "train", "step": s, "loss": 5.0 - s, "rate_bits": 1.0,
                         "mi": 0.1, "tc": 0.2, "dim_kl": 0.3}) for s in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"split": "tr')  # a torn line
    pictures, text = pictures_of(report(run, tmp_path / "out"))
    assert {"training_curves", "kl_decomposition"} <= pictures
    assert "no `config.json`" in text and "checkpoint could not be loaded" in text
    assert "line 3 is not JSON" in text
    with pytest.raises(FileNotFoundError, match="not a training run"):
        report(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no run directory"):
        report(tmp_path / "missing")
    with pytest.raises(ValueError, match="num_images"):
        report(run, num_images=0)
