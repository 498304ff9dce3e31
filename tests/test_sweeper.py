"""The Optuna sweeper on a tiny real Hydra app: failures, NaN, budget, Pareto front; bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from tests.conftest import ROOT, cli

APP = ROOT / "tests" / "sweep_app" / "app.py"


def sweep_app(
    sweep_dir: Path, *overrides: str, file_limit: int | None = None
) -> subprocess.CompletedProcess:
    """Run the tiny app as a multirun through our sweeper; file_limit: RLIMIT_FSIZE in bytes."""

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [sys.executable, str(APP), "--multirun", f"hydra.sweep.dir={sweep_dir}", *overrides],
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


def load(sweep_dir: Path, name: str = "toy") -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.trials]


def test_best_params_are_written_and_printed_with_the_storage(tmp_path):
    out = sweep_app(tmp_path, "hydra.sweeper.n_jobs=2")
    assert out.returncode == 0, out.stdout
    study = load(tmp_path)
    assert states(study) == [TrialState.COMPLETE] * 4
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["trials"] == {"complete": 4}
    assert best["best"][0]["trial"] == study.best_trial.number
    assert best["best"][0]["values"] == [study.best_value]
    assert f"x={study.best_params['x']!r}" in best["best"][0]["overrides"]
    assert "best 4 of 4 complete" in out.stdout and "optuna-dashboard" in out.stdout
    installed = importlib.util.find_spec("optuna_dashboard") is not None
    assert installed or "pip install optuna-dashboard" in out.stdout  # how to get the viewer
    assert str(tmp_path / "optuna.journal") in out.stdout
    # jobs ran in dirs named by trial number, each with its own params
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]


def test_crashed_and_nan_trials_fail_and_the_sweep_goes_on(tmp_path):
    out = sweep_app(
        tmp_path,
        "x=choice(1.0,3.0,9.0)",
        "nan_above=5",
        "crash=choice(true,false)",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failures=50",
        "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
    )
    assert out.returncode == 0, out.stdout
    study = load(tmp_path)
    done = [t for t in study.trials if t.state is TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state is TrialState.FAIL]
    assert len(done) == 3 and failed
    assert all(t.params["x"] != 9.0 and t.params["crash"] is False for t in done)
    for t in failed:
        reason = t.user_attrs["failure"]
        assert ("crashed on purpose" in reason) if t.params["crash"] else ("not finite" in reason)


def test_a_trial_killed_or_out_of_memory_fails_alone_with_why_and_the_sweep_goes_on(tmp_path):
    out = sweep_app(
        tmp_path,
        "hydra/launcher=submitit_local",
        "x=1.0",
        "y=0",
        "fault=choice(none,kill,memory)",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
    )
    assert out.returncode == 0, out.stdout
    trials = load(tmp_path).trials
    for t in trials:
        fault, reason = t.params["fault"], t.user_attrs.get("failure")
        if fault == "none":
            assert t.state is TrialState.COMPLETE and t.value == 1.0
        elif fault == "memory":
            assert t.state is TrialState.FAIL and reason == "MemoryError: out of memory"
        else:
            assert t.state is TrialState.FAIL and reason.endswith("_log.err")
            assert reason.startswith(
                "the trial's process was killed by signal 9 (SIGKILL: out of memory, see dmesg"
            )
            assert f"trial {t.number} failed: {reason}" in out.stdout
    # batches of two: a kill took no other trial of its batch along, and later batches ran
    killed = [t.number for t in trials if t.params["fault"] == "kill"]
    assert any(trials[n ^ 1].state is TrialState.COMPLETE for n in killed)
    assert len(trials) > 2


def test_a_trial_that_kills_the_sweep_itself_is_retried_once_and_the_sweep_goes_on(tmp_path):
    # the basic launcher runs a trial in the sweep's own process: a SIGKILL ends both
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    optuna.create_study(study_name="toy", direction="minimize", storage=storage).enqueue_trial(
        {"fault": "kill"}
    )
    args = ("x=1.0", "y=0", "fault=choice(none,kill)", "hydra.sweeper.n_trials=1")
    args += ("hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",)
    for _ in range(2):  # the trial, then its retry
        out = sweep_app(tmp_path, *args)
        assert out.returncode == -signal.SIGKILL, out.stdout
    assert "re-queued with the same parameters" in out.stdout
    out = sweep_app(tmp_path, *args)
    assert out.returncode == 0, out.stdout
    first, retry, last = load(tmp_path).trials
    assert first.state is retry.state is TrialState.FAIL and retry.user_attrs["retry_of"] == 0
    assert first.user_attrs["failure"] == (
        "the sweep stopped while it ran (interrupted, or killed: out of memory?): re-queued with "
        "the same parameters"
    )
    assert "as when these parameters ran as trial 0: not re-queued again" in out.stdout
    assert last.params == {"fault": "none"} and last.state is TrialState.COMPLETE


def test_failure_budget_stops_the_sweep_with_one_message(tmp_path):
    out = sweep_app(tmp_path, "crash=true", "hydra.sweeper.max_failures=1")
    assert out.returncode != 0
    assert "2 trials failed in this session, more than hydra.sweeper.max_failures=1" in out.stdout
    assert "Traceback" not in out.stdout
    assert states(load(tmp_path)) == [TrialState.FAIL] * 2


def test_a_full_disk_under_the_study_keeps_its_complete_records_and_it_resumes(tmp_path):
    journal = tmp_path / "optuna.journal"
    # ~1 kB of records a trial: the limit is reached mid-sweep, above any other file's size
    out = sweep_app(tmp_path, "hydra.sweeper.n_trials=8", file_limit=6000)
    assert out.returncode != 0 and "Traceback" not in out.stdout, out.stdout
    [line] = [x for x in out.stdout.splitlines() if "writing the study" in x]
    assert f"writing the study to {journal} failed: the file size limit" in line
    assert "its complete records are kept, the partial one removed" in line
    assert "run the same command again: it resumes the study" in line
    text = journal.read_bytes()
    assert text.endswith(b"\n") and all(json.loads(x) for x in text.splitlines())
    assert 0 < len(states(load(tmp_path))) < 8
    out = sweep_app(tmp_path, "hydra.sweeper.n_trials=8")
    assert out.returncode == 0, out.stdout
    assert states(load(tmp_path)).count(TrialState.COMPLETE) == 8


def test_multi_objective_study_reports_the_pareto_front(tmp_path):
    out = sweep_app(
        tmp_path,
        "two_objectives=true",
        "hydra.sweeper.direction=[minimize,minimize]",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.sampler._target_=optuna.samplers.NSGAIISampler",
    )
    assert out.returncode == 0, out.stdout
    study = load(tmp_path)
    front = yaml.safe_load((tmp_path / "best.yaml").read_text())["pareto_front"]
    assert sorted(e["trial"] for e in front) == sorted(t.number for t in study.best_trials)
    assert all(len(e["values"]) == 2 for e in front)
    assert "Pareto front" in out.stdout


def test_pruner_prunes_trials_that_report_worse_values(tmp_path):
    out = sweep_app(
        tmp_path,
        "report_steps=3",
        "x=choice(2.0,5.0)",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        "+hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.upper=5.0",
    )
    assert out.returncode == 0, out.stdout
    by_x = {t.params["x"]: t.state for t in load(tmp_path).trials}
    assert by_x == {2.0: TrialState.COMPLETE, 5.0: TrialState.PRUNED}


def test_multi_objective_with_a_pruner_is_refused(tmp_path):
    out = sweep_app(
        tmp_path,
        "two_objectives=true",
        "hydra.sweeper.direction=[minimize,minimize]",
        "+hydra.sweeper.pruner._target_=optuna.pruners.MedianPruner",
    )
    assert out.returncode != 0
    assert "cannot prune a multi-objective study: set hydra.sweeper.pruner=null" in out.stdout


def _one_error_no_trial(out: subprocess.CompletedProcess, sweep_dir: Path, *needles: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, text
    assert not any(p.name.isdigit() for p in sweep_dir.iterdir()) if sweep_dir.exists() else True


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            ["model.dropoutt=interval(0.0,0.5)"],
            ["'model.dropoutt' is not in the config", "did you mean model.dropout", "+model"],
        ),
        (
            ["model.dropout=tag(log,interval(0.0,0.5))"],
            ["not a valid distribution", "low > 0", "tag(log, interval(low, high))"],
        ),
        (
            ["model.embedding_dim=interval(4.0,32.0)"],
            ["model.embedding_dim=4.0 does not compose", "could not be converted to Integer"],
        ),
        (["sweep=malformed"], ["model.init_std=interval(0.01", "not a valid search space entry"]),
        (
            ["hydra.sweeper.storage=/proc/no/study.journal"],
            ["hydra.sweeper.storage: cannot write the study file /proc/no/study.journal"],
        ),
    ],
    ids=["unknown-key", "malformed-distribution", "wrong-type", "malformed-in-yaml", "storage"],
)
def test_bad_sweep_input_stops_before_any_trial(tmp_path, overrides, needles):
    out = cli(
        "--multirun",
        "--config-dir",
        str(ROOT / "tests" / "conf"),
        "sweep=deepfm",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides,
    )
    _one_error_no_trial(out, tmp_path / "sweep", *needles)
