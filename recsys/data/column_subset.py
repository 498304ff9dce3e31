"""Running a model on some of its columns: the data config cut to them, inputs padded back."""

from __future__ import annotations

from dataclasses import replace

import torch
from torchrec import KeyedJaggedTensor

from recsys.config import DataConfig
from recsys.data.features import FeatureSpec


def only_columns(data: DataConfig, columns: list[str]) -> DataConfig:
    """The data config reading just these dense and categorical columns (and the label)."""
    entries = zip(data.categorical, data.tables, strict=True)
    categorical = [entry for entry, name in entries if name in columns]
    return replace(data, dense=[c for c in data.dense if c in columns], categorical=categorical)


def pad_inputs(
    spec: FeatureSpec, part: FeatureSpec, dense: torch.Tensor, sparse: KeyedJaggedTensor
) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Inputs for every column of spec from a batch of part's: zeros and empty bags elsewhere."""
    n = len(dense)
    full = torch.zeros(n, len(spec.dense))
    for j, name in enumerate(part.dense):
        full[:, spec.dense.index(name)] = dense[:, j]
    bags = sparse.to_dict()
    none = torch.zeros(n, dtype=torch.long)
    names = spec.categorical_names
    values = [bags[k].values() if k in bags else none[:0] for k in names]
    lengths = [bags[k].lengths() if k in bags else none for k in names]
    return full, KeyedJaggedTensor(names, torch.cat(values), lengths=torch.cat(lengths))
