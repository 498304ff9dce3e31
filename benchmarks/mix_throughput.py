"""Benchmark: samples/s of a 2-source mix against the same rows read as one source.

The generated Criteo-shaped set's train files are split in two halves, each a source of a
round-robin mix (epoch `sum`: every row once); the baseline reads all files as one split. Both
produce the same `Batch`es through the same `SplitReader`s, so the ratio is what mixing costs.
Medians of `--repeats` alternating runs; the load average shows how contended the machine was.

    python benchmarks/mix_throughput.py [--rows 1000000] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reader_throughput import config  # noqa: E402
from train_throughput import ensure_data  # noqa: E402

from recsys.config import FileFormat, MixConfig, SplitConfig  # noqa: E402
from recsys.data.batches import DataQuality  # noqa: E402
from recsys.data.mix import open_mix  # noqa: E402
from recsys.data.reader import open_split  # noqa: E402


def samples_per_s(batches) -> float:
    start = time.perf_counter()
    rows = sum(len(b.labels) for b in batches)
    return rows / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    path = ensure_data(args.rows)
    files = sorted(f"train/{f.name}" for f in (path / "train").glob("*.parquet"))
    one = config(str(path), FileFormat.parquet, args.threads)
    half = len(files) // 2
    halves = {"a": files[:half], "b": files[half:]}
    sources = {
        name: {"path": str(path), "train": {"paths": paths}, "validation": None, "test": None}
        for name, paths in halves.items()
    }
    mixed = replace(one, sources=sources, mix=MixConfig())
    one.train = SplitConfig(files)
    single_rates, mix_rates = [], []
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        single_rates.append(samples_per_s(open_split(one, "train", DataQuality(), train=True)))
        mix_rates.append(samples_per_s(open_mix(mixed, {}, None, seed=0)[0].iterate(0)))
    single, mixed_rate = statistics.median(single_rates), statistics.median(mix_rates)
    after = os.getloadavg()[0]
    print(f"{args.rows:,} rows, {len(files)} files, read_threads {args.threads}, "
          f"load average {load:.1f} -> {after:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'one source':<24} {single:>12,.0f} samples/s")
    print(f"{'2-source round-robin':<24} {mixed_rate:>12,.0f} samples/s")
    print(f"{'mix / one':<24} {mixed_rate / single:>12.3f}")


if __name__ == "__main__":
    main()
