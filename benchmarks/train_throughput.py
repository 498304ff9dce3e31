"""Benchmark: FM and DeepFM trained by recsys from Parquet on disk vs the hand-written floor.

Every variant trains one epoch of the same generated set (>= 1M rows, 26 categorical, 13 dense,
batch 4096, embedding dim 16, DeepFM's MLP 256-128). recsys reads and converts the Parquet files
while it trains, with its default table optimizer (row-sparse Adam on CPU) and with each of
FBGEMM's fused CPU kernels instead; the floor (benchmarks/floor.py: an nn.EmbeddingBag per column,
SparseAdam + Adam) has every tensor loaded before its clock starts. Each variant runs in its own
process (so peak RSS is its own), in turn, `--repeats` times; medians are reported with the ratio
to the floor of the same model and the CPU seconds other processes took meanwhile (contention).

    python benchmarks/train_throughput.py [--rows 1000000] [--repeats 3] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_DENSE, N_CAT, BATCH, DIM, HIDDEN = 13, 26, 4096, 16, [256, 128]


def data_dir(rows: int) -> Path:
    cache = os.environ.get("RECSYS_CACHE") or Path.home() / ".cache" / "recsys"
    return Path(cache) / "bench" / f"ctr-{rows}"


def bench_spec(rows: int):
    """The generated set: Criteo's shape (26 categorical, 13 dense), no multi-hot column."""
    from recsys.demo.ctr import DemoSpec, log_spaced

    return DemoSpec(
        rows={"train": rows, "validation": 0, "test": 0},
        n_dense=N_DENSE,
        cardinalities=log_spaced(N_CAT, 10, 100_000),
        tag_vocab=0,
    )


def ensure_data(rows: int) -> Path:
    from recsys.demo.ctr import generate

    out = data_dir(rows)
    if not (out / "demo_info.json").exists():
        print(f"generating {rows:,} rows into {out} ...", flush=True)
        generate(out, bench_spec(rows))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# the same rows as two sources (even and odd files) mixed round-robin: what mixing costs
MIX = ["data=mix", "data.sources.web.path=${data.path}", "data.sources.app.path=${data.path}",
       "data.sources.web.train.paths=['train/part-*[02468].parquet']",
       "+data.sources.app.train={paths:['train/part-*[13579].parquet']}",
       "data.sources.web.validation=null", "data.sources.web.test=null",
       "+data.sources.app.validation=null", "+data.sources.app.test=null"]  # fmt: skip
# variant -> (trainer, model, extra recsys overrides)
TABLES = "trainer.sparse_optimizer"
VARIANTS = {
    "floor deepfm": ("floor", "deepfm", []),
    "recsys deepfm": ("recsys", "deepfm", []),
    "recsys deepfm, tables rowwise_adagrad": (
        "recsys", "deepfm", [f"{TABLES}.type=rowwise_adagrad", f"{TABLES}.lr=0.05"]),
    "recsys deepfm, tables adagrad": (
        "recsys", "deepfm", [f"{TABLES}.type=adagrad", f"{TABLES}.lr=0.02"]),
    "recsys deepfm, tables sgd": ("recsys", "deepfm", [f"{TABLES}.type=sgd", f"{TABLES}.lr=0.05"]),
    "floor fm": ("floor", "fm", []),
    "recsys fm": ("recsys", "fm", []),
    "recsys fm, 2-source mix": ("recsys", "fm", MIX),
}  # fmt: skip


def run_recsys(path: Path, model: str = "deepfm", extra: tuple[str, ...] = ()) -> dict:
    """Train with recsys's own entry path (config -> reader -> DMP -> trainer)."""
    from hydra import compose, initialize_config_dir

    from recsys import config as schema
    from recsys.train import run

    schema.register()
    cats = bench_spec(0).categorical
    overrides = [
        f"data.path={path}",
        "data.validation=null",
        "data.test=null",
        f"data.dense=[{','.join(f'd{i}' for i in range(N_DENSE))}]",
        "data.categorical=[" + ",".join(f"{k}:{v}" for k, v in cats.items()) + "]",
        f"data.batch_size={BATCH}",
        f"model={model}",
        f"model.embedding_dim={DIM}",
        *([f"model.hidden=[{','.join(map(str, HIDDEN))}]"] if model in ("deepfm", "mlp") else []),
        "trainer.max_epochs=1",
        "trainer.eval_every_steps=null",
        "trainer.progress_bar=false",
        "trainer.log_every_steps=1000000",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"recsys-bench-{os.getpid()}"
    run(cfg, run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())["train"]
    return {"samples_per_s": m["samples_per_s"], "seconds": m["train_seconds"]}


def run_floor(path: Path, model: str) -> dict:
    """The floor (FM or DeepFM), every tensor in memory before the clock starts."""
    import torch
    from floor import Floor, load_split, train

    torch.manual_seed(0)
    dense, ids, labels = load_split(path / "train", N_DENSE, N_CAT)
    cards = list(bench_spec(0).categorical.values())
    net = Floor(cards, N_DENSE, DIM, HIDDEN if model == "deepfm" else [], dropout=0.0)
    seconds = train(net, dense, ids, labels, 1, BATCH)
    return {"samples_per_s": len(labels) / seconds, "seconds": seconds}


def child(variant: str, path: Path) -> None:
    trainer, model, extra = VARIANTS[variant]
    result = run_recsys(path, model, extra) if trainer == "recsys" else run_floor(path, model)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(variant: str, path: Path) -> dict:
    before_all, before_kids = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--data", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode:
        sys.exit(f"{variant} failed:\n{proc.stdout}\n{proc.stderr}")
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (kids.ru_utime - before_kids.ru_utime) + (kids.ru_stime - before_kids.ru_stime)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["other_cpu_s"] = max(0.0, busy_cpu_seconds() - before_all - own)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data)
        return
    path = ensure_data(args.rows)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for i in range(args.repeats):
        for variant in runs:
            r = measure(variant, path)
            runs[variant].append(r)
            print(
                f"run {i + 1}/{args.repeats} {variant:<40} {r['samples_per_s']:>9,.0f} samples/s"
                f"  peak RSS {r['peak_rss_mb']:,.0f} MB"
                f"  other processes {r['other_cpu_s']:.1f} CPU s",
                flush=True,
            )
    _print_table(runs, args.rows)


def _print_table(runs: dict[str, list[dict]], rows: int) -> None:
    med = {v: statistics.median(r["samples_per_s"] for r in rs) for v, rs in runs.items()}
    print(
        f"\n{rows:,} rows, {N_CAT} categorical + {N_DENSE} dense, batch {BATCH}, dim {DIM}, "
        f"DeepFM MLP {HIDDEN}, {os.cpu_count()} cores; medians of {len(next(iter(runs.values())))}"
    )
    print("| variant | samples/s | × floor | peak RSS MB | other CPU s (max) |")
    print("|---|---:|---:|---:|---:|")
    for v, rs in runs.items():
        floor = med.get(f"floor {VARIANTS[v][1]}")
        ratio = f"{med[v] / floor:.2f}" if floor else "-"
        print(
            f"| {v} | {med[v]:,.0f} | {ratio} | {max(r['peak_rss_mb'] for r in rs):,.0f} | "
            f"{max(r['other_cpu_s'] for r in rs):.0f} |"
        )


if __name__ == "__main__":
    main()
