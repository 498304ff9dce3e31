"""Several train sources in one run: schedules, the mixed reader, resume, bad configs, a mix run."""

from __future__ import annotations

import copy
import random
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.config import MixConfig, MixStrategy
from recsys.data.batches import DataQuality
from recsys.data.mix import MixPosition, open_mix, schedule
from recsys.demo.ctr import DemoSpec, generate
from recsys.errors import ConfigError, DataError
from tests.conftest import assert_same_run, cli, metrics_of
from tests.test_checkpoint import kill_ranks_at, start_and_signal, torchrun
from tests.test_data import config


def mix(strategy: str, **over) -> MixConfig:
    return MixConfig(strategy=MixStrategy(strategy), **over)


@pytest.mark.parametrize(
    "strategy, over, order",
    [
        ("sequential", {}, [0, 0, 0, 1, 1]),
        ("sequential", {"epoch": "shortest"}, [0, 0, 1, 1]),
        ("sequential", {"epoch": "longest"}, [0, 0, 0, 1, 1, 1]),
        ("sequential", {"epoch": "4"}, [0, 0, 0, 1]),
        ("round_robin", {}, [0, 1, 0, 1, 0]),
        ("round_robin", {"epoch": "shortest"}, [0, 1, 0, 1]),
        ("round_robin", {"epoch": "longest"}, [0, 1, 0, 1, 0, 1]),
        ("alternating", {"pattern": [0, 0, 1], "burst": 2}, [0, 0, 0, 0, 1]),
        ("alternating", {"pattern": [1, 0], "epoch": "7"}, [1, 0, 1, 0, 1, 0, 1]),
    ],
)
def test_each_strategy_gives_its_exact_order(strategy, over, order):
    assert schedule(mix(strategy, **over), [3, 2], seed=0, epoch=0).tolist() == order


def test_weighted_draws_are_seeded_per_epoch_with_the_given_proportions():
    m = mix("weighted", weights=[0.7, 0.3], epoch="20000")
    first = schedule(m, [10, 5], seed=1, epoch=0)
    assert first.tolist() == schedule(m, [10, 5], seed=1, epoch=0).tolist()
    assert first.tolist() != schedule(m, [10, 5], seed=1, epoch=1).tolist()
    assert np.bincount(first) / len(first) == pytest.approx([0.7, 0.3], abs=0.015)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: mix("weighted", weights=[0.5, -1]), "weights must be >= 0"),
        (lambda: mix("weighted", weights=[0, 0]), "one at least > 0"),
        (lambda: mix("round_robin", epoch="forever"), "data.mix.epoch=forever is not"),
        (lambda: mix("alternating", pattern=[0, 2]).check(["a", "b"]), "index 2 is past the 2"),
        (lambda: mix("alternating").check(["a", "b"]), "needs data.mix.pattern"),
        (lambda: mix("weighted", weights=[1]).check(["a", "b"]), "one weight per source"),
        (lambda: mix("round_robin", validation="c").check(["a", "b"]), "is not micro, macro"),
        (lambda: schedule(mix("sequential", epoch="6"), [3, 2], 0, 0), "cannot be filled"),
    ],
)
def test_bad_mixes_are_one_line_errors(make, message):
    with pytest.raises(ConfigError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def write_source(root, rows: int, offset: float, **cols) -> str:
    """A source whose rows are numbered from `offset` (x), so batches tell where they came from."""
    x = offset + np.arange(rows, dtype=float)
    t = pa.table({"y": np.zeros(rows, np.int8), "x": x, "a": np.zeros(rows, np.int64),
                  "tags": pa.array([[1]] * rows)} | cols)  # fmt: skip
    (root / "train").mkdir(parents=True)
    pq.write_table(t, root / "train" / "part-0.parquet", row_group_size=5)
    return str(root)


def tiny_mix(tmp_path, strategy: str, b_rows: int = 8, **over):
    sources = {"a": train_only(write_source(tmp_path / "a", 12, 0)),
               "b": train_only(write_source(tmp_path / "b", b_rows, 1000))}  # fmt: skip
    return config(tmp_path / "a", sources=sources, mix=mix(strategy, **over))


def train_only(path: str) -> dict:
    return {"path": path, "validation": None, "test": None}


def firsts(batches) -> list[float]:
    return [b.dense_features[0, 0].item() for b in batches]


def test_the_mixed_reader_follows_the_schedule_and_cycles_a_shorter_source(tmp_path):
    data = tiny_mix(tmp_path, "round_robin", epoch="longest")
    train, validation, _ = open_mix(data, {}, None, seed=0)
    assert len(train) == 6 and validation is None  # 3 batches of 4 each, b's 2 cycle
    assert firsts(train.iterate(0)) == [0, 1000, 4, 1004, 8, 1000]


def test_a_saved_mix_position_resumes_with_the_same_batches(tmp_path):
    data = tiny_mix(tmp_path, "weighted", b_rows=40, weights=[1, 2], epoch="25")
    data.read_threads, data.shuffle_buffer = 2, 8

    def reader():
        return open_mix(data, {}, None, seed=3)[0]

    everything = [b.dense_features[:, 0].tolist() for b in reader().iterate(1)]
    for stop in (3, 11, 24):
        first = reader()
        batches = first.iterate(1)
        head = [next(batches).dense_features[:, 0].tolist() for _ in range(stop)]
        saved = copy.deepcopy(first.position.to_dict())
        batches.close()
        second = reader()
        position = second.position.from_dict(saved)
        assert position.step == stop and second.fits(position)
        tail = [b.dense_features[:, 0].tolist() for b in second.iterate(1, position)]
        assert head + tail == everything


def test_a_position_of_another_layout_skips_what_the_schedule_drew(tmp_path):
    data = tiny_mix(tmp_path, "round_robin", epoch="longest")
    train = open_mix(data, {}, None, seed=0)[0]
    position = train.resume_position(MixPosition(0, 10, []), saved_len=12)  # 5 of 6 steps
    assert position.skip == 5
    assert firsts(train.iterate(0, position)) == [1000]


def test_a_source_without_rows_or_a_column_is_named(tmp_path):
    data = tiny_mix(tmp_path, "round_robin")
    data.sources["b"].filter = "x < 0"
    with pytest.raises(DataError, match=r"^source b: the filters leave no rows in .*/b") as e:
        open_mix(data, {}, None, seed=0)
    assert "(split train: train): data.sources.b.filter='x < 0'; loosen the filter" in str(e.value)
    c = write_source(tmp_path / "c", 8, 0, a=np.zeros(8))  # ids as floats
    sources = {"a": train_only(str(tmp_path / "a")), "c": train_only(c)}
    data = config(tmp_path / "a", sources=sources)
    with pytest.raises(DataError, match=r"^source c: column 'a' .* in .*/c/train/part-0"):
        open_mix(data, {"train": DataQuality()}, None, seed=0)


# A run of two sources: `web` (the small demo-like set) and a smaller `app` from another planted
# model, weighted, a fixed epoch of 40 steps (app cycles), two read threads, shuffling, dropout.
@pytest.fixture(scope="module")
def app_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("app") / "app"
    generate(out, DemoSpec(rows={"train": 30_000, "validation": 6_000, "test": 6_000},
                           rows_per_file=10_000, dense_nonlinear=1.0, seed=1))  # fmt: skip
    return out


def mix_args(small_data, app_data, run_dir, *extra) -> list[str]:
    return [
        "data=mix", f"data.path={small_data}", f"data.sources.web.path={small_data}",
        f"data.sources.app.path={app_data}", "data.mix.strategy=weighted",
        "data.mix.weights=[0.6,0.4]", "data.mix.epoch=40", "data.sources.app.weight=0.5",
        "data.batch_size=1024", "data.read_threads=2", "data.shuffle_buffer=4096",
        "model.dropout=0.2", "trainer.max_epochs=2", "trainer.eval_every_steps=30",
        "trainer.checkpoint.every_steps=6", "trainer.log_every_steps=1",
        "trainer.progress_bar=false", "trainer.max_eval_batches=2", f"hydra.run.dir={run_dir}",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mixed_run(small_data, app_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    out = cli(*mix_args(small_data, app_data, run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, out.stdout + out.stderr


@pytest.mark.slow
def test_a_mixed_run_reports_each_source(mixed_run):
    run_dir, log = mixed_run
    assert "mix weighted (epoch 40): 40 steps/epoch" in log
    assert "app: 30,000 rows, 30 batches/pass, expected 40.0% of the steps" in log
    metrics = metrics_of(run_dir)
    counts = metrics["train"]["sources"]
    assert counts["web"]["batches"] + counts["app"]["batches"] == metrics["train"]["steps"] == 80
    assert counts["app"]["proportion"] == pytest.approx(0.4, abs=0.15)
    assert 0 < counts["app"]["samples"] <= counts["app"]["batches"] * 1024
    validation = metrics["validation"]
    assert {"web/auc", "app/auc", "web/logloss", "auc"} <= validation.keys()
    rows = {"web": 40_000, "app": 6_000}  # max_eval_batches=2 reads 2 x 16384 at most
    micro = sum(rows[s] * validation[f"{s}/auc"] for s in rows) / sum(rows.values())
    assert validation["auc"] == pytest.approx(micro)
    assert "source app" in log and "app/auc" in metrics["test"]


@pytest.mark.slow
def test_a_mixed_run_killed_at_a_random_step_resumes_bit_identical(
    small_data, app_data, mixed_run, tmp_path
):
    step = random.Random().randint(7, 75)
    run_dir = tmp_path / "run"
    args = mix_args(small_data, app_data, run_dir)
    killed = start_and_signal(args, step, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"step {step}: {killed.stdout[-2000:]}"
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "exactly where it stopped" in resumed.stdout + resumed.stderr, f"step {step}"
    assert_same_run(mixed_run[0], run_dir)
    assert metrics_of(run_dir)["train"]["sources"] == metrics_of(mixed_run[0])["train"]["sources"]


@pytest.mark.slow
def test_a_mix_on_two_ranks_killed_at_a_random_step_resumes_bit_identical(
    small_data, app_data, tmp_path
):
    extra = ["trainer.max_steps=24", "trainer.checkpoint.every_steps=4"]
    full = mix_args(small_data, app_data, tmp_path / "full", *extra)
    assert torchrun(2, *full).returncode == 0
    step = random.Random().randint(5, 22)
    run_dir = tmp_path / "resumed"
    args = mix_args(small_data, app_data, run_dir, *extra)
    kill_ranks_at(args, step)
    out = torchrun(2, *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "exactly where it stopped" in out.stdout + out.stderr, f"killed at step {step}"
    assert_same_run(tmp_path / "full", run_dir)


def test_a_bad_mix_stops_before_training_with_one_line(small_data, tmp_path):
    out = cli("data=mix", f"data.path={small_data}", f"data.sources.web.path={small_data}",
              f"data.sources.app.path={small_data}", "data.mix.strategy=alternating",
              "data.mix.pattern=[0,1,2]", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert out.returncode == 2
    assert "data.mix.pattern=[0, 1, 2]: index 2 is past the 2 sources (web, app)" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr and "step 1" not in out.stdout
