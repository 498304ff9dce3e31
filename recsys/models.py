"""The models: each is `forward(dense, sparse) -> logits` over one EmbeddingBagCollection."""

from __future__ import annotations

import itertools
from functools import partial
from typing import NotRequired, TypedDict, Unpack

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import InteractionArch
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet

from recsys.config import CrossStructure, Pooling
from recsys.data.features import FeatureSpec


def table_width(dim: int) -> int:
    """Columns of a table: `dim` padded to a multiple of 4, as FBGEMM's fused CPU kernels need."""
    return -(-dim // 4) * 4


def fm_pairwise(fields: torch.Tensor) -> torch.Tensor:
    """Sum over field pairs i < j of <v_i, v_j>, for fields [B, F, k], in O(F k)."""
    return 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1)


def mlp(
    inputs: int, hidden: list[int], dropout: float, batch_norm: bool, outputs: int = 1
) -> nn.Sequential:
    """Hidden layers (Linear, [BatchNorm], ReLU, [Dropout]) and a Linear to `outputs` values."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(inputs, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        inputs = width
    layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers)


class Tables(TypedDict):
    """What every model's constructor takes for its embedding tables: the config's shared keys
    (embedding_dim, pooling, init_std; `ModelConfig`) and, from the caller, features and device."""

    features: FeatureSpec
    embedding_dim: int
    pooling: Pooling
    init_std: float
    device: NotRequired[torch.device | str]  # default "meta": DMP materialises the tables


class EmbeddingModel(nn.Module):
    """Owns the embedding tables: per categorical feature a vector table `t_<column>` and, for
    models with first-order weights, a table `w_<column>` of its own.

    The first-order weight has its own table (column 0 of a 4-wide row, FBGEMM's narrowest) so
    that its optimizer state is its own: folded into the vector's row, row-wise Adagrad's one
    accumulator let the large first-order gradients shrink the vectors' steps.
    """

    def __init__(
        self,
        features: FeatureSpec,
        embedding_dim: int,
        pooling: Pooling,
        init_std: float,
        first_order: bool,
        device: torch.device | str = "meta",
    ):
        super().__init__()
        self.features = features
        self.vector_dim = embedding_dim
        self.first_order = first_order
        kinds = [("t", table_width(embedding_dim))] if embedding_dim else []
        kinds += [("w", table_width(1))] if first_order else []
        pool = PoolingType[Pooling(pooling).name.upper()]
        init = partial(nn.init.normal_, mean=0.0, std=init_std)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"{kind}_{name}",
                    embedding_dim=width,
                    num_embeddings=rows,
                    feature_names=[name],
                    pooling=pool,
                    init_fn=init,
                )
                for kind, width in kinds
                for name, rows in features.categorical
            ],
            device=torch.device(device),
        )
        self.num_dense = len(features.dense)
        self.num_sparse = len(features.categorical)
        self._columns: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def _layout(self, keys: list[str], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of the pooled output holding the vectors [F * k] and first-order weights [F].

        Keys are `column` or, when a column feeds two tables, `column@table`; tables sharded
        over several ranks come back grouped by rank, so the order is looked up once per layout.
        """
        starts = dict(zip(keys, itertools.accumulate([0, *lengths]), strict=False))
        names = self.features.categorical_names

        def start(kind: str, name: str) -> int:
            return starts.get(f"{name}@{kind}_{name}", starts.get(name, 0))

        vectors = [start("t", n) + c for n in names for c in range(self.vector_dim)]
        bias = [start("w", n) for n in names] if self.first_order else []
        return torch.tensor(vectors, dtype=torch.long), torch.tensor(bias, dtype=torch.long)

    def embed(self, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled vectors [B, F, k] and first-order weights [B, F] (if any) of the features."""
        pooled = self.ebc(sparse)
        keys = tuple(pooled.keys())
        if keys not in self._columns:
            self._columns[keys] = self._layout(list(keys), pooled.length_per_key())
        vector_cols, bias_cols = self._columns[keys]
        values = pooled.values()
        vectors = values[:, vector_cols.to(values.device)]
        vectors = vectors.view(values.shape[0], self.num_sparse, self.vector_dim)
        bias = values[:, bias_cols.to(values.device)] if self.first_order else None
        return vectors, bias


def unfold_first_order(model: EmbeddingModel, state: dict) -> dict:
    """A state dict written before first-order weights had tables of their own (the weight in
    column `embedding_dim` of the vector's row) in this model's layout; others as they are."""
    prefix = "ebc.embedding_bags."
    if not model.first_order or any(k.startswith(f"{prefix}w_") for k in state):
        return state
    state = dict(state)
    for name, _ in model.features.categorical:
        folded = state.pop(f"{prefix}t_{name}.weight")
        weight = folded.new_zeros(folded.shape[0], table_width(1))
        weight[:, 0] = folded[:, model.vector_dim]
        state[f"{prefix}w_{name}.weight"] = weight
        if model.vector_dim:
            state[f"{prefix}t_{name}.weight"] = folded[:, : table_width(model.vector_dim)].clone()
    return state


class LR(EmbeddingModel):
    """First-order baseline: a weight per id and per dense feature (logistic/linear regression)."""

    def __init__(self, **tables: Unpack[Tables]):
        super().__init__(first_order=True, **(tables | {"embedding_dim": 0}))
        self.linear = nn.Linear(self.num_dense, 1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        _, bias = self.embed(sparse)
        return self.linear(dense).squeeze(-1) + bias.sum(1)


class FM(EmbeddingModel):
    """Factorization machine; dense features enter as fields x_d * v_d."""

    def __init__(self, **tables: Unpack[Tables]):
        super().__init__(first_order=True, **tables)
        self.linear = nn.Linear(self.num_dense, 1)
        vectors = torch.randn(self.num_dense, self.vector_dim) * tables["init_std"]
        self.dense_vectors = nn.Parameter(vectors)

    def fields(self, dense: torch.Tensor, sparse: KeyedJaggedTensor):
        """All fields' vectors [B, F + D, k] and the first-order logit [B]."""
        vectors, bias = self.embed(sparse)
        dense_fields = dense.unsqueeze(-1) * self.dense_vectors
        first = self.linear(dense).squeeze(-1) + bias.sum(1)
        return torch.cat([vectors, dense_fields], dim=1), first

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, first = self.fields(dense, sparse)
        return first + fm_pairwise(fields)


class DeepFM(FM):
    """FM plus an MLP over the same field vectors (embeddings shared by both parts)."""

    def __init__(
        self, hidden: list[int], dropout: float, batch_norm: bool, **tables: Unpack[Tables]
    ):
        super().__init__(**tables)
        fields = self.num_sparse + self.num_dense
        self.dnn = mlp(fields * self.vector_dim, list(hidden), dropout, batch_norm)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, first = self.fields(dense, sparse)
        deep = self.dnn(fields.flatten(1)).squeeze(-1)
        return first + fm_pairwise(fields) + deep


class MLP(EmbeddingModel):
    """An MLP over the concatenated embeddings and raw dense features."""

    def __init__(
        self, hidden: list[int], dropout: float, batch_norm: bool, **tables: Unpack[Tables]
    ):
        super().__init__(first_order=False, **tables)
        inputs = self.num_sparse * self.vector_dim + self.num_dense
        self.dnn = mlp(inputs, list(hidden), dropout, batch_norm)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        vectors, _ = self.embed(sparse)
        return self.dnn(torch.cat([vectors.flatten(1), dense], dim=1)).squeeze(-1)


class DCNv2(MLP):
    """DCN-v2 (Wang et al. 2021): cross layers on x_0 = [embeddings, dense], stacked or parallel."""

    def __init__(
        self,
        hidden: list[int],
        dropout: float,
        batch_norm: bool,
        cross_layers: int,
        low_rank: int | None,
        structure: CrossStructure,
        **tables: Unpack[Tables],
    ):
        super().__init__(hidden, dropout, batch_norm, **tables)
        inputs = self.num_sparse * self.vector_dim + self.num_dense
        if low_rank is None:
            self.cross = CrossNet(inputs, cross_layers)
        else:
            self.cross = LowRankCrossNet(inputs, cross_layers, low_rank)
        # parallel: the final linear over [cross, DNN] is this half plus the DNN's own last layer
        parallel = CrossStructure(structure) is CrossStructure.parallel
        self.cross_out = nn.Linear(inputs, 1, bias=False) if parallel else None

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        vectors, _ = self.embed(sparse)
        x0 = torch.cat([vectors.flatten(1), dense], dim=1)
        if self.cross_out is None:
            return self.dnn(self.cross(x0)).squeeze(-1)
        return (self.cross_out(self.cross(x0)) + self.dnn(x0)).squeeze(-1)


class DLRM(EmbeddingModel):
    """DLRM as TorchRec's: dot products of all pairs of the dense vector and embeddings, top MLP."""

    def __init__(self, bottom_hidden: list[int], top_hidden: list[int], **tables: Unpack[Tables]):
        super().__init__(first_order=False, **tables)
        embedding_dim = self.vector_dim
        bottom = mlp(self.num_dense, list(bottom_hidden), 0.0, False, outputs=embedding_dim)
        self.bottom = bottom.append(nn.ReLU())
        self.interaction = InteractionArch(self.num_sparse)
        pairs = (self.num_sparse + 1) * self.num_sparse // 2
        self.top = mlp(embedding_dim + pairs, list(top_hidden), 0.0, False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        vectors, _ = self.embed(sparse)
        return self.top(self.interaction(self.bottom(dense), vectors)).squeeze(-1)
