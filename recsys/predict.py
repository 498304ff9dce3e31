"""`python -m recsys.predict run=<run dir> [data=<name>] output=<dir>`: a split through a model.

Rows stream from the input files a batch at a time into one output Parquet file per input file,
so memory stays bounded by the batch however large the data is. The output directory appears
complete or not at all (it is written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from itertools import groupby
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys import config as schema
from recsys.config import Embeddings, LabelKind, PredictConfig, SplitConfig
from recsys.data import vocabulary
from recsys.data.batches import BatchConverter, DataQuality, check_schema
from recsys.data.column_subset import pad_inputs
from recsys.data.features import FeatureSpec
from recsys.data.sources import Piece, split_pieces
from recsys.errors import ConfigError, DataError
from recsys.files import summary_table, write_dir_atomic
from recsys.runs import open_run, run_or_exit
from recsys.two_tower import TwoTower

log = logging.getLogger("recsys")
schema.register()


class ScoreColumns:
    """A ranking model's output: its logit (and the probability, for binary labels)."""

    def __init__(self, model: nn.Module, spec: FeatureSpec):
        self.model, self.label_kind = model, spec.label_kind
        self.part = spec
        self.keys: list[str] = []

    def __call__(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, pa.Array]:
        score = self.model(dense, sparse)
        out = {"score": pa.array(score.numpy())}
        if self.label_kind is LabelKind.binary:
            out["probability"] = pa.array(torch.sigmoid(score).numpy())
        return out


class TowerVectors:
    """A two-tower model's user or item vectors, computed from that tower's columns alone."""

    def __init__(self, model: TwoTower, spec: FeatureSpec, side: Embeddings):
        self.model, self.side = model, side
        user = side is Embeddings.user
        self.part = spec.only(model.user_features if user else model.item_features)
        key = model.user_id if user else model.item_id
        self.keys = [key] if key else []

    def __call__(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, pa.Array]:
        users, items = self.model(dense, sparse, vectors=True)
        vectors = users if self.side is Embeddings.user else items
        flat = pa.array(vectors.numpy().ravel())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])}


def output_of(model: nn.Module, spec: FeatureSpec, side: Embeddings | None):
    """What predict writes for this model: scores, or a tower's vectors."""
    if isinstance(model, TwoTower):
        if side is None:
            raise ConfigError(
                "embeddings is not set: a two-tower model writes user or item vectors; "
                "pass embeddings=user or embeddings=item"
            )
        return TowerVectors(model, spec, side)
    if side is not None:
        raise ConfigError(
            f"embeddings={side.value} is for two-tower models; this run's model is "
            f"{type(model).__name__}, which writes scores: leave embeddings out"
        )
    return ScoreColumns(model, spec)


def check_columns(pieces: list[Piece], part: FeatureSpec, keys: list[str]) -> None:
    """Every input file has the columns the output needs, with types the model can read."""
    features = [*part.dense, *part.categorical_names]
    for path in dict.fromkeys(p.fragment.path for p in pieces):
        file_schema = next(p for p in pieces if p.fragment.path == path).fragment.physical_schema
        for column in [*features, *keys]:
            if file_schema.get_field_index(column) < 0:
                role = "the model's features" if column in features else "keys"
                raise DataError(
                    f"column '{column}' ({role}) is not in {path}; its columns are: "
                    f"{', '.join(file_schema.names)}. Predict on data with the columns the "
                    "model was trained on" + (", or fix keys=" if role == "keys" else "")
                )
        if file_schema.get_field_index(part.label) < 0:  # predict reads no labels
            file_schema = file_schema.append(pa.field(part.label, pa.float32()))
        check_schema(path, file_schema, part)


def with_label(rb: pa.RecordBatch, label: str) -> pa.Table:
    """The rows as a table with a label column (zeros when the input has none) for the reader."""
    table = pa.Table.from_batches([rb])
    if label in table.column_names:
        return table
    return table.append_column(label, pa.array(np.zeros(len(table), dtype=np.float32)))


def run(cfg: DictConfig) -> dict:
    """Write the model's outputs for every row of the split under `output`; return the figures."""
    typed: PredictConfig = schema.to_object(cfg)
    run_dir, model, spec, data = open_run(typed, label=False)
    output = Path(typed.output).expanduser()
    if output.exists():
        raise ConfigError(f"output={output} exists: give a directory that does not exist yet")
    head = output_of(model, spec, typed.embeddings)
    part = head.part
    keys = head.keys if typed.keys is None else list(typed.keys)
    name = typed.split.value
    if typed.paths:
        data = replace(data, **{name: SplitConfig(list(typed.paths))})
    pieces, row_filter, where = split_pieces(data, name)
    if typed.paths:  # files of their own, not the split's
        where = f"{data.path} (paths: {', '.join(typed.paths)})"
    check_columns(pieces, part, keys)
    convert = BatchConverter.of(part, data, DataQuality(), vocabulary.for_data(data))
    batch_size = typed.batch_size or data.eval_batch_size
    read = list(dict.fromkeys([*part.dense, *part.categorical_names, *keys]))
    start = time.perf_counter()

    @torch.no_grad()
    def fill(tmp: Path) -> int:
        rows, parts, columns = 0, 0, {}
        for path, group in groupby(pieces, key=lambda p: p.fragment.path):
            writer = None
            for piece in group:
                for rb in piece.fragment.to_batches(
                    columns=read, filter=row_filter, batch_size=batch_size
                ):
                    if not rb.num_rows:  # the filter left none of these rows
                        continue
                    batch = convert(with_label(rb, part.label), path)
                    inputs = pad_inputs(spec, part, batch.dense_features, batch.sparse_features)
                    out = pa.table({k: rb.column(k) for k in keys} | head(*inputs))
                    if writer is None:
                        writer = pq.ParquetWriter(tmp / f"part-{parts:05d}.parquet", out.schema)
                        parts += 1
                        columns = {f.name: str(f.type) for f in out.schema}
                    writer.write_table(out)
                    rows += out.num_rows
            if writer is not None:
                writer.close()
        info = {"run": str(run_dir), "input": where, "rows": rows, "keys": keys, "columns": columns}
        (tmp / "_predict.json").write_text(json.dumps(info, indent=2) + "\n")
        return rows

    rows = write_dir_atomic(output, fill)
    seconds = time.perf_counter() - start
    result = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds if seconds else 0.0}
    table = [
        ("input", where),
        ("rows", f"{rows:,}"),
        ("rows/s", f"{result['rows_per_s']:,.0f}"),
        ("written to", str(output)),
    ]
    log.info("predictions of %s\n%s", run_dir, summary_table(table))
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Entry point; user errors end with one line naming the fix."""
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
