"""Submitit batches in which a job that dies fails alone, with why: the signal or SLURM's state.

hydra-submitit-launcher's own `launch` raises at the first job without a result: the results of
the others are lost and, if still running, they run on unwatched. This submits the batch the same
way and collects every job on its own.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

from ._parent import KILLED

log = logging.getLogger(__name__)
PARENT = "hydra_plugins.recsys_optuna_sweeper._parent"
SLURM_ERRORS = ("srun: error:", "slurmstepd: error:")  # e.g. "task 0: Killed", "oom_kill event"
SLURM_HINTS = {
    "OUT_OF_MEMORY": ": out of memory, raise hydra.launcher.mem_gb or lower the batch size",
    "TIMEOUT": ": past hydra.launcher.timeout_min",
    "NODE_FAIL": ": its node failed",
}


def is_submitit(launcher: Any) -> bool:
    """Whether the launcher is hydra-submitit-launcher's (local or SLURM)."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    return isinstance(launcher, BaseSubmititLauncher)


def launch_each(
    launcher: Any, job_overrides: Sequence[Sequence[str]], first: int
) -> list[JobReturn | str]:
    """Submit the batch as the launcher's `launch` does; each job's return, or why it has none."""
    jobs = _submit(_executor(launcher), launcher, job_overrides, first)
    return [_result(job) for job in jobs]


def _executor(launcher: Any) -> Any:
    """The launcher's executor, its local tasks run under `_parent` to learn how they ended."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    kind = launcher._EXECUTOR
    params = dict(launcher.params)
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
    if kind == "local":
        init["local_python"] = f"{shlex.quote(sys.executable)} -m {PARENT}"
    executor = submitit.AutoExecutor(cluster=kind, **init)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in shared else f"{kind}_{k}": v for k, v in params.items()}
    )
    return executor


def _submit(
    executor: Any, launcher: Any, job_overrides: Sequence[Sequence[str]], first: int
) -> list[Any]:
    """The batch's jobs, each running the launcher on its overrides in the sweep dir."""
    sweep = launcher.config.hydra.sweep
    log.info("Submitit '%s' sweep output dir : %s", launcher._EXECUTOR, sweep.dir)
    Path(str(sweep.dir)).mkdir(parents=True, exist_ok=True)
    if "mode" in sweep:
        os.chmod(str(sweep.dir), mode=int(str(sweep.mode), 8))
    numbers = range(first, first + len(job_overrides))
    for number, overrides in zip(numbers, job_overrides, strict=True):
        log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
    n, state = len(job_overrides), Singleton.get_state()
    return executor.map_array(
        launcher,
        [list(o) for o in job_overrides],
        ["hydra.sweep.dir"] * n,
        list(numbers),
        [f"job_id_for_{i}" for i in numbers],
        [state] * n,
    )


def _result(job: Any) -> JobReturn | str:
    """The job's JobReturn, or in words why it left none, naming its log."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    job.wait()
    where = f"; its log: {job.paths.stderr}"
    killed = None if job.paths.result_pickle.exists() else _logged(job, (KILLED,))
    if killed:
        return killed.removeprefix("recsys: ") + where
    try:
        return job.results()[0]
    except FailedJobError as e:  # raised outside the trial, by Hydra or submitit in the job
        return f"job {job.job_id} failed outside the trial: {_last_line(e)}" + where
    except UncompletedJobError:
        state = str(job.state)
        hint = next((h for s, h in SLURM_HINTS.items() if state.startswith(s)), "")
        said = _logged(job, SLURM_ERRORS)
        return f"job {job.job_id} ended without a result (state {state}{hint})" + (
            f": {said}{where}" if said else where
        )


def _logged(job: Any, starts: tuple[str, ...]) -> str | None:
    """The last line of a task's error log that starts with one of `starts`, if any."""
    for task in range(job.num_tasks):
        path = job.task(task).paths.stderr
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        found = [line for line in lines if line.startswith(starts)]
        if found:
            return found[-1]
    return None


def _last_line(error: Exception) -> str:
    """The exception that ended a job: the last line of the trace its FailedJobError carries
    between two dashed rules."""
    parts = str(error).split("\n----------------------\n")
    lines = (parts[1] if len(parts) > 2 else str(error)).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
