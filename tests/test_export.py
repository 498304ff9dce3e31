"""`recsys.export`: the export scores raw rows as `recsys.predict` does, without recsys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from recsys import export, predict
from recsys.errors import RecsysError
from recsys.exported import InputError, load_exported
from tests.conftest import cli, compose_cfg
from tests.exports import make_run, write_data

KINDS = {
    "lr": ("lr",),
    "fm": ("fm",),
    "deepfm": ("deepfm",),
    "mlp": ("mlp",),
    "dcn_v2": ("dcn_v2", "model.low_rank=4", "model.structure=parallel"),
    "dlrm": ("dlrm",),
    "deepfm_missing_id": ("deepfm", "data.missing_id=0", "model.pooling=mean"),
    "mlp_vocabulary": (
        "mlp",
        "data.vocabulary=true",
        "data.categorical=[user,city,tags,item,genre]",
    ),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("export") / "data")


@pytest.fixture(scope="module")
def vocab_data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("export") / "vocab_data")


def exported_run(root: Path, data: Path, name: str, *args: str) -> tuple[Path, Path]:
    run = make_run(root / name, data, *args)
    out = root / f"{name}-export"
    export.run(compose_cfg(f"run={run}", f"output={out}", config_name="export"))
    return run, out


def predicted(run: Path, out: Path, *args: str) -> pa.Table:
    predict.run(compose_cfg(f"run={run}", f"output={out}", *args, config_name="predict"))
    return ds.dataset(out).to_table()


@pytest.mark.parametrize("name", list(KINDS))
def test_export_scores_the_test_split_as_predict_does(name, data, vocab_data, tmp_path):
    source = vocab_data if "vocabulary" in name else data
    run, out = exported_run(tmp_path, source, name, *KINDS[name])
    expected = predicted(run, tmp_path / "predictions")
    scorer = load_exported(out)
    got = scorer(ds.dataset(source / "test").to_table())
    assert np.std(expected["score"].to_numpy()) > 1e-3  # the weights make a difference
    np.testing.assert_allclose(got["score"], expected["score"].to_numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["probability"], expected["probability"].to_numpy(), atol=1e-5)
    files = {p.name for p in out.iterdir()}
    assert files == {"export.json", "tables.pt", "model.pt2", "load_exported.py"}


def test_two_tower_export_encodes_users_and_items_as_predict_does(data, tmp_path):
    run, out = exported_run(tmp_path, data, "two_tower", "two_tower")
    loaded = load_exported(out)
    test = ds.dataset(data / "test").to_table()
    for side in ("user", "item"):
        expected = predicted(run, tmp_path / side, f"embeddings={side}")["embedding"]
        vectors = np.stack(expected.to_numpy(zero_copy_only=False))
        got = getattr(loaded, side)(test)["embedding"]
        np.testing.assert_allclose(got, vectors, atol=1e-5, rtol=0)
    # the corpus: each item of the data once, in id order, with its first row's item vector
    splits = [ds.dataset(data / s).to_table() for s in ("train", "validation", "test")]
    rows = pa.concat_tables(splits)
    items = sorted(set(rows["item"].to_pylist()))
    assert loaded.corpus_ids.tolist() == items
    for position in (0, len(items) - 1):
        first = rows["item"].to_pylist().index(items[position])
        vector = loaded.item(rows.slice(first, 1))["embedding"][0]
        np.testing.assert_allclose(loaded.corpus_vectors[position], vector, atol=1e-6)


def test_export_loads_in_a_fresh_process_without_recsys_or_torchrec(data, tmp_path):
    _, out = exported_run(tmp_path, data, "dcn_v2", "dcn_v2")
    rows = {"d0": [0.5, None], "d1": [1, 2], "user": [3, 700], "city": ["city-1", None],
            "tags": [[1, 2], []], "item": [4, 5], "genre": ["g1", "g2"]}  # fmt: skip
    script = f"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("recsys", "torchrec", "fbgemm_gpu"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(out)!r})
from load_exported import load_exported
scores = load_exported({str(out)!r})(json.loads({json.dumps(json.dumps(rows))}))["score"]
print(json.dumps(scores.tolist()))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = json.loads(res.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(fresh, load_exported(out)(rows)["score"], atol=1e-6)


def test_rows_the_export_cannot_read_name_the_column(data, tmp_path):
    tables = "data.categorical=[user:100,city:30,tags:40,item:30,genre:10]"
    _, out = exported_run(tmp_path, data, "mlp", "mlp", "data.oov=error", tables)
    scorer = load_exported(out)
    good = {"d0": [0.5], "d1": [1], "user": [3], "city": ["x"], "tags": [[1]], "item": [4],
            "genre": ["g1"]}  # fmt: skip
    assert scorer(good)["score"].shape == (1,)
    with pytest.raises(InputError, match="column 'city' is missing"):
        scorer({k: v for k, v in good.items() if k != "city"})
    with pytest.raises(InputError, match=r"column 'd0' \(dense\) has type string"):
        scorer(good | {"d0": ["high"]})
    with pytest.raises(InputError, match=r"column 'item' \(categorical\) has type double"):
        scorer(good | {"item": [1.5]})
    with pytest.raises(InputError, match="column 'user' has id 100 outside its table of 100"):
        scorer(good | {"user": [100]})
    with pytest.raises(InputError, match="column 'tags' cannot be read"):
        scorer(good | {"tags": [[1, "a"]]})


def test_export_refuses_an_existing_output_and_an_unfinished_run(data, tmp_path):
    run, out = exported_run(tmp_path, data, "lr", "lr")
    with pytest.raises(RecsysError, match="exists: give a directory that does not exist yet"):
        export.run(compose_cfg(f"run={run}", f"output={out}", config_name="export"))
    (tmp_path / "unfinished").mkdir()
    res = cli(f"run={tmp_path / 'unfinished'}", f"output={tmp_path / 'x'}", module="export")
    assert res.returncode == 2 and "the run has no finished model" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr and not (tmp_path / "x").exists()
