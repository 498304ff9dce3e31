"""The data path: Parquet files -> Arrow record batches -> TorchRec `Batch`es."""

from __future__ import annotations

import glob
import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import DataConfig, OovPolicy, Task
from recsys.errors import DataError
from recsys.features import FeatureSpec

T = TypeVar("T")


def find_files(root: str, split: str) -> list[str]:
    """The Parquet files of one split: a sub-directory, file or glob, relative to root."""
    target = split if Path(split).is_absolute() else str(Path(root).expanduser() / split)
    matches = sorted(glob.glob(target, recursive=True)) if glob.has_magic(target) else [target]
    files: list[str] = []
    for m in matches:
        p = Path(m)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*.parquet") if f.is_file())
        elif p.is_file() and p.suffix == ".parquet":
            files.append(str(p))
    if not files:
        raise DataError(
            f"no Parquet files at {target} (data.path={root}, split '{split}'): point data.path "
            "at a directory whose train/validation/test sub-directories hold *.parquet files, "
            "or set data.train/data.validation/data.test to paths or globs of Parquet files"
        )
    return files


def _role(spec: FeatureSpec, column: str) -> str:
    if column == spec.label:
        return "data.label"
    return "data.dense" if column in spec.dense else "data.categorical"


def check_files(files: list[str], spec: FeatureSpec, oov: OovPolicy) -> None:
    """Check every file's footer before training: columns, their types, label and id ranges."""
    for f in files:
        pf = pq.ParquetFile(f)
        check_schema(f, pf.schema_arrow, spec)
        check_ranges(f, pf.metadata, spec, oov)


def check_schema(f: str, schema: pa.Schema, spec: FeatureSpec) -> None:
    """Every configured column is in the file with a usable Arrow type."""
    for column in spec.columns:
        idx = schema.get_field_index(column)
        role = _role(spec, column)
        if idx < 0:
            raise DataError(
                f"column '{column}' ({role}) is not in {f}; its columns are: "
                f"{', '.join(schema.names)}. Fix the column name in {role}"
            )
        t = schema.field(idx).type
        numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        if column in spec.categorical_names:
            is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
            inner = t.value_type if is_list else t
            if not pa.types.is_integer(inner):
                raise DataError(
                    f"column '{column}' ({role}) in {f} has type {t}; categorical columns "
                    "must hold integer ids or lists of them: map the values to integer ids"
                )
        elif not numeric:
            raise DataError(
                f"column '{column}' ({role}) in {f} has type {t}; it must be a numeric "
                "scalar: fix the column or move it to data.categorical"
            )


def _stats_range(meta: pq.FileMetaData, column: str) -> tuple[float, float] | None:
    """Min and max of a top-level scalar column from the footer, if every row group has them."""
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if column not in names:  # a nested (list) column's leaf has a longer path
        return None
    j = names.index(column)
    lo, hi = float("inf"), float("-inf")
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(j).statistics
        if st is None or not st.has_min_max:
            return None
        lo, hi = min(lo, st.min), max(hi, st.max)
    return lo, hi


def check_ranges(f: str, meta: pq.FileMetaData, spec: FeatureSpec, oov: OovPolicy) -> None:
    """Labels that are not 0/1 and, under oov=error, ids past a table, from footer statistics."""
    if spec.task is Task.binary:
        r = _stats_range(meta, spec.label)
        if r and (r[0] < 0 or r[1] > 1):
            bad = r[0] if r[0] < 0 else r[1]
            raise DataError(
                f"label column '{spec.label}' in {f} has value {bad}; binary labels must be "
                "0 or 1: fix the data, or set data.task=regression"
            )
    if oov is OovPolicy.error:
        for name, rows in spec.categorical:
            r = _stats_range(meta, name)
            if r and (r[0] < 0 or r[1] >= rows):
                bad = r[0] if r[0] < 0 else r[1]
                raise DataError(
                    f"categorical column '{name}' in {f} has id {bad} outside its table of "
                    f"{rows} rows: raise its size in data.categorical ({name}:ROWS) above "
                    "the largest id, or set data.oov=mod"
                )


@dataclass
class DataQuality:
    """Counts of values the reader had to repair, reported at the end of a run."""

    dense_nulls: Counter = field(default_factory=Counter)
    categorical_nulls: Counter = field(default_factory=Counter)
    oov_ids: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "dense_nulls_filled": dict(self.dense_nulls),
            "categorical_nulls": dict(self.categorical_nulls),
            "out_of_range_ids": dict(self.oov_ids),
        }


class BatchConverter:
    """Turns an Arrow table of rows into a `Batch`, vectorised, with no per-row Python."""

    def __init__(self, spec: FeatureSpec, fill_value: float, oov: OovPolicy, quality: DataQuality):
        self.spec = spec
        self.fill_value = fill_value
        self.oov = oov
        self.quality = quality

    def __call__(self, table: pa.Table, source: str) -> Batch:
        labels = self._labels(table, source)
        dense = np.empty((table.num_rows, len(self.spec.dense)), dtype=np.float32)
        for j, name in enumerate(self.spec.dense):
            dense[:, j] = self._dense(table.column(name), name)
        values, lengths = [], []
        for name, rows in self.spec.categorical:
            v, n = self._ids(table.column(name), name, rows, source)
            values.append(v)
            lengths.append(n)
        sparse = KeyedJaggedTensor(
            keys=self.spec.categorical_names,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        return Batch(
            dense_features=torch.from_numpy(dense),
            sparse_features=sparse,
            labels=torch.from_numpy(labels),
        )

    def _labels(self, table: pa.Table, source: str) -> np.ndarray:
        y = pc.cast(table.column(self.spec.label), pa.float32()).to_numpy().copy()
        bad = np.isnan(y)
        if self.spec.task is Task.binary:
            bad |= (y != 0) & (y != 1)
        if bad.any():
            value = y[bad][0]
            fix = (
                "binary labels must be 0 or 1: fix the data, or set data.task=regression"
                if self.spec.task is Task.binary
                else "labels must not be null: drop those rows or fill them"
            )
            raise DataError(
                f"label column '{self.spec.label}' in {source} has value "
                f"{'null' if np.isnan(value) else value} ({int(bad.sum())} such rows); {fix}"
            )
        return y

    def _dense(self, column: pa.ChunkedArray, name: str) -> np.ndarray:
        x = pc.cast(column, pa.float32()).to_numpy()
        missing = np.isnan(x)
        n = int(missing.sum())
        if n:
            self.quality.dense_nulls[name] += n
            x = np.where(missing, np.float32(self.fill_value), x)
        return x

    def _ids(
        self, column: pa.ChunkedArray, name: str, rows: int, source: str
    ) -> tuple[np.ndarray, np.ndarray]:
        col = column.combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            self.quality.categorical_nulls[name] += col.null_count
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
            flat = pc.list_flatten(col)
            if flat.null_count:
                raise DataError(
                    f"list column '{name}' in {source} holds null ids inside its lists; "
                    "drop them from the lists"
                )
            values = flat.to_numpy().astype(np.int64, copy=False)
        elif col.null_count:
            self.quality.categorical_nulls[name] += col.null_count
            lengths = col.is_valid().to_numpy(zero_copy_only=False).astype(np.int64)
            values = col.drop_null().to_numpy().astype(np.int64, copy=False)
        else:
            lengths = np.ones(len(col), dtype=np.int64)
            values = col.to_numpy().astype(np.int64, copy=False)
        outside = (values >= rows) | (values < 0)
        n = int(outside.sum())
        if n:
            if self.oov is OovPolicy.error:
                raise DataError(
                    f"categorical column '{name}' in {source} has id {values[outside][0]} "
                    f"outside its table of {rows} rows ({n} such ids in this batch): raise its "
                    f"size in data.categorical ({name}:ROWS) above the largest id, or set "
                    "data.oov=mod"
                )
            self.quality.oov_ids[name] += n
            values = np.mod(values, rows)
        return values, lengths


class ParquetSplit:
    """One split as an iterable of `Batch`es of exactly batch_size rows (the last may be short)."""

    def __init__(
        self,
        files: list[str],
        converter: BatchConverter,
        batch_size: int,
        prefetch: int = 4,
        drop_last: bool = False,
        max_batches: int | None = None,
    ):
        self.files = files
        self.converter = converter
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.drop_last = drop_last
        self.max_batches = max_batches
        self.dataset = ds.dataset(files, format="parquet")
        self.num_rows = self.dataset.count_rows()

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        n = full + (1 if rest and not self.drop_last else 0)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches()
        if self.max_batches is not None:
            batches = (b for _, b in zip(range(self.max_batches), batches, strict=False))
        return prefetched(batches, self.prefetch)

    def _batches(self) -> Iterator[Batch]:
        columns = self.converter.spec.columns
        pending: list[pa.RecordBatch] = []
        sources: list[str] = []
        n = 0
        for fragment in self.dataset.get_fragments():
            for rb in fragment.to_batches(columns=columns, batch_size=self.batch_size):
                if rb.num_rows == 0:
                    continue
                pending.append(rb)
                if fragment.path not in sources:
                    sources.append(fragment.path)
                n += rb.num_rows
                while n >= self.batch_size:
                    table = pa.Table.from_batches(pending)
                    yield self.converter(table.slice(0, self.batch_size), " or ".join(sources))
                    rest = table.slice(self.batch_size)
                    pending, n = rest.to_batches(), rest.num_rows
                    sources = sources[-1:]
        if n and not self.drop_last:
            yield self.converter(pa.Table.from_batches(pending), " or ".join(sources))


def open_split(
    data: DataConfig, split: str, quality: DataQuality, train: bool, max_batches: int | None = None
) -> ParquetSplit:
    """The reader for one split of the configured data, its schema checked."""
    spec = FeatureSpec.from_data_config(data)
    files = find_files(data.path, split)
    check_files(files, spec, data.oov)
    return ParquetSplit(
        files,
        BatchConverter(spec, data.dense_fill_value, data.oov, quality),
        data.batch_size if train else data.eval_batch_size,
        prefetch=data.prefetch,
        max_batches=max_batches,
    )


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """Produce items on a background thread, up to `depth` ahead of the consumer."""
    if depth == 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(_Raised(e))
            return
        put(_END)

    thread = threading.Thread(target=work, name="recsys-reader", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, _Raised):
                raise x.error
            yield x
    finally:
        stop.set()
        thread.join(timeout=5)
