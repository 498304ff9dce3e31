"""`python -m recsys.evaluate run=<run dir> [data=<name>] [split=test]`: a run's metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from recsys import config as schema
from recsys.data.batches import DataQuality
from recsys.data.reader import open_split
from recsys.files import summary_table, write_json
from recsys.runs import open_run, run_or_exit, saved_retrieval
from recsys.tasks import evaluate, task_for

log = logging.getLogger("recsys")
schema.register()


def run(cfg: DictConfig) -> dict:
    """Score a finished run's model on a split with its task's metrics; write eval.json."""
    start = time.perf_counter()
    typed = schema.to_object(cfg)
    run_dir, model, _, data = open_run(typed, label=True)
    quality = DataQuality()
    split = open_split(data, typed.split.value, quality, train=False)
    task = task_for(model, data, typed.retrieval or saved_retrieval(run_dir))
    metrics = evaluate(model, task, split, torch.device("cpu"))
    result = {
        "run": str(run_dir),
        "data": data.path,
        "split": typed.split.value,
        "rows": split.num_rows,
        "metrics": metrics,
        "data_quality": quality.to_dict(),
        "wall_time_s": time.perf_counter() - start,
    }
    output = Path(typed.output) if typed.output else run_dir / "eval.json"
    write_json(output, result)
    rows = [(f"{typed.split.value} {k}", f"{v:.4f}") for k, v in metrics.items()]
    rows += [
        ("rows", f"{split.num_rows:,}"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
        ("written to", str(output)),
    ]
    log.info("evaluation of %s on %s\n%s", run_dir, data.path, summary_table(rows))
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Entry point; user errors end with one line naming the fix."""
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
