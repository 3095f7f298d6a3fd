"""pyvae.train.fit_grid: K models trained at once equal K separate fits, exact resume after a
SIGKILL, the files of a grid run, its errors, `pyvae train-grid` and `pyvae report` on a grid."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from pyvae.cli import main
from pyvae.models import VAE, BetaTCVAE, CapacityAE, HierarchicalVAE
from pyvae.ops import use_backend
from pyvae.train import fit, fit_grid, grid_product, load_checkpoint, load_model, read_metrics
from pyvae.train.grid import varied_keys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
from test_train import ToyImages, kill_after_first_checkpoint  # noqa: E402

RUN = dict(steps=4, batch_size=8, log_every=1, checkpoint_every=None, progress=False, seed=7)


def mlp_vae(**kwargs):
    return VAE(3, 1, 8, architecture="mlp", hidden=16, **kwargs)


def state(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def fit_alone(make_model, point, data, out_dir, **settings):
    """Model ``point`` trained by fit, as fit_grid documents it: weights made after
    torch.manual_seed(seed), noise from model_seed=seed."""
    seed = point.get("seed", settings["seed"])
    torch.manual_seed(seed)
    model = make_model(**{k: v for k, v in point.items() if k not in ("lr", "seed")})
    lr = {"lr": point["lr"]} if "lr" in point else {}
    fit(model, data, out_dir=out_dir, model_seed=seed, **lr, **settings)
    return state(model)


def assert_close_states(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def max_difference(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


# ---- equivalence with separate fits -----------------------------------------------------------

VAE_GRID = [{"beta": 1.0, "seed": 0, "lr": 1e-2}, {"beta": 4.0, "seed": 1, "lr": 3e-3},
            {"beta": 0.5, "seed": 2, "lr": 1e-2}]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_grid_equals_separate_fits(tmp_path, backend):
    data = ToyImages(n=32, size=8)
    with use_backend(backend):
        result = fit_grid(mlp_vae, VAE_GRID, data, out_dir=tmp_path / "grid", **RUN)
        alone = [fit_alone(mlp_vae, point, data, tmp_path / f"fit{k}", **RUN)
                 for k, point in enumerate(VAE_GRID)]
    grid_states = [state(load_model(path)) for path in result.model_dirs]
    for k in range(len(VAE_GRID)):
        assert_close_states(grid_states[k], alone[k])
    # the models really differ (seeds, betas, learning rates): the comparison can fail
    assert max_difference(grid_states[0], grid_states[1]) > 1e-2
    assert result.step == 4 and len(result.metrics) == 3


@pytest.mark.parametrize("make_model,grid", [
    (lambda **kw: BetaTCVAE(3, 1, 8, dataset_size=32, architecture="mlp", hidden=16, **kw),
     [{"beta": 1.0, "alpha": 0.5}, {"beta": 6.0, "gamma": 2.0, "seed": 3}]),
    (lambda **kw: HierarchicalVAE([3, 2], channels=1, image_size=8, hidden=16, **kw),
     [{"betas": [1.0, 1.0]}, {"betas": [0.5, 4.0], "seed": 1}]),
], ids=["BetaTCVAE", "HierarchicalVAE"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_grid_of_other_models_equals_separate_fits(tmp_path, make_model, grid, backend):
    data = ToyImages(n=32, size=8)
    settings = {**RUN, "steps": 3, "grad_clip": 1.0, "lr_schedule": "cosine",
                "lr_warmup_steps": 1}
    with use_backend(backend):
        result = fit_grid(make_model, grid, data, out_dir=tmp_path / "grid", **settings)
        for k, point in enumerate(grid):
            alone = fit_alone(make_model, point, data, tmp_path / f"fit{k}", **settings)
            assert_close_states(state(load_model(result.model_dirs[k])), alone)
    assert all("grad_norm" in metrics for metrics in result.metrics)


def test_adagrad_grid_equals_separate_fits(tmp_path):
    data = ToyImages(n=32, size=8)
    settings = {**RUN, "optimizer": "adagrad", "weight_decay": 0.1}
    with use_backend("reference"):
        result = fit_grid(mlp_vae, VAE_GRID[:2], data, out_dir=tmp_path / "grid", **settings)
        for k, point in enumerate(VAE_GRID[:2]):
            alone = fit_alone(mlp_vae, point, data, tmp_path / f"fit{k}", **settings)
            assert_close_states(state(load_model(result.model_dirs[k])), alone)


# ---- files and resume -------------------------------------------------------------------------

def test_grid_run_files(tmp_path):
    data = ToyImages(n=32, size=8)
    out = tmp_path / "grid"
    with use_backend("reference"):
        fit_grid(mlp_vae, VAE_GRID, data, out_dir=out, **{**RUN, "log_every": 2})
    described = json.loads((out / "grid.json").read_text())
    assert described["points"] == VAE_GRID and described["seeds"] == [0, 1, 2]
    assert described["lrs"] == [1e-2, 3e-3, 1e-2]
    assert described["varied"] == ["beta", "seed", "lr"]
    assert [m["beta"] for m in described["models"]] == [1.0, 4.0, 0.5]
    records = read_metrics(out)
    assert [(r["step"], r["model"]) for r in records] == [(s, k) for s in (2, 4)
                                                         for k in range(3)]
    assert [r["lr"] for r in records[:3]] == [1e-2, 3e-3, 1e-2]
    assert load_checkpoint(out)["step"] == 4
    assert (out / ".lock").exists()
    assert json.loads((out / "config.json").read_text())["models"][1]["beta"] == 4.0
    with pytest.raises(FileExistsError, match="resume=True"):
        fit_grid(mlp_vae, VAE_GRID, data, out_dir=out, **RUN)


def test_stop_and_resume_equals_an_uninterrupted_grid(tmp_path):
    data = ToyImages(n=32, size=8)
    settings = {**RUN, "steps": 5, "checkpoint_every": 2}
    with use_backend("reference"):
        whole = fit_grid(mlp_vae, VAE_GRID, data, out_dir=tmp_path / "whole", **settings)
        fit_grid(mlp_vae, VAE_GRID, data, out_dir=tmp_path / "parts", stop_after=3, **settings)
        parts = fit_grid(mlp_vae, VAE_GRID, data, out_dir=tmp_path / "parts", resume=True,
                         **settings)
        with pytest.raises(ValueError, match="another grid"):
            fit_grid(mlp_vae, VAE_GRID[:2], data, out_dir=tmp_path / "parts", resume=True,
                     **settings)
    for a, b in zip(whole.model_dirs, parts.model_dirs):
        for name, value in state(load_model(a)).items():
            assert torch.equal(value, state(load_model(b))[name]), name
    assert timeless_records(tmp_path / "parts") == timeless_records(tmp_path / "whole")


def timeless_records(run_dir):
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in read_metrics(run_dir)]


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train_grid import KILL_RUN, VAE_GRID, mlp_vae
from test_train import ToyImages
from pyvae.ops import use_backend
from pyvae.train import fit_grid
with use_backend("reference"):
    fit_grid(mlp_vae, VAE_GRID, ToyImages(n=32, size=8), out_dir=sys.argv[1], **KILL_RUN)
"""
KILL_RUN = dict(steps=24, batch_size=4, lr=1e-2, checkpoint_every=3, progress=False,
                log_every=1, seed=3)


def test_sigkill_and_resume_equals_an_uninterrupted_grid(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(tests=TESTS_DIR))
    out = tmp_path / "killed"
    kill_after_first_checkpoint(script, out)
    killed_at = load_checkpoint(out)["step"]
    assert 3 <= killed_at < 24 and killed_at % 3 == 0
    with use_backend("reference"):
        resumed = fit_grid(mlp_vae, VAE_GRID, ToyImages(n=32, size=8), out_dir=out,
                           resume=True, **KILL_RUN)
        whole = fit_grid(mlp_vae, VAE_GRID, ToyImages(n=32, size=8),
                         out_dir=tmp_path / "whole", **KILL_RUN)
    for a, b in zip(resumed.model_dirs, whole.model_dirs):
        reference = state(load_model(b))
        for name, value in state(load_model(a)).items():
            assert torch.equal(value, reference[name]), name
    steps = [(r["step"], r["model"]) for r in read_metrics(out)]
    assert steps == [(s, k) for s in range(1, 25) for k in range(3)]


# ---- errors -------------------------------------------------------------------------------------

def test_grid_errors(tmp_path):
    data = ToyImages(n=32, size=8)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"grid\[1\] gives parameters of other shapes.*head"):
        fit_grid(lambda latent_dim: VAE(latent_dim, 1, 8, architecture="mlp", hidden=8),
                 [{"latent_dim": 2}, {"latent_dim": 3}], data, out_dir=out, **RUN)
    with pytest.raises(ValueError, match="'estimator' varies.*float"):
        fit_grid(lambda estimator: BetaTCVAE(2, 1, 8, 32, estimator=estimator,
                                             architecture="mlp", hidden=8),
                 [{"estimator": "mss"}, {"estimator": "mws"}], data, out_dir=out, **RUN)
    with pytest.raises(ValueError, match="has buffers"):
        fit_grid(lambda noise_std: CapacityAE(2, noise_std, 1, 8, hidden=8),
                 [{"noise_std": 0.5}, {"noise_std": 1.0}], data, out_dir=out, **RUN)
    with pytest.raises(ValueError, match="does not support precision='fp16'"):
        fit_grid(mlp_vae, VAE_GRID, data, out_dir=out, precision="fp16", **RUN)
    with pytest.raises(ValueError, match="non-empty list"):
        fit_grid(mlp_vae, [], data, out_dir=out, **RUN)
    with pytest.raises(ValueError, match="lr must be positive"):
        fit_grid(mlp_vae, [{"lr": -1.0}], data, out_dir=out, **RUN)
    with pytest.raises(TypeError, match="unknown keyword arguments"):
        fit_grid(mlp_vae, VAE_GRID, data, out_dir=out, learning_rate=1.0, **RUN)
    assert not (out / "checkpoint").exists()


class NoisyVAE(VAE):
    """A VAE whose loss also draws torch.randn: noise fit_grid cannot give to each model."""

    def loss(self, x, kl_weight=1.0):
        return super().loss(x + 0.01 * torch.randn(x.shape), kl_weight)


def test_other_random_draws_are_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="draws random numbers other than the noise seeds"):
        fit_grid(lambda beta: NoisyVAE(2, 1, 8, beta=beta, architecture="mlp", hidden=8),
                 [{"beta": 1.0}, {"beta": 2.0}], ToyImages(n=32, size=8),
                 out_dir=tmp_path / "run", **RUN)


def test_grid_product_and_varied_keys():
    grid = grid_product({"beta": [1, 4], "seed": [0, 1]})
    assert grid == [{"beta": 1, "seed": 0}, {"beta": 1, "seed": 1}, {"beta": 4, "seed": 0},
                    {"beta": 4, "seed": 1}]
    assert varied_keys(grid + [{"beta": 1, "seed": 0, "lr": 1.0}]) == ["beta", "seed", "lr"]
    with pytest.raises(ValueError, match="'beta' needs a non-empty list"):
        grid_product({"beta": []})


# ---- the command line and the report -----------------------------------------------------------

def test_train_grid_command_and_report(tmp_path, capsys):
    images = (np.random.default_rng(0).random((32, 1, 8, 8)) < 0.3).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "run"
    command = ["train-grid", "--model", "VAE", "--model-arg", "architecture=mlp",
               "--model-arg", "latent_dim=2", "--model-arg", "hidden=8", "--data",
               str(tmp_path / "images.npy"), "--out", str(out), "--steps", "3",
               "--batch-size", "8", "--no-progress", "--device", "cpu",
               "--grid-arg", "beta=1,4", "--grid-arg", "lr=[0.01,0.001]"]
    with use_backend("reference"):
        assert main(command) == 0
    printed = capsys.readouterr().out
    assert "pyvae train-grid: 4 models, step 3" in printed
    assert json.loads((out / "grid.json").read_text())["points"] == grid_product(
        {"beta": [1, 4], "lr": [0.01, 0.001]})
    assert load_model(out / "models" / "003").beta == 4.0
    assert main(["report", str(out)]) == 0
    pictures = sorted(p.name for p in (out / "report").glob("*.png"))
    assert pictures == ["grid_distortion.png", "grid_rate.png", "rate_distortion.png"]
    assert "| 3 |" in (out / "report" / "report.md").read_text()
    with use_backend("reference"):
        assert main(command) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(command[:-4]) == 2
    assert "--grid FILE or with --grid-arg" in capsys.readouterr().err


def test_train_grid_help(capsys):
    with pytest.raises(SystemExit):
        main(["train-grid", "--help"])
    text = capsys.readouterr().out
    for flag in ("--grid FILE", "--grid-arg KEY=V1,V2", "--model-seed", "--resume", "models/000"):
        assert flag in text


def test_a_nonfinite_step_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    from test_train import ToyVAE
    from pyvae.train import TrainingDiverged
    with pytest.raises(TrainingDiverged, match="at step 6: non-finite model 0 loss=nan") as error:
        # call 1 of the (shared, vmapped) loss is fit_grid's layout probe, steps 1-5 calls 2-6
        fit_grid(lambda: ToyVAE(nan_at_call=7), [{"seed": 0}, {"seed": 1}],
                 ToyImages(n=16), out_dir=tmp_path, steps=10, batch_size=4,
                 checkpoint_every=4, progress=False, log_every=1)
    assert "model 1 rate_bits" in error.value.nonfinite
    assert error.value.checkpoint == tmp_path / "checkpoint"
    assert load_checkpoint(tmp_path)["step"] == 4


def test_grid_axes_and_a_one_axis_report(tmp_path):
    from pyvae.grid_report import grid_axes
    points = [{"betas": [1.0, b], "seed": s} for b in (0.5, 4.0) for s in (0, 1)]
    assert grid_axes(points) == [("betas[1]", [0.5, 0.5, 4.0, 4.0])]
    (tmp_path / "grid.json").write_text(json.dumps(
        {"points": points, "models": [{"name": "HierarchicalVAE"}] * 4,
         "varied": ["betas", "seed"]}))
    records = [{"split": "train", "step": 3, "model": k, "loss": 1.0 + k, "distortion": 1.0,
                "rate_bits": float(k)} for k in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "(mean over 2 seeds) over betas[1]" in text
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == [
        "grid_distortion.png", "grid_rate.png", "rate_distortion.png"]


def test_grid_report_probes_the_labels(tmp_path):
    """On labelled data the grid report adds a heatmap and a table column of each model's
    held-out linear-probe accuracy; the numbers are linear_probe's on the models' codes."""
    from pyvae.grid_report import probe_accuracies
    from pyvae.metrics import linear_probe
    from pyvae.report import _spread
    out = tmp_path / "run"
    command = ["train-grid", "--model", "VAE", "--model-arg", "architecture=mlp",
               "--model-arg", "latent_dim=2", "--model-arg", "hidden=8", "--data", "digits",
               "--out", str(out), "--steps", "2", "--batch-size", "16", "--no-progress",
               "--device", "cpu", "--grid-arg", "beta=1,4", "--grid-arg", "lr=[0.01,0.001]"]
    with use_backend("reference"):
        assert main(command) == 0
        from pyvae.report import report
        report(out, max_points=400)
    pictures = sorted(p.name for p in (out / "report").glob("*.png"))
    assert pictures == ["grid_distortion.png", "grid_probe.png", "grid_rate.png",
                        "rate_distortion.png"]
    text = (out / "report" / "report.md").read_text()
    assert "probe accuracy (%)" in text and "logistic probe of the label (10 classes)" in text

    config = json.loads((out / "config.json").read_text())
    accuracies, _ = probe_accuracies(out, 4, config, max_points=400)
    # model 3 by hand: its posterior means of the same 400 digits, the same seeded halves
    from pyvae.data import load_dataset
    digits = load_dataset("digits")
    indices = _spread(400, len(digits))
    codes = load_model(out / "models" / "003").encode(digits.images[indices])[0].detach()
    order = np.random.default_rng(0).permutation(400)
    train, test = np.sort(order[:200]), np.sort(order[200:])
    labels = np.asarray(digits.targets)[indices]
    expected = linear_probe(codes[train], labels[train], codes[test], labels[test])
    assert accuracies[3] == pytest.approx(expected["test_accuracy"])
    assert all(0.15 < a <= 1 for a in accuracies)  # 2-D codes of digits: above chance (10 %)
    assert f"| 3 | `{json.dumps({'beta': 4, 'lr': 0.001})}` |" in text
    assert f"{100 * accuracies[3]:.4g} |" in text
