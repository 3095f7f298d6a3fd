"""Durable file writes shared by training, encoding, reports and pictures: work is never lost
to a half-written file, two processes never share one job's directory, and damaged files are
found rather than read."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Iterator

from pyvae.errors import AlreadyRunningError, IntegrityError

LOCK_NAME = ".lock"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or directory's contents (a directory: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsync'ed temporary file and ``os.replace``: readers
    see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, path, "writing") from exc
    fsync_path(path.parent)
    return path


def os_error(exc: OSError, path: str | os.PathLike, doing: str) -> OSError:
    """``exc`` again, as the same OSError subclass, with a message that names ``path``, what was
    being done and the cause (e.g. "no space left on device")."""
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOSPC:
        cause = "no space left on device"
    new = type(exc)(exc.errno, f"{doing} {os.fspath(path)!r} failed: {cause}")
    new.filename = os.fspath(path)
    return new


def preallocate(path: str | os.PathLike, nbytes: int) -> None:
    """Reserve ``nbytes`` on the disk for the file ``path`` (created if missing) before it is
    memory-mapped, so that a full disk is an OSError naming the file now rather than a SIGBUS
    (Bus error) when a page of the map is first written."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if nbytes > 0:
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        raise os_error(exc, path, f"reserving {nbytes} bytes for") from exc
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """The hex SHA-256 of a file's bytes (read in chunks; memory stays small)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str = "file") -> None:
    """Raise :class:`IntegrityError` naming ``path`` if its SHA-256 is not ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{what} {os.fspath(path)!r} is damaged: its SHA-256 is "
                             f"{actual[:16]}…, but {expected[:16]}… was recorded when it was "
                             f"written")


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str = "directory") -> Iterator[Path]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``directory/.lock`` for the body.

    A second process asking for the same lock gets :class:`AlreadyRunningError` at once, naming
    the directory and the process id that holds it. The lock goes with the process, so a killed
    job leaves nothing to clean up. ``directory`` is created if missing."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            holder = f"process {pid}" if pid else "another process"
            raise AlreadyRunningError(
                f"{what} {os.fspath(directory)!r} is in use by {holder}: wait for it to "
                f"finish (or stop it) before starting another job on it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the flock
