"""Two-tower retrieval: user and item towers over their own tables, trained by in-batch softmax."""

from __future__ import annotations

from typing import Unpack

import torch
from torch import nn
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor

from recsys.data.features import FeatureSpec
from recsys.errors import ConfigError
from recsys.models import EmbeddingModel, Tables, mlp


def check_towers(
    spec: FeatureSpec, user: list[str], item: list[str], user_id: str | None, item_id: str
) -> None:
    """Every data column feeds exactly one tower, and the id columns are categorical ones."""
    columns = [*spec.dense, *spec.categorical_names]
    for key, names in (("model.user_features", user), ("model.item_features", item)):
        unknown = [c for c in names if c not in columns]
        if unknown:
            raise ConfigError(
                f"{key} names {unknown}, which the data config does not have (its dense and "
                f"categorical columns are: {', '.join(columns)}): fix {key} or the data config"
            )
    both = sorted(set(user) & set(item))
    if both:
        raise ConfigError(f"{both} are in both model.user_features and model.item_features")
    left = [c for c in columns if c not in user and c not in item]
    if left:
        raise ConfigError(
            f"data column(s) {left} are in neither model.user_features nor model.item_features: "
            "add each to one tower, or drop it from the data config"
        )
    for key, name, tower in (("user_id", user_id, user), ("item_id", item_id, item)):
        if name is not None and (name not in tower or name not in spec.categorical_names):
            raise ConfigError(
                f"model.{key}={name} must be a categorical column in model.{key[:4]}_features"
            )


class Tower(nn.Module):
    """An MLP over some fields' pooled embeddings and dense columns, to a unit vector."""

    def __init__(
        self,
        fields: list[int],
        dense: list[int],
        embedding_dim: int,
        hidden: list[int],
        output_dim: int,
        dropout: float,
        batch_norm: bool,
    ):
        super().__init__()
        self.fields, self.dense = fields, dense
        inputs = len(fields) * embedding_dim + len(dense)
        self.mlp = mlp(inputs, list(hidden), dropout, batch_norm, outputs=output_dim)

    def forward(self, vectors: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = torch.cat([vectors[:, self.fields].flatten(1), dense[:, self.dense]], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTower(EmbeddingModel):
    """User and item towers; a row's logit is the cosine of its user and item over temperature."""

    def __init__(
        self,
        hidden: list[int],
        dropout: float,
        batch_norm: bool,
        user_features: list[str],
        item_features: list[str],
        user_id: str | None,
        item_id: str,
        output_dim: int,
        temperature: float,
        **tables: Unpack[Tables],
    ):
        features = tables["features"]
        check_towers(features, user_features, item_features, user_id, item_id)
        super().__init__(first_order=False, **tables)
        self.user_features, self.item_features = list(user_features), list(item_features)
        self.user_id, self.item_id = user_id, item_id
        self.temperature = temperature
        names = features.categorical_names
        args = (self.vector_dim, hidden, output_dim, dropout, batch_norm)
        self.user_tower, self.item_tower = (
            Tower(
                [i for i, c in enumerate(names) if c in tower],
                [i for i, c in enumerate(features.dense) if c in tower],
                *args,
            )
            for tower in (user_features, item_features)
        )

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor, vectors: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Each row's logit; with vectors=True, the user and item vectors [B, output_dim]."""
        pooled, _ = self.embed(sparse)
        users, items = self.user_tower(pooled, dense), self.item_tower(pooled, dense)
        if vectors:
            return users, items
        return (users * items).sum(1) / self.temperature


def in_batch_softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
) -> torch.Tensor:
    """Sampled softmax of each row's item against the batch's items, logits less log q(item).

    The batch's items are the negatives, sampled with probability q (their frequency), so
    subtracting log q from every logit (logQ correction, Yi et al. 2019) makes the loss an
    estimate of the full softmax's. Other rows holding a row's own item are masked out of its
    negatives (accidental hits); `weights` weight the rows (0: a negative for others only).
    """
    scaled = users / temperature
    logits = scaled @ items.T if log_q is None else torch.addmm(-log_q, scaled, items.T)
    if remove_accidental_hits:
        same = item_ids[:, None] == item_ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(users), device=users.device)
    ce = F.cross_entropy(logits, target, reduction="none")
    if weights is None:
        return ce.mean()
    return (weights * ce).sum() / weights.sum().clamp_min(1.0)
