"""Faults of the shared file helpers (pyvae._io): full disks, busy directories, damaged files."""
import errno
import os

import pytest

from pyvae import _io
from pyvae.errors import AlreadyRunningError, IntegrityError, UserError


def test_preallocate_on_a_full_disk_names_the_file(small_disk):
    disk = small_disk(1 << 20)
    target = disk / "features.npy"
    with pytest.raises(OSError) as info:
        _io.preallocate(target, 8 << 20)
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and "no space left on device" in str(info.value)


def test_preallocate_reserves_the_bytes(tmp_path):
    target = tmp_path / "a.bin"
    _io.preallocate(target, 12345)
    assert target.stat().st_size == 12345
    assert os.stat(target).st_blocks * 512 >= 12345  # really allocated, not a sparse hole


def test_write_text_atomic_on_a_full_disk_keeps_the_old_file(small_disk):
    disk = small_disk(1 << 20)
    target = disk / "manifest.json"
    target.write_text("old")
    with pytest.raises(OSError) as info:
        _io.write_text_atomic(target, "x" * (4 << 20))
    assert str(target) in str(info.value) and "no space left on device" in str(info.value)
    assert target.read_text() == "old"
    assert [p.name for p in disk.iterdir()] == ["manifest.json"]  # no temporary file left


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
    with _io.exclusive_lock(tmp_path, "run directory"):
        with pytest.raises(AlreadyRunningError) as info:
            with _io.exclusive_lock(tmp_path, "run directory"):
                pass
        message = str(info.value)
        assert str(tmp_path) in message and f"process {os.getpid()}" in message
        assert isinstance(info.value, UserError)
    with _io.exclusive_lock(tmp_path):  # released on exit
        pass


def test_verify_sha256_detects_one_flipped_byte(tmp_path):
    target = tmp_path / "w.bin"
    target.write_bytes(bytes(range(256)) * 10)
    digest = _io.sha256_file(target)
    _io.verify_sha256(target, digest)
    data = bytearray(target.read_bytes())
    data[1000] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="damaged"):
        _io.verify_sha256(target, digest, "weights")
