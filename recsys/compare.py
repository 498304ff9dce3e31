"""`python -m recsys.compare DIR...`: runs of a sweep (or any run dirs) as a table, and plots."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from recsys.files import format_table

HISTORY_PNG = "compare_history.png"
PARALLEL_PNG = "compare_parallel.png"
# config keys that differ between runs without being hyper-parameters
IGNORED = ("name",)


@dataclass
class Run:
    """One run dir: its flattened config and what metrics.json says (nothing if it failed)."""

    path: Path
    config: dict[str, Any]
    metrics: dict

    @property
    def status(self) -> str:
        return self.metrics.get("status", "complete") if self.metrics else "failed"

    @property
    def objectives(self) -> list[dict]:
        m = self.metrics
        return m.get("objectives") or ([m["objective"]] if "objective" in m else [])

    def value(self, i: int = 0) -> float:
        objectives = self.objectives
        return objectives[i]["value"] if len(objectives) > i else math.nan


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: str(node) if isinstance(node, list) else node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def find_runs(dirs: list[Path]) -> list[Run]:
    """Every run dir (one with a .hydra/ record or a metrics.json) under the given dirs."""
    found: set[Path] = set()
    for root in dirs:
        for marker in [*root.rglob(".hydra"), *root.rglob("metrics.json")]:
            if ".submitit" not in marker.parts:
                found.add(marker.parent)
    runs = []
    for path in sorted(found, key=_order):
        config_file = path / "config.yaml"
        if not config_file.exists():
            config_file = path / ".hydra" / "config.yaml"
        config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.exists() else {}
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        runs.append(Run(path, _flatten(config), metrics))
    return runs


def _order(path: Path) -> tuple:
    """Sweep jobs by number (their dir name), other runs by path."""
    return (str(path.parent), int(path.name) if path.name.isdigit() else math.inf, path.name)


def by_objective(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by what they optimise (auc, rmse, ...); runs without a value join the first."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(",".join(o["metric"] for o in run.objectives), []).append(run)
    failed = groups.pop("", [])
    if not groups:
        return {"?": failed}
    next(iter(groups.values())).extend(failed)
    return groups


def varied_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between the runs: the swept parameters."""
    keys = sorted({k for r in runs for k in r.config})
    return [
        k
        for k in keys
        if k not in IGNORED and len({repr(r.config.get(k)) for r in runs if r.config}) > 1
    ]


def ranked(runs: list[Run]) -> list[Run]:
    """Best first by the first objective; runs without a value last."""
    higher = next((r.objectives[0]["higher_is_better"] for r in runs if r.objectives), True)

    def key(run: Run) -> tuple:
        value = run.value()
        return (math.isnan(value), -value if higher else value)

    return sorted(runs, key=key)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table(runs: list[Run], keys: list[str]) -> str:
    """Runs best first: status, objective(s), validation metrics, samples/s, varied params."""
    n_obj = max((len(r.objectives) for r in runs), default=1) or 1
    objective_names = next(([o["metric"] for o in r.objectives] for r in runs if r.objectives), [])
    metric_names = sorted({k for r in runs for k in r.metrics.get("validation", {})})
    header = ["run", "status", *(f"objective:{n}" for n in objective_names or ["?"] * n_obj)]
    header += [f"val {m}" for m in metric_names] + ["samples/s", *keys]
    common = os.path.commonpath([str(r.path) for r in runs]) if len(runs) > 1 else ""
    rows = []
    for r in ranked(runs):
        name = os.path.relpath(r.path, common) if common else str(r.path)
        values = [_shown(r.value(i)) for i in range(n_obj)]
        val = [_shown(r.metrics.get("validation", {}).get(m, math.nan)) for m in metric_names]
        speed = r.metrics.get("train", {}).get("samples_per_s")
        params = [_shown(r.config.get(k)) for k in keys]
        rows.append([name, r.status, *values, *val, f"{speed:,.0f}" if speed else "-", *params])
    return format_table(header, rows)


def plot_history(runs: list[Run], path: Path) -> Path:
    """The first objective of each run in order, pruned runs marked, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    higher = next((r.objectives[0]["higher_is_better"] for r in runs if r.objectives), True)
    best, xs, bests = None, [], []
    for i, run in enumerate(runs):
        value = run.value()
        if math.isnan(value):
            continue
        x = int(run.path.name) if run.path.name.isdigit() else i  # a sweep job: its trial
        style = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:gray")}[run.status]
        ax.scatter(x, value, marker=style[0], color=style[1])
        if run.status == "complete":
            best = value if best is None else (max if higher else min)(best, value)
            xs.append(x)
            bests.append(best)
    ax.step(xs, bests, where="post", color="tab:red", label="best so far")
    name = next((r.objectives[0]["metric"] for r in runs if r.objectives), "objective")
    ax.set(xlabel="run (trial) number", ylabel=name, title="optimisation history (x: pruned)")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_parallel(runs: list[Run], keys: list[str], path: Path) -> Path:
    """Parallel coordinates: each run a line across its varied parameters, coloured by objective."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    done = [r for r in runs if not math.isnan(r.value())]
    axes = [*keys, "objective"]
    columns = [[r.config.get(k) for r in done] for k in keys] + [[r.value() for r in done]]
    scaled = [_unit(col) for col in columns]
    values = [r.value() for r in done]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(axes)), 4.5))
    for j, value in enumerate(values):
        ax.plot(range(len(axes)), [col[j] for col in scaled], color=cmap(_unit([lo, hi, value])[2]))
    for i, (col, unit) in enumerate(zip(columns, scaled, strict=True)):
        if col:  # label each axis with the values at its bottom and top
            ax.text(i, -0.06, _shown(col[unit.index(min(unit))]), ha="center", va="top")
            ax.text(i, 1.03, _shown(col[unit.index(max(unit))]), ha="center")
    ax.set_xticks(range(len(axes)), axes, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_title("parallel coordinates (colour: objective, yellow = high)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _unit(column: list[Any]) -> list[float]:
    """A column mapped to [0, 1]: numbers by value (log when they span decades), others by rank."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in column):
        nums = [float(v) for v in column]
        if min(nums) > 0 and max(nums) / min(nums) > 100:
            nums = [math.log10(v) for v in nums]
        lo, hi = min(nums), max(nums)
        return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in nums]
    levels = sorted({repr(v) for v in column})
    return [levels.index(repr(v)) / max(1, len(levels) - 1) for v in column]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recsys.compare", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep dirs or run dirs")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: the dirs' parent)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    dirs = [d.resolve() for d in args.dirs]  # given relative and absolute alike
    runs = find_runs(dirs)
    if not runs:
        parser.error("no run dirs (with .hydra/ or metrics.json) under the given dirs")
    out = args.out or Path(os.path.commonpath(dirs))
    out.mkdir(parents=True, exist_ok=True)
    groups = by_objective(runs)
    for objective, group in groups.items():
        # runs that optimise different metrics are ranked apart, each with its own plots
        suffix = f"_{objective.replace(',', '_')}" if len(groups) > 1 else ""
        if suffix:
            print(f"\nruns optimising {objective}:")
        keys = varied_keys(group)
        print(table(group, keys))
        history = plot_history(group, out / HISTORY_PNG.replace(".png", f"{suffix}.png"))
        parallel = plot_parallel(group, keys, out / PARALLEL_PNG.replace(".png", f"{suffix}.png"))
        for path in (history, parallel):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
