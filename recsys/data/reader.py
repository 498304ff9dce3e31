"""The reader: a split's pieces, shared among (rank, worker), streamed as `Batch`es.

Every rank reads a disjoint share of the pieces (Parquet row groups, ORC files), balanced by rows
so that few are dropped; inside a rank, `read_threads` workers each read a share of those and the
consumer takes their batches in turn, so the order is fixed for a seed. Every rank yields the
same number of batches, computed from piece row counts alone, since TorchRec collectives hang
when one rank runs out first: training drops the excess of longer shares, evaluation pads the
shorter ones. A read that S3 does not serve (down, 5xx) waits for it up to
data.s3.outage_budget_s; past that, every rank stops before the same batch.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from recsys.config import DataConfig, FileFormat
from recsys.data import vocabulary
from recsys.data.batches import BatchConverter, DataQuality, Padding, check_ranges, check_schema
from recsys.data.features import FeatureSpec
from recsys.data.sources import Outage, Piece, filters_of, no_rows, read_error, split_pieces
from recsys.errors import DataError, S3Unavailable

T = TypeVar("T")
WINDOW_BATCHES = 8  # rows converted together: per-column work is paid once per window


def check_pieces(pieces: list[Piece], spec: FeatureSpec, data: DataConfig) -> None:
    """Check each file's schema (and Parquet footer statistics) once, before any batch."""
    seen: set[str] = set()
    for piece in pieces:
        path = piece.fragment.path
        if path in seen:
            continue
        seen.add(path)
        check_schema(path, piece.fragment.physical_schema, spec)
        if data.format is FileFormat.parquet:
            check_ranges(path, piece.fragment.metadata, spec, data.oov)


@dataclass
class WorkerPosition:
    """How many batches one worker has handed over, and the pieces its last one came from."""

    batches: int = 0
    pieces: list[str] = field(default_factory=list)


@dataclass
class ReaderPosition:
    """Where a reader stands in an epoch; a checkpoint keeps it (as `to_dict`) to go on exactly."""

    epoch: int
    batches: int = 0  # batches taken in this epoch, from all workers
    workers: list[WorkerPosition] = field(default_factory=list)
    skip: int = 0  # batches to read and leave out first (a position mapped from another layout)

    def to_dict(self) -> dict:
        """The form saved in checkpoints (`skip` is spent by then)."""
        workers = [{"batches": w.batches, "pieces": list(w.pieces)} for w in self.workers]
        return {"epoch": self.epoch, "batches": self.batches, "workers": workers}

    @classmethod
    def from_dict(cls, saved: dict) -> ReaderPosition:
        workers = [WorkerPosition(w["batches"], list(w["pieces"])) for w in saved["workers"]]
        return cls(saved["epoch"], saved["batches"], workers)


@dataclass
class _Item:
    """A worker's batch (None while fast-forwarding), the repairs in its rows, and the pieces its
    window came from."""

    batch: Batch | None
    quality: DataQuality | None
    sources: list[str]


class SplitReader:
    """One split as an iterable of `Batch`es for one rank; `len()` is the same on every rank."""

    source: str | None = None  # the source of the last batch: a mix's (data.mix) name, or none
    loss_weight = 1.0  # what the last batch's loss is multiplied by

    def __init__(
        self,
        pieces: list[Piece],
        converter: BatchConverter,
        batch_size: int,
        *,
        row_filter=None,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 1,
        prefetch: int = 4,
        shuffle_buffer: int = 0,
        seed: int = 0,
        drop_remainder: bool = False,
        max_batches: int | None = None,
        pad: bool = False,
        where: str = "",
        outage: Outage | None = None,
    ):
        self.converter = converter
        self.where = where  # the split, as errors name it
        self.outage = outage  # S3's: how reads wait for an endpoint that is down
        self.batch_size = batch_size
        self.row_filter = row_filter
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.prefetch = prefetch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        # ranks must run the same number of steps: training drops the longer shares' excess,
        # evaluation (pad) keeps every row and pads the shorter shares with `Padding`
        self.pad = pad
        self.drop_remainder = drop_remainder or (world_size > 1 and not pad)
        self.max_batches = max_batches
        self.position = ReaderPosition(0)  # where iteration stands
        self.shares = [self._share(pieces, r) for r in range(world_size)]
        self.num_rows = sum(p.rows for share in self.shares[rank] for p in share)
        # rows of every rank's share (num_rows: this rank's)
        self.total_rows = sum(p.rows for ranks in self.shares for w in ranks for p in w)
        self.counts = [  # batches of each rank's share
            sum(self._batches_of(share) for share in rank_shares) for rank_shares in self.shares
        ]
        self._len = max(self.counts) if pad else min(self.counts)
        if max_batches is not None:
            self._len = min(self._len, max_batches)

    def _share(self, pieces: list[Piece], rank: int) -> list[list[Piece]]:
        """The pieces of one rank, then of each of its workers, balanced by rows."""
        mine = _deal(pieces, self.world_size)[rank]
        return _deal(mine, self.workers)

    def _batches_of(self, pieces: list[Piece]) -> int:
        full, rest = divmod(sum(p.rows for p in pieces), self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(0)

    def start_position(self, epoch: int) -> ReaderPosition:
        """The position before an epoch's first batch."""
        return ReaderPosition(epoch, 0, [WorkerPosition() for _ in self.shares[self.rank]])

    def fits(self, position: ReaderPosition) -> bool:
        """Whether a saved position is of a reader with this one's workers."""
        return len(position.workers) == len(self.shares[self.rank])

    def iterate(self, epoch: int, position: ReaderPosition | None = None) -> Iterator[Batch]:
        """The batches of one epoch (its shuffle), from the start or from a saved `position`."""
        position = copy.deepcopy(position) if position else self.start_position(epoch)
        self.position = replace(position, skip=0)
        if self.pad:  # evaluation: the counts of one pass over the split, however many are made
            self.converter.quality.clear()
        streams = [
            prefetched(self._worker(pieces, epoch, w, worker.batches), self.prefetch)
            for w, (pieces, worker) in enumerate(
                zip(self.shares[self.rank], self.position.workers, strict=True)
            )
        ]
        return self._interleave(streams, position.skip)

    def resume_position(self, saved: ReaderPosition, saved_len: int) -> ReaderPosition:
        """`saved` (a position of a reader with other ranks or workers) mapped onto this reader.

        Pieces are dealt differently, so the epoch restarts its data and skips the same fraction
        of its batches: the run goes on, but is not the one the saved layout would have made.
        """
        position = self.start_position(saved.epoch)
        position.skip = saved.batches * self._len // max(saved_len, 1)
        return position

    def _interleave(self, streams: list[Iterator[_Item]], drop: int) -> Iterator[Batch]:
        """Take one batch from each live worker in turn, up to len(self) batches; the first
        `drop` are read and counted in the position, but not handed over."""
        pos = self.position
        live, n = list(enumerate(streams)), 0
        try:
            while live and n < self._len:
                for w, s in list(live):
                    if n >= self._len:
                        break
                    try:
                        item = next(s, None)
                    except S3Unavailable as e:
                        self._all_read(e)
                    if item is None:
                        live.remove((w, s))
                        continue
                    n += 1
                    if item.batch is None:  # fast-forwarded, already counted in the position
                        continue
                    self._all_read(None)
                    pos.batches += 1
                    pos.workers[w].batches += 1
                    pos.workers[w].pieces = item.sources
                    if drop:
                        drop -= 1
                        continue
                    self.converter.quality.add(item.quality)  # counted as the consumer takes it
                    yield item.batch
            if self.pad and n < self._len:
                padding = Padding.of(self.converter.spec)
                for _ in range(self._len - n):
                    self._all_read(None)
                    yield padding
        finally:
            for s in streams:
                s.close()

    def _all_read(self, failure: S3Unavailable | None) -> None:
        """Raise `failure` on every rank when any rank has one (S3 over several ranks: one
        collective a batch), so all stop before the same batch and checkpoint together."""
        several = self.world_size > 1 and dist.is_initialized()
        if self.outage is None or not several:
            if failure is not None:
                raise failure
            return
        failed = torch.tensor([int(failure is not None)])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            texts: list[str | None] = [None] * self.world_size
            dist.all_gather_object(texts, str(failure) if failure else None)
            raise S3Unavailable(next(t for t in texts if t))

    def _worker(self, pieces: list[Piece], epoch: int, worker: int, skip: int) -> Iterator[_Item]:
        """Batches of one worker's pieces, shuffled in windows when shuffle_buffer > 0.

        The first `skip` batches are replayed (read and shuffled as before) but not converted.
        """
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        if self.shuffle_buffer:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        window = max(self.shuffle_buffer, self.batch_size * WINDOW_BATCHES)
        pending: list[pa.RecordBatch] = []
        sources: list[str] = []
        n = 0
        # decoding (Arrow, without the GIL) runs a step ahead of converting, on its own thread
        for piece, rb in prefetched(self._read_all(pieces), 2):
            pending.append(rb)
            if piece.name not in sources:
                sources.append(piece.name)
            n += rb.num_rows
            if n >= window:
                table = pa.Table.from_batches(pending)
                if self.shuffle_buffer:
                    table = table.take(rng.permutation(n))
                full = n - n % self.batch_size
                skip = yield from self._emit(table.slice(0, full), sources, skip)
                rest = table.slice(full)
                pending, n, sources = rest.to_batches(), rest.num_rows, sources[-1:]
        if n:
            table = pa.Table.from_batches(pending)
            if self.shuffle_buffer:
                table = table.take(rng.permutation(n))
            if self.drop_remainder:
                table = table.slice(0, n - n % self.batch_size)
            yield from self._emit(table, sources, skip)

    def _read_all(self, pieces: list[Piece]) -> Iterator[tuple[Piece, pa.RecordBatch]]:
        for piece in pieces:
            for rb in self._read(piece):
                yield piece, rb

    def _read(self, piece: Piece) -> Iterator[pa.RecordBatch]:
        """A piece's record batches; a read S3 does not serve is retried (data.s3.*) and goes on
        after the record batches it had already handed over."""
        done = attempt = 0
        while True:
            try:
                for i, rb in enumerate(self._record_batches(piece)):
                    if i == done:
                        if self.outage is not None:
                            self.outage.over()
                        done += 1
                        yield rb
                return
            except (OSError, pa.ArrowException) as e:
                if self.outage is None or not Outage.of(e):
                    path = piece.fragment.path
                    raise read_error(e, path, self.where or path, mid_epoch=True) from None
                self.outage.wait(e, attempt)
                attempt += 1

    def _record_batches(self, piece: Piece) -> Iterator[pa.RecordBatch]:
        """The piece's non-empty record batches, as decoded (the same ones on every read)."""
        for rb in piece.fragment.to_batches(
            schema=piece.schema,
            columns=self.converter.spec.columns,
            filter=self.row_filter,
            batch_size=self.batch_size * WINDOW_BATCHES,
        ):
            if rb.num_rows:
                yield rb

    def _emit(self, table: pa.Table, sources: list[str], skip: int) -> Generator:
        """The table's batches, the first `skip` as placeholders; returns how many remain."""
        starts = range(0, table.num_rows, self.batch_size)
        if skip >= len(starts):
            for _ in starts:
                yield _Item(None, None, sources)
            return skip - len(starts)
        columns = self.converter.columns(table, " or ".join(sources))
        for i, start in enumerate(starts):
            if i < skip:
                yield _Item(None, None, sources)
                continue
            stop = min(start + self.batch_size, table.num_rows)
            yield _Item(columns.batch(start, stop), columns.quality(start, stop), sources)
        return 0


def _deal(pieces: list[Piece], hands: int) -> list[list[Piece]]:
    """Pieces in order, each to the hand with the fewest rows so far (ties: the first hand)."""
    dealt: list[list[Piece]] = [[] for _ in range(hands)]
    rows = [0] * hands
    for piece in pieces:
        hand = rows.index(min(rows))
        dealt[hand].append(piece)
        rows[hand] += piece.rows
    return dealt


def open_split(
    data: DataConfig,
    split: str,
    quality: DataQuality,
    train: bool,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> SplitReader:
    """The reader of one split (train, validation or test) for one rank, its files checked."""
    vocab = vocabulary.for_data(data)
    spec = FeatureSpec.from_data_config(data, vocab)
    pieces, row_filter, where = split_pieces(data, split, quality)
    if not pieces:
        raise no_rows(data, split, where, quality)
    check_pieces(pieces, spec, data)
    reader = SplitReader(
        pieces,
        BatchConverter.of(spec, data, quality, vocab),
        data.batch_size if train else data.eval_batch_size,
        row_filter=row_filter,
        rank=rank,
        world_size=world_size,
        workers=data.read_threads,
        prefetch=data.prefetch,
        shuffle_buffer=data.shuffle_buffer if train else 0,
        seed=seed,
        drop_remainder=data.drop_remainder and train,
        max_batches=max_batches,
        pad=not train,
        where=where,
        outage=Outage(data.s3) if data.path.startswith("s3://") else None,
    )
    if train and not len(reader):
        raise _no_step(reader, data, split)
    return reader


def _no_step(reader: SplitReader, data: DataConfig, split: str) -> DataError:
    """One line for a train split whose rows make no full batch on some rank's reader."""
    rows = [sum(p.rows for share in shares for p in share) for shares in reader.shares]
    rank, ranks, threads = reader.counts.index(0), reader.world_size, reader.workers
    share = f"{rows[rank]:,} rows" + (f" on rank {rank} of {ranks}" if ranks > 1 else "")
    share += f" over data.read_threads={threads} readers" if threads > 1 else ""
    fixes = ["lower data.batch_size"]
    if ranks == 1:
        why = "data.drop_remainder=true drops a short batch"
        fixes.append("set data.drop_remainder=false")
    else:
        why = f"on {ranks} ranks a short batch is dropped (every rank runs the same steps)"
        fixes += ["use fewer ranks", "write the files in more, smaller row groups (each goes "
                  "whole to one rank)"]  # fmt: skip
    fixes += ["lower data.read_threads"] if threads > 1 else []
    if filters := filters_of(data, split):
        share += f" after {filters}"
        fixes.append("loosen the filter")
    return DataError(
        f"{reader.where} makes no train step: {share}, fewer than one batch of "
        f"data.batch_size={reader.batch_size}, and {why}: {', '.join(fixes[:-1])} or {fixes[-1]}"
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
