"""Retrieval as a training task: the item corpus, the in-batch softmax loss, recall@k / NDCG@k."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from recsys.config import DataConfig, RetrievalConfig
from recsys.data.batches import DataQuality
from recsys.data.column_subset import only_columns, pad_inputs
from recsys.data.features import FeatureSpec
from recsys.data.reader import open_split
from recsys.errors import DataError
from recsys.retrieval_metrics import RankMetrics, corpus_ranks, popularity_ranks
from recsys.two_tower import TwoTower, in_batch_softmax_loss

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def take_rows(kjt: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
    """The given rows of a KJT (every key), in that order."""
    values, lengths = [], []
    for jt in kjt.to_dict().values():
        n = jt.lengths()[rows]
        shift = jt.offsets()[:-1][rows] - (torch.cumsum(n, 0) - n)
        index = torch.repeat_interleave(shift, n) + torch.arange(int(n.sum()))
        values.append(jt.values()[index])
        lengths.append(n)
    return KeyedJaggedTensor(kjt.keys(), torch.cat(values), lengths=torch.cat(lengths))


def cat_rows(kjts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """KJTs with the same keys, one's rows after the other's."""
    parts = [k.to_dict() for k in kjts]
    keys = kjts[0].keys()
    values = [p[key].values() for key in keys for p in parts]
    lengths = [p[key].lengths() for key in keys for p in parts]
    return KeyedJaggedTensor(keys, torch.cat(values), lengths=torch.cat(lengths))


def item_ids(batch: Batch, column: str) -> torch.Tensor:
    """The item id of each row; every row must have exactly one."""
    jt = batch.sparse_features[column]
    if (jt.lengths() != 1).any():
        raise DataError(
            f"the item id column '{column}' (model.item_id) has rows with no id or several: "
            "every row needs exactly one item id; drop or fix those rows"
        )
    return jt.values()


@dataclass
class Corpus:
    """Every item of the data once, in id order: features from one of its rows, and counts."""

    ids: torch.Tensor  # [N] ascending
    chunks: list[tuple[torch.Tensor, KeyedJaggedTensor]]  # the items' dense and sparse features
    positions: torch.Tensor  # item id -> its position in ids (-1: not in the data)
    sampled: np.ndarray  # train rows per item id: how often it is an in-batch candidate
    clicked: np.ndarray  # train rows per item id with a positive label: its popularity

    @classmethod
    def scan(
        cls,
        splits: dict[str, Iterable[Batch]],
        spec: FeatureSpec,
        part: FeatureSpec,
        column: str,
        chunk: int,
    ) -> Corpus:
        """Collect the corpus in one pass over splits of part's columns; counts from `train`."""
        rows = dict(spec.categorical)[column]
        seen = np.zeros(rows, dtype=bool)
        sampled = np.zeros(rows, dtype=np.int64)
        clicked = np.zeros(rows, dtype=np.int64)
        found, dense, sparse = [], [], []
        for name, batches in splits.items():
            for batch in batches:
                ids = item_ids(batch, column).numpy()
                if name == "train":
                    sampled += np.bincount(ids, minlength=rows)
                    clicked += np.bincount(ids[batch.labels.numpy() > 0], minlength=rows)
                unique, first = np.unique(ids, return_index=True)
                new = ~seen[unique]
                if not new.any():
                    continue
                seen[unique[new]] = True
                at = torch.from_numpy(first[new])
                found.append(unique[new])
                dense.append(batch.dense_features[at])
                sparse.append(take_rows(batch.sparse_features, at))
        ids = np.concatenate(found)
        order = torch.from_numpy(np.argsort(ids))
        all_dense, all_sparse = torch.cat(dense)[order], take_rows(cat_rows(sparse), order)
        chunks = [
            pad_inputs(
                spec,
                part,
                all_dense[s : s + chunk],
                take_rows(all_sparse, torch.arange(s, min(s + chunk, len(ids)))),
            )
            for s in range(0, len(ids), chunk)
        ]
        positions = torch.full((rows,), -1, dtype=torch.long)
        positions[torch.from_numpy(ids)[order]] = torch.arange(len(ids))
        return cls(torch.from_numpy(ids)[order], chunks, positions, sampled, clicked)


class Retrieval:
    """In-batch sampled softmax with logQ correction; recall@k and NDCG@k against the corpus."""

    def __init__(self, model: TwoTower, corpus: Corpus, settings: RetrievalConfig):
        self.item_id = model.item_id
        self.temperature = model.temperature
        self.remove_accidental_hits = settings.remove_accidental_hits
        self.top_k = tuple(settings.top_k)
        self.corpus = corpus
        self.metrics = tuple(f"{m}@{k}" for m in ("recall", "ndcg") for k in self.top_k)
        q = np.maximum(corpus.sampled, 1) / max(int(corpus.sampled.sum()), 1)
        self.log_q = torch.from_numpy(np.log(q)).float() if settings.logq_correction else None

    @classmethod
    def scan(cls, model: TwoTower, data: DataConfig, settings: RetrievalConfig) -> Retrieval:
        """The task on the configured data: its corpus gathered from every split's item columns."""
        items = only_columns(data, model.item_features)
        splits = {
            name: open_split(items, name, DataQuality(), train=False)
            for name in SPLITS
            if getattr(data, name) is not None
        }
        part = FeatureSpec.from_data_config(items)
        corpus = Corpus.scan(splits, model.features, part, model.item_id, data.eval_batch_size)
        log.info(
            "corpus: %d items (of %d ids), %d train interactions",
            len(corpus.ids),
            len(corpus.positions),
            int(corpus.clicked.sum()),
        )
        return cls(model, corpus, settings)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        users, items = model(batch.dense_features, batch.sparse_features, vectors=True)
        ids = item_ids(batch, self.item_id)
        log_q = None
        if self.log_q is not None:
            self.log_q = self.log_q.to(ids.device)
            log_q = self.log_q[ids]
        weights = (batch.labels > 0).float()
        return in_batch_softmax_loss(
            users, items, ids, self.temperature, log_q, weights, self.remove_accidental_hits
        )

    def evaluator(self, model: nn.Module, device: torch.device) -> RetrievalEvaluator:
        return RetrievalEvaluator(model, self, device)


class RetrievalEvaluator:
    """Ranks each positive row's item among the corpus for its user, next to popularity's rank."""

    def __init__(self, model: nn.Module, task: Retrieval, device: torch.device):
        self.model = model
        self.item_id = task.item_id
        corpus = task.corpus
        self.items = torch.cat(
            [model(d.to(device), s.to(device), vectors=True)[1] for d, s in corpus.chunks]
        )
        self.positions = corpus.positions.to(device)
        self.popularity = torch.from_numpy(popularity_ranks(corpus.clicked[corpus.ids.numpy()]))
        self.model_metrics = RankMetrics(task.top_k)
        self.popularity_metrics = RankMetrics(task.top_k)

    def add(self, batch: Batch) -> None:
        positive = batch.labels > 0
        users, _ = self.model(batch.dense_features, batch.sparse_features, vectors=True)
        at = self.positions[item_ids(batch, self.item_id)][positive]
        ranks = corpus_ranks(users[positive], self.items, at)
        self.model_metrics.add(ranks.cpu().numpy())
        self.popularity_metrics.add(self.popularity[at.cpu()].numpy())

    def result(self) -> dict[str, float]:
        return self.model_metrics.result() | self.popularity_metrics.result("popularity_")
