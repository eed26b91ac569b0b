"""Mistakes a user can fix, told as one line, and the one place that tells them.

A :class:`UserError` (a data record naming its file and line, a config key, a missing model, a
server that refuses the key) ends a command with its message on the last line of stderr and
exit status 2, with no traceback: the traceback would show our code, and the fix is in the
user's input. Any other exception is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1``
shows the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

USAGE_EXIT = 2  # as argparse and most Unix tools exit for a usage error


class UserError(Exception):
    """A mistake in what the user gave; its message names the key, file:line or server."""


class ConfigError(UserError, ValueError):
    """A config value that breaks a rule (the message names the key and what it must be)."""


class ModelNotFound(UserError, FileNotFoundError):
    """The model the config names cannot be found or read."""


class MissingPackage(UserError, ModuleNotFoundError):
    """A package the config needs is not installed (the message gives the install command)."""


def full_errors() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``, as Hydra reads it)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def told_as_one_line() -> Iterator[None]:
    """Turn a :class:`UserError` raised inside into ``error: <message>`` and exit status 2."""
    try:
        yield
    except UserError as error:
        if full_errors():
            raise
        sys.stdout.flush()
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_EXIT) from None


def one_line(error: BaseException) -> str:
    """The error's message with its lines joined, so that it reads as one line."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())
