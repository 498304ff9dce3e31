"""End-to-end training on generated demo-like data: learning, determinism, outputs, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from recsys.config import LrDecay, LrScheduleConfig
from recsys.train import run
from recsys.trainer import EarlyStopping, lr_factor
from tests.conftest import (
    ROOT,
    assert_same_run,
    categorical_override,
    cli,
    compose_cfg,
    metrics_of,
)

pytestmark = pytest.mark.slow


def train(small_data: Path, run_dir: Path, *overrides: str) -> tuple[float, dict]:
    cfg = compose_cfg(
        f"data.path={small_data}",
        "trainer.progress_bar=false",
        "trainer.eval_every_steps=null",
        *overrides,
    )
    value = run(cfg, run_dir)
    return value, metrics_of(run_dir)


def test_every_ranking_model_clearly_beats_a_first_order_baseline(small_data, tmp_path):
    auc = {}
    for model in ("lr", "fm", "deepfm", "mlp", "dcn_v2", "dlrm"):
        value, m = train(small_data, tmp_path / model, f"model={model}")
        assert value == m["validation"]["auc"] == m["objective"]["value"]
        auc[model] = m["test"]["auc"]
    info = json.loads((small_data / "demo_info.json").read_text())
    print(auc, "oracle", info["test"]["oracle_auc"])
    # one epoch: LR ~0.680, MLP ~0.702, DLRM ~0.705 (no first-order terms; it and the MLP learn the
    # pairwise effects slowest), DCN-v2 ~0.739, FM/DeepFM ~0.775 on this set
    margins = {"fm": 0.05, "deepfm": 0.05, "mlp": 0.01, "dcn_v2": 0.02, "dlrm": 0.01}
    for model, margin in margins.items():  # pairwise effects learned (planted as an FM's)
        assert auc[model] > auc["lr"] + margin, model
    assert max(auc.values()) < info["test"]["oracle_auc"]


def test_regression_task_beats_predicting_the_mean(small_data, tmp_path):
    value, m = train(
        small_data, tmp_path / "r", "model=fm", "data.label=dwell", "data.task=regression"
    )
    y = ds.dataset(small_data / "validation").to_table(columns=["dwell"]).column(0).to_numpy()
    assert m["objective"]["metric"] == "rmse" and value == m["validation"]["rmse"]
    assert m["validation"]["rmse"] < 0.9 * y.std()
    assert set(m["test"]) == {"rmse", "mae"}


def test_same_seed_same_metrics_and_weights(small_data, tmp_path):
    args = ("trainer.max_steps=30", "trainer.eval_every_steps=10")
    _, a = train(small_data, tmp_path / "a", *args)
    _, b = train(small_data, tmp_path / "b", *args)
    assert_same_run(tmp_path / "a", tmp_path / "b")  # weights, metrics, evaluations, losses
    _, c = train(small_data, tmp_path / "c", *args, "seed=1")
    assert c["validation"] != a["validation"]


def test_early_stopping_stops_after_patience_evaluations(small_data, tmp_path):
    _, m = train(
        small_data,
        tmp_path / "es",
        "trainer.max_steps=200",
        "trainer.eval_every_steps=5",
        "trainer.early_stopping.enabled=true",
        "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=1.0",  # no eval can improve by a full unit of AUC
    )
    assert m["train"]["stopped_early"] is True
    assert m["train"]["steps"] == 15
    assert [e["step"] for e in m["train"]["evaluations"]] == [5, 10, 15]


def test_schedule_accumulation_clipping_and_mean_pooling_train(small_data, tmp_path):
    _, m = train(
        small_data,
        tmp_path / "x",
        "model=mlp",
        "trainer.max_steps=40",
        "trainer.grad_accumulation=2",
        "trainer.grad_clip_norm=1.0",
        "trainer.lr_schedule.warmup_steps=10",
        "trainer.lr_schedule.decay=cosine",
        "model.pooling=mean",
        "trainer.sparse_optimizer.type=adagrad",
        "trainer.sparse_optimizer.lr=0.05",
        "trainer.dense_optimizer.weight_decay=0.01",
    )
    assert m["train"]["steps"] == 40 and np.isfinite(m["train"]["final_loss"])
    assert m["validation"]["auc"] > 0.6


def test_lr_factor_warms_up_then_decays():
    s = LrScheduleConfig(warmup_steps=4, decay=LrDecay.cosine, min_ratio=0.1)
    assert [lr_factor(s, i, 14) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(s, 4, 14) == pytest.approx(1.0)
    assert lr_factor(s, 9, 14) == pytest.approx(0.55)
    assert lr_factor(s, 14, 14) == pytest.approx(0.1)
    lin = LrScheduleConfig(decay=LrDecay.linear)
    assert lr_factor(lin, 5, 10) == pytest.approx(0.5)


def test_early_stopping_tracks_direction_of_each_metric():
    es = EarlyStopping("logloss", patience=2, min_delta=0.0)
    assert [es.update(v, i) for i, v in enumerate([0.5, 0.4, 0.45, 0.41])] == [
        False,
        False,
        False,
        True,
    ]
    assert es.best == 0.4 and es.best_step == 1


def nulls_in(split: Path, rows: int, column: str = "d3") -> int:
    """Nulls and NaNs in the first rows of a split's column, in the reader's order (by file)."""
    values = ds.dataset(sorted(map(str, split.glob("*.parquet")))).to_table(columns=[column])
    x = values.column(column).slice(0, rows).to_numpy()
    return int(np.isnan(x).sum())


def test_cli_run_writes_a_complete_run_dir(small_data, tmp_path):
    res = cli("trainer=debug", f"data.path={small_data}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = list((tmp_path / "experiments").glob("*/*_deepfm"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    out = res.stdout + res.stderr
    assert "validation auc" in out and "train samples/s" in out and str(run_dir.name) in out
    m = metrics_of(run_dir)
    assert m["train"]["steps"] == 20 and m["train"]["samples_per_s"] > 0
    # the demo has nulls in d3: counted in the rows trained on and in one evaluation pass
    quality = m["data_quality"]
    assert quality["train"]["dense_nulls_filled"]["d3"] == nulls_in(small_data / "train", 20 * 4096)
    assert quality["validation"]["dense_nulls_filled"]["d3"] == nulls_in(
        small_data / "validation", 2 * 16384
    )
    assert "train dense nulls filled" in out
    assert (run_dir / "config.yaml").read_text().count("${") == 0  # resolved
    assert not list(run_dir.glob(".*.tmp"))

    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(run_dir))
    mux.Reload()
    scalars = {t for r in mux.Runs() for t in mux.Runs()[r].get("tensors", [])}
    scalars |= {t for r in mux.Runs() for t in mux.Runs()[r].get("scalars", [])}
    assert {"train/loss", "validation/auc"} <= scalars
    assert any(mux.PluginRunToTagToContent("hparams").values())

    # the exported model loads in a fresh process without torch.distributed and reproduces
    # the validation metrics the run wrote
    code = f"""
import json, sys, torch.distributed as dist
from recsys.outputs import load_model
from recsys.config import DataConfig, LabelKind
from recsys.data.batches import DataQuality
from recsys.data.reader import open_split
from recsys.metrics import Accumulator
model, spec = load_model({str(run_dir)!r})
data = DataConfig(path={str(small_data)!r}, label=spec.label, dense=list(spec.dense),
                  categorical=[f"{{k}}:{{v}}" for k, v in spec.categorical], eval_batch_size=16384)
acc = Accumulator(spec.label_kind)
for i, b in enumerate(open_split(data, "validation", DataQuality(), train=False, max_batches=2)):
    acc.add(model(b.dense_features, b.sparse_features), b.labels)
assert not dist.is_initialized()
print(json.dumps(acc.result()))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    reloaded = json.loads(res.stdout.strip().splitlines()[-1])
    for k, v in m["validation"].items():
        assert reloaded[k] == pytest.approx(v, abs=1e-5)


def test_cfg_job_prints_the_composed_config():
    res = cli("model=fm", "trainer.max_epochs=3", "--cfg", "job")
    assert res.returncode == 0, res.stderr
    assert "_target_: recsys.models.FM" in res.stdout and "max_epochs: 3" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["trainer.max_epoch=3"], "Key 'max_epoch' not in 'TrainerConfig'"),
        (["+model.embeding_dim=8"], "error: model.embeding_dim is not a key of model"),
        (["model=transformer"], "Could not find 'model/transformer'"),
        (
            ["trainer.dense_optimizer.lr=-1"],
            "error: trainer.dense_optimizer.lr=-1.0 is out of range",
        ),
        (["data.dense=[d0,nope]"], "error: column 'nope' (data.dense) is not in"),
        (["data.label=dwell"], "error: label column 'dwell' in"),
        (["data.oov=error", categorical_override(c15=10)], "error: categorical column 'c15' in"),
        (
            ["trainer.sparse_optimizer.type=sgd", "trainer.sparse_optimizer.eps=1e-6"],
            "error: trainer.sparse_optimizer.eps is set but sgd has no eps",
        ),
        (
            ["trainer.sharding.types=[row_wise]"],
            "error: trainer.sharding.types has ['row_wise'], which needs reduce_scatter",
        ),
        (
            ["trainer.sharding.compute_kernels=[fused,fused_uvm]"],
            "error: trainer.sharding.compute_kernels has ['fused_uvm'], which keep tables in host",
        ),
    ],
)
def test_bad_input_gets_one_clear_message(small_data, tmp_path, args, message):
    res = cli("trainer=debug", f"data.path={small_data}", *args, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert message in out, out
    assert "Traceback" not in out
    for run_dir in (tmp_path / "experiments").glob("*/*"):
        assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.pt").exists()


def test_starting_over_in_a_used_run_dir_sets_the_earlier_run_aside(small_data, tmp_path):
    short = ("trainer=debug", "trainer.max_steps=4", "data.test=null")
    train(small_data, tmp_path, *short)
    first = sorted(p.name for p in tmp_path.glob("events.out.*"))
    train(small_data, tmp_path, *short, "trainer.resume=never")
    aside = list((tmp_path / "earlier").iterdir())
    assert len(aside) == 1  # the first run's checkpoints and curves, kept, out of the way
    assert sorted(p.name for p in aside[0].glob("events.out.*")) == first
    assert [p.name for p in (aside[0] / "checkpoints").iterdir()] == ["step-000000004"]
    assert not set(first) & {p.name for p in tmp_path.glob("events.out.*")}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000004"]


def test_no_parquet_files_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    res = cli("trainer=debug", f"data.path={tmp_path / 'empty'}", cwd=tmp_path)
    assert res.returncode == 2
    assert "error: no parquet files at" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr + res.stdout


def test_out_of_range_ids_are_folded_by_default_and_counted(small_data, tmp_path):
    _, m = train(small_data, tmp_path / "oov", "trainer=debug", categorical_override(c15=1000))
    assert m["data_quality"]["train"]["out_of_range_ids"]["c15"] > 0


@pytest.fixture(scope="session")
def small_orc(tmp_path_factory) -> Path:
    """The demo in RecIS's ORC layout (list<double> numbers, list<int64> ids), small."""
    from recsys.demo.ctr import DemoSpec, generate

    out = tmp_path_factory.mktemp("orc") / "small"
    rows = {"train": 60_000, "validation": 20_000, "test": 20_000}
    generate(out, DemoSpec(rows=rows, layout="recis_orc", rows_per_file=20_000))
    return out


@pytest.mark.parametrize("model", ["lr", "fm", "deepfm", "mlp", "dcn_v2", "dlrm"])
def test_every_model_trains_on_recis_orc(small_orc, tmp_path, model):
    cfg = compose_cfg(
        "data=orc", f"data.path={small_orc}", f"model={model}", "trainer.progress_bar=false",
        "trainer.eval_every_steps=null", "data.read_threads=2", "data.shuffle_buffer=8192",
    )  # fmt: skip
    value = run(cfg, tmp_path / model)
    m = metrics_of(tmp_path / model)
    assert m["train"]["steps"] == 15 and value == m["validation"]["auc"] > 0.52  # it learns
    assert m["data_quality"]["train"]["dense_nulls_filled"]["d3"] > 0  # nulls: empty lists
