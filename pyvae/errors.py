"""The errors pyvae raises for problems in what the user gave it (arguments, files, a busy run
directory, a damaged checkpoint or store). The ``pyvae`` command line prints these as one line
and exits with status 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Base class: the input, not pyvae, is at fault; the message says what to change."""


class AlreadyRunningError(UserError, RuntimeError):
    """Another process holds the exclusive lock of a run directory or feature store."""


class IntegrityError(UserError, ValueError):
    """A file's bytes do not match the checksum or length recorded when it was written."""
