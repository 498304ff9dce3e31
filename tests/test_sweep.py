"""Optuna sweeps of real training runs: kill and resume, pruning, compare, TensorBoard HParams."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recsys.compare import HISTORY_PNG, PARALLEL_PNG
from recsys.compare import main as compare_main
from tests.conftest import ROOT, cli, compose_cfg, metrics_of

pytestmark = pytest.mark.slow
TEST_CONF = str(ROOT / "tests" / "conf")


def small_sweep(data: Path, sweep_dir: Path, *overrides: str) -> list[str]:
    """`--multirun` arguments of a small FM study: 20 steps a trial, evaluated every 5."""
    return [
        "--multirun",
        "sweep=fm",
        f"data.path={data}",
        "trainer=debug",
        "trainer.eval_every_steps=5",
        "trainer.progress_bar=false",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def study_of(sweep_dir: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def wait_for_a_finished_trial(proc: subprocess.Popen, sweep_dir: Path) -> None:
    """Poll the study file until one trial has finished (the sweep is then mid-way)."""
    while proc.poll() is None:
        if (sweep_dir / "optuna.journal").exists():
            study = study_of(sweep_dir, "fm")
            if count(study, TrialState.COMPLETE):
                return
        time.sleep(0.2)
    raise AssertionError(f"the sweep ended (rc {proc.returncode}) before it could be killed")


@pytest.fixture(scope="module")
def resumed_sweep(small_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 4-trial, 2-per-batch sweep killed after its first trial, then re-run to the end."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "fm"
    args = small_sweep(small_data, sweep_dir, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2")
    with open(sweep_dir.parent / "first.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.train", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_a_finished_trial(proc, sweep_dir)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return sweep_dir, cli(*args)


def test_killed_sweep_resumes_to_exactly_n_trials(resumed_sweep):
    sweep_dir, out = resumed_sweep
    assert out.returncode == 0, out.stderr
    study = study_of(sweep_dir, "fm")
    assert count(study, TrialState.COMPLETE, TrialState.PRUNED) == 4
    assert count(study, TrialState.RUNNING, TrialState.WAITING) == 0
    # the trial the kill interrupted is failed and re-run with its parameters
    interrupted = [t for t in study.trials if t.state is TrialState.FAIL]
    assert interrupted
    retries = {t.user_attrs.get("retry_of"): t for t in study.trials if "retry_of" in t.user_attrs}
    for t in interrupted:  # killed while its parameters were drawn, it had only some of them
        assert t.params.items() <= retries[t.number].params.items()
    assert "2 of 4 trials finished" in out.stdout  # the first batch's, told when it ended
    assert "re-queued with the same parameters" in out.stdout


def test_every_trial_logged_params_and_final_metrics_for_tensorboard(resumed_sweep):
    sweep_dir, _ = resumed_sweep
    study = study_of(sweep_dir, "fm")
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        events = EventAccumulator(str(sweep_dir / str(trial.number)))
        events.Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
        assert events.Scalars("validation/auc")[-1].value == pytest.approx(trial.value)


def test_compare_prints_runs_best_first_and_writes_plots(resumed_sweep, tmp_path, capsys):
    sweep_dir, _ = resumed_sweep
    compare_main([str(sweep_dir), "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "status", "objective:auc"]
    assert "trainer.dense_optimizer.lr" in header and "samples/s" in header
    study = study_of(sweep_dir, "fm")
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    rows = [line.split() for line in lines[2:] if line.split()[1] == "complete"]
    assert [int(r[0]) for r in rows] == [t.number for t in complete]
    for name in (HISTORY_PNG, PARALLEL_PNG):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("launcher", ["local", "submitit_local"])
def test_pruner_stops_a_trial_that_learns_nothing(small_data, tmp_path, launcher):
    out = cli(
        "--multirun",
        "--config-dir",
        TEST_CONF,
        "sweep=prune_fm",
        f"launcher={launcher}",
        f"data.path={small_data}",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr
    by_lr = {
        t.params["trainer.first_order_optimizer.lr"]: t
        for t in study_of(tmp_path, "prune_fm").trials
    }
    assert by_lr[1e-6].state is TrialState.PRUNED
    # stopped at the first check after warm-up: 10 steps of 4096 rows (reported by rows seen)
    assert max(by_lr[1e-6].intermediate_values) == 10 * 4096
    assert by_lr[0.1].state is TrialState.COMPLETE
    pruned_dir = tmp_path / str(by_lr[1e-6].number)
    assert '"status": "pruned"' in (pruned_dir / "metrics.json").read_text()


def test_run_returns_a_tuple_for_a_multi_objective_config(small_data, tmp_path):
    from recsys.train import run

    cfg = compose_cfg(
        f"data.path={small_data}",
        "trainer=debug",
        "trainer.progress_bar=false",
        "objective=[auc,parameters]",
    )
    auc, parameters = run(cfg, tmp_path)
    assert 0.5 < auc < 1.0
    weights = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    assert parameters == sum(w.numel() for w in weights.values())
    m = metrics_of(tmp_path)
    assert [o["metric"] for o in m["objectives"]] == ["auc", "parameters"]
    assert [o["higher_is_better"] for o in m["objectives"]] == [True, False]
