"""A tiny Hydra app for the sweeper's own tests: a fast objective with ways to fail and prune."""

import math
import os
import resource
import signal
from pathlib import Path

import hydra
import optuna
from omegaconf import DictConfig

from recsys.sweep_trial import current_trial


def exceed_a_memory_limit() -> None:
    """Limit this process's memory (RLIMIT_AS) to 64 MiB above its size, then allocate past it."""
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), hard))
    bytearray(128 << 20)


@hydra.main(version_base="1.3", config_path=".", config_name="app")
def main(cfg: DictConfig) -> float | tuple[float, float]:
    if cfg.crash:
        raise RuntimeError("crashed on purpose")
    if cfg.fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.fault == "memory":
        exceed_a_memory_limit()
    value = (cfg.x - 2) ** 2 + cfg.y
    trial = current_trial()
    for step in range(cfg.report_steps):
        trial.report(value + 1 / (step + 1), step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    if cfg.x > cfg.nan_above:
        return math.nan
    return (value, abs(cfg.x)) if cfg.two_objectives else value


if __name__ == "__main__":
    main()
