"""The exceptions rmconvert raises and the exit codes the CLI maps them to."""

from __future__ import annotations

import enum
from pathlib import Path


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``rmconvert`` command."""

    OK = 0
    ERROR = 1  # bad input, invalid checkpoint, failed conversion
    USAGE = 2  # wrong command line
    INTERRUPTED = 130  # SIGINT / SIGTERM


class RMConvertError(Exception):
    """A problem the user can fix, reported as one line: ``<file>: <problem>``."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


class CheckpointError(RMConvertError):
    """The source or checked checkpoint is unreadable, malformed or inconsistent."""


class OutputError(RMConvertError):
    """The destination cannot be written as asked."""


class PluginError(RMConvertError):
    """A plugin failed to load, or two plugins claim the same thing."""


class UsageError(RMConvertError):
    """An option value that no plugin or mode accepts."""

    exit_code = ExitCode.USAGE


class Interrupted(RMConvertError):
    """The run was stopped by SIGINT or SIGTERM; nothing was left behind."""

    exit_code = ExitCode.INTERRUPTED


def summary(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: ``Type: the first line of its message`` (at most ``limit`` characters of it)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:limit]}"
