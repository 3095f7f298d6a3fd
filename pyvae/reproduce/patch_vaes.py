"""Patch VAEs p|i (seed 000, Tables 2–3 and §7.3).

Part 1 — the independence structure decides what the latent stores. Patch VAEs 9|1, 9|3, 15|1,
15|3 and 15|5 (:class:`pyvae.models.PatchVAE`: the i×i blocks of a p×p patch are independent
given z and each block is a small PixelCNN) are trained on random patches of the bundled
photographs (:class:`pyvae.data.Photos`). On patches of held-out crops we measure the stored
information M = E_x KL(q(z|x) ‖ p(z)) in bits (and per pixel, Table 2) and the cross entropy in
bits/dim (Table 3): the reconstruction term alone and the negative ELBO (reconstruction + M).

Part 2 — linear probes of stride-1 patch features. Patch VAEs 3|1 and 9|3 are trained on
patches of scikit-learn's digits (upscaled); every image is encoded at stride 1
(:func:`pyvae.encode.encode_patches`) and a logistic probe predicts the digit from the feature
map (average-pooled to a small grid, or flattened), against a global VAE's latents and raw
pixels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pyvae import viz
from pyvae.data import Digits, Photos, RandomPatches
from pyvae.encode import encode_patches
from pyvae.metrics import evaluate, linear_probe
from pyvae.models import VAE, PatchVAE
from pyvae.reproduce._common import (Report, Table, TensorImages, encode_means,
                                     seed_everything, split_indices, train)
from pyvae.reproduce._plots import save_lines

SEED = "000"
SEED_TITLE = "Sixt, *An Investigation into Image Area Dependencies using Unsupervised " \
             "Learning*, MSc thesis, FU Berlin 2018"
TITLE = "Patch VAEs: stored information and bits/dim against the independence size, and " \
        "linear probes of stride-1 patch features"
SUMMARY = "patch VAEs 9|1 9|3 15|1 15|3 15|5: bits stored and bits/dim; probes of patch features"
CLAIM = ("For a fixed patch size p, a larger independence size i stores less information in z "
         "(Table 2, CelebA: 9|1 32.71 bits vs 9|3 10.50; 15|1 74.93, 15|3 32.02, 15|5 13.83) "
         "and reaches a lower cross entropy (Table 3, CelebA: 9|1 5.08 vs 9|3 4.17 bits/dim; "
         "15|1 4.94, 15|3 4.15, 15|5 4.11), because the PixelCNN models local dependencies more "
         "cheaply than the latent code. Linear classifiers on stride-1 patch-VAE features beat "
         "those on a global VAE's latents (Table 4).")
PAPER_M = {"9|1": 32.71, "9|3": 10.50, "15|1": 74.93, "15|3": 32.02, "15|5": 13.83}
PAPER_BPD = {"9|1": 5.08, "9|3": 4.17, "15|1": 4.94, "15|3": 4.15, "15|5": 4.11}

SIZES = {
    "smoke": dict(models=[[9, 1], [9, 3], [15, 1], [15, 3], [15, 5]], grayscale=True,
                  latent_dim=4, hidden_channels=8, cond_channels=4, pixelcnn_hidden=8,
                  pixelcnn_layers=1, decoder_hidden=16, steps=2, batch_size=16, lr=2e-3,
                  patches_per_image=16, test_crops=0.2, test_patches=64,
                  probe_models=[[3, 1]], probe_latent_dim=4, probe_steps=2,
                  probe_image_size=16, probe_pool=2, global_latent_dim=4, global_steps=2,
                  test_fraction=0.3),
    "default": dict(models=[[9, 1], [9, 3], [15, 1], [15, 3], [15, 5]], grayscale=True,
                    latent_dim=16, hidden_channels=32, cond_channels=16, pixelcnn_hidden=24,
                    pixelcnn_layers=1, decoder_hidden=128, steps=4000, batch_size=64, lr=2e-3,
                    patches_per_image=512, test_crops=0.2, test_patches=2000,
                    probe_models=[[3, 1], [9, 3]], probe_latent_dim=8, probe_steps=400,
                    probe_image_size=16, probe_pool=4, global_latent_dim=16, global_steps=600,
                    test_fraction=0.3),
}


def _patch_vae(p: int, i: int, latent_dim: int, channels: int, c: dict) -> PatchVAE:
    return PatchVAE(p, i, latent_dim, channels, hidden_channels=c["hidden_channels"],
                    cond_channels=c["cond_channels"], pixelcnn_hidden=c["pixelcnn_hidden"],
                    pixelcnn_layers=c["pixelcnn_layers"], decoder_hidden=c["decoder_hidden"])


def _fixed_patches(images: torch.Tensor, p: int, count: int, seed: int) -> torch.Tensor:
    """``count`` random p×p patches of ``images`` (N, C, H, W), drawn with ``seed``."""
    data = RandomPatches(TensorImages(images), p, max(1, -(-count // len(images))), seed=seed)
    picks = np.random.default_rng(seed).choice(len(data), min(count, len(data)), replace=False)
    return torch.stack([data[int(k)] for k in picks])


def _part1(out, c: dict, device, seed: int, work_dir) -> tuple[list, dict, list]:
    photos = Photos(crop_size=64, grayscale=c["grayscale"])
    crops = torch.stack([photos[k] for k in range(len(photos))])
    train_idx, test_idx = split_indices(len(crops), c["test_crops"], seed)
    channels = crops.shape[1]
    results, pictures = {}, []
    recon_rows: dict[int, list] = {}
    for p, i in c["models"]:
        name = f"{p}|{i}"
        seed_everything(seed)
        model = _patch_vae(p, i, c["latent_dim"], channels, c)
        patches = RandomPatches(TensorImages(crops[train_idx]), p, c["patches_per_image"],
                                seed=seed)
        run_ = train(model, patches, work_dir=work_dir, name=f"p{p}i{i}", steps=c["steps"],
                     batch_size=c["batch_size"], lr=c["lr"], device=device, seed=seed,
                     lr_schedule="cosine")
        test = _fixed_patches(crops[test_idx], p, c["test_patches"], seed + 1)
        scores = evaluate(model, test, batch_size=256, device=device, seed=seed)
        dims = channels * p * p
        curve = [(r["step"], r["rate_bits"]) for r in run_.records
                 if r.get("split", "train") == "train"]
        results[name] = {
            "p": p, "i": i, "M_bits": scores["rate_bits"], "M_bits_per_pixel":
            scores["rate_bits"] / (p * p), "recon_bits_per_dim": scores["bits_per_dim"],
            "nelbo_bits_per_dim": scores["bits_per_dim"] + scores["rate_bits"] / dims,
            "train_seconds": round(run_.seconds, 1), "test_patches": len(test),
            "training_rate_bits": curve}
        shown = test[:8]
        recon_rows.setdefault(p, [("input", shown)])
        with torch.no_grad():
            recon = model.reconstruct(shown.to(device),
                                      torch.Generator(device).manual_seed(seed)).cpu()
        recon_rows[p].append((name, recon))
    steps = [step for step, _ in next(iter(results.values()))["training_rate_bits"]]
    save_lines(out / "rate_during_training.png", steps,
               {name: [rate for _, rate in r["training_rate_bits"]] for name, r in results.items()},
               xlabel="training step", ylabel="rate (bits per patch)",
               title="rate KL(q(z|x) ‖ p(z)) during training (training batches)")
    pictures.append(("rate_during_training.png", "The rate of every patch VAE during training: "
                                                 "whether M has settled by the end."))
    for p, rows in recon_rows.items():
        file = f"reconstructions_p{p}.png"
        viz.save_image_rows(out / file, [r for _, r in rows], [n for n, _ in rows],
                            title=f"held-out {p}×{p} patches and draws from p(x | z = mean)")
        pictures.append((file, f"Held-out {p}×{p} patches (top) and a draw from each "
                               f"{p}|i model given the posterior mean: the larger i, the more "
                               f"the PixelCNN invents instead of the code."))
    return results, {"train_crops": len(train_idx), "test_crops": len(test_idx),
                     "channels": channels}, pictures


def _part2(out, c: dict, device, seed: int, work_dir) -> tuple[dict, list]:
    size = c["probe_image_size"]
    digits = Digits(size=size)
    images, labels = digits.images, digits.targets
    train_idx, test_idx = split_indices(len(images), c["test_fraction"], seed)
    y_train, y_test = labels[train_idx], labels[test_idx]
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pooled = c["probe_pool"]
    for p, i in c["probe_models"]:
        seed_everything(seed)
        model = _patch_vae(p, i, c["probe_latent_dim"], 1, c)
        patches = RandomPatches(TensorImages(images[train_idx]), p, 16, seed=seed)
        train(model, patches, work_dir=work_dir, name=f"digits_p{p}i{i}", steps=c["probe_steps"],
              batch_size=c["batch_size"], lr=c["lr"], device=device, seed=seed,
              lr_schedule="cosine")
        with torch.no_grad():
            maps = encode_patches(model, images, batch_size=256).cpu()  # (N, D, H', W')
        grid = F.adaptive_avg_pool2d(maps, pooled)
        features[f"{p}|{i} patch VAE, stride-1 map flattened"] = (
            maps[train_idx].flatten(1).numpy(), maps[test_idx].flatten(1).numpy())
        features[f"{p}|{i} patch VAE, map pooled to {pooled}×{pooled}"] = (
            grid[train_idx].flatten(1).numpy(), grid[test_idx].flatten(1).numpy())
    seed_everything(seed)
    vae = VAE(c["global_latent_dim"], 1, size)
    train(vae, TensorImages(images[train_idx]), work_dir=work_dir, name="digits_vae",
          steps=c["global_steps"], batch_size=c["batch_size"], lr=1e-3, device=device,
          seed=seed)
    mu = encode_means(vae, images).numpy()
    features[f"global VAE latents (D={c['global_latent_dim']})"] = (mu[train_idx], mu[test_idx])
    flat = images.flatten(1).numpy()
    features[f"raw pixels {size}×{size}"] = (flat[train_idx], flat[test_idx])
    raw8 = Digits(size=8).images.flatten(1).numpy()
    features["raw pixels 8×8 (original)"] = (raw8[train_idx], raw8[test_idx])
    probes = {}
    for name, (train_x, test_x) in features.items():
        result = linear_probe(train_x, y_train, test_x, y_test, seed=seed)
        probes[name] = {"dims": int(train_x.shape[1]), "test_accuracy": result["test_accuracy"],
                        "train_accuracy": result["train_accuracy"]}
    pictures = []
    names = list(probes)
    viz.save_probe_accuracy(out / "probes.png", ["digit class"],
                            {name: [probes[name]["test_accuracy"]] for name in names},
                            baseline=0.1, title="logistic probes on held-out digits")
    pictures.append(("probes.png", "Held-out accuracy of logistic probes on each representation "
                                   "of the digits (line: chance)."))
    return probes, pictures


def run(out, config: dict, *, device, seed: int, work_dir) -> Report:
    c = config
    results, info, pictures = _part1(out, c, device, seed, work_dir)
    probes, probe_pictures = _part2(out, c, device, seed, work_dir)
    pictures += probe_pictures

    rows = [[name, r["M_bits"], r["M_bits_per_pixel"], r["recon_bits_per_dim"],
             r["nelbo_bits_per_dim"], PAPER_M[name], PAPER_BPD[name]]
            for name, r in results.items()]
    table1 = Table(
        "Tables 2–3 analogue: held-out patches of the photographs; M = E KL(q(z|x) ‖ p(z)); "
        "bits/dim of the reconstruction term and of the negative ELBO (reconstruction + M)",
        ["model p|i", "M (bits)", "M / pixel (bits)", "recon bits/dim", "−ELBO bits/dim",
         "seed M (CelebA)", "seed bits/dim (CelebA)"], rows,
        [None, ".2f", ".3f", ".3f", ".3f", ".2f", ".2f"])
    table2 = Table(
        "Logistic probes (standardised) predicting the digit, held-out accuracy",
        ["features", "dims", "test accuracy %", "train accuracy %"],
        [[name, r["dims"], 100 * r["test_accuracy"], 100 * r["train_accuracy"]]
         for name, r in probes.items()], [None, None, ".1f", ".1f"])

    def ordered(key, sizes):
        pairs = []
        for p in sizes:
            group = sorted((r["i"], r[key]) for r in results.values() if r["p"] == p)
            pairs += [(p, a, b) for a, b in zip(group, group[1:])]
        return pairs

    sizes = sorted({r["p"] for r in results.values()})
    m_pairs = ordered("M_bits", sizes)
    bpd_pairs = ordered("nelbo_bits_per_dim", sizes)
    recon_pairs = ordered("recon_bits_per_dim", sizes)
    m_ok = [a[1] > b[1] for _, a, b in m_pairs]
    bpd_ok = [a[1] > b[1] for _, a, b in bpd_pairs]
    recon_ok = [a[1] > b[1] for _, a, b in recon_pairs]
    patch_best = max(v["test_accuracy"] for k, v in probes.items() if "patch VAE" in k)
    global_acc = next(v["test_accuracy"] for k, v in probes.items() if k.startswith("global"))
    pixel_acc = max(v["test_accuracy"] for k, v in probes.items() if k.startswith("raw"))
    probe_ok = patch_best > global_acc
    held = all(m_ok) and all(bpd_ok) and probe_ok
    rising = []
    for name, r in results.items():
        curve = [rate for _, rate in r["training_rate_bits"]]
        if len(curve) >= 4 and curve[-1] > 1.1 * curve[len(curve) // 2]:
            rising.append(f"{name} ({curve[len(curve) // 2]:.1f} → {curve[-1]:.1f} bits)")
    describe = lambda pairs, ok: "; ".join(
        f"{p}|{a[0]} → {p}|{b[0]}: {a[1]:.3g} → {b[1]:.3g}{'' if good else ' ✗'}"
        for (p, a, b), good in zip(pairs, ok))
    finding = (
        f"Stored information M falls as i grows in {sum(m_ok)} of {len(m_ok)} steps "
        f"({describe(m_pairs, m_ok)} bits) and the negative-ELBO bits/dim falls in "
        f"{sum(bpd_ok)} of {len(bpd_ok)} ({describe(bpd_pairs, bpd_ok)}); the reconstruction "
        f"term alone falls in {sum(recon_ok)} of {len(recon_ok)}. On the digits, the best "
        f"patch-VAE features reach {100 * patch_best:.1f} % against {100 * global_acc:.1f} % "
        f"for the global VAE's latents ({'as' if probe_ok else 'unlike'} the seed) and "
        f"{100 * pixel_acc:.1f} % for the best raw pixels.")
    if rising:
        finding += (f" The rate was still rising over the second half of training for "
                    f"{', '.join(rising)}, so M is not converged and a longer run may reorder "
                    f"close pairs.")

    names = list(results)
    viz.save_probe_accuracy(out / "stored_bits.png", names,
                            {"M (bits)": [results[n]["M_bits"] for n in names],
                             "seed M, CelebA (bits)": [PAPER_M[n] for n in names]},
                            ylabel="bits", title="information stored in z per patch (Table 2)")
    pictures.insert(0, ("stored_bits.png", "Information M stored in z per patch, against the "
                                           "seed's CelebA values."))
    viz.save_probe_accuracy(out / "bits_per_dim.png", names,
                            {"−ELBO": [results[n]["nelbo_bits_per_dim"] for n in names],
                             "reconstruction": [results[n]["recon_bits_per_dim"] for n in names],
                             "seed, CelebA": [PAPER_BPD[n] for n in names]},
                            ylabel="bits/dim", title="cross entropy on held-out patches "
                                                     "(Table 3)")
    pictures.insert(1, ("bits_per_dim.png", "Cross entropy of held-out patches in bits/dim."))

    colour = "grayscale" if c["grayscale"] else "RGB"
    notes = [
        f"Photographs: scikit-learn's two sample photos cut into "
        f"{info['train_crops'] + info['test_crops']} 64×64 crops ({colour}); "
        f"{info['train_crops']} crops for training "
        f"({c['patches_per_image']} random patches each), {info['test_crops']} held-out crops "
        f"give {c['test_patches']} test patches per model. 8-bit levels (256-way categorical "
        f"likelihood). The seed used CelebA and CIFAR-10 and much longer training, so absolute "
        f"numbers differ; the seed's CelebA values are shown for orientation only.",
        f"Patch VAEs: D = {c['latent_dim']}, encoder width {c['hidden_channels']}, decoder "
        f"{c['decoder_hidden']} → {c['cond_channels']} conditioning channels per pixel, block "
        f"PixelCNN of {c['pixelcnn_layers']} residual block(s) × {c['pixelcnn_hidden']} "
        f"channels (i > 1) or a per-pixel categorical (i = 1); {c['steps']} steps of "
        f"{c['batch_size']} patches, AdamW lr {c['lr']} with cosine decay, β = 1.",
        "M per pixel divides by p² (pixels, as the seed's Table 2); bits/dim divide by C·p². "
        "'−ELBO bits/dim' = recon bits/dim + M / (C·p²), an upper bound on the model's "
        "cross entropy; the seed's 'cross entropy' is the comparable number.",
        f"Probes: digits at {c['probe_image_size']}×{c['probe_image_size']} (bilinear), a fixed "
        f"{1 - c['test_fraction']:.0%}/{c['test_fraction']:.0%} split; patch VAEs "
        f"{', '.join(f'{p}|{i}' for p, i in c['probe_models'])} with D = "
        f"{c['probe_latent_dim']} trained {c['probe_steps']} steps on patches of the training "
        f"digits, encoded at stride 1 (every patch); global VAE with D = "
        f"{c['global_latent_dim']} trained {c['global_steps']} steps; "
        f"pyvae.metrics.linear_probe (standardised logistic regression).",
    ]
    data = {"patch_vaes": results, "probes": probes, **info}
    return Report([table1, table2], held, finding, pictures, notes, data)
