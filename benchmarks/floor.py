"""The hand-written PyTorch baseline the benchmarks measure recsys against: FM or DeepFM with an
`nn.EmbeddingBag` per column (sparse gradients), `SparseAdam` for the tables and `Adam` for the
rest (lr 1e-3), tensors preloaded in memory."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch
from torch import nn


def load_split(split: Path, n_dense: int, n_cat: int):
    """Dense floats (nulls as 0), ids and 0/1 labels of a generated split, as tensors."""
    t = ds.dataset(split, format="parquet").to_table()
    x = np.stack([t[f"d{i}"].to_numpy(zero_copy_only=False) for i in range(n_dense)], 1)
    ids = np.stack([t[f"c{i}"].to_numpy() for i in range(n_cat)], 1)
    y = torch.from_numpy(t["click"].to_numpy().astype(np.float32))
    return torch.from_numpy(np.nan_to_num(x).astype(np.float32)), torch.from_numpy(ids), y


class Floor(nn.Module):
    """FM (no `hidden` layers) or DeepFM over per-column EmbeddingBags; first-order weights in
    their own dim-1 bags."""

    def __init__(self, cards: list[int], n_dense: int, dim: int, hidden: list[int], dropout: float):
        super().__init__()
        self.emb = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in cards)
        self.bias = nn.ModuleList(nn.EmbeddingBag(n, 1, mode="sum", sparse=True) for n in cards)
        for e in [*self.emb, *self.bias]:
            nn.init.normal_(e.weight, std=0.01)
        self.linear = nn.Linear(n_dense, 1)
        self.dense_vectors = nn.Parameter(torch.randn(n_dense, dim) * 0.01)
        layers, width = [], (len(cards) + n_dense) * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), *([nn.Dropout(dropout)] if dropout else [])]
            width = h
        self.dnn = nn.Sequential(*layers, nn.Linear(width, 1)) if hidden else None

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(idx.shape[0])
        vecs = [e(idx[:, f], offsets) for f, e in enumerate(self.emb)]
        first = sum(b(idx[:, f], offsets) for f, b in enumerate(self.bias)).squeeze(-1)
        fields = torch.cat([torch.stack(vecs, 1), x.unsqueeze(-1) * self.dense_vectors], 1)
        out = first + self.linear(x).squeeze(-1)
        out = out + 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1)
        if self.dnn is not None:
            out = out + self.dnn(fields.flatten(1)).squeeze(-1)
        return out

    def split_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The tables' parameters (sparse gradients) and the rest."""
        named = list(self.named_parameters())
        tables = [p for n, p in named if n.startswith(("emb", "bias"))]
        return tables, [p for n, p in named if not n.startswith(("emb", "bias"))]


def train(net: Floor, dense, ids, labels, epochs: int, batch: int) -> float:
    """`epochs` passes of SparseAdam (tables) and Adam (the rest), lr 1e-3; the seconds taken."""
    tables, rest = net.split_parameters()
    optimizers = [torch.optim.SparseAdam(tables, lr=1e-3), torch.optim.Adam(rest, lr=1e-3)]
    loss_fn = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        for s in range(0, len(labels), batch):
            loss = loss_fn(net(dense[s : s + batch], ids[s : s + batch]), labels[s : s + batch])
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
    return time.perf_counter() - start
