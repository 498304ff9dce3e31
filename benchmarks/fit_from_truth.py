"""How far fitting a generated set's rows moves an FM from the model that drew them: the floor's
FM started at the planted weights, trained with Adam and an L2 prior on whole tables (every row,
every step); validation and test AUC per epoch. If even this start loses AUC epoch after epoch,
the best fit of those rows lies below it, whatever settings a sweep tries.

    python benchmarks/fit_from_truth.py [--mix pairwise_heavy] [--rows 250000] [--l2 1e-4 ...]
        [--start random]   # the same fit from the floor's random initial values, for comparison
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from floor import Floor, load_split
from quality import N_CAT, N_DENSE, ensure_data

from recsys.demo.ctr import DemoSpec, PlantedModel
from recsys.metrics import binary_auc


def fm_of(path: Path, planted_start: bool) -> Floor:
    """The floor's FM (dim 16) with dense gradients, holding the planted FM of the set at `path`
    (`planted_start`) or the floor's random initial values."""
    spec = DemoSpec(**json.loads((path / "demo_info.json").read_text())["spec"])
    net = Floor(spec.cardinalities, N_DENSE, 16, [], 0.0)
    for bag in [*net.emb, *net.bias]:
        bag.sparse = False
    if not planted_start:
        return net
    planted = PlantedModel(spec, np.random.default_rng(spec.seed))
    k, scale = spec.latent_dim, float(np.sqrt(planted.pair_scale))
    with torch.no_grad():
        for f in range(N_CAT):
            net.emb[f].weight.zero_()[:, :k] = torch.from_numpy(planted.v[f]) * scale
            net.bias[f].weight[:, 0] = torch.from_numpy(planted.w[f])
        net.dense_vectors.zero_()[:, :k] = torch.from_numpy(planted.vd) * scale
        net.linear.weight[0] = torch.from_numpy(planted.u)
        net.linear.bias.fill_(planted.bias)
    return net


def fit(path: Path, planted_start: bool, l2: float, epochs: int, batch: int, lr: float):
    """Validation and test AUC at the start, then after each epoch of fitting."""
    torch.manual_seed(0)
    splits = ("train", "validation", "test")
    train, val, test = (load_split(path / s, N_DENSE, N_CAT) for s in splits)
    net = fm_of(path, planted_start)
    tables, _ = net.split_parameters()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def aucs() -> tuple[float, float]:
        with torch.no_grad():
            return tuple(binary_auc(net(x, i).numpy(), y.numpy()) for x, i, y in (val, test))

    curve = [aucs()]
    for epoch in range(epochs):
        start, order = time.perf_counter(), torch.randperm(len(train[2]))
        for s in range(0, len(order), batch):
            rows = order[s : s + batch]
            loss = loss_fn(net(train[0][rows], train[1][rows]), train[2][rows])
            loss = loss + l2 * sum(t.square().sum() for t in tables)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curve.append(aucs())
        took = time.perf_counter() - start
        print(f"l2 {l2:g} epoch {epoch + 1}: validation / test AUC {curve[-1][0]:.4f} / "
              f"{curve[-1][1]:.4f} ({took:.0f} s)", flush=True)  # fmt: skip
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mix", default="pairwise_heavy")
    p.add_argument("--rows", type=int, default=250_000)
    p.add_argument("--l2", type=float, nargs="+", default=[1e-5, 1e-4])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--start", choices=["planted", "random"], default="planted")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = ensure_data(args.mix, args.rows)
    planted = args.start == "planted"
    curves = {l2: fit(path, planted, l2, args.epochs, args.batch, args.lr) for l2 in args.l2}
    oracle = json.loads((path / "demo_info.json").read_text())["test"]["oracle_auc"]
    start = "the planted model" if planted else "random"
    print(f"\ntest AUC of an FM started at {start} ({args.mix}, {args.rows} rows, "
          f"oracle {oracle:.4f})")  # fmt: skip
    print("| L2 | start | " + " | ".join(f"epoch {e}" for e in range(1, args.epochs + 1)) + " |")
    print("|---|" + "---:|" * (args.epochs + 1))
    for l2, curve in curves.items():
        print(f"| {l2:g} | " + " | ".join(f"{t:.4f}" for _, t in curve) + " |")


if __name__ == "__main__":
    main()
