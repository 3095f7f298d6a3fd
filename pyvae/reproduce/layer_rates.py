"""Trading information between the layers of a two-layer hierarchical VAE (seed 002): a grid of
(β₁, β₂), the resulting layer rates R₁ (z₁, next to x) and R₂ (z₂, the top), reconstruction
PSNR, a logistic probe of the digit class from each layer's posterior mean, and the quality of
samples from the generative model (FID and inception score with diversity and sharpness, seed
§5.5) in the feature space of a small classifier trained on the same digits — not Inception, so
the numbers are not comparable with published FIDs or inception scores.

:class:`pyvae.models.HierarchicalVAE` with top-down inference, loss = distortion + β₁·R₁ + β₂·R₂,
on scikit-learn's digits; every number is measured on held-out digits. The diagonal β₁ = β₂ is
the conventional β-VAE.
"""
from __future__ import annotations

import numpy as np
import scipy.stats
import torch

from pyvae import viz
from pyvae.metrics import (evaluate, feature_statistics, frechet_distance, inception_score,
                           linear_probe, psnr, train_feature_classifier)
from pyvae.models import HierarchicalVAE
from pyvae.reproduce._common import (Report, Table, digits_split, encode_means,
                                     mean_and_standard_error, reconstruct, seed_everything,
                                     train, train_grid)
from pyvae.reproduce._plots import save_colored_scatter

SEED = "002"
SEED_TITLE = "Xiao & Bamler, *Trading Information between Latents in Hierarchical Variational " \
             "Autoencoders*, ICLR 2023"
TITLE = ("Layer-wise rates of a two-layer hierarchical VAE: PSNR, a linear probe and sample "
         "quality")
SUMMARY = ("two-layer hierarchical VAE on a (β₁, β₂) grid: layer rates, PSNR, linear probe, "
           "sample FID / inception score")
CLAIM = ("With one β per layer the rate splits into layer rates that can be tuned independently. "
         "Reconstruction quality (PSNR) improves with the total rate R₁ + R₂ (Eq. 9, Fig. 3), "
         "while what a classifier can read from the top layer z₂ is bounded by the rate "
         "accumulated up to it, R₂ (Eq. 10–11, Fig. 7). Sample quality (inception score, Eq. 12, "
         "Fig. 6) does not simply grow with the rate: on SVHN its best region has a higher R₂ "
         "than a β-VAE of the same total rate and the score is driven by its sharpness factor, "
         "which depends mostly on R₂; on binary MNIST (App. A.2.1) the best score sits at a high "
         "R₁ instead. The best model for each task sits somewhere else in the (R₁, R₂) plane, "
         "and off the β-VAE diagonal (§5.2, 'no one HVAE fits all'). The seed reports these as "
         "figures only (no numeric table) and no FID.")

SIZES = {
    "smoke": dict(image_size=8, latent_dims=[4, 2], hidden=32, betas1=[0.2, 5.0],
                  betas2=[0.2, 5.0], steps=3, batch_size=64, lr=1e-3, test_fraction=0.3,
                  classifier_steps=5, feature_dim=16, num_samples=64, seeds=1,
                  seed_grid=False),
    "default": dict(image_size=8, latent_dims=[8, 4], hidden=128, betas1=[0.2, 1.0, 5.0],
                    betas2=[0.2, 1.0, 5.0], steps=600, batch_size=64, lr=1e-3,
                    test_fraction=0.3, classifier_steps=1500, feature_dim=64,
                    num_samples=1000, seeds=1, seed_grid=False),
}


def _spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(a, b)[0])


@torch.no_grad()
def _samples(model: HierarchicalVAE, images: torch.Tensor, seed: int) -> torch.Tensor:
    """One ancestral posterior sample (z₁ | z₂) per image, concatenated in layer order, drawn
    with a fixed seed (the caller's RNG is untouched)."""
    device = next(model.parameters()).device
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        _, _, zs, _ = model._infer(images.to(device), sample=True)
    return torch.cat(zs, dim=-1).float().cpu()


def _quality(classifier, images: torch.Tensor, reference: tuple) -> dict:
    """FID against the ``reference`` feature statistics and the inception score (with its
    diversity and sharpness) of ``images`` in the classifier's feature space."""
    features, probs = classifier.outputs(images)
    return {"fid": frechet_distance(*feature_statistics(features), *reference),
            **{k: v for k, v in inception_score(probs).items() if not k.endswith("_nats")}}


@torch.no_grad()
def _generated(model: HierarchicalVAE, n: int, seed: int) -> torch.Tensor:
    """``n`` ancestral samples of the generative model (means of p(x | z₁)), seeded."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    return model.sample(n, generator=generator).float().cpu()


def _save_quality_curves(path, results: list[dict]) -> None:
    """FID and inception score against R₁ (one line per β₂), R₂ (one line per β₁) and
    R₁ + R₂ (β-VAE diagonal in red) — the seed's sample-quality-over-rates view (Fig. 6)."""
    fig, axes = viz._new_figure(2, 3, (13.5, 7.0))
    for row, (key, name) in enumerate((("inception_score", "inception score (↑)"),
                                       ("fid", "FID (↓), classifier features"))):
        for col, (x_key, fixed, label) in enumerate((("rate1_bits", "beta2", "β₂"),
                                                     ("rate2_bits", "beta1", "β₁"))):
            ax = axes[row, col]
            for value in sorted({r[fixed] for r in results}):
                line = sorted((r for r in results if r[fixed] == value), key=lambda r: r[x_key])
                ax.plot([r[x_key] for r in line], [r[key] for r in line], "o-", markersize=4,
                        label=f"{label} = {value:g}")
            ax.legend(fontsize=7)
            viz._style(ax, f"{name} against {'R₁' if col == 0 else 'R₂'}",
                       f"{'R₁' if col == 0 else 'R₂'} (bits)", name, title_size=9)
        ax = axes[row, 2]
        diagonal = [r["beta1"] == r["beta2"] for r in results]
        for on, color, label in ((False, "tab:blue", "β₁ ≠ β₂"), (True, "tab:red", "β-VAE")):
            chosen = [r for r, d in zip(results, diagonal) if d == on]
            ax.plot([r["total_rate_bits"] for r in chosen], [r[key] for r in chosen], "o",
                    color=color, label=label)
        for r in results:
            ax.annotate(f"({r['beta1']:g},{r['beta2']:g})", (r["total_rate_bits"], r[key]),
                        textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.legend(fontsize=7)
        viz._style(ax, f"{name} against R₁ + R₂", "R₁ + R₂ (bits)", name, title_size=9)
    fig.suptitle("sample quality of every model against its layer rates (labels: (β₁, β₂))",
                 fontsize=10)
    viz.save_figure(fig, path)


def _judge_quality(results: list[dict], real: dict) -> tuple[bool, str, dict]:
    """Whether the seed's sample-quality finding held — the best inception score off the β-VAE
    diagonal and in another cell than the best PSNR ('no one HVAE fits all') — and a sentence
    on which layer rate the score, its factors and the FID follow."""
    get = lambda key: [r[key] for r in results]
    cell = lambda r: f"({r['beta1']:g}, {r['beta2']:g})"
    rho = {f"{key}_vs_{rate}": _spearman(get(key), get(column))
           for key in ("inception_score", "sharpness", "diversity", "fid")
           for rate, column in (("R1", "rate1_bits"), ("R2", "rate2_bits"),
                                ("total_rate", "total_rate_bits"))}
    best_is = max(results, key=lambda r: r["inception_score"])
    best_fid = min(results, key=lambda r: r["fid"])
    best_psnr = max(results, key=lambda r: r["psnr_db"])
    most_rate = max(results, key=lambda r: r["total_rate_bits"])
    off_diagonal = best_is["beta1"] != best_is["beta2"]
    apart = cell(best_is) != cell(best_psnr)
    holds = off_diagonal and apart
    def layer(key):  # the layer rate with the larger |ρ|, and the direction
        rate = "R2" if abs(rho[f"{key}_vs_R2"]) > abs(rho[f"{key}_vs_R1"]) else "R1"
        return (f"{'rises' if rho[f'{key}_vs_{rate}'] > 0 else 'falls'} mostly with "
                f"{'R₂' if rate == 'R2' else 'R₁'}")
    text = (
        f"Sample quality (classifier features, not Inception): the best inception score, "
        f"{best_is['inception_score']:.2f} (held-out digits themselves: "
        f"{real['test_digits']['inception_score']:.2f}), is at {cell(best_is)} — "
        f"{'off' if off_diagonal else 'on'} the β-VAE diagonal and "
        f"{'not where PSNR is best' if apart else 'where PSNR is best too'}"
        f"{' (seed: off the diagonal, elsewhere than PSNR)' if not holds else ''}; the best FID, "
        f"{best_fid['fid']:.3g} (training against held-out digits: "
        f"{real['train_digits']['fid']:.3g}), at {cell(best_fid)}. The model with the most rate "
        f"{cell(most_rate)} {'also has' if most_rate is best_is else 'does not have'} the best "
        f"score (ρ of IS with R₁ + R₂: {rho['inception_score_vs_total_rate']:.2f}). IS "
        f"{layer('inception_score')} (ρ = {rho['inception_score_vs_R1']:.2f} with R₁, "
        f"{rho['inception_score_vs_R2']:.2f} with R₂), sharpness {layer('sharpness')} "
        f"({rho['sharpness_vs_R1']:.2f}, {rho['sharpness_vs_R2']:.2f}), diversity "
        f"{layer('diversity')} ({rho['diversity_vs_R1']:.2f}, {rho['diversity_vs_R2']:.2f}), "
        f"FID {layer('fid')} ({rho['fid_vs_R1']:.2f}, {rho['fid_vs_R2']:.2f}); the seed saw "
        f"the score driven by sharpness rising with R₂ on SVHN, and the best score at a high "
        f"R₁ on MNIST.")
    return holds, text, rho


def _claim_parts(results: list[dict], real: dict) -> tuple[bool, bool, bool]:
    """The three parts of the verdict on one grid of results: PSNR rises with R₁ + R₂
    (Spearman > 0.7), the z₂ probe follows R₂ more than R₁, and the sample-quality finding
    (:func:`_judge_quality`)."""
    get = lambda key: [r[key] for r in results]
    rho_z2_r2 = _spearman(get("probe_z2"), get("rate2_bits"))
    psnr_holds = _spearman(get("psnr_db"), get("total_rate_bits")) > 0.7
    probe_holds = rho_z2_r2 > 0 and abs(rho_z2_r2) > abs(_spearman(get("probe_z2"),
                                                                   get("rate1_bits")))
    return psnr_holds, probe_holds, _judge_quality(results, real)[0]


def _cell_means(per_seed: list[list[dict]]) -> list[dict]:
    """Per cell, the mean over the training seeds of every number (``per_seed[k][i]``: cell i
    of seed k), with its standard error under ``"se"``; pictures from the first seed."""
    means = []
    for i, first in enumerate(per_seed[0]):
        cell = {key: value for key, value in first.items()
                if key in ("beta1", "beta2") or key.startswith("_")}
        cell["se"] = {}
        for key, value in first.items():
            if key not in cell and isinstance(value, (int, float)):
                cell[key], cell["se"][key] = mean_and_standard_error(
                    [seed_results[i][key] for seed_results in per_seed])
        means.append(cell)
    return means


def _over_seeds(per_seed: list[list[dict]], real: dict) -> tuple[Table, str, dict]:
    """How the claims fare seed by seed: in how many seeds each part of the verdict holds on
    that seed's grid alone, and whether the best cell (by the mean over seeds) of PSNR, the z₂
    probes, IS and FID beats the runner-up by more than twice the standard error of their
    paired (same-seed) difference. Returns the table, a sentence and the numbers."""
    n = len(per_seed)
    parts = [_claim_parts(results, real) for results in per_seed]
    counts = [sum(p[i] for p in parts) for i in range(3)]
    names = ["PSNR rises with R₁ + R₂ (ρ > 0.7)", "z₂ probe (mean) follows R₂ more than R₁",
             "best IS off the diagonal and elsewhere than the best PSNR"]
    rows = [[name, f"{count} of {n}", ""] for name, count in zip(names, counts)]
    cell = lambda r: f"({r['beta1']:g}, {r['beta2']:g})"
    separation = {}
    for key, label, sign in (("psnr_db", "PSNR (dB)", 1), ("probe_z2", "z₂ probe, mean (%)", 1),
                             ("sample_probe_z2", "z₂ probe, sample (%)", 1),
                             ("inception_score", "inception score", 1), ("fid", "FID", -1)):
        scale = 100.0 if key.startswith(("probe", "sample_probe")) else 1.0
        means = np.mean([[sign * r[key] for r in results] for results in per_seed], axis=0)
        best, second = np.argsort(-means)[:2]
        gap, error = mean_and_standard_error(
            [sign * (results[best][key] - results[second][key]) * scale
             for results in per_seed])
        separated = bool(gap > 2 * error)
        separation[key] = {"best": cell(per_seed[0][best]), "runner_up": cell(per_seed[0][second]),
                           "gap": gap, "se": error, "separated": separated}
        rows.append([f"best {label}: {cell(per_seed[0][best])} over "
                     f"{cell(per_seed[0][second])}", f"{gap:+.3g} ± {error:.2g}",
                     "yes" if separated else "no (tie)"])
    table = Table(f"The claims over {n} training seeds: in how many seeds each part of the verdict "
                  f"holds on that seed's grid alone, and the best cell's lead over the runner-up "
                  f"(mean over seeds of the same-seed difference ± its standard error; separated "
                  f"when above 2 standard errors)", ["claim or comparison", "seeds / lead",
                                                      "separated"], rows)
    ties = [f"{key} {v['best']} vs {v['runner_up']}" for key, v in separation.items()
            if not v["separated"]]
    text = (f"Over {n} training seeds: PSNR rises with the total rate in {counts[0]} of {n} "
            f"seeds, the z₂ probe follows R₂ more than R₁ in {counts[1]}, and the best "
            f"inception score is off the diagonal and away from the best PSNR in {counts[2]}; "
            + (f"best cells tied with the runner-up within 2 standard errors: "
               f"{'; '.join(ties)}." if ties else
               "every best cell beats its runner-up by more than 2 standard errors."))
    return table, text, {"claims_held_in_seeds": dict(zip(
        ("psnr_vs_total_rate", "probe_z2_follows_R2", "sample_quality"), counts)),
        "best_cell_separation": separation, "seeds": n}


def run(out, config: dict, *, device, seed: int, work_dir) -> Report:
    c = config
    split = digits_split(c["image_size"], c["test_fraction"], seed)
    train_set, x_train, x_test = split.train_set, split.x_train, split.x_test
    y_train, y_test = split.y_train, split.y_test
    d1 = c["latent_dims"][0]

    # The feature extractor of FID / IS: a classifier trained on the training digits (not
    # Inception); the reference statistics are those of the held-out digits.
    classifier = train_feature_classifier(x_train, y_train, num_classes=10,
                                          feature_dim=c["feature_dim"],
                                          steps=c["classifier_steps"], seed=seed, device=device)
    test_features, test_probs = classifier.outputs(x_test)
    classifier_accuracy = float((test_probs.argmax(1) == np.asarray(y_test)).mean())
    reference = feature_statistics(test_features)
    pick = np.random.default_rng(seed).permutation(len(x_train))[:c["num_samples"]]
    real_quality = {"train_digits": _quality(classifier, x_train[pick], reference),
                    "test_digits": _quality(classifier, x_test, reference)}

    def score(model, beta1, beta2, eval_seed, seconds) -> dict:
        """Every held-out number of one trained model (noise of its evaluation: eval_seed)."""
        scores = evaluate(model, x_test, device=device, seed=eval_seed)
        r1, r2 = scores["layer_rates_bits"]
        mu_train, mu_test = encode_means(model, x_train), encode_means(model, x_test)
        probe1 = linear_probe(mu_train[:, :d1], y_train, mu_test[:, :d1], y_test, seed=seed)
        probe2 = linear_probe(mu_train[:, d1:], y_train, mu_test[:, d1:], y_test, seed=seed)
        # The same probes on one sample of each layer (z₂ ~ q(z₂|x), z₁ ~ q(z₁|z₂, x)):
        # what the noisy code carries, which the layer rates bound.
        z_train = _samples(model, x_train, eval_seed)
        z_test = _samples(model, x_test, eval_seed + 1)
        sample1 = linear_probe(z_train[:, :d1], y_train, z_test[:, :d1], y_test, seed=seed)
        sample2 = linear_probe(z_train[:, d1:], y_train, z_test[:, d1:], y_test, seed=seed)
        recon = reconstruct(model, x_test)
        generated = _generated(model, c["num_samples"], eval_seed)
        quality = _quality(classifier, generated, reference)
        return {"beta1": beta1, "beta2": beta2, "rate1_bits": r1, "rate2_bits": r2,
                "total_rate_bits": r1 + r2, "distortion_nats": scores["distortion"],
                "psnr_db": float(psnr(x_test, recon).mean()),
                "probe_z1": probe1["test_accuracy"], "probe_z2": probe2["test_accuracy"],
                "sample_probe_z1": sample1["test_accuracy"],
                "sample_probe_z2": sample2["test_accuracy"],
                **quality, "train_seconds": round(seconds, 1),
                "_recon": recon[:10], "_generated": generated[:10]}

    cells = [(beta1, beta2) for beta2 in c["betas2"] for beta1 in c["betas1"]]
    if c["seeds"] < 1 or (c["seeds"] > 1 and not c["seed_grid"]):
        raise ValueError(f"layer_rates: seeds must be 1, or more with seed_grid=true (the "
                         f"seeds train together through fit_grid; --seeds N), got "
                         f"seeds={c['seeds']}, seed_grid={c['seed_grid']}")
    per_seed: list[list[dict]] = []  # [seed k][cell] -> the model's numbers
    if c["seed_grid"]:
        # Every (cell, seed) is one model of one fit_grid call: K = cells x seeds, one data
        # order (seed), model k's initial weights and noise from its training seed.
        grid = [{"betas": [beta1, beta2], "seed": seed + k}
                for k in range(c["seeds"]) for beta1, beta2 in cells]
        trained = train_grid(
            lambda betas: HierarchicalVAE(c["latent_dims"], betas, 1, c["image_size"],
                                          hidden=c["hidden"]),
            grid, train_set, work_dir=work_dir, name="grid", steps=c["steps"],
            batch_size=c["batch_size"], lr=c["lr"], device=device, seed=seed)
        grid_seconds = trained[0].seconds
        for k in range(c["seeds"]):
            per_seed.append([score(trained[k * len(cells) + i].model, beta1, beta2, seed + k,
                                   grid_seconds)
                             for i, (beta1, beta2) in enumerate(cells)])
        del trained
        results = _cell_means(per_seed)
    else:
        grid_seconds = None
        results = []
        for beta1, beta2 in cells:
            seed_everything(seed)
            model = HierarchicalVAE(c["latent_dims"], [beta1, beta2], 1, c["image_size"],
                                    hidden=c["hidden"])
            run_ = train(model, train_set, work_dir=work_dir, name=f"b1_{beta1:g}_b2_{beta2:g}",
                         steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"],
                         device=device, seed=seed)
            results.append(score(model, beta1, beta2, seed, run_.seconds))
        per_seed.append(results)

    many = len(per_seed) > 1

    def value(r, key, spec, scale=1.0):
        """A table cell: the number, or 'mean ± standard error' over the seeds."""
        if not many:
            return scale * r[key]
        return f"{scale * r[key]:{spec}} ± {scale * r['se'][key]:{spec}}"

    columns = [("rate1_bits", ".2f", 1.0), ("rate2_bits", ".2f", 1.0),
               ("total_rate_bits", ".2f", 1.0), ("distortion_nats", ".1f", 1.0),
               ("psnr_db", ".2f", 1.0), ("probe_z1", ".1f", 100.0), ("probe_z2", ".1f", 100.0),
               ("sample_probe_z1", ".1f", 100.0), ("sample_probe_z2", ".1f", 100.0)]
    rows = [[f"{r['beta1']:g}", f"{r['beta2']:g}"]
            + [value(r, key, spec, scale) for key, spec, scale in columns]
            + ["β-VAE" if r["beta1"] == r["beta2"] else ""] for r in results]
    over = (f"; mean ± standard error over {len(per_seed)} training seeds trained together by "
            f"fit_grid" if many else "")
    table = Table("Held-out digits per (β₁, β₂): layer rates (bits), distortion (nats), PSNR "
                  "(dB), and logistic-probe accuracy (%) from each layer's posterior mean and "
                  f"from one posterior sample{over}",
                  ["β₁", "β₂", "R₁", "R₂", "R₁+R₂", "distortion", "PSNR", "probe z₁ (mean)",
                   "probe z₂ (mean)", "probe z₁ (sample)", "probe z₂ (sample)", ""], rows,
                  [None, None] + [spec for _, spec, _ in columns] + [None])

    get = lambda key: [r[key] for r in results]
    rho_psnr_total = _spearman(get("psnr_db"), get("total_rate_bits"))
    rho_z2_r2 = _spearman(get("probe_z2"), get("rate2_bits"))
    rho_z2_r1 = _spearman(get("probe_z2"), get("rate1_bits"))
    rho_z1_r1 = _spearman(get("probe_z1"), get("rate1_bits"))
    rho_s2_r2 = _spearman(get("sample_probe_z2"), get("rate2_bits"))
    collapsed = [r for r in results if r["rate2_bits"] < 0.1]
    r1_follows_b1 = _spearman(get("rate1_bits"), [-r["beta1"] for r in results])
    r2_follows_b2 = _spearman(get("rate2_bits"), [-r["beta2"] for r in results])
    psnr_holds, probe_holds, quality_holds = _claim_parts(results, real_quality)
    _, quality_text, rho_quality = _judge_quality(results, real_quality)
    parts = (psnr_holds, probe_holds, quality_holds)
    held = True if all(parts) else (False if not any(parts) else None)
    best_psnr = max(results, key=lambda r: r["psnr_db"])
    best_probe = max(results, key=lambda r: r["probe_z2"])
    finding = (
        f"Each β steers its own layer (Spearman ρ of R₁ with −β₁: {r1_follows_b1:.2f}, of R₂ "
        f"with −β₂: {r2_follows_b2:.2f}). PSNR "
        f"{'rises' if psnr_holds else 'does not clearly rise'} with the total rate "
        f"(ρ = {rho_psnr_total:.2f}), and the z₂ probe "
        f"{'follows R₂ rather than R₁' if probe_holds else 'does not follow R₂ more than R₁'} "
        f"(ρ = {rho_z2_r2:.2f} with R₂, {rho_z2_r1:.2f} with R₁; the z₁ probe has ρ = "
        f"{rho_z1_r1:.2f} with R₁). The best PSNR is at (β₁, β₂) = ({best_psnr['beta1']:g}, "
        f"{best_psnr['beta2']:g}), the best z₂ probe at ({best_probe['beta1']:g}, "
        f"{best_probe['beta2']:g})"
        + (" — different corners of the grid, as the seed argues." if
           (best_psnr["beta1"], best_psnr["beta2"]) != (best_probe["beta1"], best_probe["beta2"])
           else " — the same model here.")
        + (f" Where z₂ carries < 0.1 bits the probe on its mean still scores "
           f"{100 * min(r['probe_z2'] for r in collapsed):.0f}–"
           f"{100 * max(r['probe_z2'] for r in collapsed):.0f} % (tiny but informative "
           f"variations of the mean), while the probe on a sample drops to "
           f"{100 * min(r['sample_probe_z2'] for r in collapsed):.0f}–"
           f"{100 * max(r['sample_probe_z2'] for r in collapsed):.0f} % (chance 10 %)"
           if collapsed else "")
        + f"; on samples the z₂ probe has ρ = {rho_s2_r2:.2f} with R₂. " + quality_text)
    tables = [table]
    seeds_data = {}
    if many:
        seeds_table, seeds_text, seeds_data = _over_seeds(per_seed, real_quality)
        tables.append(seeds_table)
        finding += " " + seeds_text
    quality_table = Table(
        "Samples of each model's generative model against the held-out digits, in the feature "
        "space of a classifier trained on the training digits (not Inception: not comparable "
        "with published numbers): FID (↓), inception score IS = diversity · sharpness (↑); "
        "the last rows score real digits the same way"
        + (f" (models: means over {len(per_seed)} seeds)" if many else ""),
        ["β₁", "β₂", "R₁", "R₂", "R₁+R₂", "PSNR", "FID", "IS", "diversity", "sharpness", ""],
        [[f"{r['beta1']:g}", f"{r['beta2']:g}", r["rate1_bits"], r["rate2_bits"],
          r["total_rate_bits"], r["psnr_db"], r["fid"], r["inception_score"], r["diversity"],
          r["sharpness"], "β-VAE" if r["beta1"] == r["beta2"] else ""] for r in results]
        + [[name, "", None, None, None, None, q["fid"], q["inception_score"], q["diversity"],
            q["sharpness"], "real"] for name, q in (
               (f"{len(pick)} training digits", real_quality["train_digits"]),
               (f"{len(x_test)} held-out digits", real_quality["test_digits"]))],
        [None, None, ".2f", ".2f", ".2f", ".2f", ".3g", ".2f", ".2f", ".3f", None])

    pictures = []
    b1 = [f"{b:g}" for b in c["betas1"]]
    b2 = [f"{b:g}" for b in c["betas2"]]
    grid = lambda key, scale=1.0: np.array([[scale * r[key] for r in results
                                             if r["beta2"] == beta2] for beta2 in c["betas2"]])
    for key, file, what, unit, scale in (
            ("psnr_db", "psnr_heatmap.png", "PSNR of the reconstructions", "dB", 1.0),
            ("probe_z2", "probe_z2_heatmap.png", "logistic probe on z₂ (top layer)", "%", 100.0),
            ("probe_z1", "probe_z1_heatmap.png", "logistic probe on z₁", "%", 100.0),
            ("rate1_bits", "rate1_heatmap.png", "rate R₁ of z₁", "bits", 1.0),
            ("rate2_bits", "rate2_heatmap.png", "rate R₂ of z₂", "bits", 1.0),
            ("inception_score", "is_heatmap.png", "inception score of samples", "IS", 1.0),
            ("sharpness", "sharpness_heatmap.png", "sharpness of samples", "exp(−H[y|x])", 1.0),
            ("diversity", "diversity_heatmap.png", "diversity of samples", "exp(H[y])", 1.0),
            ("fid", "fid_heatmap.png", "FID of samples (classifier features)", "FID", 1.0)):
        viz.save_heatmap(out / file, grid(key, scale), b1, b2, f"{what} on held-out digits",
                         xlabel="β₁ (z₁, next to x)", ylabel="β₂ (z₂, top)",
                         colorbar_label=unit, fmt=".3g")
        pictures.append((file, f"{what} ({unit}) on the (β₁, β₂) grid."))
    labels_ = [f"({r['beta1']:g},{r['beta2']:g})" for r in results]
    save_colored_scatter(out / "rate_plane.png", [
        dict(x=get("rate1_bits"), y=get("rate2_bits"), c=get("psnr_db"), colorbar="PSNR (dB)",
             title="PSNR over the rate plane", labels=labels_),
        dict(x=get("rate1_bits"), y=get("rate2_bits"), c=[100 * a for a in get("probe_z2")],
             colorbar="probe z₂ accuracy (%)", title="z₂ probe over the rate plane",
             labels=labels_)],
        xlabel="R₁ (bits)", ylabel="R₂ (bits)",
        title="each trained model at its layer rates (labels: (β₁, β₂))")
    pictures.append(("rate_plane.png", "Every model at its measured layer rates (R₁, R₂), "
                                       "coloured by PSNR and by the z₂ probe (seed Figs. 3, 7)."))
    save_colored_scatter(out / "sample_quality_rate_plane.png", [
        dict(x=get("rate1_bits"), y=get("rate2_bits"), c=get("inception_score"),
             colorbar="inception score", title="inception score over the rate plane",
             labels=labels_),
        dict(x=get("rate1_bits"), y=get("rate2_bits"), c=get("fid"),
             colorbar="FID (classifier features)", title="FID over the rate plane",
             labels=labels_)],
        xlabel="R₁ (bits)", ylabel="R₂ (bits)",
        title="sample quality of each model at its layer rates (labels: (β₁, β₂))")
    pictures.append(("sample_quality_rate_plane.png", "Every model at its layer rates, coloured "
                                                      "by the inception score and the FID of its "
                                                      "samples (seed Fig. 6)."))
    _save_quality_curves(out / "sample_quality_curves.png", results)
    pictures.append(("sample_quality_curves.png", "Inception score and FID of the samples "
                                                  "against R₁, R₂ and R₁ + R₂."))
    viz.save_image_rows(out / "samples.png",
                        [x_test[:10]] + [r["_generated"] for r in results],
                        ["real"] + labels_,
                        title="held-out digits and samples of every model per (β₁, β₂)")
    pictures.append(("samples.png", "Held-out digits and samples (means of p(x | z₁)) of every "
                                    "model (seed Fig. 4, top)."))
    viz.save_layer_rates(out / "layer_rates.png", labels_,
                         [[r["rate1_bits"], r["rate2_bits"]] for r in results],
                         layer_names=["z₁", "z₂"], title="layer rates per (β₁, β₂)")
    pictures.append(("layer_rates.png", "The rate of each layer, stacked, per (β₁, β₂)."))
    viz.save_image_rows(out / "reconstructions.png",
                        [x_test[:10]] + [r["_recon"] for r in results],
                        ["input"] + labels_,
                        title="held-out digits and reconstructions per (β₁, β₂)")
    pictures.append(("reconstructions.png", "Held-out digits and their reconstructions by every "
                                            "model."))

    notes = [
        f"Data: scikit-learn's digits at {c['image_size']}×{c['image_size']}, a fixed "
        f"{1 - c['test_fraction']:.0%}/{c['test_fraction']:.0%} train/test split; Bernoulli "
        f"likelihood on the grey levels. The seed used SVHN and CIFAR-10 and a 21×21 grid.",
        f"Model: pyvae.models.HierarchicalVAE, latent dims (z₁, z₂) = {tuple(c['latent_dims'])}, "
        f"top-down inference, hidden width {c['hidden']}; {c['steps']} steps of "
        f"{c['batch_size']} (AdamW, lr {c['lr']}), the same initial weights for every cell.",
        "Rates: per-layer KL on the test digits (one sample of z₂ for R₁), bits. PSNR: "
        "reconstruction = mean of p(x | z₁) with both layers at their posterior means. Probes: "
        "pyvae.metrics.linear_probe (standardised logistic regression) from the training digits' "
        "codes to the class, scored on the test digits; 'mean' probes read the posterior means "
        "(as the seed does, 'the mode of q'), 'sample' probes one draw of each layer. A mean can "
        "carry class information the rate does not account for (the noise of q hides it), so "
        "only the sample probes are bounded by the layer rates (the seed's Eq. 10–11).",
        f"Sample quality: {c['num_samples']} ancestral samples per model (z₂ ~ N(0, I), "
        f"z₁ ~ p(z₁|z₂), the mean of p(x | z₁)), scored by pyvae.metrics with a "
        f"FeatureClassifier (the VAE encoder's convolutional trunk with {c['feature_dim']} "
        f"features and a linear layer to the 10 classes) trained by "
        f"pyvae.metrics.train_feature_classifier for {c['classifier_steps']} steps on the "
        f"training digits ({100 * classifier_accuracy:.1f} % held-out accuracy; the seed's "
        f"classifiers were a ResNet-18 for SVHN and a DenseNet-121 for CIFAR-10). FID = Fréchet "
        f"distance between Gaussians fitted to its {c['feature_dim']} features of the samples "
        f"and of the {len(x_test)} held-out digits; IS over all samples at once (the seed's "
        f"Eq. 12), split into diversity exp(H[p(y)]) and sharpness exp(−E H[p(y|x)]). This is "
        f"NOT Inception-v3: the values rank these models against each other and are not "
        f"comparable with published FIDs or inception scores. A model that always draws the "
        f"same image is sharp (≈ 1) but not diverse (≈ 1), so its IS is ≈ 1. The seed reports "
        f"IS only.",
        "Verdict: 'held' needs PSNR to rise with R₁ + R₂ (Spearman > 0.7), the z₂ probe to "
        "follow R₂ more than R₁, and the best inception score to lie off the β-VAE diagonal "
        "and elsewhere than the best PSNR; 'mixed' when only some of these hold. On a 3×3 grid "
        "6 of the 9 cells are off the diagonal, so that part is a weak test.",
    ]
    data = {"grid": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
            "spearman": {"psnr_vs_total_rate": rho_psnr_total, "probe_z2_vs_R2": rho_z2_r2,
                         "sample_probe_z2_vs_R2": rho_s2_r2,
                         "probe_z2_vs_R1": rho_z2_r1, "probe_z1_vs_R1": rho_z1_r1,
                         "R1_vs_minus_beta1": r1_follows_b1, "R2_vs_minus_beta2": r2_follows_b2,
                         **rho_quality},
            "classifier_test_accuracy": classifier_accuracy, "real_digits": real_quality}
    if many:
        notes.append(
            f"Seeds: {len(per_seed)} training seeds ({seed}…{seed + len(per_seed) - 1}) per cell, "
            f"all {len(per_seed) * len(cells)} models trained together in one "
            f"pyvae.train.fit_grid call ({grid_seconds:.0f} s of training); a seed sets a "
            f"model's initial weights (the same for every cell of that seed) and its noise; "
            f"the data order is one for all models (fit_grid's one data stream). Each model is "
            f"scored alone, with its training seed as the evaluation noise seed; the first "
            f"tables show the mean over seeds (± its standard error), the pictures and the "
            f"sample-quality table the means, the images the first seed. The verdict is "
            f"judged on the cell means; the last table says in how many seeds each part holds "
            f"on that seed's grid alone, and whether the best cell beats the runner-up by more "
            f"than twice the standard error of their paired (same-seed) difference.")
        data.update(seeds_data)
        data["per_seed"] = [[{k: v for k, v in r.items() if not k.startswith("_")}
                             for r in seed_results] for seed_results in per_seed]
    tables.append(quality_table)
    return Report(tables, held, finding, pictures, notes, data)
