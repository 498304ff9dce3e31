"""Shared fixtures: a small generated data set, config composition, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from recsys import config as schema
from recsys.demo.ctr import DemoSpec, generate
from recsys.distributed import torchrun_command  # noqa: F401  (the tests' import of it)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
schema.register()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A demo-like set (same columns as the demo) small enough for fast training tests."""
    out = tmp_path_factory.mktemp("data") / "small"
    spec = DemoSpec(rows={"train": 200_000, "validation": 40_000, "test": 40_000})
    generate(out, spec)
    return out


def compose_cfg(*overrides: str, config_name: str = "train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, module: str = "train"
) -> subprocess.CompletedProcess:
    """Run `python -m recsys.<module> ARGS` (train by default) in a fresh process."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"recsys.{module}", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def categorical_override(**sizes: int) -> str:
    """`data.categorical=[...]` with the demo's columns, some table sizes changed."""
    tables = DemoSpec().categorical | sizes
    return "data.categorical=[" + ",".join(f"{k}:{v}" for k, v in tables.items()) + "]"


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_run(a: Path, b: Path) -> None:
    """Same weights bit for bit, and the same metrics (all but timings)."""
    wa, wb = (torch.load(d / "model.pt", weights_only=False)["state_dict"] for d in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ma, mb = metrics_of(a), metrics_of(b)
    for key in ("validation", "test", "objective", "data_quality", "status"):
        assert ma[key] == mb[key], key
    for key in ("steps", "epochs", "samples", "final_loss", "evaluations", "losses"):
        assert ma["train"][key] == mb["train"][key], key
