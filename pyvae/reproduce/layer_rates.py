"""Trading information between the layers of a two-layer hierarchical VAE (seed 002): a grid of
(β₁, β₂), the resulting layer rates R₁ (z₁, next to x) and R₂ (z₂, the top), reconstruction
PSNR, and a logistic probe of the digit class from each layer's posterior mean.

:class:`pyvae.models.HierarchicalVAE` with top-down inference, loss = distortion + β₁·R₁ + β₂·R₂,
on scikit-learn's digits; every number is measured on held-out digits. The diagonal β₁ = β₂ is
the conventional β-VAE.
"""
from __future__ import annotations

import numpy as np
import scipy.stats
import torch

from pyvae import viz
from pyvae.metrics import evaluate, linear_probe, psnr
from pyvae.models import HierarchicalVAE
from pyvae.reproduce._common import (Report, Table, digits_split, encode_means, reconstruct,
                                     seed_everything, train)
from pyvae.reproduce._plots import save_colored_scatter

SEED = "002"
SEED_TITLE = "Xiao & Bamler, *Trading Information between Latents in Hierarchical Variational " \
             "Autoencoders*, ICLR 2023"
TITLE = "Layer-wise rates of a two-layer hierarchical VAE: PSNR and a linear probe"
SUMMARY = "two-layer hierarchical VAE on a (β₁, β₂) grid: layer rates, PSNR, linear probe"
CLAIM = ("With one β per layer the rate splits into layer rates that can be tuned independently. "
         "Reconstruction quality (PSNR) improves with the total rate R₁ + R₂ (Eq. 9, Fig. 3), "
         "while what a classifier can read from the top layer z₂ is bounded by the rate "
         "accumulated up to it, R₂ (Eq. 10–11, Fig. 7): the best model for each task sits "
         "somewhere else in the (R₁, R₂) plane, and often off the β-VAE diagonal.")

SIZES = {
    "smoke": dict(image_size=8, latent_dims=[4, 2], hidden=32, betas1=[0.2, 5.0],
                  betas2=[0.2, 5.0], steps=3, batch_size=64, lr=1e-3, test_fraction=0.3),
    "default": dict(image_size=8, latent_dims=[8, 4], hidden=128, betas1=[0.2, 1.0, 5.0],
                    betas2=[0.2, 1.0, 5.0], steps=600, batch_size=64, lr=1e-3,
                    test_fraction=0.3),
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


def run(out, config: dict, *, device, seed: int, work_dir) -> Report:
    c = config
    split = digits_split(c["image_size"], c["test_fraction"], seed)
    train_set, x_train, x_test = split.train_set, split.x_train, split.x_test
    y_train, y_test = split.y_train, split.y_test
    d1 = c["latent_dims"][0]

    results = []
    for beta2 in c["betas2"]:
        for beta1 in c["betas1"]:
            seed_everything(seed)
            model = HierarchicalVAE(c["latent_dims"], [beta1, beta2], 1, c["image_size"],
                                    hidden=c["hidden"])
            run_ = train(model, train_set, work_dir=work_dir, name=f"b1_{beta1:g}_b2_{beta2:g}",
                         steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"],
                         device=device, seed=seed)
            scores = evaluate(model, x_test, device=device, seed=seed)
            r1, r2 = scores["layer_rates_bits"]
            mu_train, mu_test = encode_means(model, x_train), encode_means(model, x_test)
            probe1 = linear_probe(mu_train[:, :d1], y_train, mu_test[:, :d1], y_test, seed=seed)
            probe2 = linear_probe(mu_train[:, d1:], y_train, mu_test[:, d1:], y_test, seed=seed)
            # The same probes on one sample of each layer (z₂ ~ q(z₂|x), z₁ ~ q(z₁|z₂, x)):
            # what the noisy code carries, which the layer rates bound.
            z_train, z_test = _samples(model, x_train, seed), _samples(model, x_test, seed + 1)
            sample1 = linear_probe(z_train[:, :d1], y_train, z_test[:, :d1], y_test, seed=seed)
            sample2 = linear_probe(z_train[:, d1:], y_train, z_test[:, d1:], y_test, seed=seed)
            recon = reconstruct(model, x_test)
            results.append({"beta1": beta1, "beta2": beta2, "rate1_bits": r1, "rate2_bits": r2,
                            "total_rate_bits": r1 + r2, "distortion_nats": scores["distortion"],
                            "psnr_db": float(psnr(x_test, recon).mean()),
                            "probe_z1": probe1["test_accuracy"],
                            "probe_z2": probe2["test_accuracy"],
                            "sample_probe_z1": sample1["test_accuracy"],
                            "sample_probe_z2": sample2["test_accuracy"],
                            "train_seconds": round(run_.seconds, 1), "_recon": recon[:10]})

    rows = [[f"{r['beta1']:g}", f"{r['beta2']:g}", r["rate1_bits"], r["rate2_bits"],
             r["total_rate_bits"], r["distortion_nats"], r["psnr_db"], 100 * r["probe_z1"],
             100 * r["probe_z2"], 100 * r["sample_probe_z1"], 100 * r["sample_probe_z2"],
             "β-VAE" if r["beta1"] == r["beta2"] else ""]
            for r in results]
    table = Table("Held-out digits per (β₁, β₂): layer rates (bits), distortion (nats), PSNR "
                  "(dB), and logistic-probe accuracy (%) from each layer's posterior mean and "
                  "from one posterior sample",
                  ["β₁", "β₂", "R₁", "R₂", "R₁+R₂", "distortion", "PSNR", "probe z₁ (mean)",
                   "probe z₂ (mean)", "probe z₁ (sample)", "probe z₂ (sample)", ""], rows,
                  [None, None, ".2f", ".2f", ".2f", ".1f", ".2f", ".1f", ".1f", ".1f", ".1f",
                   None])

    get = lambda key: [r[key] for r in results]
    rho_psnr_total = _spearman(get("psnr_db"), get("total_rate_bits"))
    rho_z2_r2 = _spearman(get("probe_z2"), get("rate2_bits"))
    rho_z2_r1 = _spearman(get("probe_z2"), get("rate1_bits"))
    rho_z1_r1 = _spearman(get("probe_z1"), get("rate1_bits"))
    rho_s2_r2 = _spearman(get("sample_probe_z2"), get("rate2_bits"))
    collapsed = [r for r in results if r["rate2_bits"] < 0.1]
    r1_follows_b1 = _spearman(get("rate1_bits"), [-r["beta1"] for r in results])
    r2_follows_b2 = _spearman(get("rate2_bits"), [-r["beta2"] for r in results])
    psnr_holds = rho_psnr_total > 0.7
    probe_holds = rho_z2_r2 > 0 and abs(rho_z2_r2) > abs(rho_z2_r1)
    held = psnr_holds and probe_holds
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
        + f"; on samples the z₂ probe has ρ = {rho_s2_r2:.2f} with R₂.")

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
            ("rate2_bits", "rate2_heatmap.png", "rate R₂ of z₂", "bits", 1.0)):
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
    ]
    data = {"grid": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
            "spearman": {"psnr_vs_total_rate": rho_psnr_total, "probe_z2_vs_R2": rho_z2_r2,
                         "sample_probe_z2_vs_R2": rho_s2_r2,
                         "probe_z2_vs_R1": rho_z2_r1, "probe_z1_vs_R1": rho_z1_r1,
                         "R1_vs_minus_beta1": r1_follows_b1, "R2_vs_minus_beta2": r2_follows_b2}}
    return Report([table], held, finding, pictures, notes, data)
