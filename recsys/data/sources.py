"""Where rows come from: local or S3 file systems, split paths and globs, filters, and pieces."""

from __future__ import annotations

import ast
import fnmatch
import glob
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from recsys.config import BadFilePolicy, DataConfig, FileFormat, S3Config, SplitConfig
from recsys.data.batches import LABEL_MAX_ABS, DataQuality
from recsys.errors import ConfigError, DataError, S3Unavailable

log = logging.getLogger(__name__)
SUFFIXES = {FileFormat.parquet: (".parquet", ".parq"), FileFormat.orc: (".orc",)}


def filesystem(path: str, s3: S3Config) -> tuple[pafs.FileSystem, str]:
    """The file system behind data.path and the root path inside it."""
    if path.startswith("s3://"):
        endpoint, scheme = s3.endpoint, None
        if endpoint and "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        fs = pafs.S3FileSystem(
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            region=s3.region,
            endpoint_override=endpoint,
            scheme=scheme or ("http" if endpoint else "https"),
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts),
            connect_timeout=5,
            request_timeout=30,
        )
        return fs, path.removeprefix("s3://").rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def s3_error(e: OSError, where: str) -> DataError:
    """One line for the S3 failures users can fix: credentials, bucket, endpoint."""
    text = str(e)
    if any(k in text for k in ("SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY", "ACCESS_DENIED")):
        return DataError(
            f"S3 refused the credentials for {where}: check data.s3.access_key/secret_key or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE"
        )
    if "NO_SUCH_BUCKET" in text:
        return DataError(f"the bucket of {where} does not exist: fix the bucket in data.path")
    if _unreachable(text):
        return DataError(
            f"cannot reach the S3 endpoint for {where} ({text.splitlines()[0]}): "
            "check data.s3.endpoint and that the server is up"
        )
    return DataError(f"reading {where} failed: {text.splitlines()[0]}")


class BadFile(DataError):
    """A data file that cannot be read: corrupt, not a Parquet/ORC file, no access, or gone."""


_UNAVAILABLE = ("NETWORK_CONNECTION", "Couldn't connect", "curlCode", "INTERNAL_FAILURE",
                "SERVICE_UNAVAILABLE", "SLOW_DOWN")  # fmt: skip


def _unreachable(text: str) -> bool:
    """Whether an S3 error is the endpoint or the network, not the file: no connection, or a
    server error (5xx, as a store that is still starting answers)."""
    return any(k in text for k in _UNAVAILABLE)


class Outage:
    """Reads of an S3 store that is unreachable or failing (5xx), shared by a reader's workers:
    they retry for data.s3.outage_budget_s from the first failure, with one warning when it goes
    and one line when it is back."""

    def __init__(self, s3: S3Config):
        self.endpoint = f"the S3 endpoint {s3.endpoint}" if s3.endpoint else "AWS S3"
        self.budget_s = s3.outage_budget_s
        self.since: float | None = None
        self._lock = threading.Lock()

    @staticmethod
    def of(e: BaseException) -> bool:
        """Whether a read failed because of the store or the network, not the file."""
        return isinstance(e, OSError) and _unreachable(str(e))

    def wait(self, e: OSError, attempt: int) -> None:
        """Sleep before retry `attempt` (from 0); S3Unavailable once the budget is spent."""
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since = now
                log.warning("%s is unavailable (%s): reads retry for up to %g s "
                            "(data.s3.outage_budget_s)", self.endpoint, _first_line(e),
                            self.budget_s)  # fmt: skip
            down, left = now - self.since, self.since + self.budget_s - now
        if left <= 0:
            raise S3Unavailable(
                f"{self.endpoint} has been unavailable for {down:.0f} s, longer than "
                f"data.s3.outage_budget_s={self.budget_s:g} ({_first_line(e)})"
            )
        time.sleep(min(0.5 * 2**attempt, 5.0, left))

    def over(self) -> None:
        """A read went through: the outage, if there was one, is over."""
        if self.since is None:
            return
        with self._lock:
            if self.since is not None:
                log.info("%s answers again after %.0f s", self.endpoint,
                         time.monotonic() - self.since)  # fmt: skip
                self.since = None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0]


def read_error(e: Exception, file: str, where: str, mid_epoch: bool = False) -> DataError:
    """One line for a file that fails to read: S3 access problems as such, else a bad file."""
    text = str(e)
    if isinstance(e, OSError) and (_unreachable(text) or "SIGNATURE" in text or "BUCKET" in text):
        return s3_error(e, where)
    why = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if isinstance(e, FileNotFoundError) or "No such file" in text or "NoSuchKey" in text:
        why = "it was removed after the split was listed"
    elif isinstance(e, PermissionError) or "Permission denied" in text or "ACCESS_DENIED" in text:
        why = "permission denied"
    fix = (
        "replace the file, or move it out of the split's paths"
        if mid_epoch  # its footer read, so data.bad_files=skip would not leave it out
        else "replace or remove the file, or set data.bad_files=skip to train without such files"
    )
    return BadFile(f"cannot read {file} of {where}: {why}: {fix}")


def readable(
    fs: pafs.FileSystem, files: list[str], data: DataConfig, where: str, quality: DataQuality
) -> list[str]:
    """The files whose footer reads; the others fail the run, or are skipped (counted in
    `quality`) under data.bad_files=skip, up to data.max_bad_files of them."""
    fmt = ds.ParquetFileFormat() if data.format is FileFormat.parquet else ds.OrcFileFormat()
    good, bad = [], []
    for path in files:
        try:
            fmt.make_fragment(path, filesystem=fs).physical_schema  # noqa: B018 (reads the footer)
            good.append(path)
        except (OSError, pa.ArrowException) as e:
            error = read_error(e, path, where)
            if data.bad_files is BadFilePolicy.fail or not isinstance(error, BadFile):
                raise error from None
            bad.append(str(error).rsplit(": ", 1)[0])
    if len(bad) > data.max_bad_files:
        raise BadFile(
            f"{len(bad)} files of {where} cannot be read, more than data.max_bad_files="
            f"{data.max_bad_files} ({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}): "
            "replace or remove them, or raise data.max_bad_files"
        )
    for line in bad:
        log.warning("skipping (data.bad_files=skip): %s", line)
    quality.skipped_files.update(p for p in files if p not in good)
    return good


def list_files(fs: pafs.FileSystem, root: str, pattern: str, fmt: FileFormat) -> list[str]:
    """Data files of one path or glob under root, sorted; hidden (_x, .x) files are skipped."""
    target = pattern if pattern.startswith("/") else f"{root}/{pattern}" if pattern != "." else root
    magic = glob.has_magic(target)
    base = target
    while glob.has_magic(base):
        base = base.rsplit("/", 1)[0]
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        candidates = [info]
    else:
        candidates = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = []
    for f in candidates:
        rel = f.path[len(base) :].lstrip("/").split("/") if f.path != base else []
        if f.type != pafs.FileType.File or any(p.startswith(("_", ".")) for p in rel):
            continue
        if not f.path.endswith(SUFFIXES[fmt]):
            continue
        if magic:
            parents = [f.path] + [str(p) for p in PurePosixPath(f.path).parents]
            if not any(fnmatch.fnmatchcase(p, target) for p in parents):
                continue
        files.append(f.path)
    return sorted(files)


_OPS = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__",
        ast.Gt: "__gt__", ast.GtE: "__ge__"}  # fmt: skip


def parse_filter(text: str, key: str) -> tuple[ds.Expression, set[str]]:
    """A filter such as `day >= '2026-11-01' and day < '2026-11-08'`: Arrow expression, columns."""
    columns: set[str] = set()

    def bad(node: ast.AST) -> ConfigError:
        return ConfigError(
            f"{key}={text!r}: cannot use {ast.unparse(node)!r}; write comparisons of a column "
            "with literals joined by and/or/not, e.g. day >= '2026-11-01' and day < '2026-11-08'"
        )

    def value(node: ast.AST):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise bad(node)

    def term(node: ast.AST):
        if isinstance(node, ast.Name):
            columns.add(node.id)
            return ds.field(node.id)
        return value(node)

    def expr(node: ast.AST) -> ds.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [expr(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~expr(node.operand)
        if isinstance(node, ast.Compare):
            out, left = None, node.left
            for op, right in zip(node.ops, node.comparators, strict=True):
                a, b = term(left), term(right)
                if isinstance(op, ast.In | ast.NotIn) and isinstance(a, ds.Expression):
                    e = a.isin(b)
                    e = ~e if isinstance(op, ast.NotIn) else e
                elif type(op) in _OPS and isinstance(a, ds.Expression):
                    e = getattr(a, _OPS[type(op)])(b)
                elif type(op) in _OPS and isinstance(b, ds.Expression):
                    flipped = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE}
                    e = getattr(b, _OPS[flipped.get(type(op), type(op))])(a)
                else:
                    raise bad(node)
                out = e if out is None else out & e
                left = right
            return out
        raise bad(node)

    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{key}={text!r} is not a valid filter expression") from None
    return expr(tree), columns


@dataclass(frozen=True)
class Piece:
    """The unit of sharding: a Parquet row group or an ORC file, with its row count."""

    fragment: ds.Fragment
    rows: int
    name: str
    schema: pa.Schema  # the dataset's: file columns plus partition keys


def _count_rows(
    part: ds.Fragment, schema: pa.Schema, row_filter: ds.Expression | None, parquet: bool
) -> int:
    """Rows of one piece that pass the filter.

    Arrow counts a row-group fragment whose filter its partition values already satisfy (no
    column left to test) as its whole file, so a Parquet count is capped at the row group's rows.
    """
    if not parquet:
        return part.count_rows(filter=row_filter)
    group = part.row_groups[0].num_rows
    if row_filter is None:
        return group
    counted = ds.Scanner.from_fragment(part, schema=schema, columns=[], filter=row_filter)
    return min(counted.count_rows(), group)


def filters_of(data: DataConfig, name: str) -> str:
    """The filters set on a split, as its keys and texts (empty when none)."""
    split = data.split(name)
    given = [("data.filter", data.filter), (f"data.{name}.filter", split and split.filter)]
    return " and ".join(f"{key}={text!r}" for key, text in given if text)


def no_rows(data: DataConfig, name: str, where: str, quality: DataQuality) -> DataError:
    """Why a split has no rows left: its filters, labels left out, or files without rows."""
    bad_labels = quality.skipped_labels[data.label]
    bad = f"a null, NaN, inf or beyond +-{LABEL_MAX_ABS:g}"
    skipped = f" ({bad_labels:,} rows with {bad} {data.label} left out too)"
    if filters := filters_of(data, name):
        return DataError(
            f"the filters leave no rows in {where}: {filters}"
            f"{skipped if bad_labels else ''}; loosen the filter or check its column's values"
        )
    if bad_labels:
        return DataError(
            f"every row of {where} has {bad} label {data.label} ({bad_labels:,} "
            "rows, left out under data.bad_files=skip): fix the labels"
        )
    return DataError(
        f"{where} has no rows: its files are empty; point data.{name}.paths at files with rows"
    )


def split_pieces(
    data: DataConfig, name: str, quality: DataQuality | None = None
) -> tuple[list[Piece], ds.Expression | None, str]:
    """Pieces of a split with its row filter, partition filters already applied, in stable order.

    Unreadable files, and rows whose label is not a finite number, fail the run or, under
    data.bad_files=skip, are left out and counted in `quality`: the rows a rank will read are
    known before the first batch, so every rank still runs the same number of steps.
    """
    quality = DataQuality() if quality is None else quality
    split: SplitConfig | None = data.split(name)
    if split is None:
        raise ConfigError(f"data.{name} is null: this run has no {name} split")
    fs, root = filesystem(data.path, data.s3)
    where = f"{data.path} (split {name}: {', '.join(split.paths)})"
    try:
        files = sorted({f for p in split.paths for f in list_files(fs, root, p, data.format)})
    except OSError as e:
        raise s3_error(e, where) from None
    if not files and data.path.startswith("s3://"):
        bucket = root.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise DataError(f"the bucket of {where} does not exist: fix the bucket in data.path")
    if not files:
        raise DataError(
            f"no {data.format.value} files at {where}: point data.path at a directory whose "
            f"{'/'.join(SUFFIXES[data.format])} files the split's paths (data.{name}.paths, "
            "paths or globs relative to data.path) select"
        )
    files = readable(fs, files, data, where, quality)
    if not files:
        raise BadFile(f"no file of {where} can be read: replace them")
    row_filter, columns = None, set()
    for text, key in ((data.filter, "data.filter"), (split.filter, f"data.{name}.filter")):
        if text:
            expr, used = parse_filter(text, key)
            row_filter = expr if row_filter is None else row_filter & expr
            columns |= used
    user_filter = row_filter
    if data.bad_files is BadFilePolicy.skip:  # null, NaN, inf and out-of-range labels
        usable = pc.abs(ds.field(data.label)) <= LABEL_MAX_ABS
        row_filter = usable if row_filter is None else row_filter & usable
    partitioning = (
        ds.HivePartitioning.discover(infer_dictionary=False) if data.hive_partitioning else None
    )
    fmt = ds.ParquetFileFormat() if data.format is FileFormat.parquet else ds.OrcFileFormat()
    try:
        dataset = ds.dataset(
            files, filesystem=fs, format=fmt, partitioning=partitioning, partition_base_dir=root
        )
        unknown = sorted(columns - set(dataset.schema.names))
        if unknown:
            raise ConfigError(
                f"the filter names column(s) {unknown} that {where} does not have; its "
                f"columns and partition keys are: {', '.join(dataset.schema.names)}"
            )
        pieces, schema = [], dataset.schema
        parquet = data.format is FileFormat.parquet
        for frag in dataset.get_fragments(filter=user_filter):
            parts = frag.split_by_row_group(user_filter, schema=schema) if parquet else [frag]
            for i, part in enumerate(parts):
                rows = _count_rows(part, schema, row_filter, parquet)
                if row_filter is not user_filter:
                    left_out = _count_rows(part, schema, user_filter, parquet) - rows
                    quality.skipped_labels[data.label] += left_out
                if rows:
                    pieces.append(Piece(part, rows, f"{frag.path}#{i}", schema))
    except OSError as e:
        raise s3_error(e, where) from None
    if quality.skipped_labels[data.label]:
        log.warning("skipping (data.bad_files=skip) %d rows of %s whose %s is null, NaN, inf "
                    "or beyond +-%g", quality.skipped_labels[data.label], where, data.label,
                    LABEL_MAX_ABS)  # fmt: skip
    else:
        del quality.skipped_labels[data.label]
    return pieces, row_filter, where
