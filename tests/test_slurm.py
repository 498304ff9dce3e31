"""Sweeps through launcher=slurm on a real single-node SLURM (tests/services/slurm-up.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, assert_same_run, cli, metrics_of, torchrun_command
from tests.test_sweep import small_sweep, study_of
from tests.test_sweeper import load, sweep_app


def _slurm_problem() -> str | None:
    """Why SLURM cannot run jobs here, or None when an idle node answers."""
    if not shutil.which("sbatch"):
        return "no SLURM client (sbatch); start one with tests/services/slurm-up.sh"
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e}); start SLURM with tests/services/slurm-up.sh"
    if not {"idle", "mix", "alloc"} & set(state):
        where = os.environ.get("SLURM_CONF", "the default slurm.conf")
        return f"no SLURM node up via {where}: run tests/services/slurm-up.sh, export SLURM_CONF"
    return None


_PROBLEM = _slurm_problem()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_PROBLEM is not None, reason=f"SLURM not available: {_PROBLEM}"),
]
# one CPU per job so two trials run at once on a 2-core node
SLURM = [
    "launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=15",
]


def test_sweep_runs_as_slurm_jobs_and_results_come_back(small_data, tmp_path):
    args = small_sweep(small_data, tmp_path, *SLURM, "hydra.sweeper.n_trials=3")
    out = cli(*args, "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner=null")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    study = study_of(tmp_path, "fm")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        metrics = json.loads((tmp_path / str(trial.number) / "metrics.json").read_text())
        assert metrics["objective"]["value"] == trial.value
    arrays = {p.name.split("_")[0] for p in (tmp_path / ".submitit").glob("[0-9]*")}
    assert len(arrays) == 2  # one job array per batch: two trials, then one
    assert "Submitit 'slurm' sweep output dir" in out.stdout


def test_multi_task_job_joins_one_process_group_and_rank0_writes(small_data, tmp_path):
    args = small_sweep(small_data, tmp_path, *SLURM, "hydra.sweeper.n_trials=1")
    out = cli(*args, "hydra.launcher.tasks_per_node=2", "trainer.sharding.types=[table_wise]")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    run_dir = tmp_path / str(study_of(tmp_path, "fm").trials[0].number)
    plan = (run_dir / "sharding_plan.txt").read_text()
    assert "rank:1/cpu" in plan  # the planner placed tables on the second process
    assert len(list(run_dir.glob("metrics.json"))) == 1
    assert study_of(tmp_path, "fm").trials[0].state is TrialState.COMPLETE
    task_logs = sorted(Path(tmp_path, ".submitit").rglob("*_log.out"))
    assert len(task_logs) == 2


def test_a_killed_trial_fails_alone_with_what_slurm_says(tmp_path):
    out = sweep_app(
        tmp_path,
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "x=1.0",
        "y=0",
        "fault=choice(kill,memory)",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
    )
    assert out.returncode == 0, out.stdout
    reasons = {t.params["fault"]: t.user_attrs["failure"] for t in load(tmp_path).trials}
    assert reasons["memory"] == "MemoryError: out of memory"  # its batch's dead job took nothing
    assert "ended without a result (state FAILED): srun: error:" in reasons["kill"]
    assert "task 0: Killed; its log: " in reasons["kill"]


def _squeue_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%t"], capture_output=True, text=True, timeout=10
    ).stdout.strip()


def _wait_for(predicate, what: str, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_usr1_checkpoints_requeues_and_the_job_ends_as_if_never_stopped(small_data, tmp_path):
    # two tasks: one rank's signal must stop both at one step; a single task takes the same path
    tasks = 2
    train = [
        f"data.path={small_data}",
        f"data.batch_size={4096 // tasks}",
        "trainer.max_epochs=1",
        "trainer.log_every_steps=1",
        "trainer.progress_bar=false",
        "trainer.threads=1",
    ]
    sweep_dir = tmp_path / "sweep"
    slurm = [*SLURM, f"hydra.launcher.tasks_per_node={tasks}", f"hydra.sweep.dir={sweep_dir}"]
    job = subprocess.Popen(
        [sys.executable, "-m", "recsys.train", "--multirun", *slurm, *train],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def task_log_at_step_20():
        for log in sweep_dir.glob(".submitit/*/*_0_log.out"):
            if " step 20/" in log.read_text():
                return log

    log = _wait_for(task_log_at_step_20, "the job's step 20")
    job_id = log.parent.name
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    _wait_for(lambda: "requeueing" in log.read_text() and _squeue_state(job_id) == "PD",
              "the requeue")  # fmt: skip
    # SLURM holds a requeued job for two minutes before it may start again: let it start now
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:]
    text = log.read_text()
    assert "SIGUSR1 received: checkpointing at the next step" in text
    assert "resuming from" in text and "exactly where it stopped" in text
    run_dir = sweep_dir / "0"
    assert metrics_of(run_dir)["train"]["preemptions"] == 1
    local = tmp_path / "local"  # the same processes, never stopped
    cmd = [*torchrun_command(tasks), "-m", "recsys.train", *train, f"hydra.run.dir={local}"]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    assert_same_run(local, run_dir)
