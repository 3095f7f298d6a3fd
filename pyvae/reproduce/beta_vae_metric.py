"""β-VAE metric on 2-D shapes (seed 004's table, from Higgins et al. 2017).

Representations scored: raw pixels, PCA, an untrained VAE, a VAE (β = 1) and a β-VAE, all with
:func:`pyvae.metrics.beta_vae_score` on :class:`pyvae.data.Shapes2D`. As in Higgins et al. and
the seed, the ground-truth factors are scale, orientation, x and y (chance 25 %); the shape is a
nuisance drawn at random for every image (:class:`ShapeFactors`). (Counting the shape as a fifth
factor, as disentanglement_lib does, caps every representation near 80 %: when the shape or the
orientation is the shared factor, nothing that a linear code of these images varies tells the
two apart.) The mutual information gap (MIG) is reported alongside.

The models are :class:`pyvae.models.VAE` with the fully-connected 1200-unit networks used for
these shapes in the β-VAE / β-TCVAE literature (``architecture="mlp"``, Chen et al.'s), trained
with Adagrad (lr 10⁻²) on a rendered subset of the shapes at the seed's 64×64 resolution, so
that β = 1 and β = 4 carry the seed's normalised β. (The seed's slides give no training
details.) (``--set architecture=conv`` trains the convolutional
network instead; ``image_size`` below 64 trains on average-pooled images, and the models' encode
function pools the metric's 64×64 renders to match.) Raw pixels and PCA see the 64×64 images.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA

from pyvae import viz
from pyvae.data import Shapes2D
from pyvae.metrics import beta_vae_score, mean_encoder, mig_score
from pyvae.models import VAE
from pyvae.reproduce._common import (Report, Table, TensorImages, downsample,
                                     mean_and_standard_error, reconstruct, seed_everything,
                                     to_uint8, train, train_grid)

SEED = "004"
SEED_TITLE = "Nicolae & Maria, *Autoencoders and Variational Autoencoders*, Pie & AI Strasbourg " \
             "2020, quoting Higgins et al. 2017"
TITLE = "β-VAE metric on 2-D shapes"
SUMMARY = "β-VAE metric on 2-D shapes: raw pixels, PCA, untrained VAE, VAE, β-VAE"
CLAIM = ("On the 2-D shapes data the β-VAE metric (accuracy of a linear classifier that "
         "predicts which factor a batch of pairs shares) is 45.75 % for raw pixels, 84.9 % for "
         "PCA, 44.14 % for an untrained VAE, 61.58 % for a VAE and 99.23 % for a β-VAE: "
         "β-VAE > VAE > raw pixels.")
FACTORS = ("shape", "scale", "orientation", "pos_x", "pos_y")
PAPER = {"raw pixels": 45.75, "PCA": 84.9, "VAE untrained": 44.14, "VAE (β=1)": 61.58,
         "β-VAE": 99.23}

SIZES = {
    "smoke": dict(image_size=16, train_size=512, latent_dim=4, architecture="mlp", hidden=32,
                  beta=4.0, steps=3, batch_size=32, optimizer="adagrad", lr=1e-2,
                  pca_components=4, metric_pairs=4, metric_train=24,
                  metric_eval=12, metric_factors=["scale", "orientation", "pos_x", "pos_y"],
                  mig_points=200, seeds=1, seed_grid=False),
    "default": dict(image_size=64, train_size=50000, latent_dim=10, architecture="mlp",
                    hidden=1200, beta=4.0, steps=3000, batch_size=64, optimizer="adagrad",
                    lr=1e-2, pca_components=10, metric_pairs=64,
                    metric_train=400, metric_eval=400,
                    metric_factors=["scale", "orientation", "pos_x", "pos_y"], mig_points=3000,
                    seeds=5, seed_grid=False),
}


class ShapeFactors:
    """:class:`Shapes2D` seen through a subset of its factors, for the disentanglement metrics:
    ``factor_sizes`` / ``sample_factors`` / ``render`` cover the factors named in ``factors``;
    the others (e.g. the shape) are drawn uniformly at random for every rendered image, from a
    generator seeded with ``seed``."""

    def __init__(self, factors, seed: int = 0):
        unknown = set(factors) - set(FACTORS)
        if unknown or not factors:
            raise ValueError(f"ShapeFactors: factors must be a subset of {FACTORS}, got "
                             f"{factors!r}")
        self.columns = [FACTORS.index(name) for name in factors]
        self.factor_names = tuple(factors)
        self.factor_sizes = tuple(Shapes2D.factor_sizes[k] for k in self.columns)
        self._rng = np.random.default_rng(seed)

    def sample_factors(self, n: int, rng) -> np.ndarray:
        return Shapes2D.sample_factors(n, rng)[:, self.columns]

    def render(self, factors) -> torch.Tensor:
        factors = np.asarray(factors)
        full = Shapes2D.sample_factors(len(factors), self._rng)
        full[:, self.columns] = factors
        return Shapes2D.render(full)


def _pooled_encoder(model, image_size: int):
    encode = mean_encoder(model)
    return lambda x: encode(downsample(torch.as_tensor(x).float(), image_size))


def run(out, config: dict, *, device, seed: int, work_dir) -> Report:
    c = config
    shapes = Shapes2D(size=c["train_size"], seed=seed)
    full = Shapes2D.render(shapes.factors)  # (N, 1, 64, 64)
    data = TensorImages(to_uint8(downsample(full, c["image_size"])))
    held_out = downsample(Shapes2D.render(Shapes2D.sample_factors(512, seed + 1)),
                          c["image_size"])
    chance = 1 / len(c["metric_factors"])

    def score(encode_fn, dims) -> dict:
        """β-VAE metric (and MIG for codes) of one representation, with the metric seed."""
        result = beta_vae_score(encode_fn, ShapeFactors(c["metric_factors"], seed),
                                batch_size=c["metric_pairs"], num_train=c["metric_train"],
                                num_eval=c["metric_eval"], seed=seed)
        if dims <= 64:  # the MIG of 4,096 single pixels says nothing
            result["mig"] = mig_score(encode_fn, ShapeFactors(c["metric_factors"], seed),
                                      num_train=c["mig_points"], seed=seed)["mig"]
        return result

    # Fixed representations (one each), then the models (one per training seed).
    pca = PCA(c["pca_components"], random_state=seed).fit(full[:5000].flatten(1).numpy())
    fixed = {"raw pixels": (lambda x: torch.as_tensor(x).float().flatten(1), 64 * 64),
             "PCA": (lambda x: pca.transform(torch.as_tensor(x).float().flatten(1).numpy()),
                     c["pca_components"])}
    scores: dict[str, list[dict]] = {name: [score(fn, dims)] for name, (fn, dims) in fixed.items()}
    dims_of = {name: dims for name, (_, dims) in fixed.items()}
    kinds = [("VAE untrained", 1.0, 0), ("VAE (β=1)", 1.0, c["steps"]),
             ("β-VAE", c["beta"], c["steps"])]
    make_model = lambda beta: VAE(c["latent_dim"], 1, c["image_size"], beta=beta,
                                  hidden=c["hidden"], architecture=c["architecture"])
    models, seconds, grid_models = {}, {}, {}
    if c["seed_grid"]:
        # The trained models of every seed in one fit_grid call (K = 2 x seeds): one data
        # order (seed), each model's initial weights and noise from its training seed.
        trained_kinds = [(name, beta) for name, beta, steps in kinds if steps]
        grid = [{"beta": beta, "seed": seed + k} for k in range(c["seeds"])
                for _, beta in trained_kinds]
        trained = train_grid(make_model, grid, data, work_dir=work_dir, name="grid",
                             steps=c["steps"], batch_size=c["batch_size"],
                             optimizer=c["optimizer"], lr=c["lr"], device=device, seed=seed)
        for i, result in enumerate(trained):
            grid_models[trained_kinds[i % len(trained_kinds)][0], i // len(trained_kinds)] = \
                result.model
        seconds["all trained models in one grid"] = [round(trained[0].seconds, 1)]
        del trained
    for k in range(c["seeds"]):
        run_seed = seed + k
        for name, beta, steps in kinds:
            if (name, k) in grid_models:
                model = grid_models.pop((name, k))
            else:
                seed_everything(run_seed)  # within a seed, the three models start equal
                model = make_model(beta)
            if steps and not c["seed_grid"]:
                trained = train(model, data, work_dir=work_dir, name=f"{beta:g}_{run_seed}",
                                steps=steps, batch_size=c["batch_size"],
                                optimizer=c["optimizer"], lr=c["lr"], device=device,
                                seed=run_seed)
                seconds.setdefault(name, []).append(round(trained.seconds, 1))
            model.to(device).eval()
            result = score(_pooled_encoder(model, c["image_size"]), c["latent_dim"])
            with torch.no_grad():
                output = model.loss(held_out.to(device))
            result["rate_bits"] = float(output.rate_bits.mean())
            result["distortion_nats"] = float(output.distortion.mean())
            scores.setdefault(name, []).append(result)
            dims_of[name] = c["latent_dim"]
            if k == 0:
                models[name] = model

    def stat(name, key, scale=1.0):
        return seed_stats(scores, name, key, scale)

    def spread(name, key, spec, scale=1.0):
        """mean ± std over the seeds (mean ± standard error with seed_grid); the mean alone
        for one result."""
        values = [scale * r[key] for r in scores[name] if r.get(key) is not None]
        if not values:
            return None
        if len(values) == 1:
            return f"{values[0]:{spec}}" if key == "eval_accuracy" else values[0]
        mean, error = (mean_and_standard_error(values) if c["seed_grid"]
                       else stat(name, key, scale))
        return f"{mean:{spec}} ± {error:{spec}}"

    rows = []
    for name in scores:
        per_seed = ", ".join(f"{100 * r['eval_accuracy']:.1f}" for r in scores[name])
        rows.append([name, dims_of[name], spread(name, "eval_accuracy", ".1f", 100),
                     per_seed if len(scores[name]) > 1 else "—",
                     stat(name, "train_accuracy", 100)[0],
                     spread(name, "mig", ".3f") if c["seed_grid"] else stat(name, "mig")[0],
                     stat(name, "rate_bits")[0], stat(name, "distortion_nats")[0], PAPER[name]])
    if c["seeds"] == 1:
        seeds_text = "one training seed"
    elif c["seed_grid"]:
        seeds_text = (f"mean ± standard error over {c['seeds']} training seeds for the VAEs, "
                      f"trained together by fit_grid")
    else:
        seeds_text = f"mean ± std over {c['seeds']} training seeds for the VAEs"
    table = Table(f"β-VAE metric (%) on 2-D shapes, factors {', '.join(c['metric_factors'])} "
                  f"(chance {100 * chance:.0f} %; {seeds_text}), and MIG",
                  ["representation", "dims", "metric (held-out) %", "per seed", "metric (train) %",
                   "MIG", "rate (bits)", "distortion (nats)", "seed's table %"], rows,
                  [None, None, None, None, ".1f", ".3f", ".2f", ".1f", ".2f"])

    acc = {name: stat(name, "eval_accuracy")[0] for name in scores}
    held, finding = judge(scores, standard_error=c["seed_grid"])

    pictures = []
    viz.save_probe_accuracy(out / "scores.png", ["this run (held-out points)", "seed's table"],
                            {name: [acc[name], PAPER[name] / 100] for name in acc},
                            baseline=chance, title="β-VAE metric on 2-D shapes")
    pictures.append(("scores.png", f"β-VAE metric of every representation (this run: mean over "
                                   f"training seeds) next to the seed's table; the line is "
                                   f"chance (1/{len(c['metric_factors'])})."))
    examples = held_out[:12]
    rows_img, labels = [examples], ["input"]
    for name in ("VAE (β=1)", "β-VAE"):
        rows_img.append(reconstruct(models[name], examples))
        labels.append(name)
    viz.save_image_rows(out / "reconstructions.png", rows_img, labels,
                        title=f"held-out shapes ({c['image_size']}×{c['image_size']}) and "
                              f"reconstructions (training seed {seed})")
    pictures.append(("reconstructions.png", "Held-out shapes and their reconstructions by the "
                                            "VAE and the β-VAE (first training seed)."))
    for name, file in (("VAE (β=1)", "traversals_vae.png"), ("β-VAE", "traversals_beta_vae.png")):
        viz.save_traversals(out / file, models[name], examples[:1].to(device),
                            title=f"{name} latent traversals")
        pictures.append((file, f"Latent traversals of the {name}, first training seed (every "
                               f"latent dimension from −3 to 3 around one shape)."))

    network = ({"mlp": f"fully-connected networks of Chen et al., {c['hidden']} units",
                "conv": f"convolutional network of Higgins et al., {c['hidden']}-unit layer"}
               [c["architecture"]])
    resolution = ("64×64" if c["image_size"] == 64 else
                  f"64×64 and average-pooled to {c['image_size']}×{c['image_size']}")
    notes = [
        f"Models: pyvae.models.VAE ({network}, Bernoulli likelihood), {c['latent_dim']} "
        f"latents, trained {c['steps']} steps of {c['batch_size']} with {c['optimizer']} "
        f"(lr {c['lr']}) on {c['train_size']} shapes rendered at {resolution}; β-VAE β = "
        f"{c['beta']}. {c['seeds']} training "
        + (f"seeds ({seed}…{seed + c['seeds'] - 1}: initial weights and noise; one data order, "
           f"seed {seed}, for all), the {2 * c['seeds']} trained models trained together in one "
           f"pyvae.train.fit_grid call "
           f"({seconds['all trained models in one grid'][0]:.0f} s); "
           if c["seed_grid"] else
           f"seed(s) ({seed}…{seed + c['seeds'] - 1}: initial weights, data order, noise); ")
        + "within a seed the three VAEs start from the same weights (the untrained one is that "
        "initialisation).",
        f"Metric: pyvae.metrics.beta_vae_score (scikit-learn logistic regression on the mean "
        f"|z₁ − z₂| of L = {c['metric_pairs']} pairs) with {c['metric_train']} training and "
        f"{c['metric_eval']} held-out points, over the factors {', '.join(c['metric_factors'])} "
        f"as in Higgins et al. (the shape drawn at random for every image), the same points for "
        f"every representation; MIG: pyvae.metrics.mig_score on {c['mig_points']} random "
        f"shapes (20 bins), not computed for the 4,096 raw pixels. Raw pixels and PCA "
        f"({c['pca_components']} components, fitted on 5,000 training shapes) read the 64×64 "
        f"images. {c['steps']} steps of {c['batch_size']} are "
        f"{c['steps'] * c['batch_size'] / c['train_size']:.1f} passes over the training shapes.",
        "Rate and distortion: means over 512 fresh shapes (one posterior sample each).",
    ]
    if c["image_size"] != 64:
        notes.append(
            f"Scale of β: Higgins et al. compare β normalised by latent size over input size. "
            f"At {c['image_size']}×{c['image_size']} the likelihood sums over "
            f"{c['image_size'] ** 2} pixels instead of 4,096, so β = 1 here is β_norm = "
            f"{c['latent_dim'] / c['image_size'] ** 2:.3g} and β = {c['beta']:g} is "
            f"{c['beta'] * c['latent_dim'] / c['image_size'] ** 2:.3g}, against 0.0024 (β = 1) "
            f"and 0.0098 (β = 4) at the seed's 64×64: the 'VAE' row carries more pressure than "
            f"the seed's VAE.")
    else:
        notes.append(
            f"Scale of β: at 64×64, as in the seed, β = 1 and β = {c['beta']:g} are β_norm = "
            f"β · {c['latent_dim']} / 4096 = {c['latent_dim'] / 4096:.3g} and "
            f"{c['beta'] * c['latent_dim'] / 4096:.3g}, the normalised values Higgins et al. "
            f"compare.")
    data = {"scores": scores, "training_seconds": seconds}
    return Report([table], held, finding, pictures, notes, data)


def seed_stats(scores: dict[str, list[dict]], name: str, key: str, scale: float = 1.0
               ) -> tuple[float | None, float | None]:
    """Mean and standard deviation over training seeds of ``scale * result[key]`` for one
    representation (None, None where no seed has the value, e.g. the MIG of raw pixels)."""
    values = [scale * r[key] for r in scores[name] if r.get(key) is not None]
    return (float(np.mean(values)), float(np.std(values))) if values else (None, None)


def judge(scores: dict[str, list[dict]], standard_error: bool = False) -> tuple[bool, str]:
    """Whether the seed's ordering β-VAE > VAE > raw pixels held, and the sentence that says so.

    ``scores`` maps each representation to one result dict per training seed (``eval_accuracy``
    in [0, 1], ``mig`` for codes). With one seed the mean order decides. With several, a mean
    difference smaller than the seed-to-seed spread is a tie, not an ordering: β-VAE > VAE holds
    only if the β-VAE also beats the VAE of the same seed in most seeds and the gap between the
    means is larger than the larger of the two standard deviations. With ``standard_error``
    (many seeds, averaged down: ``seed_grid``) the test is instead whether the mean of the
    same-seed differences β-VAE − VAE is above twice its standard error (std/√seeds).
    """
    vae, beta = scores["VAE (β=1)"], scores["β-VAE"]
    acc = {name: seed_stats(scores, name, "eval_accuracy", 100)[0] for name in scores}  # %
    gap = acc["β-VAE"] - acc["VAE (β=1)"]
    seeds = len(vae)
    wins = sum(b["eval_accuracy"] > v["eval_accuracy"] for b, v in zip(beta, vae))
    noise = max(seed_stats(scores, name, "eval_accuracy", 100)[1]
                for name in ("VAE (β=1)", "β-VAE"))
    paired, paired_se = mean_and_standard_error(
        [100 * (b["eval_accuracy"] - v["eval_accuracy"]) for b, v in zip(beta, vae)])
    if standard_error and seeds > 1:
        beta_above = paired > 2 * paired_se
    else:
        beta_above = gap > 0 and (seeds == 1 or (2 * wins > seeds and gap > noise))
    held = beta_above and acc["VAE (β=1)"] > acc["raw pixels"]
    order = sorted(acc, key=acc.get, reverse=True)
    finding = (f"β-VAE {acc['β-VAE']:.1f} %, VAE {acc['VAE (β=1)']:.1f} %, raw pixels "
               f"{acc['raw pixels']:.1f} %: the ordering β-VAE > VAE > raw pixels "
               f"{'holds' if held else 'does not hold'} here (ranking of the means: "
               f"{', '.join(order)})")
    if standard_error and seeds > 1:
        separated = abs(paired) > 2 * paired_se
        finding += (f"; over {seeds} training seeds the β-VAE beats the VAE of the same seed in "
                    f"{wins} of {seeds}, the mean same-seed difference is {paired:+.1f} ± "
                    f"{paired_se:.1f} points (standard error; seed-to-seed std of the models "
                    f"{noise:.1f} points), "
                    + (f"more than twice its standard error: the two separate, the "
                       f"{'β-VAE' if paired > 0 else 'VAE'} above"
                       if separated else "within twice its standard error: a tie"))
    elif seeds > 1:
        size = "larger" if abs(gap) > noise else "not larger"
        finding += (f"; the β-VAE beats the VAE of the same seed in {wins} of {seeds} seeds, and "
                    f"the gap ({gap:+.1f} points) is {size} than the seed-to-seed spread "
                    f"({noise:.1f} points)")
        if not beta_above and abs(gap) <= noise:
            finding += ": within the spread, the two are tied"
    finding += "."
    if min(acc["VAE (β=1)"], acc["β-VAE"]) > 80:
        finding += (" Both trained VAEs score far above the seed's 61.58 % for the VAE, so the "
                    "seed's large VAE-to-β-VAE gap does not appear at this training length.")
    mig_vae, mig_beta = (seed_stats(scores, name, "mig")[0] for name in ("VAE (β=1)", "β-VAE"))
    finding += (f" The MIG ranks the β-VAE {'above' if mig_beta > mig_vae else 'not above'} the "
                f"VAE ({mig_beta:.3f} vs {mig_vae:.3f}")
    if standard_error and seeds > 1:
        mig_gap, mig_se = mean_and_standard_error([b["mig"] - v["mig"]
                                                   for b, v in zip(beta, vae)])
        finding += (f"; same-seed difference {mig_gap:+.3f} ± {mig_se:.3f}, "
                    f"{'separated' if abs(mig_gap) > 2 * mig_se else 'a tie'} at 2 standard "
                    f"errors")
    finding += ")."
    finding += (f" PCA scores {acc['PCA']:.1f} % (seed: 84.9 %), the untrained VAE "
                f"{acc['VAE untrained']:.1f} % (seed: 44.14 %).")
    return held, finding
