"""The search space: Hydra's override grammar to Optuna distributions, and trials to overrides."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from .errors import SweepError

GRAMMAR = (
    "use interval(low, high), tag(log, interval(low, high)), int(interval(low, high)), "
    "choice(a, b, ...) or range(start, stop[, step])"
)
_ABSENT = object()


def _distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (its values as the grammar defines them)."""
    value = override.value()
    if override.is_choice_sweep():
        return CategoricalDistribution([Transformer.encode(v) for v in value.list])
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError("the range is empty")
        if value.shuffle:
            return CategoricalDistribution(values)
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=float(value.step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise ValueError(f"{type(value).__name__} sweeps are not supported")


@dataclass
class SearchSpace:
    """What every trial varies (Optuna distributions by config key) and what it keeps fixed."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # param -> override key (+ / ++ kept)
    choices: dict[str, dict[Any, Any]] = field(default_factory=dict)  # encoded -> parsed value

    @classmethod
    def parse(cls, params: dict[str, Any], arguments: list[str]) -> SearchSpace:
        """The sweeper's params, then the command line's overrides (which win for a key)."""
        lines = [(f"hydra.sweeper.params.{k}", f"{k}={v}") for k, v in params.items()]
        lines += [("the command line", a) for a in arguments]
        parser = OverridesParser.create()
        by_key: dict[str, Override] = {}
        for where, line in lines:
            try:
                (override,) = parser.parse_overrides([line])
            except HydraException as e:
                detail = " ".join(str(e).split("\n")[1:2]) or str(e)
                raise SweepError(
                    f"{where}: {line!r} is not a valid search space entry ({detail}): {GRAMMAR}"
                ) from None
            by_key.pop(override.key_or_group, None)
            by_key[override.key_or_group] = override
        space = cls()
        for key, override in by_key.items():
            if not override.is_sweep_override():
                space.fixed.append(override.input_line or "")
                continue
            try:
                space.distributions[key] = _distribution(override)
            except ValueError as e:
                raise SweepError(
                    f"{override.input_line!r} is not a valid distribution ({e}): {GRAMMAR}"
                ) from None
            space.keys[key] = override.get_key_element()
            if override.is_choice_sweep():
                space.choices[key] = {Transformer.encode(v): v for v in override.value().list}
        if not space.distributions:
            raise SweepError(
                "the search space is empty: give hydra.sweeper.params (e.g. sweep=deepfm) or sweep "
                f"overrides on the command line; {GRAMMAR}"
            )
        return space

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The job overrides of one trial: the fixed ones, then its sampled values."""
        out = list(self.fixed)
        for key, value in params.items():
            value = self.choices.get(key, {}).get(value, value)
            out.append(f"{self.keys[key]}={Transformer.str(value)}")
        return out

    def check(self, config: DictConfig, loader: ConfigLoader) -> None:
        """Every swept key exists and every extreme of its range composes, before any trial."""
        for key, dist in self.distributions.items():
            added = self.keys[key].startswith("+")
            if not added and not loader.get_group_options(key) and _select(config, key) is _ABSENT:
                raise SweepError(_unknown_key(key, config))
            if isinstance(dist, CategoricalDistribution):
                samples = list(dist.choices)
            else:
                samples = [dist.low, dist.high]
            for sample in samples:
                line = self.overrides({key: sample})[-1]
                try:
                    loader.load_sweep_config(config, [*self.fixed, line])
                except HydraException as e:
                    first = str(e.__cause__ or e).strip().splitlines()[0]
                    raise SweepError(
                        f"search space entry {key}: a trial with {line} does not compose "
                        f"({first}): fix its range or type in hydra.sweeper.params"
                    ) from None


def _select(config: DictConfig, key: str) -> Any:
    return OmegaConf.select(config, key, default=_ABSENT, throw_on_missing=False)


def _unknown_key(key: str, config: DictConfig) -> str:
    """The message for a search-space key the config lacks, with the nearest existing keys."""
    parent, _, _ = key.rpartition(".")
    node = _select(config, parent) if parent else config
    known = []
    if OmegaConf.is_dict(node):
        known = [f"{parent}.{k}" if parent else str(k) for k in node]
    near = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return (
        f"search space key {key!r} is not in the config{hint}: fix the key in "
        "hydra.sweeper.params or on the command line, or write +" + key + " to add a new key"
    )
