"""Sweeps through launcher=slurm on a real single-node SLURM (tests/services/slurm-up.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import cli
from tests.test_sweep import small_sweep, study_of


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
    args = small_sweep(small_data, tmp_path, *SLURM, "hydra.sweeper.n_trials=4")
    out = cli(*args, "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner=null")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    study = study_of(tmp_path, "fm")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    for trial in study.trials:
        metrics = json.loads((tmp_path / str(trial.number) / "metrics.json").read_text())
        assert metrics["objective"]["value"] == trial.value
    arrays = {p.name.split("_")[0] for p in (tmp_path / ".submitit").glob("[0-9]*")}
    assert len(arrays) == 2  # one job array per batch of two trials
    assert "Submitit 'slurm' sweep output dir" in out.stdout


def test_multi_task_job_joins_one_process_group_and_rank0_writes(small_data, tmp_path):
    args = small_sweep(small_data, tmp_path, *SLURM, "hydra.sweeper.n_trials=1")
    out = cli(*args, "hydra.launcher.tasks_per_node=2", "trainer.sharding.types=[table_wise]")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    run_dir = tmp_path / str(study_of(tmp_path, "fm").trials[0].number)
    log = (run_dir / "train.log").read_text()
    assert "rank:1/cpu" in log  # the planner placed tables on the second process
    assert len(list(run_dir.glob("metrics.json"))) == 1
    assert study_of(tmp_path, "fm").trials[0].state is TrialState.COMPLETE
    task_logs = sorted(Path(tmp_path, ".submitit").rglob("*_log.out"))
    assert len(task_logs) == 2
