"""`python -m recsys.export run=<run dir> output=<dir>`: a self-contained scoring artifact.

The export scores raw rows with torch, numpy and pyarrow alone (no recsys, no TorchRec):
- export.json: columns, their roles and types, and every transform training applied (vocabulary,
  string hashing, out-of-range policy, missing id, dense fill), the pooling and table widths;
- tables.pt: the embedding tables as plain tensors (and vocabularies' sorted keys);
- model.pt2 (ranking) or user.pt2 + item.pt2 (two-tower): the network after the embedding
  lookup, through `torch.export`;
- corpus.parquet (two-tower): every item of the data once, its raw id and item vector;
- load_exported.py: the loader, `load_exported(dir)`, importable from the directory itself.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig
from torch import nn

from recsys import config as schema
from recsys import exported
from recsys.config import DataConfig, ExportConfig, RunInputConfig
from recsys.data import vocabulary
from recsys.data.features import FeatureSpec
from recsys.data.sources import split_pieces
from recsys.errors import ConfigError
from recsys.files import summary_table, write_dir_atomic
from recsys.runs import open_run, run_or_exit
from recsys.two_tower import TwoTower

log = logging.getLogger("recsys")
schema.register()
SPLITS = ("train", "validation", "test")


class PooledHead(nn.Module):
    """A ranking model after its embedding lookup: (dense, vectors [B,F,k], weights [B,F])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        ebc = model._modules.pop("ebc")
        try:
            self.model = copy.deepcopy(model)  # without the tables, which travel as tensors
        finally:
            model._modules["ebc"] = ebc
        self.model.embed = lambda pooled: pooled  # the pooled inputs stand for the sparse ones
        self.first_order = model.first_order

    def forward(self, dense: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor):
        return self.model(dense, (vectors, bias if self.first_order else None))


class TowerHead(nn.Module):
    """One tower of a two-tower model over (dense [B,D], vectors [B,F,k])."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = copy.deepcopy(tower)

    def forward(self, dense: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return self.tower(vectors, dense)


def column_types(data: DataConfig, columns: list[str]) -> dict[str, str]:
    """Arrow types of the columns in the data's first test (else train) file."""
    for split in ("test", "train"):
        if data.split(split) is None:
            continue
        try:
            pieces, _, _ = split_pieces(data, split)
        except Exception:  # noqa: BLE001 - the types are informative only
            continue
        if pieces:
            file_schema = pieces[0].fragment.physical_schema
            return {c: str(file_schema.field(c).type) for c in columns if c in file_schema.names}
    return {}


def tables_of(model: nn.Module, spec: FeatureSpec, vocab: dict | None) -> dict[str, torch.Tensor]:
    """The embedding tables as plain tensors: vectors [rows, k] and first-order weights [rows]."""
    bags = model.ebc.embedding_bags
    out = {}
    for name in spec.categorical_names:
        if model.vector_dim:
            out[f"t_{name}"] = bags[f"t_{name}"].weight[:, : model.vector_dim].detach().clone()
        if model.first_order:
            out[f"w_{name}"] = bags[f"w_{name}"].weight[:, 0].detach().clone()
        if vocab is not None:
            out[f"vocab_keys_{name}"] = torch.from_numpy(vocab[name].sorted_keys.view(np.int64))
            out[f"vocab_rows_{name}"] = torch.from_numpy(vocab[name].rows)
    return out


def export_program(head: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> None:
    """`torch.export` the head with a dynamic batch dimension, saved as a .pt2 file."""
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.export.export(head.eval(), args, dynamic_shapes=[{0: batch}] * len(args))
    torch.export.save(program, str(path))


def metadata(model: nn.Module, spec: FeatureSpec, data: DataConfig, run_dir: Path) -> dict:
    vocab = data.vocabulary
    meta = {
        "format": exported.EXPORT_FORMAT,
        "kind": "two_tower" if isinstance(model, TwoTower) else "ranking",
        "model": type(model).__name__,
        "run": str(run_dir),
        "label": spec.label,
        "task": spec.label_kind.value,
        "dense": list(spec.dense),
        "categorical": [
            {"name": n, "rows": rows, "vocabulary": vocab} for n, rows in spec.categorical
        ],
        "types": column_types(data, [*spec.dense, *spec.categorical_names]),
        "dense_fill_value": data.dense_fill_value,
        "dense_max_abs": data.dense_max_abs,
        "max_list_length": data.max_list_length,
        "oov": data.oov.value,
        "missing_id": data.missing_id,
        "pooling": model.ebc.embedding_bag_configs()[0].pooling.name.lower(),
        "embedding_dim": model.vector_dim,
        "first_order": model.first_order,
        "torch": torch.__version__,
    }
    if isinstance(model, TwoTower):
        meta["towers"] = {
            side: {
                "dense": [c for c in spec.dense if c in columns],
                "categorical": [c for c in spec.categorical_names if c in columns],
                "id": key,
            }
            for side, columns, key in (
                ("user", model.user_features, model.user_id),
                ("item", model.item_features, model.item_id),
            )
        }
        meta["temperature"] = model.temperature
        meta["programs"] = {"user": "user.pt2", "item": "item.pt2"}
    else:
        meta["programs"] = {"score": "model.pt2"}
    return meta


def corpus_rows(
    data: DataConfig, columns: list[str], id_column: str, splits: tuple[str, ...] = SPLITS
) -> pa.Table:
    """Every id in the splits once (its first row's columns), in id order: the item corpus, or
    the users to recommend for."""
    parts = []
    for split in splits:
        if data.split(split) is None:
            continue
        pieces, row_filter, _ = split_pieces(data, split)
        for piece in pieces:
            parts.append(
                piece.fragment.to_table(schema=piece.schema, columns=columns, filter=row_filter)
            )
    table = pa.concat_tables(parts, promote_options="permissive")
    table = table.filter(pc.is_valid(table[id_column]))
    table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    first = table.group_by(id_column).aggregate([("__row", "min")])["__row_min"]
    return table.take(first).sort_by(id_column).drop_columns(["__row"])


def write_corpus(directory: Path, data: DataConfig, batch_size: int) -> int:
    """Encode every item of the data with the export's own item encoder into corpus.parquet."""
    encoder = exported.load_exported(directory).item
    rows = corpus_rows(data, encoder.columns, encoder.id_column)
    vectors = [
        encoder(rows.slice(s, batch_size))["embedding"] for s in range(0, len(rows), batch_size)
    ]
    flat = np.concatenate(vectors) if vectors else np.zeros((0, 1), np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    pq.write_table(pa.table({"id": rows[encoder.id_column], "embedding": embedding}),
                   directory / exported.CORPUS_FILE)  # fmt: skip
    return len(rows)


def write_export(
    directory: Path, model: nn.Module, spec: FeatureSpec, data: DataConfig, run_dir: Path
) -> dict:
    """Fill an (empty) directory with the export of a model; return its metadata."""
    meta = metadata(model, spec, data, run_dir)
    torch.save(tables_of(model, spec, vocabulary.for_data(data)), directory / exported.TABLES_FILE)
    n, f, k = 4, len(spec.categorical), model.vector_dim
    dense, vectors = torch.randn(n, len(spec.dense)), torch.randn(n, f, k)
    if isinstance(model, TwoTower):
        for side, tower in (("user", model.user_tower), ("item", model.item_tower)):
            export_program(TowerHead(tower), (dense, vectors), directory / meta["programs"][side])
    else:
        bias = torch.randn(n, f if model.first_order else 0)
        export_program(PooledHead(model), (dense, vectors, bias), directory / "model.pt2")
    shutil.copyfile(exported.__file__, directory / "load_exported.py")
    (directory / exported.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_run(cfg: RunInputConfig) -> tuple[exported.Scorer | exported.TwoTowerExport, DataConfig]:
    """A run's model exported to a temporary directory and loaded from it, and its data."""
    run_dir, model, spec, data = open_run(cfg, label=False)
    with tempfile.TemporaryDirectory(prefix="recsys-export-") as tmp:
        meta = write_export(Path(tmp), model, spec, data, run_dir)
        if meta["kind"] == "two_tower":
            write_corpus(Path(tmp), data, 8192)
        return exported.load_exported(tmp), data


def run(cfg: DictConfig) -> dict:
    """Export the run's model under `output`; return what was written."""
    typed: ExportConfig = schema.to_object(cfg)
    output = Path(typed.output).expanduser()
    if output.exists():
        raise ConfigError(f"output={output} exists: give a directory that does not exist yet")
    start = time.perf_counter()
    run_dir, model, spec, data = open_run(typed, label=False)

    def fill(tmp: Path) -> dict:
        meta = write_export(tmp, model, spec, data, run_dir)
        if meta["kind"] == "two_tower" and typed.corpus:
            meta["corpus_items"] = write_corpus(tmp, data, typed.batch_size)
        return meta

    meta = write_dir_atomic(output, fill)
    size = sum(p.stat().st_size for p in output.iterdir())
    result = {"output": str(output), "bytes": size, "seconds": time.perf_counter() - start}
    table = [
        ("model", f"{meta['model']} ({meta['kind']})"),
        ("files", ", ".join(sorted(p.name for p in output.iterdir()))),
        ("size", f"{size / 1e6:,.1f} MB"),
        ("written to", str(output)),
    ]
    if "corpus_items" in meta:
        table.insert(2, ("corpus", f"{meta['corpus_items']:,} items"))
    log.info("export of %s\n%s", run_dir, summary_table(table))
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Entry point; user errors end with one line naming the fix."""
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
