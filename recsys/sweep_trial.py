"""A job's side of an Optuna sweep: which trial it runs, to report evaluations and learn to prune.

The sweeper (hydra_plugins/recsys_optuna_sweeper) names the trial through Hydra's
`hydra.job.env_set`, so it reaches the job in this process (basic launcher) and in submitit's
processes on this machine or a SLURM node alike. The sweeper imports this module; recsys never
imports the sweeper.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

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
    from optuna.storages.journal import JournalFileBackend

    if "://" not in spec:
        return JournalStorage(JournalFileBackend(spec))
    return RDBStorage(spec)


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
