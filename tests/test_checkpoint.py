"""Checkpoints, exact resume, preemption and resharding, with real processes and signals."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from recsys.demo.ctr import DemoSpec, generate
from recsys.preemption import EXIT_PREEMPTED, Preempted, Preemption
from tests.conftest import ROOT, assert_same_run, cli, metrics_of, torchrun_command

pytestmark = pytest.mark.slow

# two epochs of 49 steps, a checkpoint every 7, dropout, shuffling, 2 read threads, cosine lr,
# early stopping state: everything a resumed run must carry over to end up bit-identical
EXACT = [
    "trainer.max_epochs=2",
    "trainer.eval_every_steps=30",
    "trainer.checkpoint.every_steps=7",
    "trainer.checkpoint.keep_last=20",
    "trainer.log_every_steps=1",
    "trainer.progress_bar=false",
    "trainer.early_stopping.enabled=true",
    "trainer.early_stopping.patience=10",
    "trainer.lr_schedule.decay=cosine",
    "data.read_threads=2",
    "data.shuffle_buffer=8192",
    "model.dropout=0.2",
    "data.batch_size=2048",
]
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


@pytest.fixture(scope="module")
def exact_data(tmp_path_factory) -> Path:
    """Half the rows of `small_data`, in two train files: at batch 2048 the same 49 steps an
    epoch, in half the time."""
    out = tmp_path_factory.mktemp("data") / "exact"
    rows = {"train": 100_000, "validation": 20_000, "test": 20_000}
    generate(out, DemoSpec(rows=rows, rows_per_file=50_000))
    return out


def args_for(exact_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={exact_data}", f"hydra.run.dir={run_dir}", *EXACT, *extra]


@pytest.fixture(scope="module")
def uninterrupted(exact_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    out = cli(*args_for(exact_data, run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir


def start_and_signal(args: list[str], step: int, sig: int) -> subprocess.CompletedProcess:
    """Run recsys.train and send `sig` once it logs `step`; returns the finished process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys.train", *args],
        cwd=ROOT,
        env=UNBUFFERED,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f" step {step}/" in line:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + rest, "")


def test_killed_at_a_random_step_then_resumed_ends_bit_identical(
    exact_data, uninterrupted, tmp_path
):
    step = random.Random().randint(9, 90)
    run_dir = tmp_path / "run"
    killed = start_and_signal(args_for(exact_data, run_dir), step, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"step {step}: {killed.stdout[-2000:]}"
    assert not (run_dir / "metrics.json").exists()
    resumed = cli(*args_for(exact_data, run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    if step >= 7:
        assert "resuming from" in resumed.stdout, f"killed at step {step}"
    assert_same_run(uninterrupted, run_dir)


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes_exactly(
    exact_data, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    stopped = start_and_signal(args_for(exact_data, run_dir), 40, signal.SIGTERM)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stdout[-3000:]
    assert "SIGTERM received: checkpointing at the next step" in stopped.stdout
    assert f"hydra.run.dir={run_dir} to resume from step" in stopped.stdout
    assert "Traceback" not in stopped.stdout
    resumed = cli(*args_for(exact_data, run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_same_run(uninterrupted, run_dir)
    assert metrics_of(run_dir)["train"]["preemptions"] == 1


def test_half_written_and_corrupt_checkpoints_are_skipped_for_an_older_one(
    exact_data, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for step in (35, 42, 49):
        name = f"step-{step:09d}"
        shutil.copytree(uninterrupted / "checkpoints" / name, run_dir / "checkpoints" / name)
    ckpt = run_dir / "checkpoints"
    (ckpt / "step-000000049" / "manifest.json").unlink()  # as if its writer died mid-way
    data = ckpt / "step-000000042" / "__0_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)  # same size, garbage: found when loading
    (ckpt / ".step-000000056.tmp").mkdir()  # an interrupted write's leftovers
    out = cli(*args_for(exact_data, run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "skipping checkpoint" in log and "step-000000049: it has no manifest.json" in log
    assert "step-000000042 cannot be loaded" in log
    assert "resuming from" in log and "step-000000035 (step 35" in log
    assert_same_run(uninterrupted, run_dir)
    assert not (ckpt / ".step-000000056.tmp").exists()


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(
    exact_data, uninterrupted, tmp_path
):
    step = random.Random().choice(range(14, 92, 7))  # a checkpoint with one before it
    run_dir = tmp_path / "run"
    tmp = run_dir / "checkpoints" / f".step-{step:09d}.tmp"
    proc = subprocess.Popen([sys.executable, "-m", "recsys.train", *args_for(exact_data, run_dir)],
                            cwd=ROOT, env=UNBUFFERED, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None and not tmp.exists():
        time.sleep(0.002)
    proc.kill()  # SIGKILL while the checkpoint's files are being written
    assert proc.wait() == -signal.SIGKILL, f"the run ended before writing step {step}"
    assert not (run_dir / "checkpoints" / f"step-{step:09d}").exists()
    resumed = cli(*args_for(exact_data, run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"step-{step - 7:09d} (step {step - 7}" in resumed.stdout + resumed.stderr
    assert_same_run(uninterrupted, run_dir)
    assert not tmp.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.embedding_dim=32", "model.embedding_dim: checkpoint 16, this run 32"),
        ("model=fm", "holds a recsys.models.DeepFM, this run builds a recsys.models.FM"),
    ],
)
def test_resuming_with_a_different_model_names_what_differs(
    exact_data, uninterrupted, tmp_path, override, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")
    args = [a for a in args_for(exact_data, run_dir, override) if a != "model.dropout=0.2"]
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stdout + out.stderr
    assert "trainer.resume=never" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*torchrun_command(nproc), "-m", "recsys.train", *args],
        cwd=ROOT,
        env=UNBUFFERED,
        capture_output=True,
        text=True,
        timeout=600,
    )


def train_on(nproc: int, small_data: Path, run_dir: Path, *extra: str):
    common = [f"data.path={small_data}", f"hydra.run.dir={run_dir}", "trainer.progress_bar=false",
              "trainer.eval_every_steps=null", "trainer.log_every_steps=3"]  # fmt: skip
    out = torchrun(nproc, *common, *extra)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_two_ranks_learn_like_one_rank_with_the_same_global_batch(small_data, tmp_path):
    two = train_on(2, small_data, tmp_path / "two", "data.batch_size=2048", "trainer.max_steps=24")
    assert "rank:1/cpu" in (tmp_path / "two" / "sharding_plan.txt").read_text()
    # each line is printed once, by rank 0 (warnings by any rank), tagged with its rank
    log = two.stdout + two.stderr
    lines = re.findall(r"^(?:\[rank \d+\] )?\[\d\d:\d\d:\d\d\] .*$", log, re.MULTILINE)
    assert lines and all(line.startswith("[rank 0] ") for line in lines), lines
    assert "tables per rank: 0: " in log and ", 1: " in log  # the plan, in one line
    assert "train rows over 2 ranks" in log and "batch 2048 per rank (4096 in all)" in log
    assert "TBE=" not in log and "shard offsets" not in log  # FBGEMM's and the plan's dumps
    steps = metrics_of(tmp_path / "two")["train"]["steps"]
    train_on(1, small_data, tmp_path / "one", "data.batch_size=4096", f"trainer.max_steps={steps}")
    one, two = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    assert one["train"]["samples"] == two["train"]["samples"] == steps * 4096
    curve1, curve2 = one["train"]["losses"], two["train"]["losses"]
    assert [s for s, _ in curve1] == [s for s, _ in curve2]
    gaps = [abs(a - b) for (_, a), (_, b) in zip(curve1, curve2, strict=True)]
    # different rows in each step (each rank reads its own files), the same curve
    assert max(gaps) < 0.03 and sum(gaps) / len(gaps) < 0.015, gaps
    assert one["validation"]["auc"] == pytest.approx(two["validation"]["auc"], abs=0.02)


def full_state(checkpoint_dir: Path, tmp_path: Path) -> dict:
    """Every tensor of a checkpoint, unsharded, read without any process group."""
    out = tmp_path / f"{checkpoint_dir.parent.parent.name}.pt"
    dcp_to_torch_save(checkpoint_dir, out)
    return torch.load(out, weights_only=False)


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_whole_on(
    ranks: int, saved: Path, saved_on: int, step: int, data: Path, tmp_path: Path, *args: str
) -> Path:
    """Resume `saved` (a run of `saved_on` ranks stopped at `step`) on `ranks`: its tables, their
    optimizer state and the dense layers come back whole; then train 6 steps on."""
    again, longer = tmp_path / f"again-{step}", tmp_path / f"longer-{step}"
    shutil.copytree(saved / "checkpoints", again / "checkpoints")
    shutil.copytree(saved / "checkpoints", longer / "checkpoints")
    out = train_on(ranks, data, again, *args, f"trainer.max_steps={step}")
    assert f"where the checkpoint had {saved_on} ranks" in out.stdout + out.stderr
    name = f"step-{step:09d}"
    before = flat(full_state(saved / "checkpoints" / name, tmp_path))
    after = flat(full_state(again / "checkpoints" / name, tmp_path))
    assert before.keys() == after.keys()
    assert any("momentum1" in k for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert metrics_of(saved)["test"] == metrics_of(again)["test"]
    train_on(ranks, data, longer, *args, f"trainer.max_steps={step + 6}")
    assert metrics_of(longer)["train"]["steps"] == step + 6
    return longer


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_back_on_two(small_data, tmp_path):
    # FBGEMM's fused Adagrad: its state is resharded (the row-sparse Adam's restarts, logged)
    args = ["data.batch_size=2048", "trainer.sparse_optimizer.type=adagrad"]
    first = tmp_path / "first"
    train_on(2, small_data, first, *args, "trainer.max_steps=10")
    on_one = resume_whole_on(1, first, 2, 10, small_data, tmp_path, *args)
    resume_whole_on(2, on_one, 1, 16, small_data, tmp_path, *args)


def test_a_job_preempted_more_than_max_requeues_times_is_not_requeued(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    preemption = Preemption()
    preemption.received = signal.SIGUSR1
    with pytest.raises(Preempted, match=r"not requeued: the job was preempted 4 times, more "
                       r"than trainer.checkpoint.max_requeues=3: run the same command with "
                       r"hydra.run.dir=/runs/a to resume from step 120"):  # fmt: skip
        preemption.stop(120, preemptions=4, max_requeues=3, run_dir="/runs/a")


def kill_ranks_at(args: list[str], step: int) -> None:
    """Train on two ranks and kill -9 the ranks and torchrun once rank 0 logs `step`."""
    proc = subprocess.Popen(
        [*torchrun_command(2), "-m", "recsys.train", *args],
        cwd=ROOT,
        env=UNBUFFERED,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if f" step {step}/" in line:
            # torchrun starts each rank in a session of its own: kill the ranks, then torchrun
            ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for pid in [*map(int, ranks), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            break
    proc.communicate(timeout=60)


def test_two_ranks_killed_at_a_random_step_resume_bit_identical(small_data, tmp_path):
    """Each rank's data position (two read workers each) and RNGs come back exactly."""
    args = ["data.batch_size=2048", "data.read_threads=2", "data.shuffle_buffer=8192",
            "model.dropout=0.2", "trainer.checkpoint.every_steps=4", "trainer.log_every_steps=1",
            "trainer.eval_every_steps=10", "trainer.max_steps=20"]  # fmt: skip
    train_on(2, small_data, tmp_path / "full", *args)
    step = random.Random().randint(5, 18)
    run_dir = tmp_path / "resumed"
    common = [f"data.path={small_data}", f"hydra.run.dir={run_dir}", "trainer.progress_bar=false"]
    kill_ranks_at([*common, *args], step)
    assert not (run_dir / "metrics.json").exists(), f"killed at step {step}"
    out = train_on(2, small_data, run_dir, *args)
    if step >= 4:
        assert "exactly where it stopped" in out.stdout + out.stderr, f"killed at step {step}"
    assert_same_run(tmp_path / "full", run_dir)
