"""Retrieval metrics: each held-out item's rank among the whole corpus, recall@k and NDCG@k."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

# Scores of L2-normalised vectors closer than this count as ties (broken by corpus position), so
# float rounding between a query's own-item score and the same score in a matrix product cannot
# move an item ahead of an identical one.
TIE = 1e-6


def corpus_ranks(
    queries: torch.Tensor, corpus: torch.Tensor, positions: torch.Tensor, budget: int = 1 << 22
) -> torch.Tensor:
    """0-based rank of corpus[positions[i]] among all corpus rows by score <queries[i], row>.

    Scores are computed a slab of corpus rows at a time, at most `budget` of them at once, so
    memory stays bounded however large the corpus is; ties go to the lower position.
    """
    own = (queries * corpus[positions]).sum(1, keepdim=True)
    ranks = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    slab = max(1, budget // max(1, len(queries)))
    for start in range(0, len(corpus), slab):
        scores = queries @ corpus[start : start + slab].T
        cols = torch.arange(start, start + scores.shape[1], device=queries.device)[None, :]
        before = cols < positions[:, None]
        ahead = (scores > own + TIE) | ((scores >= own - TIE) & before)
        ranks += (ahead & (cols != positions[:, None])).sum(1)
    return ranks


def popularity_ranks(counts: np.ndarray) -> np.ndarray:
    """Each item's 0-based rank in the popularity order: most interactions first, ties by id."""
    ranks = np.empty(len(counts), dtype=np.int64)
    ranks[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    return ranks


class RankMetrics:
    """Recall@k and NDCG@k of queries that each have one relevant item, from its rank."""

    def __init__(self, ks: tuple[int, ...]):
        self.ks = tuple(ks)
        self.queries = 0
        self.hits = np.zeros(len(self.ks))
        self.gains = np.zeros(len(self.ks))

    def add(self, ranks: np.ndarray) -> None:
        ranks = np.asarray(ranks)
        self.queries += len(ranks)
        for j, k in enumerate(self.ks):
            inside = ranks[ranks < k]
            self.hits[j] += len(inside)
            self.gains[j] += (1.0 / np.log2(inside + 2.0)).sum()

    def result(self, prefix: str = "") -> dict[str, float]:
        """Recall and NDCG over every query added, on every rank (summed over ranks if sharded)."""
        queries, hits, gains = self.queries, self.hits, self.gains
        if dist.is_initialized() and dist.get_world_size() > 1:
            sums = torch.tensor([queries, *hits, *gains], dtype=torch.float64)
            dist.all_reduce(sums)
            k = len(self.ks)
            queries, hits, gains = int(sums[0]), sums[1 : 1 + k].numpy(), sums[1 + k :].numpy()
        n = max(queries, 1)
        out = {f"{prefix}recall@{k}": float(h / n) for k, h in zip(self.ks, hits, strict=True)}
        out |= {f"{prefix}ndcg@{k}": float(g / n) for k, g in zip(self.ks, gains, strict=True)}
        return out
