"""Several train sources in one run: which source each step of an epoch reads (the schedule), the
reader that follows it over one `SplitReader` per source, and per-source evaluation.

The schedule is a pure function of the mix config, the seed, the epoch and the sources' lengths
in batches; those lengths are the same on every rank (a `SplitReader`'s length is computed from
every rank's share), so every rank follows the same schedule and runs the same number of steps
without talking, and a checkpoint's (step, each source's position) resumes it exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from torchrec.datasets.utils import Batch

from recsys.config import DataConfig, MixConfig, MixStrategy
from recsys.data.batches import DataQuality
from recsys.data.reader import ReaderPosition, SplitReader, open_split
from recsys.errors import ConfigError, DataError, RecsysError

CYCLE = 1 << 20  # a source's k-th pass within epoch e reads (and shuffles) as its epoch e + k*CYCLE
WEIGHTED_STREAM = 7  # the weighted draw's own random stream, apart from the readers' shuffles


def source_steps(mix: MixConfig, lengths: list[int]) -> list[int]:
    """Steps each source fills in a `sequential` epoch: its batches, the shortest's or longest's."""
    if mix.epoch == "shortest":
        return [min(lengths)] * len(lengths)
    if mix.epoch == "longest":
        return [max(lengths)] * len(lengths)
    if mix.epoch == "sum" or mix.strategy is not MixStrategy.sequential:
        return list(lengths)
    steps, per, left = int(mix.epoch), [], int(mix.epoch)
    if steps > sum(lengths):
        raise ConfigError(
            f"data.mix.epoch={steps} steps cannot be filled by a sequential mix of "
            f"{sum(lengths)} batches ({', '.join(map(str, lengths))}): use at most {sum(lengths)}"
            ", or data.mix.epoch=sum"
        )
    for n in lengths:
        per.append(min(n, left))
        left -= per[-1]
    return per


def epoch_steps(mix: MixConfig, lengths: list[int]) -> int:
    """Steps of one mixed epoch: the sum, n x shortest, n x longest, or a fixed count."""
    if str(mix.epoch).isdigit():
        source_steps(mix, lengths)  # a sequential mix checks that it can fill them
        return int(mix.epoch)
    return sum(source_steps(mix, lengths))


def schedule(mix: MixConfig, lengths: list[int], seed: int, epoch: int) -> np.ndarray:
    """The source index of every step of an epoch; the same on every rank and every rerun."""
    n, steps = len(lengths), epoch_steps(mix, lengths)
    if mix.strategy is MixStrategy.sequential:
        order = np.repeat(np.arange(n), source_steps(mix, lengths))
    elif mix.strategy is MixStrategy.round_robin:
        order = np.arange(steps) % n
    elif mix.strategy is MixStrategy.weighted:
        p = np.asarray(mix.weights, dtype=np.float64)
        rng = np.random.default_rng([seed, epoch, WEIGHTED_STREAM])
        order = rng.choice(n, size=steps, p=p / p.sum())
    else:
        order = np.resize(np.repeat(np.asarray(mix.pattern), mix.burst), steps)
    return order[:steps].astype(np.int64)


def expected_proportions(mix: MixConfig, lengths: list[int]) -> list[float]:
    """The share of an epoch's steps each source is expected to give."""
    if mix.strategy is MixStrategy.weighted:
        total = sum(mix.weights)
        return [w / total for w in mix.weights]
    counts = np.bincount(schedule(mix, lengths, 0, 0), minlength=len(lengths))
    return (counts / counts.sum()).tolist()


@dataclass
class MixPosition:
    """Where a mixed reader stands in an epoch: the step of its schedule and each source's
    position in its current pass; a checkpoint keeps it (as `to_dict`) to go on exactly."""

    epoch: int
    step: int = 0
    sources: list[ReaderPosition] = field(default_factory=list)
    skip: int = 0  # steps already counted in the sources' positions (a remapped position)

    def to_dict(self) -> dict:
        """The form saved in checkpoints."""
        return {"epoch": self.epoch, "step": self.step,
                "sources": [p.to_dict() for p in self.sources]}  # fmt: skip

    @classmethod
    def from_dict(cls, saved: dict) -> MixPosition:
        sources = [ReaderPosition.from_dict(p) for p in saved.get("sources", [])]
        return cls(saved["epoch"], saved.get("step", 0), sources)


class MixedReader:
    """Train batches of several sources, each step's from the source the schedule names; `len()`
    is the epoch's steps, the same on every rank."""

    def __init__(self, readers: dict[str, SplitReader], mix: MixConfig, loss_weights: list[float],
                 seed: int):  # fmt: skip
        self.names, self.readers = list(readers), list(readers.values())
        self.mix, self.seed, self.loss_weights = mix, seed, loss_weights
        self.lengths = [len(r) for r in self.readers]
        self._len = epoch_steps(mix, self.lengths)
        self.converter = self.readers[0].converter  # one feature spec; the sources share quality
        self.workers = self.readers[0].workers
        self.epoch, self.step, self._last = 0, 0, None

    def __len__(self) -> int:
        return self._len

    @property
    def source(self) -> str | None:
        """The name of the source the last batch came from."""
        return None if self._last is None else self.names[self._last]

    @property
    def loss_weight(self) -> float:
        return 1.0 if self._last is None else self.loss_weights[self._last]

    @property
    def position(self) -> MixPosition:
        return MixPosition(self.epoch, self.step, [r.position for r in self.readers])

    def start_position(self, epoch: int) -> MixPosition:
        return MixPosition(epoch, 0, [r.start_position(epoch) for r in self.readers])

    def fits(self, position: MixPosition) -> bool:
        """Whether a saved position is of a mix with these sources and read_threads."""
        return len(position.sources) == len(self.readers) and all(
            r.fits(p) for r, p in zip(self.readers, position.sources, strict=True)
        )

    def resume_position(self, saved: MixPosition, saved_len: int) -> MixPosition:
        """`saved` (of other ranks or workers) mapped onto this mix: the same fraction of the
        epoch's steps, each source skipping the batches the schedule drew from it until there."""
        step = saved.step * self._len // max(saved_len, 1)
        drawn = np.bincount(schedule(self.mix, self.lengths, self.seed, saved.epoch)[:step],
                            minlength=len(self.readers))  # fmt: skip
        sources = []
        for reader, n in zip(self.readers, drawn.tolist(), strict=True):
            passes, rest = divmod(n, len(reader))
            position = reader.start_position(saved.epoch + passes * CYCLE)
            position.skip = rest
            sources.append(position)
        return MixPosition(saved.epoch, step, sources, skip=step)

    def iterate(self, epoch: int, position: MixPosition | None = None) -> Iterator[Batch]:
        """The batches of one epoch, from its start or from a saved `position`."""
        position = copy.deepcopy(position) if position else self.start_position(epoch)
        order = schedule(self.mix, self.lengths, self.seed, epoch)
        self.epoch, self.step, self._last = epoch, position.step, None
        streams = [r.iterate(p.epoch, p) for r, p in zip(self.readers, position.sources,
                                                         strict=True)]  # fmt: skip
        return self._follow(order, streams)

    def _follow(self, order: np.ndarray, streams: list[Iterator[Batch]]) -> Iterator[Batch]:
        """Take each step's batch from its source; a source at the end of its pass (a shorter
        one in a longer epoch) starts its next pass, shuffled anew."""
        try:
            for step in range(self.step, len(order)):
                s = int(order[step])
                reader = self.readers[s]
                if reader.position.batches >= len(reader):
                    streams[s].close()
                    streams[s] = reader.iterate(reader.position.epoch + CYCLE)
                batch = next(streams[s])
                self.step, self._last = step + 1, s
                yield batch
        finally:
            for stream in streams:
                stream.close()

    def describe(self) -> str:
        """The schedule as printed at start: sources, rows, batches per epoch, proportions."""
        shares = expected_proportions(self.mix, self.lengths)
        rows = [r.total_rows for r in self.readers]
        lines = [f"mix {self.mix.strategy.value} (epoch {self.mix.epoch}): {self._len} steps/epoch"]
        for name, n, length, share, weight in zip(self.names, rows, self.lengths, shares,
                                                  self.loss_weights, strict=True):  # fmt: skip
            lines.append(f"  {name}: {n:,} rows, {length} batches/pass, expected {share:.1%} of "
                         f"the steps, loss weight {weight:g}")  # fmt: skip
        return "\n".join(lines)


@dataclass
class SourceEvaluation:
    """One split of each source, evaluated on its own, and the aggregate of their metrics:
    micro (weighted by rows), macro (sources equal) or one source's."""

    readers: dict[str, SplitReader]
    aggregate: str

    def evaluate(self, evaluate_one: Callable[[SplitReader], dict[str, float]]) -> dict[str, float]:
        """The aggregate metrics by their plain names, and each source's as `<source>/<metric>`."""
        each = {name: evaluate_one(reader) for name, reader in self.readers.items()}
        if self.aggregate in each:
            total = dict(each[self.aggregate])
        else:
            rows = {n: r.total_rows for n, r in self.readers.items()}
            weight = rows if self.aggregate == "micro" else dict.fromkeys(rows, 1)
            mass = sum(weight.values())
            first = next(iter(each.values()))
            total = {m: sum(weight[n] * each[n][m] for n in each) / mass for m in first}
        return total | {f"{n}/{m}": v for n, metrics in each.items() for m, v in metrics.items()}


def open_sources(data: DataConfig, split: str, quality: dict[str, DataQuality], train: bool,
                 **kwargs) -> dict[str, SplitReader]:  # fmt: skip
    """Each source's reader of a split (sources without that split left out), checked against
    the one feature spec; errors name the source."""
    readers = {}
    for name in data.sources:
        source = data.of_source(name)
        if source.split(split) is None:
            continue
        key = split if train else f"{split}/{name}"
        try:
            reader = open_split(source, split, quality.setdefault(key, DataQuality()), train,
                                **kwargs)  # fmt: skip
        except RecsysError as e:  # the keys to fix are the source's
            text = str(e)
            for key in ("data.path", "data.filter", f"data.{split}."):
                text = text.replace(key, key.replace("data.", f"data.sources.{name}.", 1))
            raise type(e)(f"source {name}: {text}") from None
        if not len(reader):
            raise DataError(
                f"source {name}: {reader.num_rows} rows of {source.path} (split {split}) make "
                "no batch for every rank: lower data.batch_size or give it more rows"
            )
        readers[name] = reader
    return readers


def open_mix(
    data: DataConfig, quality: dict[str, DataQuality], max_eval: int | None, seed: int, **shard
) -> tuple[MixedReader, SourceEvaluation | None, SourceEvaluation | None]:
    """The train mix of data.sources and the per-source validation and test splits."""
    train = open_sources(data, "train", quality, True, seed=seed, **shard)
    weights = [s.weight for s in data.sources.values()]
    mixed = MixedReader(train, data.mix, weights, seed)
    evaluated = []
    for split in ("validation", "test"):
        readers = open_sources(data, split, quality, False, max_batches=max_eval, **shard)
        evaluated.append(SourceEvaluation(readers, data.mix.validation) if readers else None)
    return mixed, evaluated[0], evaluated[1]
