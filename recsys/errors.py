"""Errors a user can cause and fix; the entry points print them as one line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class RecsysError(Exception):
    """A problem with the user's config or data, with the fix in its message."""


class ConfigError(RecsysError):
    """A config value that is missing, mistyped or out of range."""


class DataError(RecsysError):
    """Data that does not match the configured feature spec."""


EXIT_USER_ERROR = 2


@contextmanager
def exit_on_user_error(reraise: bool = False) -> Iterator[None]:
    """An entry point's work: a user error ends the process with one line naming the fix (exit
    status 2), or is raised on where `reraise` (a sweep's trial: the sweeper records it)."""
    try:
        yield
    except RecsysError as e:
        if reraise:
            raise
        logging.getLogger("recsys").error("error: %s", e)
        raise SystemExit(EXIT_USER_ERROR) from None
