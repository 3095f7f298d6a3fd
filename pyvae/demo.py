"""The main job on bundled data (``make demo`` / ``pyvae demo``): train a small patch VAE p|i on
crops of scikit-learn's sample photographs, encode every crop at stride 1 into a feature store,
and report throughput, the speed-up over per-patch encoding (same run), the stored rate, and
pictures. Runs on the GPU when there is one, else on the CPU in a few minutes; nothing is
downloaded. Everything lands under ``--out`` and is re-runnable: training resumes from its
checkpoint, the feature store is rebuilt."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pyvae import viz
from pyvae._device import check_device
from pyvae.data import Photos, RandomPatches
from pyvae.encode import encode_dataset, encode_patches, fully_convolutional, open_features
from pyvae.encode.similarity import save_similarity_png, similarity_map
from pyvae.models import PatchVAE
from pyvae.train import fit, read_metrics

LN2 = math.log(2.0)


def stored_rate_bits(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(q(z|patch) || N(0, I)) in bits at every location: (N, H', W') from (N, D, H', W')."""
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    return 0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar).sum(1) / LN2


def time_call(fn, device: torch.device) -> float:
    """Seconds of one call, synchronised on GPUs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_demo(out: str = "demo-output", *, patch_size: int = 9, independence: int = 3,
             latent_dim: int = 16, steps: int = 400, batch_size: int = 128,
             device: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run the demo pipeline; returns the summary that it prints and saves as summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    photos = Photos(crop_size=64)
    print(f"data: {len(photos)} crops of 64×64 from scikit-learn's sample photographs; "
          f"device {device}")

    # 1. Train p|i on random patches of the crops (resumes from out/run/checkpoint).
    torch.manual_seed(seed)
    model = PatchVAE(patch_size, independence, latent_dim, 3, hidden_channels=32,
                     cond_channels=16, pixelcnn_hidden=24, pixelcnn_layers=1)
    patches = RandomPatches(photos, patch_size, patches_per_image=512, seed=seed)
    run_dir = out / "run"
    start = time.perf_counter()
    fit(model, patches, out_dir=run_dir, steps=steps, batch_size=batch_size, lr=2e-3,
        lr_schedule="cosine", kl_warmup_steps=steps // 4, eval_fraction=0.02,
        eval_every=max(steps // 4, 1), eval_batches=4, log_every=25,
        checkpoint_every=max(steps // 4, 1), resume=True, seed=seed, device=device,
        progress=progress)
    train_seconds = time.perf_counter() - start
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("split") == "eval"]
    model.eval()

    # 2. Encode every crop at stride 1 into a fresh store.
    store = out / "features"
    if store.exists():
        shutil.rmtree(store)
    result = encode_dataset(model, photos, store, batch_size=32, chunk_size=32,
                            with_logvar=True, device=device, progress=progress)
    features, manifest = open_features(store)
    logvar = np.load(store / "logvar.npy", mmap_mode="r")
    rate = stored_rate_bits(np.asarray(features), np.asarray(logvar))

    # 3. The same images, per-patch (unfold) against stride 1, same run, same device.
    sample = torch.stack([photos[k] for k in range(4)]).to(device)
    network = fully_convolutional(model.encoder, patch_size).to(device)
    encode_patches(model, sample[:1], network=network)  # warm-up
    stride1 = time_call(lambda: encode_patches(model, sample, network=network), device)
    per_patch = time_call(lambda: encode_patches(model, sample, method="unfold"), device)

    # 4. Pictures.
    held_out = torch.stack([patches[k] for k in range(0, len(patches), len(patches) // 16)][:16])
    with torch.no_grad():
        recon = model.reconstruct(held_out.to(device), torch.Generator(device).manual_seed(seed))
    pictures = {
        "reconstructions": viz.save_reconstructions(
            out / "reconstructions.png", held_out, recon.cpu(),
            title=f"{patch_size}|{independence} patch VAE: patches and draws from p(x | z = mean)"),
        "training": viz.save_training_curves(out / "training.png", records),
    }
    query = (0, features.shape[2] // 2, features.shape[3] // 2)
    distances = similarity_map(features, *query)
    pictures["similarity"] = save_similarity_png(out / "similarity.png", photos, distances,
                                                 query, patch_size)

    summary = {
        "model": f"PatchVAE {patch_size}|{independence}, D={latent_dim}",
        "device": str(device),
        "train_steps": steps, "train_seconds": round(train_seconds, 1),
        "eval_bits_per_dim": evals[-1]["bits_per_dim"] if evals else None,
        "eval_rate_bits": evals[-1]["rate_bits"] if evals else None,
        "store": str(store), "store_shape": list(manifest["shape"]),
        "store_dtype": manifest["dtype"],
        "encode_images_per_second": round(result.images_per_second, 1),
        "stride1_seconds_4_images": round(stride1, 4),
        "per_patch_seconds_4_images": round(per_patch, 4),
        "speedup_over_per_patch": round(per_patch / stride1, 1),
        "stored_rate_bits_per_patch": round(float(rate.mean()), 3),
        "stored_rate_bits_per_pixel": round(float(rate.mean()) / patch_size ** 2, 4),
        "pictures": {k: str(v) for k, v in pictures.items()},
        "checkpoint": str(run_dir / "checkpoint"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_summary(summary: dict) -> None:
    s = summary
    print(f"\n{s['model']} on {s['device']}: {s['train_steps']} steps in {s['train_seconds']} s; "
          f"held-out cross entropy {s['eval_bits_per_dim']:.3f} bits/dim, "
          f"rate {s['eval_rate_bits']:.2f} bits per patch")
    print(f"stride-1 encoding: {s['encode_images_per_second']} images/s end to end into "
          f"{s['store']} {tuple(s['store_shape'])} {s['store_dtype']}")
    print(f"speed-up over per-patch encoding (4 images, same run): "
          f"{s['speedup_over_per_patch']}× ({s['per_patch_seconds_4_images']} s vs "
          f"{s['stride1_seconds_4_images']} s)")
    print(f"stored rate M = E[KL(q(z|x) || p(z))]: {s['stored_rate_bits_per_patch']} bits per "
          f"patch, {s['stored_rate_bits_per_pixel']} bits per pixel")
    for name, path in s["pictures"].items():
        print(f"{name:>16s}: {path}")
    print(f"{'checkpoint':>16s}: {s['checkpoint']}")
    print(f"{'read the store':>16s}: np.load('{s['store']}/features.npy', mmap_mode='r') "
          f"+ json.load(open('{s['store']}/manifest.json'))")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    parser.add_argument("--patch-size", type=int, default=9, help="p (default: 9)")
    parser.add_argument("--independence", type=int, default=3, help="i (default: 3)")
    parser.add_argument("--latent-dim", type=int, default=16, help="D (default: 16)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main_from_args(args) -> int:
    summary = run_demo(args.out, patch_size=args.patch_size, independence=args.independence,
                       latent_dim=args.latent_dim, steps=args.steps, device=args.device,
                       progress=not args.no_progress)
    print_summary(summary)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvae.demo", description=__doc__)
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
