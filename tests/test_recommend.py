"""`recsys.recommend`: each user's top-k against a brute-force reference on a small corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from recsys import export, recommend
from recsys.errors import RecsysError
from recsys.exported import load_exported
from recsys.topk import top_k
from tests.conftest import compose_cfg
from tests.exports import make_run, write_data


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recommend")
    data = write_data(root / "data")
    return data, make_run(root / "run", data, "two_tower")


def brute_force(data: Path, run: Path, tmp: Path, k: int, exclude_seen: bool) -> dict:
    """user id -> its top-k item ids, from every user x item score."""
    out = tmp / "export"
    export.run(compose_cfg(f"run={run}", f"output={out}", config_name="export"))
    model = load_exported(out)
    test = ds.dataset(data / "test").to_table()
    ids = test["user"].to_pylist()
    first = {u: i for i, u in reversed(list(enumerate(ids))) if u is not None}
    users = test.take(sorted(first.values()))
    scores = model.user(users)["embedding"] @ model.corpus_vectors.T
    corpus = model.corpus_ids.tolist()
    if exclude_seen:
        train = ds.dataset(data / "train").to_table().to_pylist()
        for i, user in enumerate(users["user"].to_pylist()):
            for row in train:
                if row["user"] == user and row["click"] > 0:
                    scores[i, corpus.index(row["item"])] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {
        u: [corpus[j] for j in b if np.isfinite(scores[i, j])]
        for i, (u, b) in enumerate(zip(users["user"].to_pylist(), best, strict=True))
    }


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_exact_top_k_equals_brute_force(run, tmp_path, exclude_seen):
    data, run_dir = run
    out = tmp_path / "top"
    args = (f"run={run_dir}", f"output={out}", "k=5", f"exclude_seen={exclude_seen}",
            "batch_size=16", "slab=7")  # fmt: skip
    figures = recommend.run(compose_cfg(*args, config_name="recommend"))
    table = ds.dataset(out).to_table()
    assert table.column_names == ["user", "items", "scores"]
    expected = brute_force(data, run_dir, tmp_path, 5, exclude_seen)
    got = dict(zip(table["user"].to_pylist(), table["items"].to_pylist(), strict=True))
    assert got == expected and figures["users"] == len(expected)
    scores = table["scores"].to_pylist()
    assert all(s == sorted(s, reverse=True) for s in scores)
    assert json.loads((out / "_recommend.json").read_text())["exclude_seen"] == exclude_seen


def test_faiss_reports_its_recall_against_exact(run, tmp_path):
    pytest.importorskip("faiss", reason="index=faiss needs the `faiss` extra (faiss-cpu)")
    data, run_dir = run
    for factory, floor in (("Flat", 1.0), ("HNSW16", 0.9)):
        out = tmp_path / factory
        args = (f"run={run_dir}", f"output={out}", "k=5", "index=faiss",
                f"faiss_index={factory}", "exclude_seen=true")  # fmt: skip
        figures = recommend.run(compose_cfg(*args, config_name="recommend"))
        assert figures["recall@5"] >= floor and figures["recall_users"] == figures["users"]
        table = ds.dataset(out).to_table()
        assert all(len(items) == 5 for items in table["items"].to_pylist())


def test_recommend_refuses_a_ranking_run(tmp_path):
    data = write_data(tmp_path / "data")
    ranking = make_run(tmp_path / "run", data, "mlp")
    with pytest.raises(RecsysError, match="recommend needs a two-tower run"):
        cfg = compose_cfg(f"run={ranking}", f"output={tmp_path / 'x'}", config_name="recommend")
        recommend.run(cfg)
    assert not (tmp_path / "x").exists()


def test_top_k_over_slabs_equals_a_full_sort_and_drops_seen_items():
    users, items = torch.randn(7, 8), torch.randn(50, 8)
    full = users @ items.T
    scores, positions = top_k(users, items, 10, slab=6)
    expected = full.topk(10, dim=1)
    assert torch.equal(positions, expected.indices)
    torch.testing.assert_close(scores, expected.values)
    seen = [np.array(expected.indices[i, :3].numpy()) for i in range(7)]
    _, positions = top_k(users, items, 10, slab=6, seen=seen)
    assert torch.equal(positions, expected.indices.new_tensor(full.scatter(
        1, expected.indices[:, :3], float("-inf")).topk(10, dim=1).indices))  # fmt: skip
