"""The embedded demo data: a Criteo-like CTR set drawn from a planted FM, written once as Parquet.

`python -m recsys.demo.ctr [--out DIR] [--rows N ...]` writes a set and prints its oracle figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as orc
import pyarrow.parquet as pq

from recsys.config import demo_dir
from recsys.demo import interactions
from recsys.metrics import binary_auc

SPLITS = ("train", "validation", "test")
INFO_FILE = "demo_info.json"


def log_spaced(n: int, low: int, high: int) -> list[int]:
    return [int(round(x)) for x in np.geomspace(low, high, n)]


@dataclass
class DemoSpec:
    """Shape of a generated data set; the defaults are the embedded demo set."""

    rows: dict[str, int] = field(
        default_factory=lambda: {"train": 2_000_000, "validation": 100_000, "test": 100_000}
    )
    n_dense: int = 8
    cardinalities: list[int] = field(default_factory=lambda: log_spaced(16, 20, 100_000))
    tag_vocab: int = 1_000
    max_tags: int = 8
    latent_dim: int = 4
    zipf_exponent: float = 1.1
    pairwise_to_first_order: float = 1.2
    # std of a non-linear effect of the dense features (sin and square terms) relative to the
    # first-order part's; 0 leaves it out (and the generated rows unchanged)
    dense_nonlinear: float = 0.0
    base_rate: float = 0.25
    null_rate: float = 0.02
    rows_per_file: int = 100_000
    seed: int = 0
    # "parquet": scalar columns, label `click`; "recis_orc": ORC laid out as RecIS users have it,
    # numeric features list<double>, categorical list<int64>, label `label` (one double a row)
    layout: str = "parquet"

    @property
    def dense_names(self) -> list[str]:
        return [f"d{i}" for i in range(self.n_dense)]

    @property
    def categorical(self) -> dict[str, int]:
        """Column -> table size, the multi-hot `tags` column last."""
        cats = {f"c{i}": n for i, n in enumerate(self.cardinalities)}
        if self.tag_vocab:
            cats["tags"] = self.tag_vocab
        return cats


class PlantedModel:
    """A factorization machine with random weights that draws features and labels."""

    def __init__(self, spec: DemoSpec, rng: np.random.Generator):
        self.spec = spec
        k = spec.latent_dim
        sizes = list(spec.categorical.values())
        self.w = [rng.normal(0, 0.25, n).astype(np.float32) for n in sizes]
        self.v = [rng.normal(0, 0.3, (n, k)).astype(np.float32) for n in sizes]
        self.u = rng.normal(0, 0.3, spec.n_dense).astype(np.float32)
        self.vd = rng.normal(0, 0.3, (spec.n_dense, k)).astype(np.float32)
        self.perm = [rng.permutation(n) for n in sizes]
        self.cdf = [self._zipf_cdf(n) for n in sizes]
        for f, v in enumerate(self.v):
            # centre each field's vectors on their frequency-weighted mean, so no pairwise
            # effect leaks into a single feature's marginal: a first-order model cannot fit it
            p = np.diff(self.cdf[f], prepend=0.0)
            v -= (p[:, None] * v[self.perm[f]]).sum(0).astype(np.float32)
        # drawn from their own stream, so that sets without them are drawn as before
        self.curve = np.random.default_rng([spec.seed, 1]).normal(0, 1, (2, spec.n_dense))
        self.pair_scale = self.nonlinear_scale = 1.0
        self.bias = 0.0
        self.noise_std = 1.0
        sample = self.draw(rng, 50_000)
        first, pair = sample["first"], sample["pair"]
        self.pair_scale = spec.pairwise_to_first_order * first.std() / pair.std()
        self.nonlinear_scale = spec.dense_nonlinear * first.std() / sample["nonlinear"].std()
        score = self.score(sample)
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisect the bias that gives the wanted base rate
            mid = (lo + hi) / 2
            rate = (1 / (1 + np.exp(-(score + mid)))).mean()
            lo, hi = (mid, hi) if rate < spec.base_rate else (lo, mid)
        self.bias = (lo + hi) / 2

    def _zipf_cdf(self, n: int) -> np.ndarray:
        p = 1.0 / np.arange(1, n + 1) ** self.spec.zipf_exponent
        return np.cumsum(p / p.sum())

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Features, first-order and pairwise scores of n fresh rows."""
        s = self.spec
        dense = rng.normal(0, 1, (n, s.n_dense)).astype(np.float32)
        first = self.bias + dense @ self.u
        fields = [dense[:, :, None] * self.vd[None]]  # [n, n_dense, k]
        ids: list[np.ndarray] = []
        names = list(s.categorical)
        for f in range(len(s.cardinalities)):
            idx = self.perm[f][np.searchsorted(self.cdf[f], rng.random(n), side="right")]
            idx = np.minimum(idx, len(self.cdf[f]) - 1)
            ids.append(idx)
            first = first + self.w[f][idx]
            fields.append(self.v[f][idx][:, None, :])
        lengths = offsets = tag_ids = None
        if s.tag_vocab:
            t = len(names) - 1
            lengths = np.minimum(rng.poisson(2.0, n), s.max_tags)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            tag_ids = self.perm[t][
                np.minimum(np.searchsorted(self.cdf[t], rng.random(offsets[-1])), s.tag_vocab - 1)
            ]
            rows = np.repeat(np.arange(n), lengths)
            first = first + np.bincount(rows, weights=self.w[t][tag_ids], minlength=n)
            tag_vec = np.zeros((n, s.latent_dim), dtype=np.float64)
            np.add.at(tag_vec, rows, self.v[t][tag_ids])
            fields.append(tag_vec[:, None, :].astype(np.float32))
        stacked = np.concatenate(fields, axis=1)
        pair = 0.5 * ((stacked.sum(1) ** 2).sum(1) - (stacked**2).sum((1, 2)))
        nonlinear = np.sin(1.5 * dense) @ self.curve[0] + (dense**2 - 1) @ self.curve[1]
        return {
            "dense": dense,
            "nonlinear": nonlinear.astype(np.float64),
            "ids": ids,
            "tag_lengths": lengths,
            "tag_offsets": offsets,
            "tag_ids": tag_ids,
            "first": first.astype(np.float64),
            "pair": pair.astype(np.float64),
        }

    def score(self, d: dict[str, np.ndarray]) -> np.ndarray:
        """The planted logit of drawn rows: first-order, non-linear dense and pairwise parts."""
        score = d["first"] + self.pair_scale * d["pair"]
        return score + self.nonlinear_scale * d["nonlinear"] if self.spec.dense_nonlinear else score

    def table(self, rng: np.random.Generator, n: int) -> tuple[pa.Table, np.ndarray]:
        """n labelled rows as an Arrow table, and their true click probabilities."""
        s = self.spec
        d = self.draw(rng, n)
        score = self.score(d)
        p = 1 / (1 + np.exp(-score))
        cols: dict[str, pa.Array] = {
            "click": pa.array((rng.random(n) < p).astype(np.int8)),
            "dwell": pa.array((score + rng.normal(0, self.noise_std, n)).astype(np.float32)),
        }
        for j, name in enumerate(s.dense_names):
            x = d["dense"][:, j]
            mask = rng.random(n) < s.null_rate if j == 3 else None
            cols[name] = pa.array(x, mask=mask)
        for name, ids in zip(s.categorical, d["ids"], strict=False):
            cols[name] = pa.array(ids.astype(np.int64))
        if s.tag_vocab:
            offsets = pa.array(d["tag_offsets"].astype(np.int32))
            cols["tags"] = pa.ListArray.from_arrays(
                offsets, pa.array(d["tag_ids"].astype(np.int64))
            )
        table = pa.table(cols)
        return (to_recis_layout(table, s) if s.layout == "recis_orc" else table), p

    def first_order_probability(self, d: dict[str, np.ndarray]) -> np.ndarray:
        return 1 / (1 + np.exp(-d["first"]))


def to_recis_layout(table: pa.Table, spec: DemoSpec) -> pa.Table:
    """Every feature as a list column (a null dense value becomes an empty list)."""
    cols: dict[str, pa.Array] = {"label": pc.cast(table["click"], pa.float64())}
    for name in [*spec.dense_names, *spec.categorical]:
        col = table[name].combine_chunks()
        if pa.types.is_list(col.type):
            cols[name] = col
            continue
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(valid)]).astype(np.int32)
        values = col.drop_null()
        values = pc.cast(values, pa.float64()) if name in spec.dense_names else values
        cols[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table(cols)


def generate(out: str | Path, spec: DemoSpec) -> dict:
    """Write train/validation/test Parquet files under out (atomically) and return their info."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rng = np.random.default_rng(spec.seed)
        model = PlantedModel(spec, rng)
        label = "label" if spec.layout == "recis_orc" else "click"
        regression = None if spec.layout == "recis_orc" else "dwell"
        info: dict = {"spec": asdict(spec), "label": label, "regression_label": regression}
        for split in (s for s in SPLITS if spec.rows.get(s)):
            (tmp / split).mkdir()
            clicks, probs = [], []
            for part, start in enumerate(range(0, spec.rows[split], spec.rows_per_file)):
                n = min(spec.rows_per_file, spec.rows[split] - start)
                table, p = model.table(rng, n)
                if spec.layout == "recis_orc":
                    orc.write_table(table, tmp / split / f"part-{part:05d}.orc")
                else:
                    pq.write_table(
                        table, tmp / split / f"part-{part:05d}.parquet", row_group_size=65536
                    )
                clicks.append(table.column(label).to_numpy())
                probs.append(p)
            y, p = np.concatenate(clicks), np.concatenate(probs)
            info[split] = {
                "rows": int(len(y)),
                "base_rate": float(y.mean()),
                "oracle_auc": binary_auc(p, y),
                "oracle_dwell_rmse": model.noise_std,
            }
        fo = model.draw(np.random.default_rng(spec.seed + 1), 100_000)
        full = 1 / (1 + np.exp(-model.score(fo)))
        y = (np.random.default_rng(spec.seed + 2).random(len(full)) < full).astype(np.int8)
        info["first_order_part_auc"] = binary_auc(model.first_order_probability(fo), y)
        info["oracle_auc_same_sample"] = binary_auc(full, y)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / INFO_FILE).exists():  # another process won the race when it exists
                raise
        return json.loads((out / INFO_FILE).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Each embedded demo set by its cache dir name, and how it is written there.
DEMOS = {
    "ctr-v1": partial(generate, spec=DemoSpec()),
    "ctr-orc-v1": partial(
        generate,
        spec=DemoSpec(
            rows={"train": 1_000_000, "validation": 100_000, "test": 100_000}, layout="recis_orc"
        ),
    ),
    interactions.NAME: partial(interactions.generate, spec=interactions.InteractionSpec()),
    # data=mix's second source: the demo's columns drawn from another planted model (a domain)
    "ctr-app-v1": partial(
        generate,
        spec=DemoSpec(
            rows={"train": 500_000, "validation": 50_000, "test": 50_000},
            dense_nonlinear=1.0,
            seed=1,
        ),
    ),
}


def ensure_demo(path: str | Path) -> dict | None:
    """If path is an embedded demo set's cache dir, generate it there once; return its info."""
    path = Path(path).expanduser()
    name = next((n for n in DEMOS if path == Path(demo_dir(n))), None)
    if name is None:
        return None
    if not (path / INFO_FILE).exists():
        print(f"generating the demo data set into {path} (once) ...", flush=True)
        DEMOS[name](path)
    return json.loads((path / INFO_FILE).read_text())


def main() -> None:
    """Generate a demo-like set of any size (benchmarks use this)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=demo_dir())
    ap.add_argument("--rows", type=int, help="train rows (validation and test get 1/8 each)")
    ap.add_argument("--dense", type=int, default=DemoSpec.n_dense)
    ap.add_argument("--categorical", type=int, default=16, help="single-id categorical columns")
    ap.add_argument("--no-tags", action="store_true", help="leave out the multi-hot column")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec = DemoSpec(
        n_dense=args.dense,
        cardinalities=log_spaced(args.categorical, 10, 100_000),
        tag_vocab=0 if args.no_tags else DemoSpec.tag_vocab,
        seed=args.seed,
    )
    if args.rows:
        spec.rows = {"train": args.rows, "validation": args.rows // 8, "test": args.rows // 8}
    info = generate(args.out, spec)
    print(json.dumps({k: v for k, v in info.items() if k != "spec"}, indent=2))


if __name__ == "__main__":
    main()
