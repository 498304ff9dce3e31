"""Where a study lives: a journal file (default, in the sweep dir) or an RDB URL such as sqlite."""

from __future__ import annotations

from pathlib import Path

from optuna.storages import BaseStorage

from recsys.sweep_trial import storage_of

from .errors import SweepError

JOURNAL_NAME = "optuna.journal"


def storage_spec(storage: str | None, sweep_dir: str) -> str:
    """The storage as one string a job can open too: an absolute journal path or an RDB URL."""
    if storage is None:
        return str((Path(sweep_dir) / JOURNAL_NAME).resolve())
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def open_storage(spec: str) -> BaseStorage:
    """Open (creating if needed) the storage named by `storage_spec`; one line if it can't be."""
    path = _file_of(spec)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a"):
                pass
        except OSError as e:
            raise SweepError(
                f"hydra.sweeper.storage: cannot write the study file {path} ({e.strerror}): "
                "choose a writable place, e.g. hydra.sweeper.storage=null (the sweep dir) or "
                "hydra.sweep.dir=<a writable dir>"
            ) from None
    if "://" not in spec:
        return storage_of(spec)  # a journal file, found writable above
    try:
        return storage_of(spec)
    except Exception as e:  # SQLAlchemy's errors for a bad URL, driver or server
        first = str(e).strip().splitlines()[0]
        raise SweepError(
            f"hydra.sweeper.storage={spec}: cannot open it ({first}): give a reachable RDB URL "
            "such as sqlite:///path/study.db, a journal file path, or null"
        ) from None


def _file_of(spec: str) -> Path | None:
    """The local file a storage writes to, when it is one (journal file or sqlite)."""
    if "://" not in spec:
        return Path(spec)
    if spec.startswith("sqlite:///"):
        return Path(spec.removeprefix("sqlite:///"))
    return None
