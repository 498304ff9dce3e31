"""`python -m recsys.compare` over run dirs given in any form, of runs that optimise different
metrics (run dirs written as `recsys.train` writes them: config.yaml and metrics.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from recsys.compare import HISTORY_PNG, main


def run_dir(path: Path, metric: str, value: float, dim: int) -> Path:
    """A finished run's dir: its config and metrics, with one objective."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"model:\n  embedding_dim: {dim}\n")
    objective = {"metric": metric, "split": "validation", "value": value,
                 "higher_is_better": metric == "auc"}  # fmt: skip
    metrics = {"status": "complete", "objective": objective, "objectives": [objective],
               "validation": {metric: value}, "train": {"samples_per_s": 1000.0}}  # fmt: skip
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_relative_and_absolute_dirs_and_runs_of_different_objectives(tmp_path, capsys):
    run_dir(tmp_path / "binary" / "a", "auc", 0.70, 8)
    run_dir(tmp_path / "binary" / "b", "auc", 0.75, 16)
    run_dir(tmp_path / "regression" / "c", "rmse", 1.5, 8)
    run_dir(tmp_path / "regression" / "d", "rmse", 1.2, 16)
    relative = os.path.relpath(tmp_path / "binary")
    main([relative, str(tmp_path / "regression")])
    out = capsys.readouterr().out
    auc, rmse = out.split("runs optimising auc:")[1].split("runs optimising rmse:")
    # each group ranked by its own metric and direction, under its own header
    assert auc.split()[:3] == ["run", "status", "objective:auc"]
    assert [line.split()[0] for line in auc.splitlines()[3:5]] == ["b", "a"]
    assert rmse.split()[:3] == ["run", "status", "objective:rmse"]
    assert [line.split()[0] for line in rmse.splitlines()[3:5]] == ["d", "c"]
    for name in ("auc", "rmse"):
        assert (tmp_path / HISTORY_PNG.replace(".png", f"_{name}.png")).exists()
