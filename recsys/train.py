"""`python -m recsys.train [overrides]`: compose the config, train, evaluate, write the run dir."""

from __future__ import annotations

import logging
import random
import resource
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from recsys import checkpoint
from recsys import config as schema
from recsys.batches import DataQuality
from recsys.data import open_split
from recsys.demo_data import ensure_demo
from recsys.distributed import (
    agree,
    dense_parameters,
    full_state_dict,
    init_process_group,
    is_rank0,
    log_ranks,
    plan_summary,
    quiet_torchrec,
    resolve_device,
    shard,
)
from recsys.errors import ConfigError, RecsysError
from recsys.objectives import (
    RUN_MEASURES,
    objective_entries,
    objective_names,
    parameter_count,
    pruning_callback,
    sweep_result,
)
from recsys.outputs import (
    flat_hparams,
    mask_in_files,
    save_config,
    save_model,
    secrets,
    set_aside_earlier_run,
    summary_table,
    write_json,
    write_text,
)
from recsys.preemption import EXIT_PREEMPTED, Preempted, Preemption
from recsys.tasks import task_for
from recsys.trainer import Checkpointing, Trainer

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


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train one model as configured and return its objective (a validation metric)."""
    start = time.perf_counter()
    typed = schema.to_object(cfg)
    data, tcfg = typed.data, typed.trainer
    if data.validation is None and tcfg.early_stopping.enabled:
        raise ConfigError(
            "trainer.early_stopping.enabled=true needs a validation split (data.validation)"
        )
    quiet_torchrec()
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    ensure_demo(data.path)
    seed_everything(typed.seed)
    device = resolve_device(tcfg.device)

    init_process_group(device)
    log_ranks()
    run_dir = Path(agree(str(run_dir)))  # rank 0's, should ranks' clocks name it differently
    # repairs in the rows used: trained on (every epoch), and one pass of each evaluated split
    quality = {split: DataQuality() for split in ("train", "validation", "test")}
    # each rank reads its own share of every split; evaluation gathers the ranks' predictions
    shard_of = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    train = open_split(data, "train", quality["train"], train=True, seed=typed.seed, **shard_of)
    val = test = None
    if data.validation:
        val = open_split(
            data, "validation", quality["validation"], False, tcfg.max_eval_batches, **shard_of
        )
    if data.test:
        test = open_split(data, "test", quality["test"], False, tcfg.max_eval_batches, **shard_of)
    spec = train.converter.spec  # table sizes from config or the vocabularies
    model = instantiate(cfg.model, _partial_=True, _convert_="all")(features=spec, device="meta")
    task = task_for(model, data)
    objectives = objective_names(typed.objective, task.metrics)
    objective = next((n for n in objectives if n not in RUN_MEASURES), None)
    monitor = _metric(
        tcfg.early_stopping.metric or objective, task.metrics, "trainer.early_stopping.metric"
    )
    description = checkpoint.describe(
        model, OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    )
    model = shard(model, device, tcfg.sparse_optimizer, tcfg.sharding)
    dense_opt = instantiate(cfg.trainer.dense_optimizer, params=dense_parameters(model))
    checkpoints = run_dir / "checkpoints"
    preemption = Preemption()
    ckpt = Checkpointing(checkpoints, description, preemption, run_dir)
    # the trainer takes the configured learning rates before a checkpoint's replace them
    trainer = Trainer(model, dense_opt, tcfg, task, device, None, monitor, ckpt)
    restored = checkpoint.restore(
        checkpoint.candidates(checkpoints, tcfg.resume), model, dense_opt, description
    )
    writer = None
    if is_rank0():
        if restored is None and (aside := set_aside_earlier_run(run_dir)):
            log.warning("starting over: the earlier run's checkpoints and TensorBoard files in "
                        "this run dir were moved to %s", aside)  # fmt: skip
        # a resumed run's curves go on from its checkpoint, hiding what came after it before
        step = restored.manifest["step"] if restored else None
        trainer.writer = writer = SummaryWriter(log_dir=str(run_dir), purge_step=step)
        save_config(run_dir, cfg)
        write_text(run_dir / "sharding_plan.txt", str(model.plan).strip() + "\n")
    log.info("sharding plan: %s (in full: sharding_plan.txt)", plan_summary(model.plan))
    ranks = dist.get_world_size()
    rows = sum(p.rows for share in train.shares for worker in share for p in worker)
    log.info(
        "training %s on %s: %s train rows%s, %d steps/epoch, batch %d%s, device %s",
        type(model.module).__name__,
        data.path,
        f"{rows:,}",
        f" over {ranks} ranks" if ranks > 1 else "",
        len(train),
        data.batch_size,
        f" per rank ({data.batch_size * ranks} in all)" if ranks > 1 else "",
        device,
    )
    with preemption:
        fit = trainer.fit(train, val, pruning_callback(objectives[0]), restored)
    val_metrics = fit.evaluations[-1] if fit.evaluations else {}
    val_metrics = {k: v for k, v in val_metrics.items() if k != "step"}
    test_metrics = trainer.evaluate(test) if test is not None else {}
    quality = {split: _summed_over_ranks(q).to_dict() for split, q in quality.items()}
    wall = time.perf_counter() - start
    measures = {"parameters": parameter_count(model), "samples_per_s": fit.samples_per_s}
    entries = objective_entries(objectives, val_metrics, measures)
    metrics = {
        "status": "pruned" if fit.stopped_by_callback else "complete",
        "validation": val_metrics,
        "test": test_metrics,
        "objective": entries[0],
        "objectives": entries,
        "parameters": measures["parameters"],
        "train": {
            "steps": fit.steps,
            "epochs": fit.epochs,
            "samples": fit.samples,
            "samples_per_s": fit.samples_per_s,
            "train_seconds": fit.train_seconds,
            "final_loss": fit.final_loss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "stopped_early": fit.stopped_early,
            "first_step_at": fit.first_step_at,
            "evaluations": fit.evaluations,
            "losses": fit.losses,
            "preemptions": fit.preemptions,
        },
        "wall_time_s": wall,
        "data_quality": quality,
    }
    state = full_state_dict(model)  # a collective: every rank takes part, rank 0 writes
    if not is_rank0():
        return sweep_result(metrics)
    write_json(run_dir / "metrics.json", metrics)
    model_path = save_model(run_dir, cfg.model, spec, state)
    final = {f"validation/{k}": v for k, v in val_metrics.items()}
    final |= {f"test/{k}": v for k, v in test_metrics.items()}
    final["train/samples_per_s"] = fit.samples_per_s
    writer.add_hparams(flat_hparams(cfg), final, run_name=".", global_step=fit.steps)
    writer.close()

    rows = [(f"validation {k}", f"{v:.4f}") for k, v in val_metrics.items()]
    rows += [(f"test {k}", f"{v:.4f}") for k, v in test_metrics.items()]
    rows += [
        (
            "objective",
            ", ".join(f"{o['split']} {o['metric']} = {o['value']:.4g}" for o in entries),
        ),
        (
            "steps / epochs",
            f"{fit.steps} / {fit.epochs}" + (" (early stop)" if fit.stopped_early else ""),
        ),
        ("train samples/s", f"{fit.samples_per_s:,.0f}"),
        ("peak RSS", f"{metrics['train']['peak_rss_mb']:,.0f} MB"),
        ("wall time", f"{wall:.1f} s"),
    ]
    for split, kinds in quality.items():
        for kind, counts in kinds.items():
            if counts := {k: v for k, v in counts.items() if v}:
                text = ", ".join(f"{k}: {v:,}" for k, v in counts.items())
                rows.append((f"{split} {kind.replace('_', ' ')}", text))
    rows += [("run dir", str(run_dir)), ("model", str(model_path))]
    log.info("summary\n%s", summary_table(rows))
    return sweep_result(metrics)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Entry point; user errors end the run with one line naming the fix."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    mask_in_files(run_dir / HydraConfig.get().output_subdir, secrets(cfg))
    try:
        return run(cfg, run_dir)
    except Preempted as e:
        if HydraConfig.get().mode is RunMode.MULTIRUN:
            raise
        log.warning("%s", e)
        sys.exit(EXIT_PREEMPTED)
    except RecsysError as e:
        if HydraConfig.get().mode is RunMode.MULTIRUN:
            raise
        log.error("error: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
