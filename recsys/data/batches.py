"""Arrow rows -> TorchRec `Batch`: column checks, repairs, id folding and string hashing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import DataConfig, LabelKind, OovPolicy
from recsys.data.features import FeatureSpec
from recsys.errors import DataError
from recsys.exported import (
    InputError,
    cap_lists,
    clip_dense,
    dense_values,
    hash_strings,
    is_list,
    is_string,
)

# labels beyond this are refused or skipped like NaN: a batch's squared error would overflow
LABEL_MAX_ABS = 1e15


def _role(spec: FeatureSpec, column: str) -> str:
    if column == spec.label:
        return "data.label"
    return "data.dense" if column in spec.dense else "data.categorical"


def check_schema(source: str, schema: pa.Schema, spec: FeatureSpec) -> None:
    """Every configured column is there with a type its role can use."""
    for column in spec.columns:
        idx = schema.get_field_index(column)
        role = _role(spec, column)
        if idx < 0:
            raise DataError(
                f"column '{column}' ({role}) is not in {source}; its columns are: "
                f"{', '.join(schema.names)}. Fix the column name in {role}"
            )
        t = schema.field(idx).type
        inner = t.value_type if is_list(t) else t
        if column in spec.categorical_names:
            if not (pa.types.is_integer(inner) or is_string(inner)):
                raise DataError(
                    f"column '{column}' ({role}) in {source} has type {t}; categorical columns "
                    "hold integer or string ids, or lists of them"
                )
        elif not (pa.types.is_integer(inner) or pa.types.is_floating(inner)
                  or pa.types.is_boolean(inner)):  # fmt: skip
            raise DataError(
                f"column '{column}' ({role}) in {source} has type {t}; it must be numeric (a "
                "number, or a list holding one): fix the column or move it to data.categorical"
            )


def _stats_range(meta: pq.FileMetaData, column: str) -> tuple[float, float] | None:
    """Min and max of a top-level scalar column from the footer, if every row group has them."""
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if column not in names:  # a list column's leaf has a longer path
        return None
    j = names.index(column)
    lo, hi = float("inf"), float("-inf")
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(j).statistics
        if st is None or not st.has_min_max or isinstance(st.min, str | bytes):
            return None
        lo, hi = min(lo, st.min), max(hi, st.max)
    return lo, hi


def check_ranges(source: str, meta: pq.FileMetaData, spec: FeatureSpec, oov: OovPolicy) -> None:
    """Labels that are not 0/1 and, under oov=error, ids past a table, from footer statistics."""
    if spec.label_kind is LabelKind.binary:
        r = _stats_range(meta, spec.label)  # inf: the rows' check says more (data.bad_files)
        if r and np.isfinite(r).all() and (r[0] < 0 or r[1] > 1):
            bad = r[0] if r[0] < 0 else r[1]
            raise DataError(
                f"label column '{spec.label}' in {source} has value {bad}; binary labels must "
                "be 0 or 1: fix the data, or set data.task=regression"
            )
    if oov is OovPolicy.error:
        for name, rows in spec.categorical:
            r = _stats_range(meta, name)
            if r and (r[0] < 0 or r[1] >= rows):
                bad = r[0] if r[0] < 0 else r[1]
                raise DataError(
                    f"categorical column '{name}' in {source} has id {bad} outside its table "
                    f"of {rows} rows: raise its size in data.categorical ({name}:ROWS) above "
                    "the largest id, or set data.oov=mod"
                )


@dataclass
class DataQuality:
    """Counts of values the reader had to repair, reported at the end of a run."""

    dense_nulls: Counter = field(default_factory=Counter)
    categorical_nulls: Counter = field(default_factory=Counter)
    oov_ids: Counter = field(default_factory=Counter)
    dense_clipped: Counter = field(default_factory=Counter)  # beyond data.dense_max_abs, or inf
    lists_truncated: Counter = field(default_factory=Counter)  # past data.max_list_length
    # of the whole split, found by every rank before reading (data.bad_files=skip): merged by max
    skipped_files: Counter = field(default_factory=Counter)  # path -> 1
    skipped_labels: Counter = field(default_factory=Counter)  # label column -> rows left out

    def to_dict(self) -> dict:
        """The counts, with what was skipped only where something was (data.bad_files=skip)."""
        skipped = {"skipped_files": self.skipped_files, "skipped_bad_labels": self.skipped_labels}
        return {
            "dense_nulls_filled": dict(self.dense_nulls),
            "categorical_nulls": dict(self.categorical_nulls),
            "out_of_range_ids": dict(self.oov_ids),
            "dense_values_clipped": dict(self.dense_clipped),
            "lists_truncated": dict(self.lists_truncated),
        } | {k: dict(v) for k, v in skipped.items() if v}

    @classmethod
    def from_dict(cls, d: dict) -> DataQuality:
        return cls(
            Counter(d["dense_nulls_filled"]),
            Counter(d["categorical_nulls"]),
            Counter(d["out_of_range_ids"]),
            Counter(d.get("dense_values_clipped", {})),  # absent from older checkpoints
            Counter(d.get("lists_truncated", {})),
            Counter(d.get("skipped_files", {})),
            Counter(d.get("skipped_bad_labels", {})),
        )

    def clear(self) -> None:
        """Forget the repairs of a pass (what was skipped is the split's, and stays)."""
        for counts in self.repairs():
            counts.clear()

    def repairs(self) -> tuple[Counter, ...]:
        """The counts of values repaired in the rows read (not of the split's skipped parts)."""
        return (self.dense_nulls, self.categorical_nulls, self.oov_ids, self.dense_clipped,
                self.lists_truncated)  # fmt: skip

    def add(self, other: DataQuality) -> None:
        for mine, theirs in zip(self.repairs(), other.repairs(), strict=True):
            mine.update(theirs)
        self.skipped_files |= other.skipped_files
        self.skipped_labels |= other.skipped_labels


def _prefix_sums(counts: np.ndarray) -> np.ndarray:
    """[0, counts[0], counts[0] + counts[1], ...]: the sum over rows [a, b) is s[b] - s[a]."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def _per_row(flags: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """Flags of the values summed per row (rows of `lengths` values, or one value each)."""
    if lengths is None:
        return flags
    ends = np.cumsum(lengths)
    sums = _prefix_sums(flags)
    return sums[ends] - sums[ends - lengths]


@dataclass
class Columns:
    """Converted rows: labels, dense matrix and, per categorical feature, values and lengths."""

    keys: list[str]
    labels: np.ndarray
    dense: np.ndarray
    ids: list[tuple[np.ndarray, np.ndarray | None]]  # (values, lengths or None: one id a row)
    # what converting these rows repaired: (DataQuality field, column, repairs per row)
    repairs: list[tuple[str, str, np.ndarray]]

    def __post_init__(self) -> None:
        self.offsets = [
            None if n is None else np.concatenate([[0], np.cumsum(n)]) for _, n in self.ids
        ]
        self.repair_sums = [(kind, name, _prefix_sums(n)) for kind, name, n in self.repairs]

    def quality(self, start: int, stop: int) -> DataQuality:
        """The repairs made in rows [start, stop)."""
        quality = DataQuality()
        for kind, name, sums in self.repair_sums:
            if n := int(sums[stop] - sums[start]):
                getattr(quality, kind)[name] += n
        return quality

    def batch(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) as a `Batch` (a KeyedJaggedTensor for the categorical features)."""
        values, lengths, ones = [], [], np.ones(stop - start, np.int64)
        for (v, n), o in zip(self.ids, self.offsets, strict=True):
            values.append(v[start:stop] if o is None else v[o[start] : o[stop]])
            lengths.append(ones if n is None else n[start:stop])
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        return Batch(
            dense_features=torch.from_numpy(self.dense[start:stop]),
            sparse_features=sparse,
            labels=torch.from_numpy(self.labels[start:stop]),
        )


class Padding(Batch):
    """A one-row stand-in batch for a rank whose evaluation share has run out: it joins the
    other ranks' collectives, and its output is dropped."""

    @classmethod
    def of(cls, spec: FeatureSpec) -> Padding:
        keys = spec.categorical_names
        sparse = KeyedJaggedTensor(
            keys=keys,
            values=torch.zeros(len(keys), dtype=torch.long),
            lengths=torch.ones(len(keys), dtype=torch.long),
        )
        return cls(torch.zeros(1, len(spec.dense)), sparse, torch.zeros(1))


class BatchConverter:
    """Turns an Arrow table of rows into a `Batch`, vectorised, with no per-row Python."""

    def __init__(
        self,
        spec: FeatureSpec,
        fill_value: float,
        oov: OovPolicy,
        quality: DataQuality,
        missing_id: int | None = None,
        vocab: dict | None = None,
        *,
        dense_max_abs: float | None = None,
        max_list_length: int | None = None,
    ):
        self.spec = spec
        self.fill_value = fill_value
        self.oov = oov
        self.quality = quality
        self.missing_id = missing_id
        self.vocab = vocab
        self.dense_max_abs = dense_max_abs
        self.max_list_length = max_list_length

    @classmethod
    def of(
        cls, spec: FeatureSpec, data: DataConfig, quality: DataQuality, vocab: dict | None
    ) -> BatchConverter:
        """The converter with data.*'s repairs: fill value, oov, missing id and limits."""
        limits = {"dense_max_abs": data.dense_max_abs, "max_list_length": data.max_list_length}
        return cls(spec, data.dense_fill_value, data.oov, quality, data.missing_id, vocab, **limits)

    def __call__(self, table: pa.Table, source: str) -> Batch:
        """All rows of table as one `Batch`, its repairs counted in self.quality."""
        columns = self.columns(table, source)
        self.quality.add(columns.quality(0, table.num_rows))
        return columns.batch(0, table.num_rows)

    def columns(self, table: pa.Table, source: str) -> Columns:
        """Convert many rows at once (per-column work is per call), to slice into batches."""
        repairs: list[tuple[str, str, np.ndarray]] = []
        labels = self._scalar(table.column(self.spec.label), self.spec.label, source)
        self._check_labels(labels, source)
        dense = np.empty((table.num_rows, len(self.spec.dense)), dtype=np.float32)
        for j, name in enumerate(self.spec.dense):
            x = self._scalar(table.column(name), name, source)
            if (clipped := clip_dense(x, self.dense_max_abs)).any():
                repairs.append(("dense_clipped", name, clipped))
            missing = np.isnan(x)
            if missing.any():
                repairs.append(("dense_nulls", name, missing))
                x[missing] = self.fill_value
            dense[:, j] = x
        ids = [
            self._ids(table.column(n), n, rows, source, repairs)
            for n, rows in self.spec.categorical
        ]
        return Columns(self.spec.categorical_names, labels, dense, ids, repairs)

    def _scalar(self, column: pa.ChunkedArray, name: str, source: str) -> np.ndarray:
        """A float32 copy of a numeric column; a list column must hold at most one number a row."""
        role = _role(self.spec, name)
        try:
            return dense_values(column.combine_chunks(), name, role, f" in {source}")
        except InputError as e:
            fix = "list it in data.categorical if it holds ids, or fix the data"
            raise DataError(f"{e}: {fix}") from None

    def _check_labels(self, y: np.ndarray, source: str) -> None:
        bad = ~(np.abs(y) <= LABEL_MAX_ABS)  # NaN too
        if self.spec.label_kind is LabelKind.binary:
            bad |= (y != 0) & (y != 1)
        if bad.any():
            value = y[bad][0]
            fix = (
                "binary labels must be 0 or 1: fix the data, or set data.task=regression"
                if self.spec.label_kind is LabelKind.binary and np.isfinite(value)
                else f"labels must be numbers within +-{LABEL_MAX_ABS:g} (training squares them in "
                "float32), not null, NaN or inf: drop or fill those rows, "
                "or set data.bad_files=skip to leave them out (counted)"
            )
            raise DataError(
                f"label column '{self.spec.label}' in {source} has value "
                f"{'null' if np.isnan(value) else value} ({int(bad.sum())} such rows); {fix}"
            )

    def _ids(
        self, column: pa.ChunkedArray, name: str, rows: int, source: str, repairs: list
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Values and lengths of a feature; lengths None when every row holds exactly one id."""
        col = column.combine_chunks()
        if is_list(col.type):
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
            flat = pc.list_flatten(col)
            if flat.null_count:
                raise DataError(
                    f"list column '{name}' in {source} holds null ids inside its lists; "
                    "drop them from the lists"
                )
            flat, lengths, cut = cap_lists(flat, lengths, self.max_list_length)
            if cut.any():
                repairs.append(("lists_truncated", name, cut))
        elif col.null_count:
            lengths = col.is_valid().to_numpy(zero_copy_only=False).astype(np.int64)
            flat = col.drop_null()
        else:
            lengths, flat = None, col  # one id a row
        if lengths is not None and (empty := lengths == 0).any():  # null or empty list
            repairs.append(("categorical_nulls", name, empty))
        if self.vocab is not None:
            values = self.vocab[name].lookup(flat)
        elif is_string(flat.type):
            values = (hash_strings(flat) % np.uint64(rows)).astype(np.int64)
        else:
            values = flat.to_numpy().astype(np.int64, copy=False)
            values = self._fold(values, name, rows, source, lengths, repairs)
        if lengths is None:
            return values, None
        if self.missing_id is not None and (lengths == 0).any():
            empty = lengths == 0
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            values = np.insert(values, starts[empty], self.missing_id)
            lengths = np.where(empty, 1, lengths)
        return values, lengths

    def _fold(
        self,
        values: np.ndarray,
        name: str,
        rows: int,
        source: str,
        lengths: np.ndarray | None,
        repairs: list,
    ) -> np.ndarray:
        outside = values.view(np.uint64) >= rows  # negative ids wrap to huge values
        if not outside.any():
            return values
        n = int(outside.sum())
        if self.oov is OovPolicy.error:
            raise DataError(
                f"categorical column '{name}' in {source} has id {values[outside][0]} "
                f"outside its table of {rows} rows ({n} such ids in this batch): raise its "
                f"size in data.categorical ({name}:ROWS) above the largest id, or set "
                "data.oov=mod"
            )
        repairs.append(("oov_ids", name, _per_row(outside, lengths)))
        return np.mod(values, rows)
