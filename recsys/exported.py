"""Scoring raw rows with an export of `python -m recsys.export`: torch, numpy and pyarrow only.

This file is copied into every export as `load_exported.py`, so plain Python without recsys reads
one: `sys.path.insert(0, export_dir); from load_exported import load_exported`. It holds the
feature transforms training applies (string hashing, vocabulary lookup, out-of-range ids, nulls);
recsys's own reader uses the same functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.nn import functional as F

EXPORT_FORMAT = "recsys.export/1"
META_FILE = "export.json"
TABLES_FILE = "tables.pt"
CORPUS_FILE = "corpus.parquet"
FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


class InputError(ValueError):
    """Rows the model cannot read: the message names the column and the fix."""


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def hash_strings(values: pa.Array) -> np.ndarray:
    """64-bit FNV-1a of each UTF-8 string, vectorised over rows (stable across runs/machines)."""
    values = pc.cast(values, pa.large_string()) if pa.types.is_string(values.type) else values
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[
        values.offset : values.offset + len(values) + 1
    ]
    buf = values.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(values), FNV_OFFSET, dtype=np.uint64)
    for i in range(int(lengths.max()) if len(lengths) else 0):
        live = lengths > i
        h[live] = (h[live] ^ data[starts[live] + i].astype(np.uint64)) * FNV_PRIME
    return h


def id_keys(values: pa.Array) -> np.ndarray:
    """One uint64 key per id: integers as they are, strings by their 64-bit FNV-1a hash."""
    if is_string(values.type):
        return hash_strings(values)
    return pc.cast(values, pa.int64()).to_numpy().view(np.uint64)


def vocab_lookup(sorted_keys: np.ndarray, rows: np.ndarray, values: pa.Array) -> np.ndarray:
    """Table rows of raw ids through a vocabulary's sorted keys (0: not in the vocabulary)."""
    keys = id_keys(values)
    if not len(sorted_keys):
        return np.zeros(len(keys), np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, rows[pos], 0)


def as_table(batch: Any, columns: list[str]) -> pa.Table:
    """A dict of raw columns (lists, arrays), an Arrow batch or table, as a table of `columns`."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if isinstance(batch, pa.Table):
        missing = [c for c in columns if c not in batch.column_names]
        if missing:
            raise InputError(f"column '{missing[0]}' is missing; the model reads: {columns}")
        return batch.select(columns)
    out = {}
    for c in columns:
        if c not in batch:
            raise InputError(f"column '{c}' is missing; the model reads: {columns}")
        value = batch[c]
        try:
            out[c] = value if isinstance(value, pa.Array | pa.ChunkedArray) else pa.array(value)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise InputError(f"column '{c}' cannot be read: {e}") from None
    if len({len(v) for v in out.values()}) > 1:
        sizes = {c: len(v) for c, v in out.items()}
        raise InputError(f"columns have different numbers of rows: {sizes}")
    return pa.table(out) if out else pa.table({})


def _floats(values: pa.Array) -> np.ndarray:
    """float32 values; integers past float32's exact range (2^24) round, as numpy's would."""
    return pc.cast(values, pa.float32(), safe=False).to_numpy(zero_copy_only=False)


def dense_values(col: pa.Array, name: str, role: str = "dense", where: str = "") -> np.ndarray:
    """A float32 copy of a numeric column (NaN where null); a list holds at most one number."""
    inner = col.type.value_type if is_list(col.type) else col.type
    if not (pa.types.is_integer(inner) or pa.types.is_floating(inner)
            or pa.types.is_boolean(inner) or pa.types.is_null(inner)):  # fmt: skip
        raise InputError(f"column '{name}' ({role}){where} has type {col.type}; it must be numeric")
    if not is_list(col.type):
        return _floats(col).astype(np.float32)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    if len(lengths) and lengths.max() > 1:
        raise InputError(
            f"column '{name}' ({role}){where} holds lists of up to {lengths.max()} numbers; it "
            "is configured as one number a row"
        )
    out = np.full(len(col), np.nan, dtype=np.float32)
    flat = _floats(pc.list_flatten(col))
    out[lengths == 1] = flat
    return out


def clip_dense(x: np.ndarray, max_abs: float | None) -> np.ndarray:
    """Values beyond +-max_abs (inf too) set to +-max_abs in place; returns which were."""
    outside = np.abs(x) > max_abs if max_abs is not None else np.zeros(len(x), bool)
    if outside.any():
        x[outside] = np.copysign(np.float32(max_abs), x[outside])
    return outside


def cap_lists(
    flat: pa.Array, lengths: np.ndarray, cap: int | None
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Lists of more than `cap` ids cut to their first `cap`; also which rows were cut."""
    cut = lengths > cap if cap is not None else np.zeros(len(lengths), bool)
    if not cut.any():
        return flat, lengths, cut
    starts = np.cumsum(lengths) - lengths
    within = np.arange(len(flat)) - np.repeat(starts, lengths)  # an id's place in its list
    return flat.filter(pa.array(within < cap)), np.minimum(lengths, cap), cut


def bags(col: pa.Array, name: str) -> tuple[pa.Array, np.ndarray | None]:
    """A categorical column's ids flattened, and ids per row (None: exactly one id every row)."""
    inner = col.type.value_type if is_list(col.type) else col.type
    if not (pa.types.is_integer(inner) or is_string(inner) or pa.types.is_null(inner)):
        raise InputError(
            f"column '{name}' (categorical) has type {col.type}; it holds integer or string "
            "ids, or lists of them"
        )
    if is_list(col.type):
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
        flat = pc.list_flatten(col)
        if flat.null_count:
            raise InputError(f"list column '{name}' holds null ids inside its lists; drop them")
        return flat, lengths
    if col.null_count:
        return col.drop_null(), col.is_valid().to_numpy(zero_copy_only=False).astype(np.int64)
    return col, None


def table_rows(flat: pa.Array, rows: int, oov: str, name: str) -> np.ndarray:
    """Table rows of ids without a vocabulary: strings hashed, integers folded by `oov`."""
    if is_string(flat.type):
        return (hash_strings(flat) % np.uint64(rows)).astype(np.int64)
    if pa.types.is_null(flat.type):
        return np.zeros(0, np.int64)
    values = flat.to_numpy().astype(np.int64, copy=False)
    outside = values.view(np.uint64) >= rows  # negative ids wrap to huge values
    if oov == "error" and outside.any():
        raise InputError(
            f"column '{name}' has id {values[outside][0]} outside its table of {rows} rows "
            "(the model was trained with data.oov=error)"
        )
    return np.mod(values, rows) if outside.any() else values


def fill_missing(
    values: np.ndarray, lengths: np.ndarray, missing_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows with no id (null or an empty list) get `missing_id` as their one id."""
    empty = lengths == 0
    if not empty.any():
        return values, lengths
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.insert(values, starts[empty], missing_id), np.where(empty, 1, lengths)


class Features:
    """The transforms of one set of columns, from raw Arrow columns to the network's inputs."""

    def __init__(self, meta: dict, tables: dict[str, torch.Tensor], dense: list, categorical: list):
        self.meta, self.tables = meta, tables
        self.dense = [c for c in meta["dense"] if c in dense]
        self.categorical = [c for c in meta["categorical"] if c["name"] in categorical]
        self.columns = [*self.dense, *(c["name"] for c in self.categorical)]
        self.all_dense = meta["dense"]
        self.all_categorical = [c["name"] for c in meta["categorical"]]

    def schema(self) -> dict:
        """Each column the rows need: its role and the types it takes."""
        cols = {
            c: {"role": "dense", "type": self.meta["types"].get(c, "float")} for c in self.dense
        }
        for c in self.categorical:
            info = {"role": "categorical", "type": self.meta["types"].get(c["name"], "int|string")}
            cols[c["name"]] = info | {"table_rows": c["rows"]}
        return cols

    def inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense [B, D], pooled vectors [B, F, k] and first-order weights [B, F] of every feature
        of the model, zeros for the ones outside this set."""
        table = as_table(batch, self.columns)
        n = table.num_rows
        dense = torch.zeros(n, len(self.all_dense))
        for name in self.dense:
            x = dense_values(table.column(name).combine_chunks(), name)
            clip_dense(x, self.meta.get("dense_max_abs"))  # absent: an export from before it
            x[np.isnan(x)] = self.meta["dense_fill_value"]
            dense[:, self.all_dense.index(name)] = torch.from_numpy(x)
        k, first_order = self.meta["embedding_dim"], self.meta["first_order"]
        vectors = torch.zeros(n, len(self.all_categorical), k)
        bias = torch.zeros(n, len(self.all_categorical) if first_order else 0)
        for c in self.categorical:
            name = c["name"]
            flat, lengths = bags(table.column(name).combine_chunks(), name)
            if lengths is not None:
                flat, lengths, _ = cap_lists(flat, lengths, self.meta.get("max_list_length"))
            if c["vocabulary"]:
                keys = self.tables[f"vocab_keys_{name}"].numpy().view(np.uint64)
                values = vocab_lookup(keys, self.tables[f"vocab_rows_{name}"].numpy(), flat)
            else:
                values = table_rows(flat, c["rows"], self.meta["oov"], name)
            if lengths is None:
                lengths = np.ones(n, np.int64)
            elif self.meta["missing_id"] is not None:
                values, lengths = fill_missing(values, lengths, self.meta["missing_id"])
            ids = torch.from_numpy(np.require(values, np.int64, ["C", "W"]))
            offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
            j = self.all_categorical.index(name)
            mode = self.meta["pooling"]
            if k:
                vectors[:, j] = F.embedding_bag(ids, self.tables[f"t_{name}"], offsets, mode=mode)
            if first_order:
                w = self.tables[f"w_{name}"][:, None]
                bias[:, j] = F.embedding_bag(ids, w, offsets, mode=mode)[:, 0]
        return dense, vectors, bias


class Scorer:
    """A ranking model over raw rows: `score` (and `probability` for binary labels)."""

    def __init__(self, meta: dict, tables: dict, program: torch.nn.Module):
        self.meta, self.program = meta, program
        self.features = Features(
            meta, tables, meta["dense"], [c["name"] for c in meta["categorical"]]
        )
        self.columns = self.features.columns

    @torch.no_grad()
    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        score = self.program(*self.features.inputs(batch))
        out = {"score": score.numpy()}
        if self.meta["task"] == "binary":
            out["probability"] = torch.sigmoid(score).numpy()
        return out


class Encoder:
    """One tower of a two-tower model over raw rows of its columns: unit vectors [B, d]."""

    def __init__(self, meta: dict, tables: dict, program: torch.nn.Module, side: str):
        tower = meta["towers"][side]
        self.program, self.side, self.id_column = program, side, tower["id"]
        self.features = Features(meta, tables, tower["dense"], tower["categorical"])
        self.columns = self.features.columns

    @torch.no_grad()
    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        dense, vectors, _ = self.features.inputs(batch)
        return {"embedding": self.program(dense, vectors).numpy()}


class TwoTowerExport:
    """A two-tower export: `user` and `item` encoders, and the item corpus if it was exported."""

    def __init__(self, meta: dict, user: Encoder, item: Encoder, corpus: dict | None):
        self.meta, self.user, self.item = meta, user, item
        self.corpus_ids = None if corpus is None else corpus["ids"]
        self.corpus_vectors = None if corpus is None else corpus["vectors"]


def load_exported(directory: str | Path) -> Scorer | TwoTowerExport:
    """The export in `directory`: a `Scorer`, or a `TwoTowerExport` with user/item encoders."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} does not exist: not an export of recsys.export")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')}, not {EXPORT_FORMAT}")
    tables = torch.load(directory / TABLES_FILE, map_location="cpu", weights_only=True)
    programs = {
        name: torch.export.load(str(directory / file)).module()
        for name, file in meta["programs"].items()
    }
    if meta["kind"] == "ranking":
        return Scorer(meta, tables, programs["score"])
    corpus = None
    if (directory / CORPUS_FILE).exists():
        table = pq.read_table(directory / CORPUS_FILE)
        vectors = table["embedding"].combine_chunks()
        width = vectors.type.list_size
        flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        ids = table["id"].to_numpy(zero_copy_only=False)
        corpus = {"ids": ids, "vectors": flat.reshape(len(ids), width)}
    user = Encoder(meta, tables, programs["user"], "user")
    item = Encoder(meta, tables, programs["item"], "item")
    return TwoTowerExport(meta, user, item, corpus)
