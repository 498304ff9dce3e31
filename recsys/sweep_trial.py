"""A job's side of an Optuna sweep: which trial it runs, to report evaluations and learn to prune.

The sweeper (hydra_plugins/recsys_optuna_sweeper) names the trial through Hydra's
`hydra.job.env_set`, so it reaches the job in this process (basic launcher) and in submitit's
processes on this machine or a SLURM node alike. The sweeper imports this module; recsys never
imports the sweeper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from recsys.errors import write_failed

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

STORAGE_ENV = "RECSYS_OPTUNA_STORAGE"
STUDY_ENV = "RECSYS_OPTUNA_STUDY"
TRIAL_ENV = "RECSYS_OPTUNA_TRIAL_ID"


def job_overrides(storage: str, study: str, trial_id: int) -> list[str]:
    """The Hydra overrides that tell one job which trial of which study it runs."""
    values = {STORAGE_ENV: storage, STUDY_ENV: study, TRIAL_ENV: str(trial_id)}
    return [f"++hydra.job.env_set.{k}={_quoted(v)}" for k, v in values.items()]


def _quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def storage_of(spec: str) -> BaseStorage:
    """The study storage a spec names: a journal file path, or an RDB URL such as sqlite."""
    from optuna.storages import JournalStorage, RDBStorage

    if "://" not in spec:
        return JournalStorage(WholeRecordJournal(spec))
    return RDBStorage(spec)


class WholeRecordJournal(JournalFileBackend):
    """A journal file whose appends land whole or not at all: a failed write (full disk) is cut
    back off, so the records before it stay readable and a later append cannot merge into it."""

    def __init__(self, path: str) -> None:
        self.path, self.lock = path, JournalFileSymlinkLock(path)
        super().__init__(path, lock_obj=self.lock)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        self.lock.acquire()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, end)
                raise write_failed(
                    "the study",
                    Path(self.path),
                    e,
                    "its complete records are kept",
                    "free space there, then run the same command again: it resumes the study",
                ) from None
            finally:
                os.close(fd)
        finally:
            self.lock.release()


def current_trial() -> optuna.Trial | None:
    """The trial this job runs, with the study's configured pruner; None outside our sweeps."""
    trial_id = os.environ.get(TRIAL_ENV)
    if trial_id is None:
        return None
    import optuna
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    pruner_cfg = HydraConfig.get().sweeper.get("pruner")
    study = optuna.load_study(
        study_name=os.environ[STUDY_ENV],
        storage=storage_of(os.environ[STORAGE_ENV]),
        pruner=instantiate(pruner_cfg) if pruner_cfg else optuna.pruners.NopPruner(),
    )
    return optuna.Trial(study, int(trial_id))
