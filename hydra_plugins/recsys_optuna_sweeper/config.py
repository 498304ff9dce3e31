"""The sweeper's settings (`hydra/sweeper=recsys_optuna`), validated by Hydra like any config."""
# (no `from __future__ import annotations`: Hydra imports plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations)

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    """One Optuna study run as a Hydra multirun; each trial is a job of the selected launcher."""

    _target_: str = "hydra_plugins.recsys_optuna_sweeper.sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds sampler and pruner itself (seeded, validated)
    study_name: str = "sweep"
    # null: a journal file `optuna.journal` in hydra.sweep.dir; or a file path (journal), or an
    # RDB URL such as sqlite:///path/study.db
    storage: str | None = None
    # maximize | minimize, or a list of them for a multi-objective study (the job returns a tuple)
    direction: Any = "maximize"
    # finished (complete or pruned) trials the study ends with, counting earlier sessions
    n_trials: int = 20
    # trials launched together per batch through the launcher
    n_jobs: int = 1
    # failed trials (exception, NaN) this session tolerates before it stops
    max_failures: int = 3
    sampler: Any = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0}
    )
    # null: no pruning; else e.g. {_target_: optuna.pruners.MedianPruner, n_warmup_steps: 400000}
    pruner: Any = None
    # the search space: config key -> override grammar (interval, tag(log, ...), choice, range)
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="recsys_optuna", node=OptunaSweeperConf, provider="recsys"
)
