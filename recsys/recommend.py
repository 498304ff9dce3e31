"""`python -m recsys.recommend run=<two-tower run dir> k=100 output=<dir>`: top-k items per user.

The corpus (every item of the data once) is encoded once; the users (every user id of `split`, or
of `paths=`, with its first row's features) a batch at a time, each batch's top-k written as it
is found: exact by default (the corpus a slab at a time, never a users x items matrix), or
approximate through a faiss index (index=faiss, faiss_index= a factory string such as HNSW32 or
IVF256,Flat), whose recall@k against exact is measured on a sample of users. exclude_seen=true
drops the items each user interacted with (a positive label) in train. Output: Parquet files of
(user id, items, scores), scores the cosine similarity of user and item vectors.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from recsys import config as schema
from recsys.config import DataConfig, Index, RecommendConfig, SplitConfig
from recsys.data.sources import split_pieces
from recsys.errors import ConfigError
from recsys.export import corpus_rows, load_run
from recsys.exported import TwoTowerExport
from recsys.files import summary_table, write_dir_atomic
from recsys.runs import run_or_exit
from recsys.topk import top_k

log = logging.getLogger("recsys")
schema.register()


def seen_items(
    data: DataConfig, user_column: str, item_column: str, users: pa.Array, corpus: pa.Array
) -> list[np.ndarray]:
    """Per user, the corpus positions of the items of its train rows with a positive label."""
    pieces, row_filter, _ = split_pieces(data, "train")
    parts = [
        p.fragment.to_table(
            schema=p.schema, columns=[user_column, item_column, data.label], filter=row_filter
        )
        for p in pieces
    ]
    rows = pa.concat_tables(parts, promote_options="permissive")
    rows = rows.filter(pc.greater(rows[data.label], 0))
    user, item = (
        pc.fill_null(pc.index_in(rows[column], value_set=values), -1).to_numpy().astype(np.int64)
        for column, values in ((user_column, users), (item_column, corpus))
    )
    keep = (user >= 0) & (item >= 0)
    user, item = user[keep], item[keep]
    order = np.argsort(user, kind="stable")
    counts = np.bincount(user, minlength=len(users))
    return np.split(item[order], np.cumsum(counts)[:-1])


class FaissSearch:
    """An approximate inner-product index over the corpus vectors."""

    def __init__(self, vectors: np.ndarray, factory: str, params: str):
        try:
            import faiss
        except ImportError:
            raise ConfigError(
                "index=faiss needs faiss: pip install faiss-cpu (the project's `faiss` extra), "
                "or use index=exact"
            ) from None
        self.index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        self.index.train(vectors)
        self.index.add(vectors)
        if params:
            faiss.ParameterSpace().set_index_parameters(self.index, params)

    def __call__(self, users: np.ndarray, k: int, seen: list[np.ndarray] | None):
        extra = max((len(s) for s in seen), default=0) if seen is not None else 0
        scores, positions = self.index.search(users, k + extra)
        if seen is not None:
            for i, s in enumerate(seen):
                drop = np.isin(positions[i], s)
                scores[i, drop] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")
            scores = np.take_along_axis(scores, order, 1)
            positions = np.take_along_axis(positions, order, 1)
        return scores[:, :k], positions[:, :k]


def exact(users: np.ndarray, items: torch.Tensor, k: int, slab: int, seen):
    scores, positions = top_k(torch.from_numpy(users), items, k, slab, seen)
    return scores.numpy(), positions.numpy()


def lists(values: pa.Array, scores: np.ndarray, positions: np.ndarray) -> tuple:
    """Per-user lists of item ids and scores, without padding (-inf, or faiss's -1)."""
    valid = np.isfinite(scores) & (positions >= 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32))
    items = pa.ListArray.from_arrays(offsets, values.take(pa.array(positions[valid])))
    return items, pa.ListArray.from_arrays(offsets, pa.array(scores[valid], pa.float32()))


def recall(approx: np.ndarray, reference: np.ndarray) -> float:
    """Mean share of each reference top-k found by the approximate search."""
    pairs = zip(approx, reference, strict=True)
    hits = [len(np.intersect1d(a[a >= 0], r)) / max(len(r), 1) for a, r in pairs]
    return float(np.mean(hits)) if hits else 1.0


def run(cfg: DictConfig) -> dict:
    """Write each user's top-k items under `output`; return the figures."""
    typed: RecommendConfig = schema.to_object(cfg)
    output = Path(typed.output).expanduser()
    if output.exists():
        raise ConfigError(f"output={output} exists: give a directory that does not exist yet")
    model, data = load_run(typed)
    if not isinstance(model, TwoTowerExport):
        raise ConfigError(f"run={typed.run} is a {model.meta['model']} model: recommend needs a "
                          "two-tower run")  # fmt: skip
    split = typed.split.value
    users_data = data if not typed.paths else replace(data, **{split: SplitConfig(typed.paths)})
    user_column = model.user.id_column
    if user_column is None:
        raise ConfigError("the model has no model.user_id: recommend names users by that column")
    users = corpus_rows(users_data, model.user.columns, user_column, (split,))
    ids = pa.array(model.corpus_ids)
    items = torch.from_numpy(model.corpus_vectors)
    seen = None
    if typed.exclude_seen:
        seen = seen_items(data, user_column, model.item.id_column, users[user_column], ids)
    k = typed.k
    figures: dict = {"users": len(users), "items": len(ids), "k": k, "index": typed.index.value}
    search = None
    if typed.index is Index.faiss:
        start = time.perf_counter()
        search = FaissSearch(model.corpus_vectors, typed.faiss_index, typed.faiss_params)
        figures["index_build_s"] = time.perf_counter() - start

    def fill(tmp: Path) -> None:
        writer, start = None, time.perf_counter()
        checked, recalls, checking = 0, [], 0.0
        for s in range(0, len(users), typed.batch_size):
            batch = users.slice(s, typed.batch_size)
            vectors = model.user(batch)["embedding"]
            part_seen = None if seen is None else seen[s : s + len(batch)]
            if search is None:
                scores, positions = exact(vectors, items, k, typed.slab, part_seen)
            else:
                scores, positions = search(vectors, k, part_seen)
                if checked < typed.recall_sample:
                    check_start = time.perf_counter()
                    n = min(typed.recall_sample - checked, len(batch))
                    some = None if part_seen is None else part_seen[:n]
                    _, reference = exact(vectors[:n], items, k, typed.slab, some)
                    recalls.append((recall(positions[:n], reference), n))
                    checked += n
                    checking += time.perf_counter() - check_start
            item_lists, score_lists = lists(ids, scores, positions)
            table = pa.table(
                {user_column: batch[user_column], "items": item_lists, "scores": score_lists}
            )
            if writer is None:
                writer = pq.ParquetWriter(tmp / "part-00000.parquet", table.schema)
            writer.write_table(table)
        if writer is not None:
            writer.close()
        if recalls:
            figures[f"recall@{k}"] = sum(r * n for r, n in recalls) / sum(n for _, n in recalls)
            figures["recall_users"] = checked
        # users/s: encoding, search and writing; not the index build nor the recall check
        figures["seconds"] = time.perf_counter() - start - checking
        figures["recall_check_s"] = checking
        figures["users_per_s"] = len(users) / figures["seconds"] if figures["seconds"] else 0.0
        info = {"run": typed.run, "exclude_seen": typed.exclude_seen, **figures}
        (tmp / "_recommend.json").write_text(json.dumps(info, indent=2) + "\n")

    write_dir_atomic(output, fill)
    table = [
        ("users", f"{len(users):,}"),
        ("corpus", f"{len(ids):,} items"),
        ("index", typed.index.value if search is None else f"faiss {typed.faiss_index}"),
        ("users/s", f"{figures['users_per_s']:,.0f}"),
        ("written to", str(output)),
    ]
    if f"recall@{k}" in figures:
        measured = f"{figures[f'recall@{k}']:.4f} ({figures['recall_users']} users)"
        table.insert(3, (f"recall@{k} vs exact", measured))
    log.info("recommendations of %s\n%s", typed.run, summary_table(table))
    return figures


@hydra.main(version_base="1.3", config_path="../conf", config_name="recommend")
def main(cfg: DictConfig) -> None:
    """Entry point; user errors end with one line naming the fix."""
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
