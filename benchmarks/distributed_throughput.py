"""Benchmark: DeepFM samples/s on 1 process vs 2 processes (torchrun, gloo, tables sharded
table-wise) with the same global batch (4096) and the same CPU threads in all (2 vs 2 x 1).

One epoch of the generated 1M-row set of train_throughput.py, alternating, `--repeats` times;
medians. On a 2-core machine no speed-up is expected: the point of 2 ranks there is correctness.

    python benchmarks/distributed_throughput.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from train_throughput import BATCH, DIM, HIDDEN, N_DENSE, bench_spec, ensure_data

from recsys.distributed import torchrun_command

ROOT = Path(__file__).resolve().parents[1]


def measure(path: Path, nproc: int) -> dict:
    cats = ",".join(f"{k}:{v}" for k, v in bench_spec(0).categorical.items())
    with tempfile.TemporaryDirectory(prefix="recsys-dist-bench-") as run_dir:
        overrides = [
            f"data.path={path}",
            "data.validation=null",
            "data.test=null",
            f"data.dense=[{','.join(f'd{i}' for i in range(N_DENSE))}]",
            f"data.categorical=[{cats}]",
            f"data.batch_size={BATCH // nproc}",
            f"model.embedding_dim={DIM}",
            f"model.hidden=[{','.join(map(str, HIDDEN))}]",
            f"trainer.threads={2 // nproc}",
            "trainer.eval_every_steps=null",
            "trainer.progress_bar=false",
            "trainer.log_every_steps=1000000",
            "trainer.checkpoint.enabled=false",
            f"hydra.run.dir={run_dir}",
        ]
        proc = subprocess.run(
            [*torchrun_command(nproc), "-m", "recsys.train", *overrides],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": str(2 // nproc)},
        )
        if proc.returncode:
            sys.exit(f"{nproc} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        m = json.loads((Path(run_dir) / "metrics.json").read_text())["train"]
    return {"samples_per_s": m["samples_per_s"], "steps": m["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = ensure_data(args.rows)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for i in range(args.repeats):
        for nproc in (1, 2):
            runs[nproc].append(measure(path, nproc))
            print(f"run {i + 1}: {nproc} rank(s) {runs[nproc][-1]['samples_per_s']:,.0f} "
                  "samples/s", flush=True)  # fmt: skip
    med = {n: statistics.median(r["samples_per_s"] for r in runs[n]) for n in runs}
    print(f"\n{'ranks':>5} {'steps':>6} {'samples/s (median)':>19}")
    for n in runs:
        print(f"{n:>5} {runs[n][0]['steps']:>6} {med[n]:>19,.0f}")
    print(f"2 ranks / 1 rank: {med[2] / med[1]:.2f}x")


if __name__ == "__main__":
    main()
