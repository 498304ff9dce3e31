"""`python -m recsys.train [overrides]`: compose the config, train, evaluate, write the run dir."""

from __future__ import annotations

import logging
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys import checkpoint
from recsys import config as schema
from recsys.checkpoint import Restored
from recsys.data.batches import DataQuality
from recsys.data.features import FeatureSpec
from recsys.data.mix import MixedReader, SourceEvaluation, open_mix
from recsys.data.reader import SplitReader, open_split
from recsys.demo.ctr import ensure_demo
from recsys.distributed import (
    agree,
    dense_parameters,
    first_order_in_row,
    full_state_dict,
    init_process_group,
    is_rank0,
    keep_freed_memory,
    log_ranks,
    plan_summary,
    quiet_torchrec,
    resolve_device,
    shard,
)
from recsys.errors import ConfigError, S3Unavailable, exit_on_user_error
from recsys.files import summary_table, write_json, write_text
from recsys.objectives import (
    RUN_MEASURES,
    objective_entries,
    objective_names,
    parameter_count,
    pruning_callback,
    sweep_result,
)
from recsys.outputs import mask_in_files, save_config, save_model, secrets, set_aside_earlier_run
from recsys.preemption import EXIT_PREEMPTED, Preempted, Preemption
from recsys.tasks import task_for
from recsys.tracking import Loggers, TrackingError, open_loggers
from recsys.trainer import Checkpointing, Trainer, TrainingState

log = logging.getLogger("recsys")
schema.register()


def _metric(name: str | None, metrics: tuple[str, ...], key: str) -> str:
    """A metric name the model's task has, defaulting to its main metric."""
    name = name or metrics[0]
    if name not in metrics:
        raise ConfigError(
            f"{key}={name} is not a metric of this model: use one of {', '.join(metrics)}"
        )
    return name


def _summed_over_ranks(quality: DataQuality) -> DataQuality:
    """Every rank's repair counts (each read its own share), added up."""
    if dist.get_world_size() == 1:
        return quality
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, quality.to_dict())
    total = DataQuality()
    for share in shares:
        total.add(DataQuality.from_dict(share))
    return total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Splits:
    """Every rank's share of each split, and the repairs counted in the rows it uses."""

    train: SplitReader | MixedReader
    validation: SplitReader | SourceEvaluation | None
    test: SplitReader | SourceEvaluation | None
    # trained on (every epoch), one pass of each evaluated split (of each source: "test/<name>")
    quality: dict[str, DataQuality]


@dataclass
class Setup:
    """The sharded model and what trains it."""

    model: DistributedModelParallel
    trainer: Trainer
    objectives: list[str]
    description: dict  # what a checkpoint must match


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train one model as configured and return its objective (a validation metric)."""
    start = time.perf_counter()
    typed = schema.to_object(cfg)
    check(typed)
    device = start_process(typed)
    run_dir = Path(agree(str(run_dir)))  # rank 0's, should ranks' clocks name it differently
    splits = open_splits(typed)
    setup = build(cfg, typed, splits.train.converter.spec, device, run_dir)
    restored = checkpoint.restore(
        checkpoint.candidates(run_dir / "checkpoints", typed.trainer.resume),
        setup.model,
        setup.trainer.dense_optimizer,
        setup.description,
    )
    loggers = start_run_dir(cfg, typed, run_dir, restored, setup)
    setup.trainer.writer = loggers
    log_start(typed.data, splits.train, setup, device)
    with loggers.ending_on_error(cfg):
        with setup.trainer.checkpointing.preemption:
            state = setup.trainer.fit(
                splits.train, splits.validation, pruning_callback(setup.objectives[0]), restored
            )
        metrics = metrics_record(state, setup, splits, time.perf_counter() - start)
        weights = full_state_dict(setup.model)  # a collective: every rank takes part
        if is_rank0():
            spec = splits.train.converter.spec
            write_outputs(cfg, run_dir, metrics, state, loggers, spec, weights)
    return sweep_result(metrics)


def check(typed: schema.TrainConfig) -> None:
    """Config errors found before anything starts."""
    if typed.data.validation is None and typed.trainer.early_stopping.enabled:
        raise ConfigError(
            "trainer.early_stopping.enabled=true needs a validation split (data.validation)"
        )


def start_process(typed: schema.TrainConfig) -> torch.device:
    """Threads, memory, demo data, seeds and the process group; the device to train on."""
    quiet_torchrec()
    keep_freed_memory()
    if typed.trainer.threads:
        torch.set_num_threads(typed.trainer.threads)
    for path in [typed.data.path, *(s.path for s in typed.data.sources.values())]:
        ensure_demo(path)
    seed_everything(typed.seed)
    device = resolve_device(typed.trainer.device)
    init_process_group(device)
    log_ranks()
    return device


def open_splits(typed: schema.TrainConfig) -> Splits:
    """Each rank reads its own share of every split; evaluation gathers the ranks' predictions."""
    data, max_eval = typed.data, typed.trainer.max_eval_batches
    quality = {split: DataQuality() for split in ("train", "validation", "test")}
    shard_of = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    if data.sources:
        return Splits(*open_mix(data, quality, max_eval, typed.seed, **shard_of), quality)
    train = open_split(data, "train", quality["train"], train=True, seed=typed.seed, **shard_of)
    evaluated = {
        split: open_split(data, split, quality[split], False, max_eval, **shard_of)
        if getattr(data, split)
        else None
        for split in ("validation", "test")
    }
    return Splits(train, evaluated["validation"], evaluated["test"], quality)


def build(
    cfg: DictConfig,
    typed: schema.TrainConfig,
    spec: FeatureSpec,
    device: torch.device,
    run_dir: Path,
) -> Setup:
    """The model (sharded), its task, objectives and optimizers, and the trainer."""
    tcfg = typed.trainer
    in_row = first_order_in_row(device, tcfg.sparse_optimizer, tcfg.first_order_optimizer)
    model = instantiate(cfg.model, _partial_=True, _convert_="all")(
        features=spec, device="meta", first_order_in_row=in_row
    )
    task = task_for(model, typed.data, typed.retrieval)
    # a mix's metrics: the aggregate by the plain names, and each source's as <source>/<metric>
    metrics = task.metrics + tuple(f"{s}/{m}" for s in typed.data.sources for m in task.metrics)
    objectives = objective_names(typed.objective, metrics)
    objective = next((n for n in objectives if n not in RUN_MEASURES), None)
    monitor = _metric(
        tcfg.early_stopping.metric or objective, metrics, "trainer.early_stopping.metric"
    )
    description = checkpoint.describe(
        model, OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    )
    model = shard(model, device, tcfg.sparse_optimizer, tcfg.sharding, tcfg.first_order_optimizer)
    dense_opt = instantiate(cfg.trainer.dense_optimizer, params=dense_parameters(model))
    ckpt = Checkpointing(run_dir / "checkpoints", description, Preemption(), run_dir)
    # the trainer takes the configured learning rates before a checkpoint's replace them
    trainer = Trainer(model, dense_opt, tcfg, task, device, None, monitor, ckpt)
    return Setup(model, trainer, objectives, description)


def start_run_dir(
    cfg: DictConfig,
    typed: schema.TrainConfig,
    run_dir: Path,
    restored: Restored | None,
    setup: Setup,
) -> Loggers:
    """On rank 0: the earlier run set aside (when starting over), the config, the sharding plan
    and the loggers (TensorBoard, MLflow); an unreachable tracking store stops every rank."""
    loggers, error = Loggers([]), ""
    if is_rank0():
        if restored is None and (aside := set_aside_earlier_run(run_dir)):
            log.warning("starting over: the earlier run's checkpoints and TensorBoard files in "
                        "this run dir were moved to %s", aside)  # fmt: skip
        save_config(run_dir, cfg)
        write_text(run_dir / "sharding_plan.txt", str(setup.model.plan).strip() + "\n")
        step = restored.manifest["step"] if restored else None
        try:
            loggers = open_loggers(typed.logger, cfg, run_dir, step)
        except TrackingError as e:
            error = str(e)
    if error := agree(error):
        raise TrackingError(error)
    return loggers


def log_start(
    data: schema.DataConfig, train: SplitReader | MixedReader, setup: Setup, device: torch.device
) -> None:
    model = setup.model
    log.info("sharding plan: %s (in full: sharding_plan.txt)", plan_summary(model.plan))
    ranks = dist.get_world_size()
    readers = train.readers if isinstance(train, MixedReader) else [train]
    rows = sum(r.total_rows for r in readers)
    if isinstance(train, MixedReader):
        log.info("%s", train.describe())
    log.info(
        "training %s on %s: %s train rows%s, %d steps/epoch, batch %d%s, device %s",
        type(model.module).__name__,
        ", ".join(data.sources) if data.sources else data.path,
        f"{rows:,}",
        f" over {ranks} ranks" if ranks > 1 else "",
        len(train),
        data.batch_size,
        f" per rank ({data.batch_size * ranks} in all)" if ranks > 1 else "",
        device,
    )


def metrics_record(state: TrainingState, setup: Setup, splits: Splits, wall: float) -> dict:
    """What metrics.json holds: validation and test metrics, objectives, training, data quality."""
    val_metrics = state.evaluations[-1] if state.evaluations else {}
    val_metrics = {k: v for k, v in val_metrics.items() if k != "step"}
    test = splits.test
    test_metrics = setup.trainer.evaluate(test) if test is not None else {}
    quality = {split: _summed_over_ranks(q).to_dict() for split, q in splits.quality.items()}
    measures = {"parameters": parameter_count(setup.model), "samples_per_s": state.samples_per_s}
    entries = objective_entries(setup.objectives, val_metrics, measures)
    return {
        "status": "pruned" if state.stopped_by_callback else "complete",
        "validation": val_metrics,
        "test": test_metrics,
        "objective": entries[0],
        "objectives": entries,
        "parameters": measures["parameters"],
        "train": {
            "steps": state.steps,
            "epochs": state.epochs,
            "samples": state.samples,
            "samples_per_s": state.samples_per_s,
            "train_seconds": state.train_seconds,
            "final_loss": state.final_loss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "stopped_early": state.stopped_early,
            "first_step_at": state.first_step_at,
            "evaluations": state.evaluations,
            "losses": state.losses,
            "preemptions": state.preemptions,
            "sources": source_counts(state),
        },
        "wall_time_s": wall,
        "data_quality": quality,
    }


def write_outputs(
    cfg: DictConfig,
    run_dir: Path,
    metrics: dict,
    state: TrainingState,
    loggers: Loggers,
    spec: FeatureSpec,
    weights: dict,
) -> None:
    """metrics.json, model.pt, the loggers' final record, and the summary in the log."""
    write_json(run_dir / "metrics.json", metrics)
    model_path = save_model(run_dir, cfg.model, spec, weights)
    loggers.finish(cfg, metrics, metrics["status"], state.steps)
    rows = summary_rows(metrics, state) + [("run dir", str(run_dir)), ("model", str(model_path))]
    log.info("summary\n%s", summary_table(rows))


def source_counts(state: TrainingState) -> dict[str, dict]:
    """A mix's batches, samples and realised share of the steps, per source."""
    return {
        name: {
            "batches": batches,
            "samples": state.source_samples[name],
            "proportion": batches / max(state.steps, 1),
        }
        for name, batches in state.source_batches.items()
    }


def summary_rows(metrics: dict, state: TrainingState) -> list[tuple[str, str]]:
    """The end-of-run summary: metrics, objectives, steps, speed, memory, time and repairs."""
    rows = [(f"validation {k}", f"{v:.4f}") for k, v in metrics["validation"].items()]
    rows += [(f"test {k}", f"{v:.4f}") for k, v in metrics["test"].items()]
    entries = metrics["objectives"]
    rows += [
        (
            "objective",
            ", ".join(f"{o['split']} {o['metric']} = {o['value']:.4g}" for o in entries),
        ),
        (
            "steps / epochs",
            f"{state.steps} / {state.epochs}" + (" (early stop)" if state.stopped_early else ""),
        ),
        ("train samples/s", f"{state.samples_per_s:,.0f}"),
        *(
            (
                f"source {name}",
                f"{c['batches']:,} batches ({c['proportion']:.1%}), {c['samples']:,} samples",
            )
            for name, c in metrics["train"]["sources"].items()
        ),
        ("peak RSS", f"{metrics['train']['peak_rss_mb']:,.0f} MB"),
        ("wall time", f"{metrics['wall_time_s']:.1f} s"),
    ]
    for split, kinds in metrics["data_quality"].items():
        for kind, counts in kinds.items():
            if counts := {k: v for k, v in counts.items() if v}:
                text = ", ".join(f"{k}: {v:,}" for k, v in counts.items())
                rows.append((f"{split} {kind.replace('_', ' ')}", text))
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Entry point; user errors end the run with one line naming the fix."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    mask_in_files(run_dir / HydraConfig.get().output_subdir, secrets(cfg))
    multirun = HydraConfig.get().mode is RunMode.MULTIRUN  # the sweeper records a trial's error
    with exit_on_user_error(reraise=multirun):
        try:
            return run(cfg, run_dir)
        except (Preempted, S3Unavailable) as e:  # user errors too, but ones a rerun goes on from
            if multirun:
                raise
            again = ""  # S3 unavailable after training (the test split): the final checkpoint
            if isinstance(e, S3Unavailable):
                again = (f"; once it answers, run the same command with hydra.run.dir={run_dir}"
                         " to resume from its last checkpoint")  # fmt: skip
            log.warning("%s%s", e, again)
            sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
