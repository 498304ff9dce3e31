"""Small runs of every model kind for export, serving and retrieval tests: no training, random
weights, on a tiny data set with integer and string ids, multi-hot lists and missing values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hydra.utils import instantiate
from torch import nn

from recsys import config as schema
from recsys.data import vocabulary
from recsys.data.features import FeatureSpec
from recsys.outputs import save_config, save_model
from tests.conftest import compose_cfg

TABLES = {"user": 50, "city": 30, "tags": 40, "item": 30, "genre": 10}
TWO_TOWER = (
    "model.user_features=[user,city,tags,d0]",
    "model.item_features=[item,genre,d1]",
    "model.user_id=user",
    "model.item_id=item",
)


def write_data(path: Path, seed: int = 0) -> Path:
    """train/validation/test Parquet files: user ids past their table (folded), string cities,
    tag lists (some empty or null), nulls in dense and categorical columns."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 800), ("validation", 200), ("test", 300)):
        tags = [list(rng.integers(0, 40, rng.integers(0, 4))) for _ in range(n)]
        tags = [None if rng.random() < 0.05 else t for t in tags]
        table = pa.table({
            "click": rng.integers(0, 2, n).astype(np.float32),
            "d0": pa.array(rng.normal(size=n), mask=rng.random(n) < 0.1),
            "d1": rng.integers(0, 5, n),
            "user": pa.array(rng.integers(0, 70, n), mask=rng.random(n) < 0.05),
            "city": pa.array([f"city-{i}" for i in rng.integers(0, 60, n)],
                             mask=rng.random(n) < 0.05),
            "tags": pa.array(tags, pa.list_(pa.int64())),
            "item": rng.integers(0, 25, n),
            "genre": [f"g{i % 7}" for i in rng.integers(0, 100, n)],
        })  # fmt: skip
        (path / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path / split / "part-0.parquet")
    return path


def data_overrides(path: Path) -> list[str]:
    categorical = ",".join(f"{k}:{v}" for k, v in TABLES.items())
    return [f"data.path={path}", "data.label=click", "data.dense=[d0,d1]",
            f"data.categorical=[{categorical}]", "data.batch_size=64",
            "data.eval_batch_size=128"]  # fmt: skip


def make_run(run_dir: Path, data: Path, model: str, *overrides: str) -> Path:
    """A run dir as training leaves it (config.yaml, model.pt), with random non-trivial weights."""
    extra = TWO_TOWER if model == "two_tower" else ()
    cfg = compose_cfg(f"model={model}", *data_overrides(data), *extra, *overrides)
    typed = schema.to_object(cfg)
    if typed.data.vocabulary:
        vocabulary.build(typed.data)
    spec = FeatureSpec.from_data_config(typed.data, vocabulary.for_data(typed.data))
    torch.manual_seed(0)
    model = instantiate(cfg.model, _partial_=True, _convert_="all")(features=spec, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
    run_dir.mkdir(parents=True)
    save_model(run_dir, cfg.model, spec, model.state_dict())
    save_config(run_dir, cfg)
    return run_dir
