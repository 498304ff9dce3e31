"""The sweep loop: open or resume the study, ask a batch of trials, launch it, tell outcomes."""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.config_loader import ConfigLoader
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from recsys.errors import RecsysError
from recsys.files import write_text
from recsys.sweep_trial import job_overrides

from ._results import shown, write_results
from ._search_space import SearchSpace
from ._storage import open_storage, storage_spec
from ._submitit import is_submitit, launch_each
from .config import OptunaSweeperConf
from .errors import SweepError

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class Outcome:
    """How one trial ended, as the study records it."""

    state: TrialState
    values: list[float] | None = None
    reason: str = ""


def outcome(ret: JobReturn | str, n_objectives: int) -> Outcome:
    """A job's return (or why it has none) read as a trial outcome: values, pruned, or failed
    with the reason."""
    if isinstance(ret, str):
        return Outcome(TrialState.FAIL, reason=ret)
    if ret.status is not JobStatus.COMPLETED:
        error = ret._return_value  # the exception the trial's job raised, carried back by Hydra
        if isinstance(error, optuna.TrialPruned):
            return Outcome(TrialState.PRUNED)
        text = str(error) or ("out of memory" if isinstance(error, MemoryError) else "")
        return Outcome(TrialState.FAIL, reason=f"{type(error).__name__}: {text}")
    value = ret.return_value
    try:
        values = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
    except (TypeError, ValueError):
        return Outcome(TrialState.FAIL, reason=f"returned {value!r}, not a number or tuple")
    if len(values) != n_objectives:
        return Outcome(
            TrialState.FAIL,
            reason=f"returned {len(values)} values for {n_objectives} study directions: make "
            "the job return one value per hydra.sweeper.direction",
        )
    if not all(math.isfinite(v) for v in values):
        return Outcome(TrialState.FAIL, reason=f"returned {values}, not finite")
    return Outcome(TrialState.COMPLETE, values)


def _directions(direction: Any) -> list[str]:
    directions = list(direction) if OmegaConf.is_list(direction) else [direction]
    bad = [d for d in directions if d not in ("maximize", "minimize")]
    if bad or not directions:
        raise SweepError(
            f"hydra.sweeper.direction={direction} is not maximize/minimize or a list of them: "
            "e.g. direction=maximize, or direction=[maximize,minimize] for two objectives"
        )
    return directions


def _build(key: str, cfg: Any, **kwargs: Any) -> Any:
    """A sampler or pruner from its `_target_` config, or one clear error."""
    try:
        return instantiate(cfg, **kwargs)
    except Exception as e:
        cause = e.__cause__ or e
        raise SweepError(
            f"hydra.sweeper.{key} cannot be built ({type(cause).__name__}: {cause}): give "
            f"_target_ an optuna.{key}s class and its arguments"
        ) from None


def _check_counts(settings: OptunaSweeperConf) -> None:
    for key, least in (("n_trials", 1), ("n_jobs", 1), ("max_failures", 0)):
        if (value := getattr(settings, key)) < least:
            raise SweepError(f"hydra.sweeper.{key}={value} is out of range: use >= {least}")


def _open_study(settings: OptunaSweeperConf, spec: str, directions: list[str]) -> optuna.Study:
    """Create the study, or load it to resume: re-queue trials an interrupted session left."""
    name = settings.study_name
    pruner_cfg = settings.pruner
    pruner = _build("pruner", pruner_cfg) if pruner_cfg else optuna.pruners.NopPruner()
    if len(directions) > 1 and pruner_cfg:
        raise SweepError(
            "Optuna cannot prune a multi-objective study: set hydra.sweeper.pruner=null"
        )
    study = optuna.create_study(
        storage=open_storage(spec),
        study_name=name,
        directions=directions,
        pruner=pruner,
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise SweepError(
            f"study {name!r} in {spec} has directions {[d.name.lower() for d in study.directions]}"
            f", not {directions}: use another hydra.sweeper.study_name or the study's directions"
        )
    sampler_cfg = settings.sampler
    seed = sampler_cfg.get("seed") if sampler_cfg else None
    # a resumed, seeded sampler must not replay the random draws of the sessions before it
    extra = {"seed": seed + len(study.trials)} if seed is not None else {}
    if sampler_cfg:
        study.sampler = _build("sampler", sampler_cfg, **extra)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _requeue(study, trial)
    return study


def _requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Fail a trial an interrupted session left running and re-queue its parameters, once: a
    trial that kills the sweep's own process (basic launcher, out of memory) must not loop."""
    reason = "the sweep stopped while it ran (interrupted, or killed: out of memory?)"
    earlier = trial.user_attrs.get("retry_of")
    if earlier is None:
        reason += ": re-queued with the same parameters"
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    else:
        reason += (
            f", as when these parameters ran as trial {earlier}: not re-queued again "
            "(launcher=submitit_local runs each trial in a process of its own)"
        )
    optuna.Trial(study, trial._trial_id).set_user_attr("failure", reason)
    _tell(study, trial.number, state=TrialState.FAIL)
    log.warning("trial %d failed: %s", trial.number, reason)


def _tell(study: optuna.Study, trial: Any, values: Any = None, state: Any = None) -> bool:
    """Record an outcome; False once a grid or brute-force sampler has no points left."""
    try:
        study.tell(trial, values, state)
    except RuntimeError as e:  # such samplers call Study.stop(), valid only inside optimize()
        if "Study.stop" not in str(e):
            raise
        return False  # the outcome was stored all the same
    return True


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(
    settings: OptunaSweeperConf,
    arguments: list[str],
    config: DictConfig,
    loader: ConfigLoader,
    launcher: Launcher,
) -> optuna.Study:
    """Run trials until n_trials have finished (complete or pruned), resuming a stored study."""
    _check_counts(settings)
    directions = _directions(settings.direction)
    space = SearchSpace.parse(dict(settings.params or {}), arguments)
    space.check(config, loader)
    sweep_dir = Path(config.hydra.sweep.dir)
    spec = storage_spec(settings.storage, str(sweep_dir))
    study = _open_study(settings, spec, directions)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(config))
    tracked = _tracked(config, study, sweep_dir)
    try:
        _run_trials(settings, study, space, sweep_dir, spec, launcher, directions)
    except BaseException:
        if tracked is not None:
            tracked.close(study, failed=True)
        raise
    if tracked is not None:
        tracked.close(study, failed=False)
    return study


def _tracked(config: DictConfig, study: optuna.Study, sweep_dir: Path) -> Any:
    """The study's parent run in MLflow when the trials log there (logger=mlflow), else None."""
    if OmegaConf.select(config, "logger.mlflow") is None:
        return None
    from recsys.tracking import StudyRun

    try:
        return StudyRun.open(config, study, sweep_dir)
    except RecsysError as e:
        raise SweepError(str(e)) from None


def _run_trials(
    settings: OptunaSweeperConf,
    study: optuna.Study,
    space: SearchSpace,
    sweep_dir: Path,
    spec: str,
    launcher: Launcher,
    directions: list[str],
) -> None:
    """Launch batches of trials until n_trials have finished, telling the study each outcome."""
    n_trials, failures = settings.n_trials, 0
    log.info(
        "study %r (%s): %d of %d trials finished; storage %s (view: %s)",
        study.study_name,
        ", ".join(directions),
        _finished(study),
        n_trials,
        spec,
        dashboard(spec),
    )
    exhausted = False
    while not exhausted and (left := n_trials - _finished(study)) > 0:
        # asked together, a batch's trials have consecutive numbers: job i's dir is its trial's
        batch = [study.ask(space.distributions) for _ in range(min(settings.n_jobs, left))]
        jobs = [
            space.overrides(t.params) + job_overrides(spec, study.study_name, t._trial_id)
            for t in batch
        ]
        launched = time.time()
        for trial in batch:
            trial.set_user_attr("launched_at", launched)
        returns = _launch(launcher, jobs, batch[0].number)
        for trial, ret in zip(batch, returns, strict=True):
            result = outcome(ret, len(directions))
            if result.state is TrialState.FAIL:
                failures += 1
                trial.set_user_attr("failure", result.reason)
                log.warning("trial %d failed: %s", trial.number, result.reason)
            exhausted = not _tell(study, trial, result.values, result.state) or exhausted
            values = ", ".join(map(shown, result.values or []))
            log.info("trial %d %s %s", trial.number, result.state.name.lower(), values)
        if failures > settings.max_failures:
            log.info(write_results(study, space, sweep_dir, spec))
            raise SweepError(
                f"{failures} trials failed in this session, more than hydra.sweeper.max_failures="
                f"{settings.max_failures} (reasons above): fix the cause or raise max_failures;"
                " re-running the same command resumes the study"
            )
    if exhausted:
        log.info("the sampler has tried every point of the search space")
    log.info(write_results(study, space, sweep_dir, spec))
    log.info("study stored in %s; view it with: %s", spec, dashboard(spec))


def _launch(launcher: Launcher, jobs: list[list[str]], first: int) -> list[JobReturn | str]:
    """Each job's return, or why it has none; in a submitit batch a dead job fails alone."""
    if is_submitit(launcher):
        return launch_each(launcher, jobs, first)
    try:
        return list(launcher.launch(jobs, initial_job_idx=first))
    except Exception as e:  # a job died without returning: killed, out of memory, node lost
        log.error("the batch of trials from %d ended without results: %s", first, e)
        return [f"the batch ended without results ({type(e).__name__}, see the log)"] * len(jobs)


def dashboard(spec: str) -> str:
    """The command that opens the study, and how to get it where it is not installed."""
    command = f"optuna-dashboard {spec}"
    if importlib.util.find_spec("optuna_dashboard") is None:
        command += " (install it with: pip install optuna-dashboard)"
    return command
