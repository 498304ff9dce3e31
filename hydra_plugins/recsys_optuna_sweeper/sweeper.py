"""The Hydra Sweeper plugin; the study logic is imported only when a sweep runs."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import OptunaSweeperConf


class OptunaSweeper(Sweeper):
    """Runs an Optuna study as a multirun; settings as in `config.OptunaSweeperConf`."""

    def __init__(self, **settings: Any) -> None:
        self.settings = OptunaSweeperConf(**settings)
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from recsys.errors import WriteFailed

        from ._study import run_study
        from .errors import SweepError

        assert self.hydra_context is not None and self.config is not None
        try:
            return run_study(
                self.settings,
                arguments,
                self.config,
                self.hydra_context.config_loader,
                self.launcher,
            )
        except WriteFailed as e:  # a full disk under the study file, best.yaml or multirun.yaml
            raise SweepError(str(e)) from None
