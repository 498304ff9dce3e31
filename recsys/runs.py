"""A finished training run as input: its model, and data checked against the features it knows."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from recsys import config as schema
from recsys.config import RETRIEVAL_KEYS, DataConfig, RetrievalConfig, RunInputConfig
from recsys.data import vocabulary
from recsys.data.features import FeatureSpec
from recsys.demo.ctr import ensure_demo
from recsys.distributed import keep_freed_memory, quiet_torchrec
from recsys.errors import DataError, exit_on_user_error
from recsys.outputs import load_model, unmask_secrets

log = logging.getLogger("recsys")


def _entries(spec: FeatureSpec) -> list[str]:
    return [f"{name}:{rows}" for name, rows in spec.categorical]


def check_features(run_dir: Path, spec: FeatureSpec, data: DataConfig, label: bool) -> None:
    """The data config gives the columns the model was trained on, in the same roles and order."""
    given = FeatureSpec.from_data_config(data, vocabulary.for_data(data))
    problems = []
    if given.dense != spec.dense:
        problems.append(f"data.dense is {list(given.dense)}, the model's is {list(spec.dense)}")
    if given.categorical != spec.categorical:
        problems.append(f"data.categorical is {_entries(given)}, the model's is {_entries(spec)}")
    if label and (given.label, given.label_kind) != (spec.label, spec.label_kind):
        problems.append(
            f"data.label/task is {given.label}/{given.label_kind.value}, the model's is "
            f"{spec.label}/{spec.label_kind.value}"
        )
    if problems:
        raise DataError(
            f"the data does not match the features the model in {run_dir} was trained on: "
            f"{'; '.join(problems)}. Leave data= out to use the run's own data config, or give "
            "one with these columns"
        )


def saved_data(run_dir: Path) -> DataConfig:
    """The data config a run was trained with; S3 credentials masked in it come from AWS's chain."""
    saved = OmegaConf.load(run_dir / "config.yaml").data
    unmask_secrets(saved)
    known = {f.name for f in fields(DataConfig)}
    node = OmegaConf.merge(
        OmegaConf.structured(DataConfig), {k: v for k, v in saved.items() if k in known}
    )
    return schema.to_object(node)


def saved_retrieval(run_dir: Path) -> RetrievalConfig:
    """The retrieval settings a run was trained with (an earlier run's are in its model config)."""
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    earlier = {k: v for k, v in saved["model"].items() if k in RETRIEVAL_KEYS}
    node = saved.get("retrieval") or earlier
    return schema.to_object(OmegaConf.merge(OmegaConf.structured(RetrievalConfig), node))


def open_run(cfg: RunInputConfig, label: bool) -> tuple[Path, nn.Module, FeatureSpec, DataConfig]:
    """The run's model (refused if the run has none) and the data to run it on, checked."""
    quiet_torchrec()
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.run.startswith("models:/"):
        from recsys.registry import resolve_run  # MLflow only where a registry name is given

        run_dir = resolve_run(cfg.run, cfg.tracking_uri)
    else:
        run_dir = Path(cfg.run).expanduser()
    model, spec = load_model(run_dir)
    data = cfg.data or saved_data(run_dir)
    ensure_demo(data.path)
    check_features(run_dir, spec, data, label)
    return run_dir, model, spec, data


def run_or_exit(run: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """An entry point's work; a user error ends the process with one line naming the fix."""
    with exit_on_user_error():
        run(cfg)
