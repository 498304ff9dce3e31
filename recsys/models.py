"""The models: each is `forward(dense, sparse) -> logits` over one EmbeddingBagCollection."""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import NamedTuple, NotRequired, TypedDict, Unpack

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


def _sum_and_pairwise(fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fields' sum [B, k] and the sum over field pairs i < j of <v_i, v_j> [B]."""
    total = fields.sum(1)
    squares = torch.linalg.vector_norm(fields.flatten(1), dim=1).square()
    return total, 0.5 * (total.square().sum(1) - squares)


class _FMPairwise(torch.autograd.Function):
    """The pairwise term with a backward of one pass: d/dv_i = g (sum_j v_j - v_i)."""

    @staticmethod
    def forward(ctx, fields: torch.Tensor) -> torch.Tensor:
        total, pairwise = _sum_and_pairwise(fields)
        ctx.save_for_backward(fields, total)
        return pairwise

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        fields, total = ctx.saved_tensors
        return (total.unsqueeze(1) - fields).mul_(grad.view(-1, 1, 1))


def fm_pairwise(fields: torch.Tensor) -> torch.Tensor:
    """Sum over field pairs i < j of <v_i, v_j>, for fields [B, F, k], in O(F k)."""
    if torch.is_grad_enabled() and fields.requires_grad:
        return _FMPairwise.apply(fields)
    return _sum_and_pairwise(fields)[1]  # what torch.export traces


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
    # models with first-order weights: each in its vector's row, column `embedding_dim` (one
    # lookup for both; for optimizers with a per-weight state), not a table of its own
    first_order_in_row: NotRequired[bool]


class _Layout(NamedTuple):
    """The pooled output seen as blocks of `unit` columns: the blocks holding each feature's
    vector, in feature order [F * n], and the columns of its first-order weight [F]; `in_order`
    when each feature is one block, in feature order, its first-order weight (if any) inside."""

    unit: int
    vector_units: torch.Tensor
    bias_columns: torch.Tensor
    in_order: bool


class EmbeddingModel(nn.Module):
    """Owns the embedding tables: per categorical feature a vector table `t_<column>` and, for
    models with first-order weights, a table `w_<column>` of its own or (`first_order_in_row`)
    column `embedding_dim` of the vector's row.

    A table of its own (column 0 of a 4-wide row, FBGEMM's narrowest) gives the first-order
    weight an optimizer state of its own under FBGEMM's kernels: folded into the vector's row,
    row-wise Adagrad's one accumulator let the large first-order gradients shrink the vectors'
    steps. The row-sparse Adam keeps a state per weight and a rule per column, so there the
    weight rides in the row and one lookup serves both.
    """

    def __init__(
        self,
        features: FeatureSpec,
        embedding_dim: int,
        pooling: Pooling,
        init_std: float,
        first_order: bool,
        device: torch.device | str = "meta",
        first_order_in_row: bool = False,
    ):
        super().__init__()
        self.features = features
        self.vector_dim = embedding_dim
        self.first_order = first_order
        in_row = first_order and first_order_in_row and embedding_dim > 0
        # the first-order weight's column in the vector's row; -1: a table of its own, or none
        self.first_order_column = embedding_dim if in_row else -1
        kinds = [("t", table_width(embedding_dim + in_row))] if embedding_dim or in_row else []
        kinds += [("w", table_width(1))] if first_order and not in_row else []
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
        self._columns: dict[tuple[str, ...], _Layout] = {}

    def _layout(self, keys: list[str], lengths: list[int], device: torch.device) -> _Layout:
        """Where the pooled output holds each feature's vector and first-order weight.

        Keys are `column` or, when a column feeds two tables, `column@table`; tables sharded
        over several ranks come back grouped by rank, so the order is looked up once per layout.
        """
        starts = dict(zip(keys, itertools.accumulate([0, *lengths]), strict=False))
        names = self.features.categorical_names
        unit = math.gcd(*lengths)  # every block starts at a multiple of it

        def start(kind: str, name: str) -> int:
            return starts.get(f"{name}@{kind}_{name}", starts.get(name, 0))

        per_vector = -(-self.vector_dim // unit)
        vectors = [start("t", n) // unit + u for n in names for u in range(per_vector)]
        if self.first_order_column >= 0:
            bias = [start("t", n) + self.first_order_column for n in names]
        else:
            bias = [start("w", n) for n in names] if self.first_order else []
        in_order = vectors == list(range(len(names))) and (
            self.first_order_column >= 0 or not self.first_order
        )
        as_index = partial(torch.tensor, dtype=torch.long, device=device)
        return _Layout(unit, as_index(vectors), as_index(bias), in_order)

    def embed(self, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled vectors [B, F, k] and first-order weights [B, F] (if any) of the features."""
        pooled = self.ebc(sparse)
        keys = tuple(pooled.keys())
        values = pooled.values()
        if keys not in self._columns:
            self._columns[keys] = self._layout(list(keys), pooled.length_per_key(), values.device)
        layout = self._columns[keys]
        batch = values.shape[0]
        if layout.in_order:  # views of the rows, one split's backward
            return self._split_rows(values.view(batch, self.num_sparse, layout.unit))
        # whole blocks of `unit` columns, not single columns: a far cheaper gather and backward
        blocks = values.view(batch, -1, layout.unit).index_select(1, layout.vector_units)
        vectors = blocks.view(batch, self.num_sparse, -1)[..., : self.vector_dim]
        bias = values[:, layout.bias_columns] if self.first_order else None
        return vectors, bias

    def _split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors [B, F, k] and first-order weights [B, F] (if any) of pooled rows [B, F, w]."""
        k, width = self.vector_dim, rows.shape[2]
        if self.first_order_column < 0:
            return rows if width == k else rows[..., :k], None
        vectors, bias, _ = rows.split([k, 1, width - k - 1], dim=2)
        return vectors, bias.squeeze(2)


def unfold_first_order(model: EmbeddingModel, state: dict) -> dict:
    """A state dict with the first-order weights in the vectors' rows (column `embedding_dim`:
    trained with `first_order_in_row`, or before they had tables of their own) in this model's
    layout; others as they are."""
    prefix = "ebc.embedding_bags."
    in_row = model.first_order_column >= 0
    if not model.first_order or in_row or any(k.startswith(f"{prefix}w_") for k in state):
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
