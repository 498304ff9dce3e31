"""The embedded interaction demo: users, items, their features and who interacted with what.

Preferences are planted: user and item vectors built from their features (segment, interests;
category, tags) plus an idiosyncratic part, and item popularity. An interaction picks an item
with probability softmax(sharpness * <user, item> + log popularity); a share of the rows are
skipped impressions (label 0) of popular items. `python -m recsys.demo.interactions [--out DIR]`
writes a set and prints the planted model's and the popularity ranking's recall@k.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import demo_dir
from recsys.files import write_dir_atomic
from recsys.retrieval_metrics import RankMetrics, popularity_ranks

NAME = "interactions-v1"
SPLITS = ("train", "validation", "test")
INFO_FILE = "demo_info.json"


@dataclass
class InteractionSpec:
    """Shape of a generated interaction set; the defaults are the embedded demo set."""

    rows: dict[str, int] = field(
        default_factory=lambda: {"train": 1_000_000, "validation": 50_000, "test": 50_000}
    )
    users: int = 20_000
    items: int = 5_000
    segments: int = 32
    categories: int = 50
    tags: int = 300
    latent_dim: int = 16
    sharpness: float = 10.0
    popularity_exponent: float = 0.8
    activity_exponent: float = 0.5
    skip_rate: float = 0.2
    rows_per_file: int = 250_000
    seed: int = 0

    @property
    def categorical(self) -> dict[str, int]:
        """Column -> table size."""
        return {
            "user_id": self.users,
            "user_segment": self.segments,
            "user_interests": self.tags,
            "item_id": self.items,
            "item_category": self.categories,
            "item_tags": self.tags,
        }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lists(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int64)))


class PlantedPreferences:
    """Users, items and the planted choice model that draws interactions between them."""

    def __init__(self, spec: InteractionSpec, rng: np.random.Generator):
        self.spec = spec
        s, d = spec, spec.latent_dim
        segment_vec = _unit(rng.normal(size=(s.segments, d)))
        category_vec = _unit(rng.normal(size=(s.categories, d)))
        tag_vec = _unit(rng.normal(size=(s.tags, d)))
        # items: a category, 1-4 tags leaning to their category's, a price, a popularity
        self.item_category = rng.integers(0, s.categories, s.items)
        near = np.argsort(-(category_vec @ tag_vec.T), axis=1)[:, :20]
        lengths = rng.integers(1, 5, s.items)
        tags = near[np.repeat(self.item_category, lengths), rng.integers(0, 20, lengths.sum())]
        self.item_tags = _lists(lengths, tags)
        tag_mean = np.zeros((s.items, d))
        np.add.at(tag_mean, np.repeat(np.arange(s.items), lengths), tag_vec[tags])
        noise = rng.normal(size=(s.items, d)) / np.sqrt(d)
        tag_mean /= lengths[:, None]
        self.item_vec = _unit(category_vec[self.item_category] + 0.6 * tag_mean + 0.5 * noise)
        self.item_price = np.exp(rng.normal(0, 0.5, s.items) + self.item_category % 5 * 0.4)
        zipf = 1.0 / np.arange(1, s.items + 1) ** s.popularity_exponent
        self.popularity = (zipf / zipf.sum())[rng.permutation(s.items)]
        # users: a segment, an age, 0-5 interests (tags close to their taste) and an activity
        self.user_segment = rng.integers(0, s.segments, s.users)
        noise = rng.normal(size=(s.users, d)) / np.sqrt(d)
        self.user_vec = _unit(segment_vec[self.user_segment] + 0.8 * noise)
        self.user_age = 18 + 50 * rng.beta(2, 3, s.users) + self.user_segment % 4
        liked = np.argsort(-(self.user_vec @ tag_vec.T), axis=1)[:, :10]
        lengths = rng.integers(0, 6, s.users)
        picks = rng.integers(0, 10, lengths.sum())
        self.user_interests = _lists(lengths, liked[np.repeat(np.arange(s.users), lengths), picks])
        activity = 1.0 / np.arange(1, s.users + 1) ** s.activity_exponent
        self.activity = (activity / activity.sum())[rng.permutation(s.users)]

    def logits(self, users: np.ndarray) -> np.ndarray:
        """The planted model's score of every item for each user, [len(users), items]."""
        affinity = self.spec.sharpness * (self.user_vec[users] @ self.item_vec.T)
        return affinity + np.log(self.popularity)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n rows of (user, item, label), in random order."""
        users = np.sort(rng.choice(self.spec.users, n, p=self.activity))
        items = np.empty(n, dtype=np.int64)
        for a in range(0, self.spec.users, 1024):  # users are sorted: theirs are rows lo:hi
            lo, hi = np.searchsorted(users, [a, a + 1024])
            logits = self.logits(np.arange(a, min(a + 1024, self.spec.users)))
            cdf = np.cumsum(np.exp(logits - logits.max(1, keepdims=True)), axis=1)
            # each user's CDF shifted by its row number: one searchsorted samples every row
            flat = (cdf / cdf[:, -1:] + np.arange(len(cdf))[:, None]).ravel()
            row = users[lo:hi] - a
            pos = np.searchsorted(flat, row + rng.random(hi - lo)) - row * self.spec.items
            items[lo:hi] = np.minimum(pos, self.spec.items - 1)
        skipped = rng.random(n) < self.spec.skip_rate
        items[skipped] = rng.choice(self.spec.items, int(skipped.sum()), p=self.popularity)
        order = rng.permutation(n)
        return users[order], items[order], (~skipped[order]).astype(np.int8)

    def users_table(self, users: np.ndarray) -> dict[str, pa.Array]:
        rows = pa.array(users)
        return {
            "user_id": pa.array(users.astype(np.int64)),
            "user_segment": pa.array(self.user_segment[users].astype(np.int64)),
            "user_age": pa.array(self.user_age[users].astype(np.float32)),
            "user_interests": self.user_interests.take(rows),
        }

    def items_table(self, items: np.ndarray) -> dict[str, pa.Array]:
        rows = pa.array(items)
        return {
            "item_id": pa.array(items.astype(np.int64)),
            "item_category": pa.array(self.item_category[items].astype(np.int64)),
            "item_price": pa.array(self.item_price[items].astype(np.float32)),
            "item_tags": self.item_tags.take(rows),
        }

    def rank_metrics(self, users: np.ndarray, items: np.ndarray, counts: np.ndarray) -> dict:
        """Recall@k / NDCG@k of the planted model's ranking and of popularity (train counts)."""
        planted, popular = RankMetrics((10, 50, 100)), RankMetrics((10, 50, 100))
        for start in range(0, len(users), 4096):
            u, i = users[start : start + 4096], items[start : start + 4096]
            scores = self.logits(u)
            own = scores[np.arange(len(u)), i][:, None]
            ids = np.arange(self.spec.items)[None, :]
            ahead = (scores > own) | ((scores == own) & (ids < i[:, None]))
            planted.add(ahead.sum(1))
        popular.add(popularity_ranks(counts)[items])
        return {"planted": planted.result(), "popularity": popular.result()}


def _fill(spec: InteractionSpec, out: Path) -> dict:
    rng = np.random.default_rng(spec.seed)
    world = PlantedPreferences(spec, rng)
    info: dict = {"spec": asdict(spec), "label": "click"}
    sizes = [spec.rows.get(s, 0) for s in SPLITS]
    drawn = world.draw(rng, sum(sizes))  # rows are i.i.d.: the splits are consecutive slices
    bounds = np.cumsum([0, *sizes])
    counts = np.zeros(spec.items, dtype=np.int64)
    for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        if lo == hi:
            continue
        (out / split).mkdir()
        users, items, labels = (x[lo:hi] for x in drawn)
        for part, start in enumerate(range(0, len(users), spec.rows_per_file)):
            rows = slice(start, start + spec.rows_per_file)
            cols = {"click": pa.array(labels[rows])}
            cols |= world.users_table(users[rows]) | world.items_table(items[rows])
            pq.write_table(pa.table(cols), out / split / f"part-{part:05d}.parquet")
        positive = labels == 1
        if split == "train":
            counts = np.bincount(items[positive], minlength=spec.items)
        info[split] = {"rows": len(users), "positives": int(positive.sum())}
        if split != "train":
            info[split] |= world.rank_metrics(users[positive], items[positive], counts)
    for name, table in (("users", world.users_table), ("items", world.items_table)):
        (out / name).mkdir()
        n = spec.users if name == "users" else spec.items
        pq.write_table(pa.table(table(np.arange(n))), out / name / "part-00000.parquet")
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def generate(out: str | Path, spec: InteractionSpec) -> dict:
    """Write train/validation/test interactions and users/items catalogs under out, atomically."""
    out = Path(out)
    try:
        return write_dir_atomic(out, lambda tmp: _fill(spec, tmp))
    except OSError:
        if not (out / INFO_FILE).exists():  # another process won the race when it exists
            raise
        return json.loads((out / INFO_FILE).read_text())


def main() -> None:
    """Generate an interaction set of any size."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=demo_dir(NAME))
    ap.add_argument("--rows", type=int, help="train rows (validation and test get 1/20 each)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec = InteractionSpec(seed=args.seed)
    if args.rows:
        spec.rows = {"train": args.rows, "validation": args.rows // 20, "test": args.rows // 20}
    info = generate(args.out, spec)
    print(json.dumps({k: v for k, v in info.items() if k != "spec"}, indent=2))


if __name__ == "__main__":
    main()
