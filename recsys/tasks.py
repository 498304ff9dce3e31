"""What a model learns: its task, a loss and metrics (Ranking: per row; two-tower: Retrieval).

"Task" here means only that (the `TrainingTask` the trainer steps); binary vs regression is the
label's kind (`config.LabelKind`, set by data.task), and Hydra's task is the job it runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.datasets.utils import Batch

from recsys.config import DataConfig, LabelKind, RetrievalConfig
from recsys.data.batches import Padding
from recsys.metrics import KIND_METRICS, Accumulator
from recsys.retrieval import Retrieval
from recsys.two_tower import TwoTower


class Evaluator(Protocol):
    def add(self, batch: Batch) -> None: ...

    def result(self) -> dict[str, float]: ...


class TrainingTask(Protocol):
    """The trainer's view of a model's learning problem."""

    metrics: tuple[str, ...]  # what objective / early stopping may name; the first is the default

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def evaluator(self, model: nn.Module, device: torch.device) -> Evaluator: ...


def loss_fn(kind: LabelKind, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind is LabelKind.binary:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.mse_loss(logits, labels)


class LogitEvaluator:
    """Collects a model's logits over a split and scores them against the labels."""

    def __init__(self, model: nn.Module, kind: LabelKind):
        self.model = model
        self.accumulator = Accumulator(kind)

    def add(self, batch: Batch) -> None:
        logits = self.model(batch.dense_features, batch.sparse_features)
        self.accumulator.add(logits, batch.labels)

    def result(self) -> dict[str, float]:
        return self.accumulator.result()


class Ranking:
    """A logit per row against its label: cross-entropy (binary) or squared error (regression)."""

    def __init__(self, kind: LabelKind):
        self.kind = kind
        self.metrics = KIND_METRICS[kind]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return loss_fn(self.kind, model(batch.dense_features, batch.sparse_features), batch.labels)

    def evaluator(self, model: nn.Module, device: torch.device) -> LogitEvaluator:
        return LogitEvaluator(model, self.kind)


def task_for(model: nn.Module, data: DataConfig, retrieval: RetrievalConfig) -> TrainingTask:
    """The learning problem of a model (before sharding) on the configured data; `retrieval`
    configures it for two-tower models."""
    if isinstance(model, TwoTower):
        return Retrieval.scan(model, data, retrieval)
    return Ranking(data.task)


@torch.no_grad()
def evaluate(
    model: nn.Module, task: TrainingTask, batches: Iterable[Batch], device: torch.device
) -> dict[str, float]:
    """The task's metrics of the model's current weights over batches (on device)."""
    model.eval()
    evaluator = task.evaluator(model, device)
    for batch in batches:
        if isinstance(batch, Padding):  # this rank's share ran out; the others need its step
            model(batch.dense_features, batch.sparse_features)
        else:
            evaluator.add(batch)
    return evaluator.result()
