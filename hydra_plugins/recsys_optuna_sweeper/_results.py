"""The outcome of a study: best trial (or Pareto set) to best.yaml, and the table printed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf
from optuna import Study
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from recsys.files import format_table, write_text

from ._search_space import SearchSpace

RESULTS_NAME = "best.yaml"
TOP = 10


def shown(value: object) -> str:
    """A value for a table: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_trials(study: Study) -> list[FrozenTrial]:
    """The best complete trials: the top ones of a single objective, or the Pareto set."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1.0 if study.direction is StudyDirection.MAXIMIZE else 1.0
    return sorted(done, key=lambda t: sign * t.value)[:TOP]


def write_results(study: Study, space: SearchSpace, sweep_dir: Path, storage: str) -> str:
    """Write best.yaml into the sweep dir and return the table of the best trials."""
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    best = best_trials(study)
    pareto = len(study.directions) > 1
    entries = [
        {
            "trial": t.number,
            "values": list(t.values),
            "params": dict(t.params),
            "overrides": " ".join(space.overrides(t.params)),
        }
        for t in (best if pareto else best[:1])
    ]
    results = {
        "study": study.study_name,
        "storage": storage,
        "directions": [d.name.lower() for d in study.directions],
        "trials": dict(counts),
        ("pareto_front" if pareto else "best"): entries,
    }
    write_text(sweep_dir / RESULTS_NAME, OmegaConf.to_yaml(OmegaConf.create(results)))
    names = sorted({k for t in best for k in t.params})
    header = ["trial", *(f"value {i}" for i in range(len(study.directions))), *names]
    if len(study.directions) == 1:
        header[1] = "value"
    rows = [
        [str(t.number), *map(shown, t.values), *(shown(t.params.get(k, "")) for k in names)]
        for t in best
    ]
    title = "Pareto front" if pareto else f"best {len(best)} of {counts['complete']} complete"
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return f"{title} ({summary}):\n{format_table(header, rows)}"
