"""Faults of training (issue 14): a full disk while checkpointing, a resume whose checkpoint is
missing or damaged, two processes on one run directory, the metrics window across a resume,
and the checkpoints' checksums."""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pyvae import _io
from pyvae.errors import AlreadyRunningError, IntegrityError, UserError
from pyvae.train import (MissingCheckpointError, TrainingDiverged, fit, load_checkpoint,
                         load_model, read_metrics, save_checkpoint)
from conftest import run_torchrun
from test_train import TESTS_DIR, ToyAE, ToyImages, ToyVAE, assert_same_parameters, parameters

QUIET = dict(progress=False, log_every=1)


def checkpoints(run_dir):
    return sorted(p for p in os.listdir(run_dir) if p.startswith(".checkpoint-"))


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---- 3: a full disk while checkpointing ------------------------------------------------------

def test_full_disk_while_checkpointing_names_the_file_and_keeps_the_last_checkpoint(small_disk):
    disk = small_disk(1 << 20)
    run_dir = disk / "run"
    data = ToyImages(n=16, size=32)  # ToyVAE(image_size=32): 28 KB of weights
    run = dict(steps=6, batch_size=4, lr=1e-2, checkpoint_every=None, **QUIET)
    torch.manual_seed(0)
    fit(ToyVAE(image_size=32), data, out_dir=run_dir, stop_after=2, **run)
    saved = parameters(load_model(run_dir))
    # leave 16 KiB: enough for the logs and config.json, not for the next checkpoint
    filler = disk / "filler"
    _io.preallocate(filler, shutil.disk_usage(disk).free - (16 << 10))

    with pytest.raises(OSError) as info:
        fit(ToyVAE(image_size=32), data, out_dir=run_dir, resume=True, **run)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "no space left on device" in message
    assert ".checkpoint-00000006-" in message and "model.safetensors" in message
    assert "iostream" not in message
    # the step-2 checkpoint is intact and loadable, no partial one is left, the log is kept
    assert checkpoints(run_dir) == [os.readlink(run_dir / "checkpoint")]
    assert load_checkpoint(run_dir)["step"] == 2
    assert_same_parameters(parameters(load_model(run_dir)), saved)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))

    filler.unlink()  # with space again, the run resumes from step 2 and finishes
    result = fit(ToyVAE(image_size=32), data, out_dir=run_dir, resume=True, **run)
    assert result.step == 6 and load_checkpoint(run_dir)["step"] == 6
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))


def test_full_disk_while_writing_the_training_state_names_state_pt(small_disk):
    disk = small_disk(256 << 10)
    torch.manual_seed(0)
    model = ToyAE()
    save_checkpoint(disk, model, {"step": 1})
    big = {"step": 2, "big": torch.randn(128 << 10)}  # 512 KB: torch.save's zip writer fails
    with pytest.raises(OSError) as info:
        save_checkpoint(disk, model, big)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "no space left on device" in message
    assert info.value.filename.endswith("state.pt") and info.value.filename in message
    assert load_checkpoint(disk)["step"] == 1 and len(checkpoints(disk)) == 1


# ---- 4: resume without a usable checkpoint ---------------------------------------------------

def stopped_run(run_dir, checkpoint_every=None):
    """A run of 6 steps stopped at step 4 (a checkpoint at step 4); returns its files' bytes."""
    torch.manual_seed(0)
    fit(ToyVAE(), ToyImages(n=16), out_dir=run_dir, steps=6, stop_after=4, batch_size=4,
        checkpoint_every=checkpoint_every, **QUIET)
    return {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "config.json")}


def resume(run_dir, checkpoint_every=None):
    return fit(ToyVAE(), ToyImages(n=16), out_dir=run_dir, steps=6, batch_size=4, resume=True,
               checkpoint_every=checkpoint_every, **QUIET)


def damage_dangling_link(run_dir):
    shutil.rmtree(os.path.realpath(run_dir / "checkpoint"))
    return "checkpoint"


def damage_missing_state(run_dir):
    (run_dir / "checkpoint" / "state.pt").unlink()
    return "state.pt"


def damage_truncated_state(run_dir):
    state = run_dir / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:300])
    return "state.pt"


@pytest.mark.parametrize("damage, error", [(damage_dangling_link, MissingCheckpointError),
                                           (damage_missing_state, MissingCheckpointError),
                                           (damage_truncated_state, IntegrityError)])
def test_resume_without_a_usable_checkpoint_is_an_error_and_keeps_the_log(tmp_path, damage,
                                                                          error):
    run_dir = tmp_path / "run"
    files = stopped_run(run_dir)
    name = damage(run_dir)
    with pytest.raises(error) as info:
        resume(run_dir)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert str(run_dir) in message and "metrics.jsonl" in message and name in message
    assert {name: (run_dir / name).read_bytes() for name in files} == files


def test_resume_with_the_link_removed_after_checkpoints_is_an_error(tmp_path):
    run_dir = tmp_path / "run"
    files = stopped_run(run_dir, checkpoint_every=2)
    (run_dir / "checkpoint").unlink()  # the records of steps 3 and 4 follow the step-2 one
    with pytest.raises(MissingCheckpointError, match="metrics.jsonl"):
        resume(run_dir, checkpoint_every=2)
    assert {name: (run_dir / name).read_bytes() for name in files} == files


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 3.5}\n')
    assert resume(run_dir, checkpoint_every=2).step == 6
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))


def test_a_truncated_state_without_manifest_names_the_file(tmp_path):
    stopped_run(tmp_path)
    (tmp_path / "checkpoint" / "manifest.json").unlink()  # as written before manifests
    damage_truncated_state(tmp_path)
    with pytest.raises(IntegrityError, match=r"state\.pt' is damaged or truncated"):
        load_checkpoint(tmp_path)


# ---- 5: two processes on one run directory ---------------------------------------------------

def test_a_second_fit_on_a_busy_run_directory_is_refused(tmp_path):
    with _io.exclusive_lock(tmp_path, "run directory"):
        with pytest.raises(AlreadyRunningError) as info:
            fit(ToyAE(), ToyImages(n=8), out_dir=tmp_path, steps=2, batch_size=4, **QUIET)
    assert str(tmp_path) in str(info.value) and f"process {os.getpid()}" in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was touched
    fit(ToyAE(), ToyImages(n=8), out_dir=tmp_path, steps=2, batch_size=4, **QUIET)  # released


HOLD_LOCK = """
import sys
from pyvae import _io
with _io.exclusive_lock(sys.argv[1], "run directory"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_fit_in_another_process_holds_the_run_directory(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(AlreadyRunningError, match=f"in use by process {holder.pid}"):
            fit(ToyAE(), ToyImages(n=8), out_dir=tmp_path, steps=2, batch_size=4, **QUIET)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    fit(ToyAE(), ToyImages(n=8), out_dir=tmp_path, steps=2, batch_size=4, **QUIET)


BUSY_DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import ToyAE, ToyImages
from pyvae.train import fit
fit(ToyAE(), ToyImages(n=16), out_dir=sys.argv[1], steps=2, batch_size=4, progress=False)
"""


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_when_rank_0_cannot_lock(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(BUSY_DDP_SCRIPT.format(tests=TESTS_DIR))
    run_dir = tmp_path / "run"
    with _io.exclusive_lock(run_dir, "run directory"):
        status, output = run_torchrun(2, script, run_dir,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert status != 0
    assert "AlreadyRunningError" in output and "MainRankFailed" in output, output[-4000:]
    assert not (run_dir / "metrics.jsonl").exists()


# ---- 7: the metrics window across a resume ---------------------------------------------------

WINDOW_RUN = dict(steps=13, batch_size=4, lr=1e-2, log_every=5, checkpoint_every=3,
                  progress=False)  # checkpoints at 3, 6, 9, 12: inside the log windows


def assert_same_records(a, b):
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x.keys() - {"images_per_s"}:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)


def test_a_stopped_and_resumed_run_logs_the_records_of_an_uninterrupted_one(tmp_path):
    data = ToyImages(n=16)
    torch.manual_seed(0)
    fit(ToyVAE(), data, out_dir=tmp_path / "whole", **WINDOW_RUN)
    whole = read_metrics(tmp_path / "whole")
    assert [r["step"] for r in whole] == [5, 10, 13]

    torch.manual_seed(0)
    first = fit(ToyVAE(), data, out_dir=tmp_path / "parts", stop_after=7, **WINDOW_RUN)
    assert [r["step"] for r in read_metrics(tmp_path / "parts")] == [5]  # 6 and 7 are pending
    assert set(first.metrics) <= set(whole[0])
    assert first.metrics["loss"] != whole[0]["loss"]  # the means of steps 6 and 7
    fit(ToyVAE(), data, out_dir=tmp_path / "parts", resume=True, **WINDOW_RUN)
    assert_same_records(read_metrics(tmp_path / "parts"), whole)


def test_a_crashed_and_resumed_run_logs_the_records_of_an_uninterrupted_one(tmp_path):
    data = ToyImages(n=16)
    torch.manual_seed(0)
    fit(ToyVAE(), data, out_dir=tmp_path / "whole", **WINDOW_RUN)

    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged):  # step 8 fails: the last checkpoint is step 6's
        fit(ToyVAE(nan_at_call=8), data, out_dir=tmp_path / "parts", **WINDOW_RUN)
    assert load_checkpoint(tmp_path / "parts")["log_window"]["steps"] == 1  # step 6
    # the same config (the 7 steps left are the new model's calls 1 to 7: no NaN)
    fit(ToyVAE(nan_at_call=8), data, out_dir=tmp_path / "parts", resume=True, **WINDOW_RUN)
    assert_same_records(read_metrics(tmp_path / "parts"), read_metrics(tmp_path / "whole"))


# ---- 10: checksums of the checkpoint files ---------------------------------------------------

def test_the_manifest_records_every_file_checksum(tmp_path):
    stopped_run(tmp_path)
    directory = tmp_path / "checkpoint"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["step"] == 4
    assert manifest["sha256"] == {name: _io.sha256_file(directory / name)
                                  for name in ("model.safetensors", "model.json", "state.pt")}


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "model.json"])
def test_a_flipped_byte_is_found_on_load_and_on_resume(tmp_path, name):
    run_dir = tmp_path / "run"
    files = stopped_run(run_dir)
    path = run_dir / "checkpoint" / name
    flip_byte(path, path.stat().st_size - 2)  # the weights' last bytes are tensor data
    if name != "state.pt":
        with pytest.raises(IntegrityError, match="damaged") as info:
            load_model(run_dir)  # what `pyvae report` and `pyvae encode` read
        assert str(path) in str(info.value)
    with pytest.raises(IntegrityError, match="damaged") as info:
        load_checkpoint(run_dir)
    assert str(path) in str(info.value)
    with pytest.raises(IntegrityError) as info:
        resume(run_dir)
    assert str(path) in str(info.value) and str(run_dir) in str(info.value)
    assert {name: (run_dir / name).read_bytes() for name in files} == files
