"""Benchmark: rows/s of our reader producing `Batch`es vs a raw pyarrow scan of the same files.

For local Parquet, local ORC and Parquet on a local S3 server (SeaweedFS), in one run: the raw
`pyarrow.dataset(...).to_batches()` scan of the configured columns is the floor of what Arrow
can do; ours adds piece planning, re-batching to exactly batch_size rows and the conversion to
dense tensors and KeyedJaggedTensors. Medians of `--repeats` alternating runs, as ratios.

    python benchmarks/reader_throughput.py [--rows 1000000] [--repeats 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import bench_spec, ensure_data  # noqa: E402

from recsys.config import DataConfig, FileFormat, S3Config, SplitConfig  # noqa: E402
from recsys.data.batches import DataQuality  # noqa: E402
from recsys.data.reader import open_split  # noqa: E402
from recsys.demo.ctr import to_recis_layout  # noqa: E402


def config(path: str, fmt: FileFormat, threads: int, s3: S3Config | None = None) -> DataConfig:
    spec = bench_spec(0)
    return DataConfig(
        path=path, format=fmt, train=SplitConfig(["train"]), validation=None, test=None,
        label="label" if fmt is FileFormat.orc else "click", dense=spec.dense_names,
        categorical=[f"{k}:{v}" for k, v in spec.categorical.items()], read_threads=threads,
        s3=s3 or S3Config(),
    )  # fmt: skip


def ours(data: DataConfig) -> float:
    start = time.perf_counter()
    rows = sum(len(b.labels) for b in open_split(data, "train", DataQuality(), train=True))
    return rows / (time.perf_counter() - start)


def raw(data: DataConfig, fs: pafs.FileSystem, root: str) -> float:
    fmt = "orc" if data.format is FileFormat.orc else "parquet"
    start = time.perf_counter()
    dataset = ds.dataset(f"{root}/train", format=fmt, filesystem=fs)
    columns = [data.label, *data.dense, *data.tables]
    rows = sum(b.num_rows for b in dataset.to_batches(columns=columns, batch_size=4096))
    return rows / (time.perf_counter() - start)


def make_orc(parquet: Path) -> Path:
    import pyarrow.orc as orc
    import pyarrow.parquet as pq

    out = parquet.parent / f"{parquet.name}-orc"
    if not out.exists():
        tmp = Path(tempfile.mkdtemp(dir=parquet.parent))
        (tmp / "train").mkdir()
        for f in sorted((parquet / "train").glob("*.parquet")):
            table = to_recis_layout(pq.read_table(f), bench_spec(0))
            orc.write_table(table, tmp / "train" / f"{f.stem}.orc")
        tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    parquet = ensure_data(args.rows)
    orc_dir = make_orc(parquet)
    local = pafs.LocalFileSystem()
    cases = {
        "local parquet": (config(str(parquet), FileFormat.parquet, 1), local, str(parquet)),
        "local orc": (config(str(orc_dir), FileFormat.orc, 1), local, str(orc_dir)),
    }
    server = None
    try:
        from tests import s3_server

        server = s3_server.start(Path(tempfile.mkdtemp(prefix="recsys-bench-s3-")))
        pafs.copy_files(str(parquet / "train"), f"{server.bucket}/bench/train", local,
                        server.filesystem())  # fmt: skip
        s3 = S3Config(endpoint=f"http://{server.endpoint}", region="us-east-1",
                      access_key=server.access_key, secret_key=server.secret_key)  # fmt: skip
        cases["s3 parquet"] = (
            config(f"s3://{server.bucket}/bench", FileFormat.parquet, 1, s3),
            server.filesystem(), f"{server.bucket}/bench",
        )  # fmt: skip
    except (ImportError, RuntimeError) as e:
        print(f"s3 parquet: skipped ({e})")
    try:
        head = ("source", "threads", "raw scan rows/s", "ours rows/s", "ratio")
        print(f"{head[0]:<15} {head[1]:>7} {head[2]:>16} {head[3]:>12} {head[4]:>6}")
        for name, (data, fs, root) in cases.items():
            for threads in args.threads:
                data.read_threads = threads
                r, o = [], []
                for _ in range(args.repeats):
                    r.append(raw(data, fs, root))
                    o.append(ours(data))
                mr, mo = statistics.median(r), statistics.median(o)
                print(f"{name:<15} {threads:>7} {mr:>16,.0f} {mo:>12,.0f} {mo / mr:>6.2f}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
