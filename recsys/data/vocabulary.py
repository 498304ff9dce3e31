"""Vocabularies: per categorical column, the ids seen in the train split, most frequent first.

`build` (run by `python -m recsys.vocabulary [data=...] [data.vocabulary_min_count=N]`) counts
them and writes <data.path>/_vocab/<column>.parquet (value, count) and vocab.json last, so a
half-written vocabulary is never read; an embedded demo set's go to <cache>/vocab/<set>, leaving
the shared demo data as it was generated. With `data.vocabulary=true` each table gets one row per
kept id plus row 0 for ids not in it (unseen, or rarer than min_count), and raw ids, integers or
strings, map to their rows by a sorted-array lookup.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys.config import DataConfig, demo_dir
from recsys.data.batches import DataQuality
from recsys.data.sources import filesystem, no_rows, split_pieces
from recsys.errors import DataError
from recsys.exported import id_keys, vocab_lookup

log = logging.getLogger("recsys")
VOCAB_DIR = "_vocab"
INDEX = "vocab.json"


class Vocabulary:
    """Maps a column's raw ids to table rows 1..n (0 for ids not in the vocabulary)."""

    def __init__(self, values: pa.Array):
        keys = id_keys(values)
        order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[order]
        self.rows = (order + 1).astype(np.int64)

    @property
    def table_rows(self) -> int:
        return len(self.rows) + 1

    def lookup(self, values: pa.Array) -> np.ndarray:
        return vocab_lookup(self.sorted_keys, self.rows, values)


def for_data(data: DataConfig) -> dict[str, Vocabulary] | None:
    """The vocabularies when data.vocabulary is set, else None (sizes come from config)."""
    return load(data) if data.vocabulary else None


def location(data: DataConfig) -> tuple[pafs.FileSystem, str]:
    """The file system and directory of data.path's vocabularies."""
    fs, root = filesystem(data.path, data.s3)
    demo = Path(demo_dir("")).resolve()
    if isinstance(fs, pafs.LocalFileSystem) and Path(root).parent == demo:
        return fs, str(demo.parent / "vocab" / Path(root).name)
    return fs, f"{root}/{VOCAB_DIR}"


def load(data: DataConfig) -> dict[str, Vocabulary]:
    """The vocabularies of data.path's categorical columns, as `recsys.vocabulary` wrote them."""
    fs, where = location(data)
    index_path = f"{where}/{INDEX}"
    try:
        with fs.open_input_stream(index_path) as f:
            text = f.read().decode()
            index = json.loads(text)
    except (FileNotFoundError, OSError):
        raise DataError(
            f"data.vocabulary=true but {data.path} has no vocabulary ({index_path}): "
            "run `python -m recsys.vocabulary` with the same data overrides first"
        ) from None
    missing = [c for c in data.tables if c not in index["columns"]]
    if missing:
        raise DataError(
            f"the vocabulary in {where} lacks column(s) {missing}: run "
            "`python -m recsys.vocabulary` again with the current data.categorical"
        )
    out = {}
    for name in data.tables:
        key = (
            data.path,
            text,
            name,
        )  # vocab.json is rewritten by every build, so it keys freshness
        if key not in _LOADED:
            with fs.open_input_file(f"{where}/{name}.parquet") as f:
                values = pq.read_table(f, columns=["value"]).column(0).combine_chunks()
            _LOADED[key] = Vocabulary(values)
        out[name] = _LOADED[key]
    return out


# Vocabularies already read in this process: train/validation/test readers and evaluate share them.
_LOADED: dict[tuple[str, str, str], Vocabulary] = {}


def build(data: DataConfig) -> dict:
    """Count every categorical column's ids over the train split and write the vocabularies."""
    columns = list(data.tables)
    quality = DataQuality()
    pieces, row_filter, split = split_pieces(data, "train", quality)
    if not pieces:  # empty vocabularies would map every id to the out-of-vocabulary row
        raise no_rows(data, "train", split, quality)
    counts: dict[str, list[pa.Table]] = {c: [] for c in columns}
    rows = 0
    for piece in pieces:
        for rb in piece.fragment.to_batches(schema=piece.schema, columns=columns,
                                             filter=row_filter, batch_size=1 << 16):  # fmt: skip
            rows += rb.num_rows
            for c in columns:
                col = rb.column(c)
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    col = pc.list_flatten(col)
                vc = pc.value_counts(col.drop_null())
                counts[c].append(pa.table({"value": vc.field(0), "count": vc.field(1)}))
            if sum(len(t) for t in counts[columns[0]]) > 1 << 22:
                counts = {c: [_merge(ts)] for c, ts in counts.items()}
    fs, where = location(data)
    fs.create_dir(where, recursive=True)
    index: dict = {"split": "train", "rows": rows, "min_count": data.vocabulary_min_count,
                   "columns": {}}  # fmt: skip
    for c in columns:
        table = _merge(counts[c])
        kept = table.filter(pc.greater_equal(table["count"], data.vocabulary_min_count))
        with fs.open_output_stream(f"{where}/{c}.parquet") as f:
            pq.write_table(kept, f)
        index["columns"][c] = {"distinct": len(table), "kept": len(kept),
                               "table_rows": len(kept) + 1}  # fmt: skip
    with fs.open_output_stream(f"{where}/{INDEX}") as f:
        f.write(json.dumps(index, indent=2).encode())
    log.info("vocabularies of %s written to %s", split, where)
    return index


def _merge(tables: list[pa.Table]) -> pa.Table:
    """Sum counts per value; most frequent first, ties by value, so the order is stable."""
    if not tables:
        return pa.table({"value": pa.array([], pa.int64()), "count": pa.array([], pa.int64())})
    merged = pa.concat_tables(tables).group_by("value").aggregate([("count", "sum")])
    merged = merged.rename_columns(["value", "count"])
    return merged.sort_by([("count", "descending"), ("value", "ascending")])
