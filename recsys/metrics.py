"""Metrics: AUC, logloss and normalised entropy (binary); RMSE and MAE (regression)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from recsys.config import LabelKind

# Whether a larger value of each metric is better (used by early stopping and objectives).
HIGHER_IS_BETTER = {
    "auc": True,
    "logloss": False,
    "ne": False,
    "rmse": False,
    "mae": False,
    "recall": True,
    "ndcg": True,
}
# Each label kind's metrics, its main one first.
KIND_METRICS = {LabelKind.binary: ("auc", "logloss", "ne"), LabelKind.regression: ("rmse", "mae")}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of a metric is better; recall@k, ndcg@k go by their name, and a
    source's (`<source>/auc`) by its metric's."""
    return HIGHER_IS_BETTER[metric.rpartition("/")[2].partition("@")[0]]


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC, ties counted as half (Mann-Whitney U)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over runs of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compute(kind: LabelKind, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """All metrics of a label kind from model outputs (logits for binary, values for regression)."""
    logits = logits.astype(np.float64)
    if kind is LabelKind.binary:
        # log(1 + e^-|x|) + max(x, 0) - x*y is the stable binary cross-entropy
        ll = np.mean(np.logaddexp(0, logits) - logits * labels)
        p = float(np.clip(labels.mean(), 1e-12, 1 - 1e-12))
        entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        return {"auc": binary_auc(logits, labels), "logloss": float(ll), "ne": float(ll / entropy)}
    err = logits - labels
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


class Accumulator:
    """Collects a split's outputs batch by batch; 8 bytes per row."""

    def __init__(self, kind: LabelKind):
        self.kind = kind
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.logits.append(logits.detach().float().cpu())
        self.labels.append(labels.detach().float().cpu())

    def result(self) -> dict[str, float]:
        """Metrics over every row added, on every rank (the ranks' rows gathered when sharded)."""
        logits = torch.cat(self.logits).numpy() if self.logits else np.zeros(0, np.float32)
        labels = torch.cat(self.labels).numpy() if self.labels else np.zeros(0, np.float32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            shares: list = [None] * dist.get_world_size()
            dist.all_gather_object(shares, (logits, labels))
            logits = np.concatenate([s[0] for s in shares])
            labels = np.concatenate([s[1] for s in shares])
        return compute(self.kind, logits, labels)
