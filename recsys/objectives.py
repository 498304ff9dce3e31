"""What a run gives a sweep: its objective values, and its evaluations reported to the trial."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from torch import nn

from recsys.distributed import agree, is_rank0
from recsys.errors import ConfigError
from recsys.metrics import higher_is_better
from recsys.sweep_trial import current_trial

# Objectives measured on the run itself rather than on the validation split.
RUN_MEASURES = {"parameters": False, "samples_per_s": True}


def objective_names(objective: Any, metrics: tuple[str, ...]) -> list[str]:
    """The configured objective(s): validation metrics or run measures; default the main metric."""
    names = [objective] if objective is None or isinstance(objective, str) else list(objective)
    names = [n or metrics[0] for n in names] or [metrics[0]]
    for name in names:
        if name not in metrics and name not in RUN_MEASURES:
            raise ConfigError(
                f"objective={name} is neither a metric of this model ({', '.join(metrics)}) nor "
                f"a run measure ({', '.join(RUN_MEASURES)}): use one of them, or a list of them"
            )
    return names


def parameter_count(model: nn.Module) -> int:
    """Weights of the whole model, embedding tables included (global sizes when sharded)."""
    return sum(math.prod(v.size()) for v in model.state_dict().values())


def objective_entries(names: list[str], validation: dict[str, float], run: dict) -> list[dict]:
    """Each objective's value and direction, for metrics.json; `run` holds the run measures."""
    return [
        {
            "metric": name,
            "split": "run" if name in RUN_MEASURES else "validation",
            "value": float(run[name] if name in RUN_MEASURES else validation.get(name, math.nan)),
            "higher_is_better": RUN_MEASURES[name]
            if name in RUN_MEASURES
            else higher_is_better(name),
        }
        for name in names
    ]


def sweep_result(metrics: dict) -> float | tuple[float, ...]:
    """The value(s) main() returns; raises optuna.TrialPruned when the sweep pruned the run."""
    if metrics["status"] == "pruned":
        raise optuna.TrialPruned(f"pruned at step {metrics['train']['steps']}")
    values = tuple(o["value"] for o in metrics["objectives"])
    return values[0] if len(values) == 1 else values


def pruning_callback(objective: str) -> Callable[[int, dict[str, float]], bool] | None:
    """Reports each evaluation to the sweep's trial (rank 0) at the rows trained on so far, so
    that trials of any batch size are compared at equal data; True on all ranks once pruned."""
    trial = current_trial()
    if trial is None or len(trial.study.directions) > 1 or objective in RUN_MEASURES:
        return None

    def report(rows: int, metrics: dict[str, float]) -> bool:
        prune = False
        if is_rank0():
            trial.report(metrics[objective], rows)
            prune = trial.should_prune()
        return agree(prune)

    return report
