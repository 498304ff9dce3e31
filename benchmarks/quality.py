"""Quality benchmark: test AUC per epoch of every ranking model vs a hand-written floor.

Generated Criteo-like sets (13 dense, 26 categorical with Zipf-skewed ids) with several mixes of
planted effects, each with its oracle AUC (the planted model's own) and first-order oracle AUC
(its first-order part alone). Every model trains through `python -m recsys.train` streaming from
Parquet; the floor is fifty lines of plain PyTorch in the same run: an `nn.EmbeddingBag` per
column, `SparseAdam` for the tables and `Adam` for the rest (lr 1e-3), tensors preloaded. Each
cell runs in its own process; the table gives AUC, logloss, samples/s, peak RSS and the ratios to
the floor of the model's family (FM for lr/fm, DeepFM for the deep models).

    python benchmarks/quality.py [--rows 400000] [--mixes ...] [--models ...] [--epochs 1]
        [--set trainer.sparse_optimizer.lr=0.1 ...]   # extra recsys overrides, for trying settings
    python benchmarks/quality.py --sweep deepfm --mixes pairwise_heavy [--trials 20]
        # a sweep per mix: the share of the distance from the default's AUC to the oracle's closed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import busy_cpu_seconds  # noqa: E402

N_DENSE, N_CAT, BATCH, DIM, HIDDEN = 13, 26, 4096, 16, [256, 128]
# effect mixes: DemoSpec fields over the Criteo-like base (tables of 10..100k rows, Zipf 1.1)
MIXES = {
    "balanced": {"pairwise_to_first_order": 1.0, "dense_nonlinear": 0.5},
    "first_order_heavy": {"pairwise_to_first_order": 0.4, "dense_nonlinear": 0.3},
    "pairwise_heavy": {"pairwise_to_first_order": 2.0, "dense_nonlinear": 0.3},
    "dense_nonlinear": {"pairwise_to_first_order": 0.6, "dense_nonlinear": 1.5},
    "long_tail": {
        "pairwise_to_first_order": 1.0,
        "dense_nonlinear": 0.5,
        "zipf_exponent": 0.9,
        "max_rows": 1_000_000,
    },  # fmt: skip
}
MODELS = ["lr", "fm", "deepfm", "mlp", "dcn_v2", "dlrm"]
FLOOR_OF = {"lr": "fm", "fm": "fm"}  # the rest: deepfm


def spec_of(mix: str, rows: int):
    from recsys.demo.ctr import DemoSpec, log_spaced

    over = dict(MIXES[mix])
    high = over.pop("max_rows", 100_000)
    return DemoSpec(
        rows={"train": rows, "validation": rows // 10, "test": rows // 5},  # validation: sweeps
        n_dense=N_DENSE,
        cardinalities=log_spaced(N_CAT, 10, high),
        tag_vocab=0,
        **over,
    )


def ensure_data(mix: str, rows: int) -> Path:
    from recsys.demo.ctr import generate

    cache = os.environ.get("RECSYS_CACHE") or Path.home() / ".cache" / "recsys"
    out = Path(cache) / "bench" / f"quality-v2-{mix}-{rows}"
    if not (out / "demo_info.json").exists():
        print(f"generating {mix} ({rows:,} train rows) into {out} ...", flush=True)
        generate(out, spec_of(mix, rows))
    return out


def set_args(path: Path) -> list[str]:
    """The overrides that point a recsys run at a generated set, shared by runs and sweeps."""
    sizes = json.loads((path / "demo_info.json").read_text())["spec"]["cardinalities"]
    cats = {f"c{i}": n for i, n in enumerate(sizes)}
    return [
        f"data.path={path}",
        f"data.dense=[{','.join(f'd{i}' for i in range(N_DENSE))}]",
        "data.categorical=[" + ",".join(f"{k}:{v}" for k, v in cats.items()) + "]",
        "trainer.progress_bar=false",
        "trainer.checkpoint.enabled=false",
    ]


def run_recsys(path: Path, model: str, epochs: int, extra: list[str]) -> dict:
    """One model through the CLI; its metrics.json."""
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"recsys-quality-{os.getpid()}-{model}"
    args = [
        *set_args(path),
        f"data.batch_size={BATCH}",
        f"trainer.max_epochs={epochs}",
        "data.validation=null",
        f"model={model}",
        f"hydra.run.dir={run_dir}",
        *([f"model.embedding_dim={DIM}"] if model != "lr" else []),
        *extra,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "recsys.train", *args], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode:
        raise RuntimeError(f"recsys {model} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"auc": m["test"]["auc"], "logloss": m["test"]["logloss"],
            "samples_per_s": m["train"]["samples_per_s"],
            "peak_rss_mb": m["train"]["peak_rss_mb"]}  # fmt: skip


def run_sweep(path: Path, sweep: str, trials: int, extra: list[str]) -> dict:
    """A `--multirun sweep=<sweep>` study on the set (validation AUC, the sweeper's defaults,
    batch size and epochs from the sweep's space); the best trial's test AUC and overrides."""
    sweep_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"recsys-quality-{os.getpid()}-{sweep}"
    args = ["--multirun", f"sweep={sweep}", f"hydra.sweeper.n_trials={trials}",
            f"hydra.sweep.dir={sweep_dir}", *set_args(path), *extra]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recsys.train", *args], cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"sweep={sweep} failed (exit {proc.returncode}); its log is above")
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())["best"][0]
    m = json.loads((sweep_dir / str(best["trial"]) / "metrics.json").read_text())
    return {
        "auc": m["test"]["auc"],
        "validation_auc": best["values"][0],
        "overrides": " ".join(f"{k}={v}" for k, v in best["params"].items()),
        "minutes": (time.perf_counter() - started) / 60,
    }


def run_floor(path: Path, model: str, epochs: int) -> dict:
    """The hand-written floor: FM or DeepFM, EmbeddingBag + SparseAdam + Adam, in memory."""
    import resource

    import numpy as np
    import torch
    from floor import Floor, load_split, train

    from recsys.metrics import binary_auc

    torch.manual_seed(0)

    dense, ids, labels = load_split(path / "train", N_DENSE, N_CAT)
    cards = json.loads((path / "demo_info.json").read_text())["spec"]["cardinalities"]
    net = Floor(cards, N_DENSE, DIM, HIDDEN if model == "deepfm" else [], dropout=0.0)
    seconds = train(net, dense, ids, labels, epochs, BATCH)
    dense, ids, y = load_split(path / "test", N_DENSE, N_CAT)
    y = y.numpy()
    with torch.no_grad():
        p = torch.cat([torch.sigmoid(net(dense[s : s + 16384], ids[s : s + 16384]))
                       for s in range(0, len(y), 16384)]).double().numpy()  # fmt: skip
    eps = 1e-7
    logloss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
    return {"auc": binary_auc(p, y), "logloss": float(logloss),
            "samples_per_s": epochs * len(labels) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def measure(kind: str, path: Path, model: str, epochs: int, extra: list[str]) -> dict:
    """One cell in a fresh process, with the CPU seconds other processes took meanwhile."""
    before = busy_cpu_seconds()
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(path), "--models", model,
           "--epochs", str(epochs), "--set", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{kind} {model} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["other_cpu_s"] = max(0.0, busy_cpu_seconds() - before - result["cpu_s"])
    return result


def child(kind: str, path: Path, model: str, epochs: int, extra: list[str]) -> None:
    import resource

    t = resource.getrusage(resource.RUSAGE_SELF)
    if kind == "floor":
        out = run_floor(path, model, epochs)
    else:
        out = run_recsys(path, model, epochs, extra)
    t2, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    out["cpu_s"] = (
        t2.ru_utime + t2.ru_stime - t.ru_utime - t.ru_stime + kids.ru_utime + kids.ru_stime
    )
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=250_000, help="train rows per set (test: 1/5)")
    ap.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides of every recsys run")
    ap.add_argument("--sweep", help="instead: this sweep (deepfm, ...) per mix, vs its default")
    ap.add_argument("--trials", type=int, default=20, help="of --sweep")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", choices=["recsys", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.models[0], args.epochs, args.set)
        return
    if args.sweep:
        sweep_closes_gap(args)
        return
    started = time.perf_counter()
    rows = []
    for mix in args.mixes:
        path = ensure_data(mix, args.rows)
        info = json.loads((path / "demo_info.json").read_text())
        floors = {}
        for family in sorted({FLOOR_OF.get(m, "deepfm") for m in args.models}):
            floors[family] = measure("floor", path, family, args.epochs, [])
            rows.append({"mix": mix, "model": f"floor {family}", **floors[family]})
            _print_row(rows[-1], None)
        for model in args.models:
            r = measure("recsys", path, model, args.epochs, args.set)
            rows.append({"mix": mix, "model": model, **r})
            _print_row(rows[-1], floors[FLOOR_OF.get(model, "deepfm")])
        print(f"  {mix}: oracle AUC {info['test']['oracle_auc']:.4f}, first-order oracle "
              f"{info['first_order_part_auc']:.4f}", flush=True)  # fmt: skip
        for r in rows:
            if r["mix"] == mix:
                r["oracle_auc"] = info["test"]["oracle_auc"]
                r["first_order_auc"] = info["first_order_part_auc"]
    _print_table(rows, args)
    print(f"\nfinished in {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def sweep_closes_gap(args) -> None:
    """Per mix: the model's default test AUC, then the best of a sweep, and the share of the
    default's distance to the oracle that the sweep closed."""
    for mix in args.mixes:
        path = ensure_data(mix, args.rows)
        oracle = json.loads((path / "demo_info.json").read_text())["test"]["oracle_auc"]
        default = measure("recsys", path, args.sweep, args.epochs, args.set)
        best = run_sweep(path, args.sweep, args.trials, args.set)
        closed = (best["auc"] - default["auc"]) / (oracle - default["auc"])
        print(f"\n{mix} ({args.rows:,} rows): default {args.sweep} ({args.epochs} epoch(s)) "
              f"test AUC {default['auc']:.4f}; sweep={args.sweep}, {args.trials} trials in "
              f"{best['minutes']:.0f} min: best validation AUC {best['validation_auc']:.4f}, "
              f"test AUC {best['auc']:.4f} ({best['overrides']}); oracle {oracle:.4f}: "
              f"{closed:.0%} of the gap closed", flush=True)  # fmt: skip


def _print_row(r: dict, floor: dict | None) -> None:
    ratio = ""
    if floor:
        speed = r["samples_per_s"] / floor["samples_per_s"]
        ratio = f"  AUC {r['auc'] - floor['auc']:+.4f} vs floor, {speed:.2f}x its speed"
    print(f"  {r['mix']:<18} {r['model']:<13} AUC {r['auc']:.4f}  logloss {r['logloss']:.4f}  "
          f"{r['samples_per_s']:>9,.0f}/s  other CPU {r['other_cpu_s']:.0f} s{ratio}",
          flush=True)  # fmt: skip


def _print_table(rows: list[dict], args) -> None:
    print(
        f"\n{args.rows:,} train rows, {args.epochs} epoch(s), batch {BATCH}, dim {DIM}, "
        f"{N_CAT} categorical + {N_DENSE} dense; extra overrides: {' '.join(args.set) or '-'}"
    )
    head = (
        "| mix | model | test AUC | ΔAUC vs floor | share of oracle gap closed | logloss | "
        "samples/s | × floor speed | peak RSS MB |"
    )
    print(head)
    print("|" + "---|" * 9)
    floors = {(r["mix"], r["model"].split()[1]): r for r in rows if r["model"].startswith("floor")}
    for r in rows:
        fam = (
            r["model"].split()[1]
            if r["model"].startswith("floor")
            else FLOOR_OF.get(r["model"], "deepfm")
        )
        f = floors[(r["mix"], fam)]
        gap = (r["auc"] - r["first_order_auc"]) / (r["oracle_auc"] - r["first_order_auc"])
        print(
            f"| {r['mix']} | {r['model']} | {r['auc']:.4f} | {r['auc'] - f['auc']:+.4f} | "
            f"{gap:.0%} | {r['logloss']:.4f} | {r['samples_per_s']:,.0f} | "
            f"{r['samples_per_s'] / f['samples_per_s']:.2f} | {r['peak_rss_mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
