"""One user-error type: problems with the user's input that the message explains, printed by every CLI as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A flag, file, model or dataset that cannot work, with a message naming it and what was expected."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ExistingOutputError(UserError, FileExistsError):
    """An output that would be overwritten (e.g. a run's checkpoints)."""


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run a CLI's work; a UserError ends the process with `error: <message>` (exit status 1), no traceback."""
    try:
        return fn()
    except UserError as e:
        sys.exit(f"error: {e}")
