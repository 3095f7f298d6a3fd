"""Encoding whole collections into a feature store (pyvae.encode.encode_dataset): contents equal
encode_patches, the manifest, unreadable images, kill-and-resume, refusals, torchrun, the CLI,
and the similarity maps."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyvae.cli import main as cli_main
from pyvae.data import NumpyImages, load_image
from pyvae.encode import (StoreError, encode_dataset, encode_patches, open_features,
                          save_similarity_png, similarity_map)
from pyvae.encode.dataset import TEST_DELAY_ENV, model_hash
from pyvae.models import PatchVAE
from pyvae.train import load_model, save_checkpoint
from conftest import run_torchrun

N, SIZE = 12, 16


def tiny_model(seed: int = 0, channels: int = 3) -> PatchVAE:
    torch.manual_seed(seed)
    return PatchVAE(3, 1, 4, channels, hidden_channels=8, cond_channels=4,
                    decoder_hidden=16).eval()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def images():
    return torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def reference(model, images, *, batch_size, chunk_size, logvar=False):
    """encode_patches on the same images, batched as the store batches them (CPU convolutions
    may round differently for different batch sizes)."""
    mus, logvars = [], []
    for chunk in range(0, len(images), chunk_size):
        stop = min(chunk + chunk_size, len(images))
        for start in range(chunk, stop, batch_size):
            mu, lv = encode_patches(model, images[start:min(start + batch_size, stop)],
                                    return_logvar=True)
            mus.append(mu)
            logvars.append(lv)
    mu, lv = torch.cat(mus).numpy(), torch.cat(logvars).numpy()
    return (mu, lv) if logvar else mu


def write_pngs(folder: Path, images: torch.Tensor, *, truncated=(), garbage=()) -> list[str]:
    """images[k] as folder/img{k:02d}.png (the last ones in a sub-folder); rows in
    ``truncated`` get a cut-off PNG (header readable, decoding fails), rows in ``garbage``
    random bytes (header unreadable)."""
    names = []
    for k, image in enumerate(images):
        name = f"{'sub/' if k >= len(images) - 2 else ''}img{k:02d}.png"
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path)
        if k in truncated:
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
        if k in garbage:
            path.write_bytes(b"definitely not an image" * 4)
        names.append(name)
    return names


def subprocess_env(threads: int = 1, **extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]),
                                         env.get("PYTHONPATH", "")])
    return env


# ---- contents and manifest ------------------------------------------------------------------

def test_float32_store_equals_encode_patches_and_numpy_reads_it(model, images, tmp_path):
    out = tmp_path / "store"
    result = encode_dataset(model, images, out, batch_size=4, chunk_size=5, dtype="float32",
                            with_logvar=True, progress=False)
    mu, lv = reference(model, images, batch_size=4, chunk_size=5, logvar=True)
    assert result.shape == (N, 4, SIZE - 2, SIZE - 2) and result.encoded == N
    assert result.path == out and result.skipped == [] and result.images_per_second > 0

    # Plain numpy, no pyvae: the arrays and the JSON manifest.
    features = np.load(out / "features.npy", mmap_mode="r")
    assert features.dtype == np.float32 and np.array_equal(features, mu)
    assert np.array_equal(np.load(out / "logvar.npy"), lv)
    assert np.load(out / "valid.npy").tolist() == [True] * N
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "pyvae-feature-store" and manifest["format_version"] == 1
    assert manifest["shape"] == [N, 4, SIZE - 2, SIZE - 2] and manifest["dtype"] == "float32"
    assert manifest["patch_size"] == 3 and manifest["latent_dim"] == 4
    assert manifest["image_shape"] == [3, SIZE, SIZE]
    assert manifest["model"]["config"] == json.loads(json.dumps(model.config))
    assert manifest["model"]["hash"] == model_hash(model)
    assert manifest["model"]["hash"].startswith("sha256:")
    assert manifest["source"]["kind"] == "tensor"
    assert manifest["source"]["fingerprint"].startswith("sha256:")
    assert manifest["chunk_size"] == 5 and manifest["num_chunks"] == 3
    assert manifest["with_logvar"] is True and manifest["precision"] == "fp32"
    assert manifest["skipped"] == [] and manifest["complete"] is True
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [
        "000000.done", "000001.done", "000002.done"]
    assert not [p for p in out.rglob(".*tmp*")]

    opened, same = open_features(out)
    assert isinstance(opened, np.memmap) and np.array_equal(opened, mu) and same == manifest


def test_float16_store_is_the_float32_result_rounded(model, images, tmp_path):
    encode_dataset(model, images, tmp_path / "s", batch_size=3, chunk_size=6, progress=False)
    features, manifest = open_features(tmp_path / "s")
    assert manifest["dtype"] == "float16" and features.dtype == np.float16
    expected = reference(model, images, batch_size=3, chunk_size=6).astype(np.float16)
    assert np.array_equal(features, expected)


def test_folder_source_with_unreadable_images(model, images, tmp_path):
    names = write_pngs(tmp_path / "imgs", images, truncated=(3,), garbage=(8,))
    with pytest.warns(UserWarning, match="2 unreadable image"):
        result = encode_dataset(model, tmp_path / "imgs", tmp_path / "s", batch_size=4,
                                chunk_size=4, dtype="float32", num_workers=1, progress=False)
    features, manifest = open_features(tmp_path / "s")
    assert manifest["names"] == sorted(names) == names  # every file a row, sorted paths
    assert manifest["source"]["kind"] == "folder" and manifest["source"]["grayscale"] is False
    assert [(s["index"], s["name"]) for s in manifest["skipped"]] == [
        (3, "img03.png"), (8, "img08.png")]
    assert all(s["reason"] for s in manifest["skipped"]) and result.skipped == manifest["skipped"]
    valid = np.load(tmp_path / "s" / "valid.npy")
    assert valid.tolist() == [k not in (3, 8) for k in range(N)]
    assert np.isnan(features[[3, 8]]).all() and not np.isnan(features[valid]).any()
    loaded = torch.stack([load_image(tmp_path / "imgs" / name) if valid[k] else images[k]
                          for k, name in enumerate(names)])
    expected = encode_patches(model, loaded).numpy()
    np.testing.assert_allclose(features[valid], expected[valid], rtol=0, atol=1e-5)


def test_npy_source_and_grayscale_model(tmp_path):
    model = tiny_model(channels=1)
    array = np.random.default_rng(0).integers(0, 256, (N, SIZE, SIZE - 3, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", array)
    encode_dataset(model, str(tmp_path / "images.npy"), tmp_path / "s", batch_size=4,
                   chunk_size=8, dtype="float32", progress=False)
    features, manifest = open_features(tmp_path / "s")
    images = torch.from_numpy(array[..., 0] / np.float32(255)).unsqueeze(1)  # NCHW strides
    assert np.array_equal(features, reference(model, images, batch_size=4, chunk_size=8))
    assert manifest["source"]["kind"] == "npy" and manifest["source"]["layout"] == "NHWC"
    assert manifest["source"]["path"] == str((tmp_path / "images.npy").resolve())
    assert manifest["names"] is None and features.shape == (N, 4, SIZE - 2, SIZE - 5)


def test_dataset_source_equals_tensor_source(model, images, tmp_path):
    encode_dataset(model, NumpyImages(images.numpy()), tmp_path / "a", batch_size=4,
                   progress=False)
    encode_dataset(model, images, tmp_path / "b", batch_size=4, progress=False)
    assert ((tmp_path / "a" / "features.npy").read_bytes()
            == (tmp_path / "b" / "features.npy").read_bytes())


def test_autocast_precision(model, images, tmp_path):
    encode_dataset(model, images, tmp_path / "s", precision="bf16", dtype="float32",
                   progress=False)
    features, manifest = open_features(tmp_path / "s")
    assert manifest["precision"] == "bf16"
    np.testing.assert_allclose(features, encode_patches(model, images).numpy(), atol=0.05)


# ---- refusals and argument errors -----------------------------------------------------------

def test_refusals(model, images, tmp_path):
    out = tmp_path / "s"
    encode_dataset(model, images, out, batch_size=4, chunk_size=4, progress=False)
    with pytest.raises(StoreError, match="already holds a feature store; pass resume=True"):
        encode_dataset(model, images, out, batch_size=4, chunk_size=4, progress=False)
    with pytest.raises(StoreError, match=r"model: hash .* now \(same config, different weights\)"):
        encode_dataset(tiny_model(seed=1), images, out, chunk_size=4, resume=True,
                       progress=False)
    changed = images.clone()
    changed[0, 0, 0, 0] += 0.5
    with pytest.raises(StoreError, match="source: fingerprint"):
        encode_dataset(model, changed, out, chunk_size=4, resume=True, progress=False)
    with pytest.raises(StoreError, match="dtype: store 'float16', now 'float32'"):
        encode_dataset(model, images, out, chunk_size=4, dtype="float32", resume=True,
                       progress=False)
    with pytest.raises(StoreError, match="precision: store 'fp32', now 'bf16'"):
        encode_dataset(model, images, out, chunk_size=4, precision="bf16", resume=True,
                       progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a feature store"):
        encode_dataset(model, images, other, resume=True, progress=False)
    # A complete store resumed with the same everything: nothing to do.
    result = encode_dataset(model, images, out, batch_size=4, chunk_size=4, resume=True,
                            progress=False)
    assert result.encoded == 0 and open_features(out)[1]["complete"]


def test_folder_refusal_names_the_changed_files(model, images, tmp_path):
    write_pngs(tmp_path / "imgs", images[:4])
    encode_dataset(model, tmp_path / "imgs", tmp_path / "s", progress=False)
    (tmp_path / "imgs" / "img01.png").unlink()
    with pytest.raises(StoreError, match="4 images in the store, 3 now"):
        encode_dataset(model, tmp_path / "imgs", tmp_path / "s", resume=True, progress=False)
    with pytest.raises(StoreError, match="source size: store None, now"):
        encode_dataset(model, tmp_path / "imgs", tmp_path / "s", resume=True, size=8,
                       progress=False)


def test_resume_after_a_crash_during_creation(model, images, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float16, shape=(2, 2))
    with pytest.raises(StoreError, match="not a feature store"):
        encode_dataset(model, images, out, progress=False)
    encode_dataset(model, images, out, resume=True, progress=False)
    assert open_features(out)[0].shape == (N, 4, SIZE - 2, SIZE - 2)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dtype": "float64"}, ValueError, "dtype must be one of"),
    ({"precision": "fp8"}, ValueError, "precision must be"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size must be an int, got float"),
    ({"size": 8}, ValueError, "size= applies to image-folder sources only"),
])
def test_argument_errors(model, images, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        encode_dataset(model, images, tmp_path / "s", progress=False, **kwargs)
    assert not (tmp_path / "s").exists()


def test_source_errors(model, images, tmp_path):
    with pytest.raises(ValueError, match="source images have 1 channels, the model reads 3"):
        encode_dataset(model, images[:, :1], tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="smaller than the model's 3×3 patches"):
        encode_dataset(model, images[:, :, :2], tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="source: spec"):
        encode_dataset(model, str(tmp_path / "missing"), tmp_path / "s", progress=False)
    with pytest.raises(TypeError, match="patch model"):
        encode_dataset(torch.nn.Linear(2, 2), images, tmp_path / "s", progress=False)


# ---- kill and resume, torchrun, CLI (real processes) ----------------------------------------

@pytest.fixture
def checkpoint(model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, model, {"step": 0})
    return run


KILLABLE = textwrap.dedent("""
    import sys
    from pyvae.encode import encode_dataset
    from pyvae.train import load_model
    encode_dataset(load_model(sys.argv[1]), sys.argv[2], sys.argv[3], batch_size=2,
                   chunk_size=2, progress=False)
""")


def test_killed_run_resumes_to_identical_bytes(checkpoint, images, tmp_path):
    np.save(tmp_path / "images.npy", images.numpy())
    source, out = str(tmp_path / "images.npy"), tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(checkpoint), source, str(out)],
        env=subprocess_env(torch.get_num_threads(), **{TEST_DELAY_ENV: "2"}),  # as here
        stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "chunks" / "000000.done").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no chunk finished within 60 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert len(list((out / "chunks").glob("*.done"))) < N // 2
    with pytest.raises(ValueError, match="incomplete"):
        open_features(out)
    assert open_features(out, require_complete=False)[0].shape == (N, 4, SIZE - 2, SIZE - 2)

    model = load_model(checkpoint)
    result = encode_dataset(model, source, out, batch_size=2, chunk_size=2, resume=True,
                            progress=False)
    assert 0 < result.encoded < N
    encode_dataset(model, source, tmp_path / "whole", batch_size=2, chunk_size=2,
                   progress=False)
    for name in ("features.npy", "valid.npy"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert open_features(out)[1]["complete"]


DISTRIBUTED = textwrap.dedent("""
    import os, sys, warnings
    import torch.distributed as dist
    from pyvae.encode import encode_dataset
    from pyvae.train import load_model
    warnings.simplefilter("ignore")
    result = encode_dataset(load_model(sys.argv[1]), sys.argv[2], sys.argv[3], batch_size=3,
                            chunk_size=3, dtype="float32", device="cpu", progress=False)
    assert not dist.is_initialized(), "the process group must be destroyed"
    with open(f"{sys.argv[3]}.rank{os.environ['RANK']}", "w") as file:
        file.write(f"{result.encoded} {len(result.skipped)}")
""")


def test_torchrun_two_processes_equal_one(checkpoint, images, tmp_path):
    write_pngs(tmp_path / "imgs", images, truncated=(1, 4))  # chunk 0 (rank 0), 1 (rank 1)
    script = tmp_path / "encode_script.py"
    script.write_text(DISTRIBUTED)
    status, output = run_torchrun(2, script, checkpoint, tmp_path / "imgs", tmp_path / "two",
                                  env=subprocess_env())
    assert status == 0, output[-4000:]
    for rank in (0, 1):  # every rank returns the store's rows and every rank's skips
        assert (tmp_path / f"two.rank{rank}").read_text() == f"{N} 2"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): CPU convolutions may round
    try:                      # differently with other thread counts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encode_dataset(load_model(checkpoint), tmp_path / "imgs", tmp_path / "one",
                           batch_size=3, chunk_size=3, dtype="float32", progress=False)
    finally:
        torch.set_num_threads(threads)
    two, manifest = open_features(tmp_path / "two")
    one, single = open_features(tmp_path / "one")
    for name in ("features.npy", "valid.npy"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert np.isnan(two[[1, 4]]).all() and np.array_equal(two, one, equal_nan=True)
    assert manifest["skipped"] == single["skipped"]
    assert [s["index"] for s in manifest["skipped"]] == [1, 4] and manifest["complete"]
    ranks = [json.loads((tmp_path / "two" / "chunks" / f"{k:06d}.done").read_text())["rank"]
             for k in range(4)]
    assert ranks == [0, 1, 0, 1]


def test_cli_encode(checkpoint, model, images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["encode", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("CHECKPOINT", "SOURCE", "OUT", "--batch-size", "--chunk-size", "--dtype",
                 "--precision", "--logvar", "--resume", "--device", "--num-workers", "--size",
                 "--crop", "--grayscale", "--no-progress", "features.npy"):
        assert flag in text

    np.save(tmp_path / "images.npy", images.numpy())
    argv = ["encode", str(checkpoint), str(tmp_path / "images.npy"), str(tmp_path / "cli"),
            "--chunk-size", "4", "--batch-size", "4", "--dtype", "float32", "--logvar",
            "--device", "cpu", "--no-progress"]
    assert cli_main(argv) == 0
    assert f"{N} images" in capsys.readouterr().out
    features, manifest = open_features(tmp_path / "cli")
    mu, lv = reference(model, images, batch_size=4, chunk_size=4, logvar=True)
    assert np.array_equal(features, mu)
    assert np.array_equal(np.load(tmp_path / "cli" / "logvar.npy"), lv)
    assert manifest["model"]["hash"] == model_hash(model)

    assert cli_main(argv) == 2  # an existing store without --resume
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert cli_main(argv + ["--resume"]) == 0
    assert cli_main(["encode", str(tmp_path / "nowhere"), str(tmp_path / "images.npy"),
                     str(tmp_path / "x")]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err


# ---- similarity -----------------------------------------------------------------------------

def test_similarity_map_matches_numpy(model, images, tmp_path):
    encode_dataset(model, images, tmp_path / "s", progress=False)
    features, _ = open_features(tmp_path / "s")
    query = (5, 3, 9)
    distances = similarity_map(features, *query, chunk_size=5)
    code = features[5, :, 3, 9].astype(np.float32)
    direct = np.sqrt(((features.astype(np.float32) - code[None, :, None, None]) ** 2).sum(1))
    assert distances.shape == (N, SIZE - 2, SIZE - 2) and distances.dtype == np.float32
    np.testing.assert_allclose(distances, direct, rtol=1e-6, atol=1e-6)
    assert distances[query] == 0.0 and (distances >= 0).all()

    as_tensor = similarity_map(torch.from_numpy(np.array(features)), *query)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    np.testing.assert_allclose(as_tensor.numpy(), direct, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"y must be an int in \[0, 14\)"):
        similarity_map(features, 0, 14, 0)
    with pytest.raises(ValueError, match="image_index"):
        similarity_map(features, N, 0, 0)


def test_save_similarity_png(model, images, tmp_path):
    features = encode_patches(model, images)
    distances = similarity_map(features, 2, 4, 6)
    distances[7] = float("nan")  # an unreadable image of a store: left out by default
    path = save_similarity_png(tmp_path / "sim.png", images, distances, query=(2, 4, 6),
                               patch_size=3, names=[f"n{k}" for k in range(N)])
    assert path == tmp_path / "sim.png" and path.stat().st_size > 1000
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.png"]  # no temporary left
    with pytest.raises(ValueError, match="distance maps, distances are"):
        save_similarity_png(tmp_path / "bad.png", images, distances, (2, 4, 6), patch_size=5)


def test_tiled_store_matches_whole_images_and_tile_size_is_checked_on_resume(tmp_path):
    torch.manual_seed(3)
    model = PatchVAE(3, 1, 4, 1, hidden_channels=8).eval()
    images = torch.rand(5, 1, 23, 19)
    whole = encode_dataset(model, images, tmp_path / "whole", dtype="float32", progress=False)
    tiled = encode_dataset(model, images, tmp_path / "tiled", dtype="float32", tile_size=8,
                           progress=False)
    a = np.load(whole.path / "features.npy")
    b = np.load(tiled.path / "features.npy")
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    with pytest.raises(StoreError, match="tile_size"):
        encode_dataset(model, images, tmp_path / "tiled", dtype="float32", tile_size=9,
                       resume=True, progress=False)
    with pytest.raises(ValueError, match="tile_size"):
        encode_dataset(model, images, tmp_path / "bad", tile_size=2, progress=False)
