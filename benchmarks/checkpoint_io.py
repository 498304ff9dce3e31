"""Benchmark: checkpoint save/load time and size, recsys (torch.distributed.checkpoint, sharded)
vs a plain `torch.save` of the same tensors gathered into one file on rank 0.

Two DeepFM models (dim 16, [256, 128]), with the fused rowwise-Adagrad state of their tables: the
demo's (16 tables, ~0.3M rows) and one with >= 10M embedding rows (26 tables, one of 10M rows).
Each runs on 1 and on 2 processes (torchrun, gloo); medians of `--repeats`.

    python benchmarks/checkpoint_io.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed_throughput import torchrun

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "demo": None,  # the demo's tables, from conf/data/local.yaml
    "10M rows": {f"c{i}": 10_000_000 if i == 0 else 100_000 for i in range(26)},
}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child(model_name: str, repeats: int, out: Path) -> None:
    """In each of torchrun's processes: build the sharded model, time save and load."""
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from recsys import checkpoint
    from recsys import config as schema
    from recsys.data.features import FeatureSpec
    from recsys.distributed import (
        dense_parameters,
        full_state_dict,
        init_process_group,
        quiet_torchrec,
        shard,
    )

    quiet_torchrec()
    schema.register()
    tables = MODELS[model_name]
    overrides = ["model=deepfm", "model.embedding_dim=16", "model.hidden=[256,128]"]
    if tables:
        cats = ",".join(f"{k}:{v}" for k, v in tables.items())
        overrides += [f"data.categorical=[{cats}]", "data.dense=[d0,d1,d2,d3,d4,d5,d6,d7]"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    typed = schema.to_object(cfg)
    device = torch.device("cpu")
    init_process_group(device)
    spec = FeatureSpec.from_data_config(typed.data, None)
    model = instantiate(cfg.model, _partial_=True, _convert_="all")(features=spec, device="meta")
    description = checkpoint.describe(model)
    rows = sum(t[0] for t in description["tables"].values())
    t = typed.trainer
    model = shard(model, device, t.sparse_optimizer, t.sharding, t.first_order_optimizer)
    dense_opt = instantiate(cfg.trainer.dense_optimizer, params=dense_parameters(model))
    rank = dist.get_rank()
    root = out / "checkpoints"
    plain = out / "plain.pt"
    times: dict[str, list[float]] = {k: [] for k in ("save", "load", "plain_save", "plain_load")}
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        path = checkpoint.save(root, 1, model, {"dense_optimizer": dense_opt.state_dict()},
                               {}, description, keep_last=1)  # fmt: skip
        times["save"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        checkpoint.restore([path], model, dense_opt, description)
        times["load"].append(time.perf_counter() - t)
        # the baseline: every tensor gathered to rank 0, one torch.save / torch.load there
        dist.barrier()
        t = time.perf_counter()
        state = full_state_dict(model)
        if rank == 0:
            torch.save({"model": state, "dense_optimizer": dense_opt.state_dict()}, plain)
        dist.barrier()
        times["plain_save"].append(time.perf_counter() - t)
        t = time.perf_counter()
        if rank == 0:
            torch.load(plain, weights_only=False)  # read back into memory, not re-sharded
        dist.barrier()
        times["plain_load"].append(time.perf_counter() - t)
    if rank == 0:
        result = {k: statistics.median(v) for k, v in times.items()}
        result |= {"rows": rows, "bytes": dir_size(path), "plain_bytes": plain.stat().st_size}
        print("RESULT " + json.dumps(result), flush=True)


def measure(model_name: str, nproc: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="recsys-ckpt-bench-") as tmp:
        child_args = ["--child", model_name, "--repeats", str(repeats), "--out", tmp]
        proc = subprocess.run(
            [*torchrun(nproc), __file__, *child_args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode:
        sys.exit(f"{model_name} on {nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.repeats, args.out)
        return
    names = ["ranks", "rows", "size MB", "save s", "load s", "plain save s", "plain load s"]
    header = f"{'model':<10} " + " ".join(f"{n:>12}" for n in [*names, "save x", "load x"])
    print(header)
    print("-" * len(header))
    for name in MODELS:
        for nproc in (1, 2):
            r = measure(name, nproc, args.repeats)
            cells = [f"{nproc}", f"{r['rows']:,}", f"{r['bytes'] / 2**20:,.0f}"]
            cells += [f"{r[k]:.2f}" for k in ("save", "load", "plain_save", "plain_load")]
            cells += [f"{r['plain_save'] / r['save']:.2f}", f"{r['plain_load'] / r['load']:.2f}"]
            print(f"{name:<10} " + " ".join(f"{c:>12}" for c in cells), flush=True)
    print("plain: every tensor gathered to rank 0, one torch.save; its load only reads the file")
    print("save x / load x: plain time over ours (> 1: ours faster)")


if __name__ == "__main__":
    main()
