"""The error tree. Every error carries the file or tensor it is about; the CLI maps classes to exit codes."""
from __future__ import annotations


class CkptctlError(Exception):
    """Base class. `exit_code` follows cmp(1): 1 differences, 2 bad input, 3 internal/worker failure."""

    exit_code = 3


class BadInput(CkptctlError):
    """The user's input cannot be used: missing/truncated files, inconsistent shapes, bad layouts, unknown keys."""

    exit_code = 2


class UnknownKey(BadInput):
    def __init__(self, key: str, where: str = ""):
        super().__init__(f"unknown parameter name {key!r}" + (f" in {where}" if where else "")
                         + ": no sharding rule knows it")
        self.key = key


class LayoutError(BadInput):
    pass


class WorkerFailure(CkptctlError):
    exit_code = 3
