"""Two-tower learning on generated interactions; `recsys.evaluate` and `recsys.predict` on runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from omegaconf import OmegaConf

from recsys import config as schema
from recsys import evaluate, predict
from recsys.data.batches import DataQuality
from recsys.data.reader import open_split
from recsys.demo.interactions import InteractionSpec, generate
from recsys.errors import RecsysError
from recsys.outputs import load_model
from recsys.runs import open_run
from recsys.train import run as train
from tests.conftest import ROOT, cli, compose_cfg, metrics_of, torchrun_command

pytestmark = pytest.mark.slow


def run_test_split(run_dir: Path):
    """The test split of the data a run was trained on, as the model reads it."""
    cfg = schema.to_object(compose_cfg(f"run={run_dir}", config_name="evaluate"))
    _, _, _, data = open_run(cfg, label=True)
    return open_split(data, "test", DataQuality(), train=False)


@pytest.fixture(scope="module")
def interactions(tmp_path_factory) -> Path:
    """A small interaction set with the demo's columns and planted preferences."""
    out = tmp_path_factory.mktemp("interactions") / "set"
    spec = InteractionSpec(
        rows={"train": 50_000, "validation": 5_000, "test": 5_000},
        users=2_000,
        items=1_000,
        rows_per_file=12_500,  # files for two ranks to share
    )
    generate(out, spec)
    return out


@pytest.fixture(scope="module")
def two_tower_run(interactions, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "two_tower"
    cfg = compose_cfg(
        "model=two_tower",
        f"data.path={interactions}",
        "data.batch_size=1024",
        "trainer.max_epochs=2",
        "trainer.eval_every_steps=null",
        "trainer.progress_bar=false",
    )
    train(cfg, run_dir)
    return run_dir


def test_two_tower_clearly_beats_popularity_on_held_out_interactions(interactions, two_tower_run):
    m = metrics_of(two_tower_run)
    info = json.loads((interactions / "demo_info.json").read_text())["test"]
    test = m["test"]
    print({k: round(v, 4) for k, v in test.items()}, "planted", info["planted"]["recall@10"])
    assert m["objective"]["metric"] == "recall@10"
    # the baseline is computed on the same split as the generator's own popularity ranking
    assert test["popularity_recall@10"] == pytest.approx(info["popularity"]["recall@10"])
    assert test["recall@10"] > 1.25 * test["popularity_recall@10"]
    assert test["recall@10"] > test["popularity_recall@10"] + 0.07
    assert test["ndcg@10"] > test["popularity_ndcg@10"] + 0.05
    assert test["recall@10"] < info["planted"]["recall@10"]


def test_evaluate_reproduces_the_test_metrics_of_the_run(two_tower_run):
    result = evaluate.run(compose_cfg(f"run={two_tower_run}", config_name="evaluate"))
    written = json.loads((two_tower_run / "eval.json").read_text())
    assert written["metrics"] == result["metrics"] and written["split"] == "test"
    for name, value in metrics_of(two_tower_run)["test"].items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_a_run_written_before_retrieval_settings_left_the_model_config_evaluates_alike(
    two_tower_run, tmp_path
):
    """Earlier two-tower runs kept logq_correction, remove_accidental_hits and top_k in the model
    config (model.pt and config.yaml): their model loads and evaluates with those settings."""
    old = tmp_path / "old_run"
    shutil.copytree(two_tower_run, old, ignore=shutil.ignore_patterns("checkpoints"))
    payload = torch.load(old / "model.pt", weights_only=False)
    payload["model"] |= {"logq_correction": True, "remove_accidental_hits": True, "top_k": [10, 50]}
    torch.save(payload, old / "model.pt")
    saved = OmegaConf.load(old / "config.yaml")
    saved.model.top_k = [10, 50]
    saved.model.logq_correction = saved.model.remove_accidental_hits = True
    del saved["retrieval"]
    OmegaConf.save(saved, old / "config.yaml")
    result = evaluate.run(compose_cfg(f"run={old}", config_name="evaluate"))
    expected = {k: v for k, v in metrics_of(two_tower_run)["test"].items() if "@100" not in k}
    assert result["metrics"].keys() == expected.keys()
    for name, value in expected.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_tables_sharded_over_two_ranks_export_the_model_they_trained(interactions, tmp_path):
    """Two gloo processes split the tables; the exported model scores as the sharded one did."""
    run_dir = tmp_path / "run"
    args = [
        "model=two_tower",
        f"data.path={interactions}",
        "trainer=debug",
        f"hydra.run.dir={run_dir}",
    ]
    res = subprocess.run(
        [*torchrun_command(2), "-m", "recsys.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank:1/cpu" in (run_dir / "sharding_plan.txt").read_text()  # tables on rank 1 too
    result = evaluate.run(compose_cfg(f"run={run_dir}", config_name="evaluate"))
    for name, value in metrics_of(run_dir)["test"].items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_predict_writes_one_item_vector_per_input_row(interactions, two_tower_run, tmp_path):
    out = tmp_path / "items"
    args = (f"run={two_tower_run}", f"output={out}", "embeddings=item", "paths=[items]")
    cfg = compose_cfg(*args, config_name="predict")
    result = predict.run(cfg)
    table = ds.dataset(out).to_table()
    assert result["rows"] == table.num_rows == 1_000
    assert table.column_names == ["item_id", "embedding"]
    info = json.loads((out / "_predict.json").read_text())
    assert info["input"].endswith("(paths: items)") and info["rows"] == 1_000
    assert info["columns"] == {"item_id": "int64", "embedding": "fixed_size_list<item: float>[64]"}
    assert table["item_id"].to_pylist() == list(range(1_000))
    # the same vectors as the item tower computes from the interaction rows that hold the items
    model, _ = load_model(two_tower_run)
    batch = next(iter(run_test_split(two_tower_run)))
    with torch.no_grad():
        _, items = model(batch.dense_features, batch.sparse_features, vectors=True)
    ids = batch.sparse_features["item_id"].values().numpy()
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors[ids], items.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def deepfm_run(small_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "deepfm"
    train(
        compose_cfg("trainer=debug", f"data.path={small_data}", "trainer.progress_bar=false"),
        run_dir,
    )
    return run_dir


def test_predict_scores_equal_the_model_forward_on_every_row(small_data, deepfm_run, tmp_path):
    out = tmp_path / "scores"
    cfg = compose_cfg(f"run={deepfm_run}", f"output={out}", "keys=[c0,tags]", config_name="predict")
    result = predict.run(cfg)
    table = ds.dataset(out).to_table()
    source = ds.dataset(small_data / "test").to_table(columns=["c0", "tags"])
    assert result["rows"] == table.num_rows == source.num_rows
    assert table.column_names == ["c0", "tags", "score", "probability"]
    columns = json.loads((out / "_predict.json").read_text())["columns"]
    assert columns == {"c0": "int64", "tags": "list<element: int64>", "score": "float",
                       "probability": "float"}  # fmt: skip
    assert table["c0"].equals(source["c0"]) and table["tags"].equals(source["tags"])
    model, _ = load_model(deepfm_run)
    with torch.no_grad():
        logits = [model(b.dense_features, b.sparse_features) for b in run_test_split(deepfm_run)]
    np.testing.assert_allclose(table["score"].to_numpy(), torch.cat(logits).numpy(), atol=1e-6)
    p = table["probability"].to_numpy()
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-table["score"].to_numpy())), rtol=1e-5)


def test_a_run_without_a_finished_model_is_refused_with_one_line(tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    res = cli(f"run={unfinished}", cwd=tmp_path, module="evaluate")
    assert res.returncode == 2
    assert "error: " in res.stdout and "the run has no finished model" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    assert not list(tmp_path.glob("*.log")) and not (unfinished / "eval.json").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["embeddings=item", "paths=[users]"],
            "column 'item_price' (the model's features) is not in",
        ),
        (["embeddings=user", "keys=[nope]"], "column 'nope' (keys) is not in"),
        ([], "embeddings is not set: a two-tower model writes user or item vectors"),
        (["embeddings=item", "data=local"], "the data does not match the features the model"),
    ],
)
def test_predict_refuses_input_it_cannot_read_before_writing(
    two_tower_run, tmp_path, args, message
):
    out = tmp_path / "out"
    with pytest.raises(RecsysError, match=re.escape(message)):
        cfg = compose_cfg(f"run={two_tower_run}", f"output={out}", *args, config_name="predict")
        predict.run(cfg)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
