"""Linear probes on the intermediate layers of VAE encoders (seed 000, Figures 11–12).

The seed trained linear classifiers on the outputs of every (batch-norm) layer of global VAEs
and found that "only in the first layers features with more usable information exist" than in
the latent code. Here, on scikit-learn's digits (labelled, bundled):

- a patch VAE p|i (:class:`pyvae.models.PatchVAE`) trained on random patches of the training
  digits; every image is run through the encoder's fully-convolutional stride-1 form
  (:func:`pyvae.encode.stride1.fully_convolutional`, the network
  :func:`pyvae.encode.encode_patches` runs) layer by layer, and the output of every conv layer
  (after its ReLU) and the final layer's posterior means (the latent code map) are kept;
- a global convolutional VAE (:class:`pyvae.models.VAE`, the seed's own setting): the output of
  every layer of its encoder (after each ReLU) and the posterior means;
- raw pixels, and both encoders with their initial random weights (what the architecture alone
  gives).

Every feature set gets the same standardised logistic probe (:func:`pyvae.metrics.linear_probe`)
on a fixed train/test split, once on the full (flattened) maps and once average-pooled to a
fixed grid so that every layer has the same spatial resolution.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from pyvae import viz
from pyvae.data import RandomPatches
from pyvae.encode.stride1 import fully_convolutional
from pyvae.metrics import linear_probe
from pyvae.models import VAE, PatchVAE
from pyvae.reproduce._common import (Report, Table, TensorImages, digits_split,
                                     seed_everything, train)

SEED = "000"
SEED_TITLE = "Sixt, *An Investigation into Image Area Dependencies using Unsupervised " \
             "Learning*, MSc thesis, FU Berlin 2018"
TITLE = "Linear probes on every encoder layer of a patch VAE and a global VAE"
SUMMARY = "linear probes on every encoder layer (stride-1 patch VAE, global VAE) vs the code"
CLAIM = ("Linear classifiers trained on the intermediate (batch-norm) layers of global VAEs "
         "(Fig. 11: CelebA attributes, VAE and β-VAE; Fig. 12: CIFAR-10 classes, VAE) show that "
         "\"only in the first layers features with more usable information exist\" than in the "
         "latent representation (§7.3); the seed gives the per-layer accuracies as figures only. "
         "For orientation, its Table 4 has the latent codes near or below raw pixels (CelebA: "
         "VAE_256d 86.21 %, PIXEL 86.52 %; CIFAR-10: VAE_256d 45.30 %, PIXEL 38.22 %).")

SIZES = {
    "smoke": dict(image_size=16, test_fraction=0.3, patch_model=[9, 3], latent_dim=4,
                  hidden_channels=8, cond_channels=4, pixelcnn_hidden=8, pixelcnn_layers=1,
                  decoder_hidden=16, patches_per_image=8, patch_steps=2, global_latent_dim=4,
                  global_steps=2, batch_size=32, lr=2e-3, pool=2, probe_max_iter=50,
                  items=200, initial_weights=False),
    "default": dict(image_size=16, test_fraction=0.3, patch_model=[9, 3], latent_dim=8,
                    hidden_channels=32, cond_channels=16, pixelcnn_hidden=24,
                    pixelcnn_layers=1, decoder_hidden=128, patches_per_image=16,
                    patch_steps=1000, global_latent_dim=16, global_steps=1000, batch_size=64,
                    lr=2e-3, pool=4, probe_max_iter=1000, items=None,
                    initial_weights=True),
}


# ---- intermediate outputs ------------------------------------------------------------------------

@torch.no_grad()
def layer_outputs(network: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``network`` module by module on ``x`` and keep the output after every ReLU (the end
    of each conv or fully-connected block) and the network's final output, in order.

    Returns:
        A list of tensors: (N, C_l, H_l, W_l) maps or (N, F_l) vectors; the last entry is the
        network's output.
    """
    outputs = []
    for index, module in enumerate(network):
        x = module(x)
        if isinstance(module, nn.ReLU) or index == len(network) - 1:
            outputs.append(x)
    return outputs


@torch.no_grad()
def patch_encoder_layers(model: PatchVAE, images: torch.Tensor
                         ) -> list[tuple[str, torch.Tensor]]:
    """Every conv layer's output of a patch VAE's encoder at stride 1 over whole ``images``
    (N, C, H, W) in [0, 1], then the posterior-mean map (the code):
    [("conv1", (N, C_1, H − 2, W − 2)), ..., ("code μ", (N, D, H − p + 1, W − p + 1))].

    The last entry equals :func:`pyvae.encode.encode_patches` ``(model, images)``.
    """
    device = next(model.parameters()).device
    network = fully_convolutional(model.encoder, model.patch_size).to(device)
    outputs = layer_outputs(network, model.preprocess(images.to(device).float()))
    *convs, final = outputs
    named = [(f"conv{k + 1}", out.cpu()) for k, out in enumerate(convs)]
    # The final (ex-linear) layer's map reaches past the image edge: crop to the valid patches.
    rows, cols = (s - model.patch_size + 1 for s in images.shape[2:])
    return named + [("code μ", final[:, :model.latent_dim, :rows, :cols].cpu())]


@torch.no_grad()
def global_encoder_layers(model: VAE, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every layer's output of a convolutional VAE's encoder (after each ReLU: conv1, conv2, ...,
    fc) and the posterior means (N, D) (the code), for ``images`` (N, C, H, W) in [0, 1].

    The last entry equals ``model.encode(images)[0]``.
    """
    device = next(model.parameters()).device
    x = 2.0 * images.to(device).float() - 1.0           # what ConvEncoder.forward feeds its net
    outputs = layer_outputs(model.encoder.net, x)
    names = [f"conv{k + 1}" if out.dim() == 4 else "fc" for k, out in enumerate(outputs)]
    mu = model.head(outputs[-1])[:, :model.latent_dim]
    return [(name, out.cpu()) for name, out in zip(names, outputs)] + [("code μ", mu.cpu())]


def as_features(output: torch.Tensor, pool: int | None) -> np.ndarray:
    """(N, C, H, W) maps flattened (``pool=None``) or average-pooled to pool×pool first; (N, F)
    vectors as they are. Float32 numpy (N, ·)."""
    if output.dim() == 4 and pool is not None:
        output = F.adaptive_avg_pool2d(output, pool)
    return output.flatten(1).float().numpy()


def describe_shape(output: torch.Tensor) -> str:
    return "×".join(str(s) for s in output.shape[1:])


# ---- probes and the comparison -------------------------------------------------------------------

def probe_layers(layers: list[tuple[str, torch.Tensor]], train_idx, test_idx, labels, *,
                 pool: int | None, seed: int, max_iter: int) -> list[dict]:
    """The logistic probe (standardised) on every layer's features: per layer ``layer``,
    ``shape`` (of one item's output), ``dims`` (features), ``test_accuracy``,
    ``train_accuracy``."""
    results = []
    for name, output in layers:
        features = as_features(output, pool)
        probe = linear_probe(features[train_idx], labels[train_idx], features[test_idx],
                             labels[test_idx], seed=seed, max_iter=max_iter)
        results.append({"layer": name, "shape": describe_shape(output),
                        "dims": int(features.shape[1]),
                        "test_accuracy": probe["test_accuracy"],
                        "train_accuracy": probe["train_accuracy"]})
    return results


def accuracy_gap(first: float, code: float, n_test: int) -> dict:
    """first − code accuracy with the standard error of the difference of two independent
    binomial proportions over ``n_test`` items; ``verdict`` is ``"earlier"`` (the gap exceeds 2
    standard errors), ``"code"`` (below −2) or ``"tie"``."""
    se = math.sqrt((first * (1 - first) + code * (1 - code)) / n_test)
    gap = first - code
    verdict = "earlier" if gap > 2 * se else ("code" if gap < -2 * se else "tie")
    return {"gap": gap, "se": se, "verdict": verdict}


def depth_trend(results: list[dict]) -> float:
    """Spearman correlation between layer depth (1, 2, ..., code last) and test accuracy."""
    accuracy = [r["test_accuracy"] for r in results]
    if len(accuracy) < 3 or np.ptp(accuracy) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(np.arange(len(accuracy)), accuracy)[0])


def judge(comparisons: list[dict]) -> tuple[bool | None, str]:
    """Held when the first layer beats the code by more than 2 standard errors in every
    comparison (trained encoder × feature setting), not held when in none, mixed otherwise."""
    earlier = [c for c in comparisons if c["verdict"] == "earlier"]
    held = True if len(earlier) == len(comparisons) else (False if not earlier else None)
    words = {"earlier": "first layer better", "code": "code better", "tie": "a tie"}
    parts = [f"{c['encoder']}, {c['features']}: first layer − code = {100 * c['gap']:+.1f} ± "
             f"{100 * c['se']:.1f} points ({words[c['verdict']]})" for c in comparisons]
    return held, "; ".join(parts) + "."


# ---- models --------------------------------------------------------------------------------------

def build_patch_vae(c: dict) -> PatchVAE:
    p, i = c["patch_model"]
    return PatchVAE(p, i, c["latent_dim"], 1, hidden_channels=c["hidden_channels"],
                    cond_channels=c["cond_channels"], pixelcnn_hidden=c["pixelcnn_hidden"],
                    pixelcnn_layers=c["pixelcnn_layers"], decoder_hidden=c["decoder_hidden"])


def trained_and_initial(c: dict, split, device, seed: int, work_dir) -> dict[str, nn.Module]:
    """Both encoders after training and, with ``initial_weights``, copies of them before it."""
    models = {}
    seed_everything(seed)
    patch = build_patch_vae(c).to(device)
    if c["initial_weights"]:
        models["patch VAE, initial weights"] = build_patch_vae(c).to(device)
        models["patch VAE, initial weights"].load_state_dict(patch.state_dict())
    patches = RandomPatches(TensorImages(split.x_train), c["patch_model"][0],
                            c["patches_per_image"], seed=seed)
    train(patch, patches, work_dir=work_dir, name="patch_vae", steps=c["patch_steps"],
          batch_size=c["batch_size"], lr=c["lr"], device=device, seed=seed,
          lr_schedule="cosine")
    models["patch VAE"] = patch
    seed_everything(seed)
    vae = VAE(c["global_latent_dim"], 1, c["image_size"]).to(device)
    if c["initial_weights"]:
        models["global VAE, initial weights"] = VAE(c["global_latent_dim"], 1, c["image_size"])
        models["global VAE, initial weights"].load_state_dict(vae.state_dict())
    train(vae, split.train_set, work_dir=work_dir, name="global_vae", steps=c["global_steps"],
          batch_size=c["batch_size"], lr=1e-3, device=device, seed=seed)
    models["global VAE"] = vae
    for model in models.values():
        model.to(device).eval()
    return models


def save_accuracy_plot(path, probes: dict[str, dict[str, list[dict]]], pixels: dict[str, float],
                       settings: list[str]):
    """Test accuracy against layer (one panel per encoder, one line per feature setting), raw
    pixels as horizontal lines."""
    encoders = [name for name in probes[settings[0]] if "initial" not in name]
    fig, axes = viz._new_figure(1, len(encoders), (5.0 * len(encoders), 3.8))
    for ax, encoder in zip(axes[0], encoders):
        for setting, style in zip(settings, ("o-", "s--")):
            for variant, alpha in ((encoder, 1.0), (f"{encoder}, initial weights", 0.45)):
                if variant not in probes[setting]:
                    continue
                rows = probes[setting][variant]
                label = f"{setting}{'' if variant == encoder else ', initial weights'}"
                ax.plot(range(len(rows)), [100 * r["test_accuracy"] for r in rows], style,
                        alpha=alpha, label=label, markersize=4)
        for (setting, value), colour in zip(pixels.items(), ("black", "grey")):
            ax.axhline(100 * value, color=colour, linestyle=":", linewidth=1,
                       label=f"raw pixels, {setting}")
        rows = probes[settings[0]][encoder]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['layer']}\n{r['shape']}" for r in rows], fontsize=7)
        viz._style(ax, encoder, None, "held-out accuracy %")
        ax.legend(fontsize=6)
    fig.suptitle("logistic probes on each encoder layer (digits)", fontsize=10)
    return viz.save_figure(fig, path)


# ---- the experiment ------------------------------------------------------------------------------

def encoder_layers(models: dict[str, nn.Module], images: torch.Tensor) -> dict[str, list]:
    """Per model, its (layer name, output) list (:func:`patch_encoder_layers` or
    :func:`global_encoder_layers`)."""
    return {name: (patch_encoder_layers(model, images) if isinstance(model, PatchVAE)
                   else global_encoder_layers(model, images))
            for name, model in models.items()}


def compare_first_to_code(probes: dict, n_test: int) -> list[dict]:
    """For every trained encoder and feature setting: :func:`accuracy_gap` of the first layer
    against the code, with the :func:`depth_trend`."""
    return [{"encoder": name, "features": setting, "trend": depth_trend(rows),
             **accuracy_gap(rows[0]["test_accuracy"], rows[-1]["test_accuracy"], n_test)}
            for setting, by_model in probes.items() for name, rows in by_model.items()
            if "initial" not in name]


def result_tables(probes: dict, pixels: dict, comparisons: list[dict], images: torch.Tensor,
                  settings: dict) -> list[Table]:
    rows = []
    for setting, by_model in probes.items():
        for name, results in by_model.items():
            rows += [[name, setting, r["layer"], r["shape"], r["dims"], 100 * r["test_accuracy"],
                      100 * r["train_accuracy"]] for r in results]
        rows += [["raw pixels", setting, "pixels", describe_shape(images),
                  as_features(images, settings[setting]).shape[1],
                  100 * pixels[setting]["test_accuracy"],
                  100 * pixels[setting]["train_accuracy"]]]
    table1 = Table("Logistic probes on every encoder layer, held-out digits",
                   ["encoder", "features", "layer", "output shape", "dims", "test accuracy %",
                    "train accuracy %"], rows, [None, None, None, None, None, ".1f", ".1f"])
    table2 = Table("First layer against the code (trained encoders)",
                   ["encoder", "features", "first − code (points)", "± SE", "depth trend ρ",
                    "verdict"],
                   [[r["encoder"], r["features"], 100 * r["gap"], 100 * r["se"], r["trend"],
                     r["verdict"]] for r in comparisons],
                   [None, None, ".1f", ".1f", ".2f", None])
    return [table2, table1]


def setup_notes(c: dict, layers: dict, n_train: int, n_test: int) -> list[str]:
    p, i = c["patch_model"]
    return [
        f"Digits: scikit-learn's 8×8 digits ({n_train + n_test} of 1,797) at {c['image_size']}×{c['image_size']} "
        f"(bilinear), a fixed {1 - c['test_fraction']:.0%}/{c['test_fraction']:.0%} split "
        f"({n_train} / {n_test}); the seed used CelebA and CIFAR-10.",
        f"Patch VAE {p}|{i}: D = {c['latent_dim']}, {len(layers['patch VAE']) - 1} valid 3×3 "
        f"convolutions of {c['hidden_channels']} channels and a linear layer; {c['patch_steps']} "
        f"steps on {c['patches_per_image']} random patches per training digit (AdamW lr "
        f"{c['lr']}, cosine). Layers computed at stride 1 by running "
        "pyvae.encode.stride1.fully_convolutional's network module by module; the code map is "
        "exactly encode_patches' output.",
        f"Global VAE: pyvae.models.VAE (Higgins et al.'s convolutional encoder at this size: "
        f"4×4 stride-2 convolutions, a 256-unit layer), D = {c['global_latent_dim']}, "
        f"{c['global_steps']} steps (AdamW lr 1e-3). No batch norm (the seed probed its "
        "batch-norm layers); the layer outputs are taken after each ReLU.",
        "Initial weights: the same networks before training (same initialisation), probed the "
        "same way: how much of a layer's accuracy the architecture gives without training"
        + ("." if c["initial_weights"] else " (not run at this size)."),
        f"Probe: pyvae.metrics.linear_probe (standardised logistic regression, max_iter "
        f"{c['probe_max_iter']}), on the flattened layer output and on it average-pooled to "
        f"{c['pool']}×{c['pool']} (vectors unchanged). Verdict per trained encoder and feature "
        "setting: first layer − code accuracy against 2 standard errors of the difference of "
        "two binomial proportions; held = every one favours the first layer. More features "
        "give a linear probe more capacity: the flattened first layers have the most dims.",
    ]


def first_items(split, items: int | None):
    """The split cut to its first ``items`` digits in the same train/test proportion (None: all),
    so that the smoke size probes a few hundred digits."""
    if items is None:
        return split
    n_train = round(items * len(split.x_train) / (len(split.x_train) + len(split.x_test)))
    n_test = items - n_train
    return type(split)(split.x_train[:n_train], split.y_train[:n_train], split.x_test[:n_test],
                       split.y_test[:n_test], TensorImages(split.x_train[:n_train]))


def run(out, config: dict, *, device, seed: int, work_dir) -> Report:
    c = config
    split = first_items(digits_split(c["image_size"], c["test_fraction"], seed), c["items"])
    images = torch.cat([split.x_train, split.x_test])
    labels = np.concatenate([split.y_train, split.y_test])
    train_idx = np.arange(len(split.x_train))
    test_idx = np.arange(len(split.x_train), len(images))
    layers = encoder_layers(trained_and_initial(c, split, device, seed, work_dir), images)
    settings = {"flattened": None, f"pooled to {c['pool']}×{c['pool']}": c["pool"]}

    def probe(outputs, pool):
        return probe_layers(outputs, train_idx, test_idx, labels, pool=pool, seed=seed,
                            max_iter=c["probe_max_iter"])

    probes = {setting: {name: probe(outputs, pool) for name, outputs in layers.items()}
              for setting, pool in settings.items()}
    pixels = {setting: probe([("pixels", images)], pool)[0]
              for setting, pool in settings.items()}
    comparisons = compare_first_to_code(probes, len(test_idx))
    held, finding = judge(comparisons)
    best = ", ".join(f"{name} {r['layer']} {100 * r['test_accuracy']:.1f} % ({setting})"
                     for name, (setting, r) in best_layers(probes).items())
    finding += (" Raw pixels: " + ", ".join(f"{100 * r['test_accuracy']:.1f} % ({k})"
                                            for k, r in pixels.items())
                + f"; the best layer of each trained encoder: {best}.")
    save_accuracy_plot(out / "layer_probes.png", probes,
                       {k: r["test_accuracy"] for k, r in pixels.items()}, list(settings))
    pictures = [("layer_probes.png", "Held-out accuracy of a logistic probe on every encoder "
                                     "layer (left to right: input side to code), trained "
                                     "(solid) and with the initial weights (faint); dotted: "
                                     "raw pixels.")]
    data = {"probes": probes, "raw_pixels": pixels, "comparisons": comparisons,
            "train_items": len(train_idx), "test_items": len(test_idx)}
    return Report(result_tables(probes, pixels, comparisons, images, settings), held, finding,
                  pictures, setup_notes(c, layers, len(train_idx), len(test_idx)), data)


def best_layers(probes: dict) -> dict[str, tuple[str, dict]]:
    """Per trained encoder, the (feature setting, layer result) with the best test accuracy."""
    best: dict[str, tuple[str, dict]] = {}
    for setting, by_model in probes.items():
        for name, rows in by_model.items():
            top = max(rows, key=lambda r: r["test_accuracy"])
            if "initial" not in name and (
                    name not in best or top["test_accuracy"] > best[name][1]["test_accuracy"]):
                best[name] = (setting, top)
    return best
