"""Errors a user can cause and fix; the entry points print them as one line."""

from __future__ import annotations

import errno
import logging
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RecsysError(Exception):
    """A problem with the user's config or data, with the fix in its message."""


class ConfigError(RecsysError):
    """A config value that is missing, mistyped or out of range."""


class DataError(RecsysError):
    """Data that does not match the configured feature spec."""


class S3Unavailable(RecsysError):
    """An S3 endpoint unreachable (or failing) mid-run for longer than data.s3.outage_budget_s."""


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


class WriteFailed(RecsysError):
    """A file of the run (checkpoint, model.pt, metrics.json) could not be written whole."""


_FILLED = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file size limit (ulimit -f) was reached",
    errno.EDQUOT: "the disk quota is exceeded",
}


def _errno(error: BaseException) -> int | None:
    """The errno of an OSError in error, its causes, or (DCP) its ranks' failures."""
    seen: list[BaseException] = [error]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError) and e.errno:
            return e.errno
        seen += [x for x in (e.__cause__, e.__context__) if x is not None]
        for failure in (getattr(e, "failures", None) or {}).values():  # CheckpointException
            seen.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def is_write_failure(error: BaseException) -> bool:
    """An OSError, or torch.save's RuntimeError for a failed write ("file write failed",
    "unexpected pos" from its zip writer)."""
    text = str(error).lower()
    return (
        isinstance(error, OSError)
        or any(k in text for k in ("writ", "unexpected pos", "inline_container"))
        or _errno(error) is not None
    )


RERUN = "free space there (or set hydra.run.dir to another disk), then run the same command again"


def write_failed(
    what: str, path: Path, error: BaseException, kept: str, fix: str = RERUN
) -> WriteFailed:
    """One line: what could not be written where, what filled, what is kept and the fix."""
    reason = _FILLED.get(_errno(error) or 0)
    if reason is None and resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        reason = "the file size limit (ulimit -f) was reached, or the disk is full"
    if reason is None:
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
    return WriteFailed(
        f"writing {what} to {path} failed: {reason}; {kept}, the partial one removed: {fix}"
    )
