"""Trial overhead per launcher: seconds from the sweeper launching a trial to its first step.

    python benchmarks/trial_overhead.py [--trials 3]

Runs a small FM sweep (one trial per batch) through the basic launcher, submitit_local and,
when a SLURM node answers (tests/services/slurm-up.sh, SLURM_CONF), slurm; reads each trial's
launch time from the study and its first step's time from metrics.json. Also prints the CPU
seconds the whole machine spent meanwhile beyond this benchmark's own processes (SLURM jobs
count there too, as slurmd's children), to tell a contended measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from recsys.demo.ctr import DemoSpec, generate

ROOT = Path(__file__).resolve().parents[1]


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used (user + system, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system = (int(f) for f in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def overheads(launcher: str, data: Path, sweep_dir: Path, trials: int) -> list[float]:
    """Launch-to-first-step seconds of each trial of a sweep through one launcher."""
    args = [
        "--multirun",
        "sweep=fm",
        f"launcher={launcher}",
        f"data.path={data}",
        "trainer=debug",
        "trainer.progress_bar=false",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.pruner=null",
    ]
    if launcher == "slurm":
        args += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
    subprocess.run(
        [sys.executable, "-m", "recsys.train", *args],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    study = optuna.load_study(study_name="fm", storage=storage)
    out = []
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = json.loads((sweep_dir / str(trial.number) / "metrics.json").read_text())
        out.append(metrics["train"]["first_step_at"] - trial.user_attrs["launched_at"])
    return out


def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout
    return any(s in state for s in ("idle", "mix", "alloc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    launchers = ["local", "submitit_local"] + (["slurm"] if slurm_up() else [])
    with tempfile.TemporaryDirectory(prefix="recsys-overhead-") as tmp:
        data = Path(tmp) / "data"
        generate(data, DemoSpec(rows={"train": 200_000, "validation": 40_000, "test": 40_000}))
        print(f"{'launcher':<15} {'median s':>9} {'min s':>7} {'max s':>7}  {'other CPU s':>11}")
        for launcher in launchers:
            busy, own = busy_cpu_seconds(), own_cpu_seconds()
            secs = overheads(launcher, data, Path(tmp) / launcher, args.trials)
            other = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)
            name = "basic" if launcher == "local" else launcher
            print(
                f"{name:<15} {statistics.median(secs):>9.2f} {min(secs):>7.2f} "
                f"{max(secs):>7.2f}  {other:>11.1f}"
            )
    if "slurm" not in launchers:
        print("slurm: skipped (no SLURM node answers; see tests/services/slurm-up.sh)")


if __name__ == "__main__":
    main()
