"""Errors a user can fix. The CLI prints any `UserError` as one line (the problem and the fix) and exits 2;
anything else is a bug or an environment failure, printed as one line with a hint to rerun with --debug.

Each class also derives from the builtin a caller would expect (`ValueError`, `FileNotFoundError`, ...), so
library code that catches those keeps working.
"""
from __future__ import annotations

import re


class UserError(Exception):
    """Bad input or a missing file: the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value (from config.yaml or --set) has the wrong type or range, or names something unknown."""


class UnknownNameError(ConfigError, KeyError):
    """A config key, dataset or other name that does not exist (a KeyError to callers that look names up)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DataError(UserError):
    """A dataset, data_root, image or weights file the run reads is missing or unreadable."""


class MissingDataError(DataError, FileNotFoundError):
    """A folder or file the run reads does not exist."""


class InvalidDataError(DataError, ValueError):
    """A data file exists but its content is wrong (a malformed split file, an undecodable image, ...)."""


class OutputWriteError(UserError, OSError):
    """A run could not write one of its outputs (disk full, read-only folder, ...); nothing half-written is left."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def one_line(message: str) -> str:
    """A multi-line message (e.g. with an expected folder layout) flattened to one line."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return re.sub(r"\s+", " ", " | ".join(parts))
