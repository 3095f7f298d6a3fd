"""Issue 14, encoding: a truncated or damaged store is never trusted, a full disk is an error
naming the file (not a Bus error), one job per store, and decompression bombs are refused
before anything is allocated."""
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyvae._io import exclusive_lock
from pyvae.cli import main as cli_main
from pyvae.data import ImageFolder, ImageTooLargeError, load_image
from pyvae.encode import encode_dataset, open_features
from pyvae.errors import AlreadyRunningError, IntegrityError
from pyvae.models import PatchVAE
from pyvae.train import save_checkpoint

N, SIZE = 10, 16


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PatchVAE(3, 1, 4, 3, hidden_channels=8, cond_channels=4, decoder_hidden=16).eval()


@pytest.fixture
def images():
    return torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def encode(model, source, out, **kwargs):
    kwargs = {"batch_size": 2, "chunk_size": 3, "dtype": "float32", "progress": False, **kwargs}
    return encode_dataset(model, source, out, **kwargs)


# ---- item 1: a truncated store ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["features.npy", "valid.npy"])
def test_truncated_array_is_refused_on_resume_and_open(model, images, tmp_path, name):
    out = tmp_path / "store"
    encode(model, images, out)
    path = out / name
    path.write_bytes(path.read_bytes()[:-5])  # the last rows cut off
    with pytest.raises(IntegrityError, match=f"{name}.*cut short"):
        encode(model, images, out, resume=True)
    with pytest.raises(IntegrityError, match=f"{name}.*cut short"):
        open_features(out)


# ---- item 10: damaged rows ---------------------------------------------------------------------

def test_flipped_byte_is_found_on_open_and_reencoded_on_resume(model, images, tmp_path):
    out = tmp_path / "store"
    encode(model, images, out)
    good = np.load(out / "features.npy").copy()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["chunk_sha256"]) == manifest["num_chunks"] == 4
    # Flip one byte inside row 4 (chunk 1) of the data, past the .npy header.
    data = bytearray((out / "features.npy").read_bytes())
    row_bytes = good[0].nbytes
    offset = len(data) - good.nbytes + 4 * row_bytes + 17
    data[offset] ^= 0x40
    (out / "features.npy").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"features\.npy.*rows 3\.\.5 \(chunk 1\)"):
        open_features(out)
    assert open_features(out, verify=False)[0].shape == good.shape  # the opt-out
    with pytest.warns(UserWarning, match=r"1 finished chunk.*\[1\]"):
        result = encode(model, images, out, resume=True)
    assert result.encoded == 3  # only the damaged chunk
    features, _ = open_features(out)
    np.testing.assert_array_equal(np.asarray(features), good)


# ---- item 3: a full disk -------------------------------------------------------------------------

def test_full_disk_is_an_error_naming_the_file_and_resume_continues(model, small_disk):
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    disk = small_disk(1 << 20)  # features: 8 x 4 x 62 x 62 float32 = 492 KB
    filler = disk / "filler"
    filler.write_bytes(b"x" * (700 << 10))
    out = disk / "store"
    with pytest.raises(OSError, match=r"features\.npy.*no space left on device"):
        encode(model, images, out)
    filler.unlink()  # room again: resume finishes the store
    encode(model, images, out, resume=True)
    features, _ = open_features(out)
    assert features.shape == (8, 4, 62, 62) and np.isfinite(features).all()


def test_full_disk_in_a_subprocess_is_not_a_bus_error(model, small_disk, tmp_path):
    # What used to kill the process with SIGBUS (rc 135) is now an exception, exit status 1.
    disk = small_disk(1 << 20)
    (disk / "filler").write_bytes(b"x" * (700 << 10))
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, model, {"step": 0})
    np.save(tmp_path / "images.npy", np.random.default_rng(0).random((8, 3, 64, 64),
                                                                      dtype=np.float32))
    code = textwrap.dedent("""
        import sys
        from pyvae.encode import encode_dataset
        from pyvae.train import load_model
        encode_dataset(load_model(sys.argv[1]), sys.argv[2], sys.argv[3], dtype="float32",
                       progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "images.npy"),
                           str(disk / "store")], capture_output=True, text=True, env=env)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "no space left on device" in done.stderr


# ---- item 5: one job per store ------------------------------------------------------------------

def test_second_job_on_a_store_is_refused(model, images, tmp_path):
    out = tmp_path / "store"
    with exclusive_lock(out, "feature store"):
        with pytest.raises(AlreadyRunningError, match=f"feature store.*store.*process {os.getpid()}"):
            encode(model, images, out)
    encode(model, images, out)  # released: the lock file itself does not get in the way
    encode(model, images, out, resume=True)


def test_lock_held_by_another_process(model, images, tmp_path):
    out = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pyvae._io import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunningError, match=f"process {holder.pid}"):
            encode(model, images, out)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


# ---- item 6: decompression bombs ----------------------------------------------------------------

def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny valid-looking PNG whose header (IHDR) declares width x height."""
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    start = 8 + 8  # PNG signature, then the IHDR chunk's length and type
    data[start:start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:start + 13]))
    data[start + 13:start + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_refused_from_its_header(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (SIZE, SIZE), (k, 2, 3)).save(folder / f"ok{k}.png")
    bomb = png_declaring(folder / "zbomb.png", 12000, 12000)
    assert bomb.stat().st_size < 1000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb) as image:
        assert image.size == (12000, 12000)  # Pillow believes the header, and only warns
    out = tmp_path / "store"
    with pytest.raises(ImageTooLargeError, match=r"zbomb\.png.*12000×12000.*max_pixels=67,108,864"):
        encode(model, folder, out)
    assert not (out / "features.npy").exists()  # nothing was allocated
    with pytest.raises(ImageTooLargeError, match="zbomb.png"):
        ImageFolder(folder)
    with pytest.raises(ImageTooLargeError, match="zbomb.png"):
        load_image(bomb)
    # A smaller limit refuses ordinary images too; None lifts it.
    with pytest.raises(ValueError, match=r"max_pixels=100"):
        encode(model, torch.rand(2, 3, SIZE, SIZE), tmp_path / "other", max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels must be a positive int or None"):
        encode(model, torch.rand(2, 3, SIZE, SIZE), tmp_path / "other", max_pixels=0)
    assert len(ImageFolder(folder, max_pixels=None)) == 3  # no limit: the header is accepted


def test_cli_max_pixels(model, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, model, {"step": 0})
    folder = tmp_path / "images"
    folder.mkdir()
    png_declaring(folder / "bomb.png", 12000, 12000)
    status = cli_main(["encode", str(run), str(folder), str(tmp_path / "store"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bomb.png" in err and "--max-pixels" in err
    for k in range(2):
        Image.new("RGB", (SIZE, SIZE), (k, 2, 3)).save(folder / f"ok{k}.png")
    (folder / "bomb.png").unlink()
    status = cli_main(["encode", str(run), str(folder), str(tmp_path / "store"), "--no-progress",
                       "--max-pixels", "100"])
    assert status == 2 and "max_pixels=100" in capsys.readouterr().err
