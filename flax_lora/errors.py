"""One user-error type: problems with the user's input that the message explains, printed by every CLI as one line.

Hub lookups (models, datasets) fail as one too: `hub_download` turns the libraries' many exception types into it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
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


def check_output_folder(path: str, what: str) -> None:
    """Refuse an output folder that is a file or cannot be created or written, before any slow work starts.

    `what` names the flag and its value in the message, e.g. "--output_dir runs/a".
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest ancestor that exists decides whether it can be created
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {existing} is not writable (permission denied)")


# ------------------------------------------------------------------------------------ Hugging Face hub

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")


def is_hub_id(name: str) -> bool:
    """True for an `owner/name` hub id; anything else (and an id whose owner is a local folder) is a local path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not os.path.isdir(name.split("/")[0])


def _hub_failure(e: Exception) -> str | None:
    """Why a hub lookup failed, in words (the libraries' messages repeat URLs); None when it is not a lookup failure."""
    from huggingface_hub import constants, errors

    if isinstance(e, errors.OfflineModeIsEnabled) or (constants.HF_HUB_OFFLINE and isinstance(e, OSError)):
        return "HF_HUB_OFFLINE is set, so nothing is downloaded"
    if isinstance(e, errors.GatedRepoError):
        return "it is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
    if isinstance(e, errors.RevisionNotFoundError):
        return "it has no such --revision"
    if isinstance(e, errors.RepositoryNotFoundError) or type(e).__name__ == "DatasetNotFoundError":
        return "the hub has no such repository (a private one needs `hf auth login`)"
    if isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__ or "Timeout" in type(e).__name__:
        return f"the hub cannot be reached, no network? ({type(e).__name__}: {str(e)[:200]})"
    return None


@contextlib.contextmanager
def hub_download(kind: str, name: str, fix: str) -> Iterator[None]:
    """Around a hub lookup or download: a failure becomes one UserError naming `name`, the reason and `fix`.

    huggingface_hub's warnings are muted meanwhile: its retry loop prints about 20 lines before it gives up.
    """
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # offline, unknown, gated or private repo: each library raises its own types
        reason = _hub_failure(e)
        if reason is None:  # found, but e.g. its files do not build a dataset
            raise UserError(f"hub {kind} {name!r} could not be loaded ({type(e).__name__}: {str(e)[:300]})") from e
        raise UserError(f"{name!r} is neither a local folder nor a reachable hub {kind} id: {reason}. {fix}") from e
    finally:
        hub_logger.setLevel(level)
