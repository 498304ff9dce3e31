"""The training loop: loss, optimizer steps, LR schedule, periodic evaluation, early stopping."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from recsys import checkpoint
from recsys.batches import DataQuality
from recsys.checkpoint import Restored
from recsys.config import LrDecay, LrScheduleConfig, TrainerConfig
from recsys.data import SplitReader
from recsys.distributed import row_sparse_adam
from recsys.errors import RecsysError
from recsys.metrics import higher_is_better
from recsys.preemption import Preemption
from recsys.tasks import TrainingTask, evaluate

log = logging.getLogger(__name__)


def lr_factor(schedule: LrScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rates at a step: linear warm-up, then decay."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay is LrDecay.none:
        return 1.0
    span = max(1, total_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    if schedule.decay is LrDecay.linear:
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_ratio + (1.0 - schedule.min_ratio) * shape


@dataclass
class EarlyStopping:
    """Tracks the best value of a validation metric and how long since it improved."""

    metric: str
    patience: int
    min_delta: float
    best: float | None = None
    best_step: int = 0
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; True when training should stop."""
        sign = 1.0 if higher_is_better(self.metric) else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience


@dataclass
class FitResult:
    """Where training stands; checkpointed, so that a resumed run goes on exactly from there."""

    steps: int = 0
    epoch: int = 0  # the epoch being trained, from 0
    epoch_batches: int = 0  # batches of that epoch already trained
    epochs: int = 0  # epochs started
    samples: int = 0
    train_seconds: float = 0.0
    finished: bool = False
    stopped_early: bool = False
    stopped_by_callback: bool = False  # on_evaluation asked to stop (a sweep pruned the run)
    first_step_at: float | None = None  # wall clock (time.time) when the first step finished
    final_loss: float = float("nan")
    last_eval_step: int = -1
    preemptions: int = 0  # checkpoints written because a signal asked the run to stop
    evaluations: list[dict] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # [step, loss averaged over ranks]
    early_stopping: dict = field(default_factory=dict)  # EarlyStopping's best, best_step, bad_evals

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds else 0.0


def rng_state() -> dict:
    """Every random generator training draws from (dropout, shuffles seeded elsewhere)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}  # fmt: skip


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class Checkpointing:
    """Where a run's checkpoints go, what they must match, and the signals that stop the run."""

    root: Path
    description: dict
    preemption: Preemption
    run_dir: Path


class Trainer:
    """Trains a sharded model: dense parameters by `dense_optimizer`, tables fused in backward."""

    def __init__(
        self,
        model: nn.Module,
        dense_optimizer: torch.optim.Optimizer,
        cfg: TrainerConfig,
        task: TrainingTask,
        device: torch.device,
        writer: SummaryWriter | None,
        monitor: str,
        checkpointing: Checkpointing | None = None,
    ):
        self.model = model
        self.dense_optimizer = dense_optimizer
        self.fused_optimizer = getattr(model, "fused_optimizer", None)
        # on CPU, Adam of the tables runs after backward over the fused SGD's rows
        self.row_sparse = row_sparse_adam(model, device, cfg.sparse_optimizer)
        self.cfg = cfg
        self.task = task
        self.device = device
        self.writer = writer
        self.monitor = monitor
        self.checkpointing = checkpointing
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self._optimizers()]
        self._last_save = time.monotonic()

    def _optimizers(self) -> list:
        """The optimizers whose learning rates the schedule scales."""
        sparse = self.row_sparse or self.fused_optimizer  # the fused SGD under Adam keeps its rate
        return [o for o in (self.dense_optimizer, sparse) if o is not None]

    def _set_lr(self, factor: float) -> float:
        for opt, bases in zip(self._optimizers(), self._base_lrs, strict=True):
            for group, base in zip(opt.param_groups, bases, strict=True):
                group["lr"] = base * factor
        if self.fused_optimizer is not None and self.row_sparse is None:
            self.fused_optimizer.step()  # hands the new lr to FBGEMM; the update ran in backward
        return self._base_lrs[0][0] * factor

    def _to_device(self, batch: Batch) -> Batch:
        return batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)

    def fit(
        self,
        train: SplitReader,
        validation: Iterable[Batch] | None,
        on_evaluation: Callable[[int, dict[str, float]], bool] | None = None,
        restored: Restored | None = None,
    ) -> FitResult:
        """Train, from the start or from `restored`; `on_evaluation(step, metrics)` sees every
        validation and returns True to stop."""
        cfg = self.cfg
        self.on_evaluation = on_evaluation
        steps_per_epoch = len(train)
        total = cfg.max_epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        stopper = None
        if cfg.early_stopping.enabled and validation is not None:
            es = cfg.early_stopping
            stopper = EarlyStopping(self.monitor, es.patience, es.min_delta)
        result, position = self._resume(restored, train, stopper)
        stopped = result.stopped_early or result.stopped_by_callback
        result.finished = result.finished and (stopped or result.steps >= total)  # or go on
        show_bar = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
        bar = tqdm(total=total, initial=result.steps, unit="step", dynamic_ncols=True,
                   disable=not show_bar)  # fmt: skip
        accum = cfg.grad_accumulation
        dense_params = [p for g in self.dense_optimizer.param_groups for p in g["params"]]
        window_start, window_samples = time.perf_counter(), 0
        lr = self._set_lr(lr_factor(cfg.lr_schedule, result.steps, total))
        done = result.finished
        while not done and result.epoch < cfg.max_epochs:
            self.model.train()
            tick = time.perf_counter()
            result.epochs = result.epoch + 1
            batches = []  # none left when the checkpoint was taken at the epoch's last step
            if result.epoch_batches < steps_per_epoch:
                batches = train.iterate(result.epoch, position)
            for batch in batches:
                batch = self._to_device(batch)
                loss = self.task.loss(self.model, batch)
                (loss / accum).backward()
                if self.row_sparse is not None:
                    self.row_sparse.step()
                result.steps += 1
                result.epoch_batches += 1
                result.first_step_at = result.first_step_at or time.time()
                boundary = result.steps % accum == 0 or result.steps == total
                if boundary:
                    if cfg.grad_clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(dense_params, cfg.grad_clip_norm)
                    self.dense_optimizer.step()
                    self.dense_optimizer.zero_grad(set_to_none=True)
                    lr = self._set_lr(lr_factor(cfg.lr_schedule, result.steps, total))
                n = batch.labels.shape[0]
                result.samples += n * self.world_size
                window_samples += n * self.world_size
                if result.steps % cfg.log_every_steps == 0 or result.steps == total:
                    value = self._mean_over_ranks(loss.detach())
                    if not math.isfinite(value):
                        raise RecsysError(
                            f"the training loss became {value} at step {result.steps}: lower "
                            "trainer.dense_optimizer.lr / trainer.sparse_optimizer.lr, or set "
                            "trainer.grad_clip_norm"
                        )
                    now = time.perf_counter()
                    rate = window_samples / (now - window_start)
                    window_start, window_samples = now, 0
                    result.final_loss = value
                    result.losses.append([result.steps, value])
                    self._scalar("train/loss", value, result.steps)
                    self._scalar("train/lr", lr, result.steps)
                    self._scalar("train/samples_per_s", rate, result.steps)
                    if show_bar:
                        bar.set_postfix(
                            epoch=result.epoch + 1, loss=f"{value:.4f}", sps=f"{rate:,.0f}"
                        )
                    else:
                        log.info(
                            "epoch %d step %d/%d  loss %.4f  lr %.2e  %s samples/s",
                            result.epoch + 1,
                            result.steps,
                            total,
                            value,
                            lr,
                            f"{rate:,.0f}",
                        )
                bar.update(1)
                every = cfg.eval_every_steps
                if validation is not None and every and result.steps % every == 0:
                    result.train_seconds += time.perf_counter() - tick
                    done = self._evaluate_and_check(validation, result, stopper)
                    tick = window_start = time.perf_counter()
                    window_samples = 0
                done = done or result.steps >= total
                if boundary and not done and self._checkpoint_due(result.steps):
                    result.train_seconds += time.perf_counter() - tick
                    self._save(result, train, stopper)
                    tick = window_start = time.perf_counter()
                    window_samples = 0
                if done:
                    break
            position = None
            result.train_seconds += time.perf_counter() - tick
            if validation is not None and result.last_eval_step != result.steps:
                done = self._evaluate_and_check(validation, result, stopper) or done
            window_start, window_samples = time.perf_counter(), 0
            if result.epoch_batches >= steps_per_epoch and not done:
                result.epoch, result.epoch_batches = result.epoch + 1, 0
        bar.close()
        result.stopped_early = bool(stopper and stopper.bad_evals >= stopper.patience)
        if not result.finished:
            result.finished = True
            if self.checkpointing is not None and cfg.checkpoint.enabled:
                self._save(result, train, stopper)
        return result

    def _resume(
        self, restored: Restored | None, train: SplitReader, stopper: EarlyStopping | None
    ) -> tuple[FitResult, dict | None]:
        """The state to go on from, and the data position within its epoch (None: its start)."""
        if restored is None:
            return FitResult(), None
        saved = restored.trainer_state
        result = FitResult(**saved["fit"])
        if stopper is not None and result.early_stopping:
            stopper.best = result.early_stopping["best"]
            stopper.best_step = result.early_stopping["best_step"]
            stopper.bad_evals = result.early_stopping["bad_evals"]
        rank_state = restored.rank_state
        set_rng_state(rank_state["rng"])
        workers = len(train.shares[train.rank])
        if restored.same_layout and self.row_sparse is not None:
            self.row_sparse.load_state_dict(rank_state["sparse_adam"])
        elif self.row_sparse is not None:
            log.warning("the tables' Adam moments restart: they are kept per rank layout")
        if restored.same_layout and len(rank_state["position"]["workers"]) == workers:
            train.converter.quality.add(DataQuality.from_dict(rank_state["quality"]))
            position = rank_state["position"]
            how = "exactly where it stopped"
        else:
            position = train.resume_position(rank_state["position"], saved["steps_per_epoch"])
            result.epoch_batches = position["drop"]
            how = (
                f"on {self.world_size} ranks x {workers} read_threads, where the checkpoint had "
                f"{restored.manifest['world_size']} ranks: weights, optimizers and step are "
                "restored; the epoch's data restarts and skips "
                f"{position['drop']}/{len(train)} batches, so this run will not be identical to "
                "an uninterrupted one"
            )
        log.info("resuming from %s (step %d, epoch %d): %s", restored.path, result.steps,
                 result.epoch + 1, how)  # fmt: skip
        if result.epoch_batches == 0:
            position = None
        return result, position

    def _checkpoint_due(self, step: int) -> bool:
        """Whether to checkpoint now: every N steps or minutes, or a signal; agreed by all ranks."""
        if self.checkpointing is None:
            return False
        c = self.cfg.checkpoint
        timed = bool(c.enabled and c.every_minutes)
        timed = timed and time.monotonic() - self._last_save >= c.every_minutes * 60
        signalled = self.checkpointing.preemption.received is not None
        if self.world_size > 1:  # rank 0's clock decides; a signal to any rank counts
            flags = torch.tensor([int(timed and dist.get_rank() == 0), int(signalled)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            timed, signalled = bool(flags[0]), bool(flags[1])
        if signalled:
            return True
        return timed or bool(c.enabled and c.every_steps and step % c.every_steps == 0)

    def _save(self, result: FitResult, train: SplitReader, stopper: EarlyStopping | None) -> None:
        """Checkpoint the run as it stands; after a signal, stop the run there."""
        ck = self.checkpointing
        preempted = ck.preemption.received is not None and not result.finished
        result.preemptions += int(preempted)
        if stopper is not None:
            result.early_stopping = {"best": stopper.best, "best_step": stopper.best_step,
                                     "bad_evals": stopper.bad_evals}  # fmt: skip
        trainer_state = {
            "fit": dataclasses.asdict(result),
            "dense_optimizer": self.dense_optimizer.state_dict(),
            "steps_per_epoch": len(train),
        }
        rank_state = {"rng": rng_state(), "position": copy.deepcopy(train.position),
                      "sparse_adam": self.row_sparse and self.row_sparse.state_dict(),
                      "quality": train.converter.quality.to_dict()}  # fmt: skip
        started = time.perf_counter()
        path = checkpoint.save(ck.root, result.steps, self.model, trainer_state, rank_state,
                               ck.description, self.cfg.checkpoint.keep_last)  # fmt: skip
        self._last_save = time.monotonic()
        log.info("checkpoint %s written in %.1f s", path, time.perf_counter() - started)
        if preempted:
            ck.preemption.stop(result.steps, result.preemptions,
                               self.cfg.checkpoint.max_requeues, str(ck.run_dir))  # fmt: skip

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value.item()

    def _evaluate_and_check(
        self, validation: Iterable[Batch], result: FitResult, stopper: EarlyStopping | None
    ) -> bool:
        metrics = self.evaluate(validation)
        result.last_eval_step = result.steps
        result.evaluations.append({"step": result.steps, **metrics})
        for name, value in metrics.items():
            self._scalar(f"validation/{name}", value, result.steps)
        text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.info("validation at step %d: %s", result.steps, text)
        self.model.train()
        if self.on_evaluation is not None and self.on_evaluation(result.steps, metrics):
            log.info("stopping at step %d: the evaluation callback asked to", result.steps)
            result.stopped_by_callback = True
            return True
        if stopper is None:
            return False
        stop = stopper.update(metrics[self.monitor], result.steps)
        if stop:
            log.info(
                "early stopping: validation %s has not improved for %d evaluations "
                "(best %.4f at step %d)",
                self.monitor,
                stopper.patience,
                stopper.best,
                stopper.best_step,
            )
        return stop

    def evaluate(self, split: Iterable[Batch]) -> dict[str, float]:
        """The task's metrics of the current weights over a whole split."""
        return evaluate(self.model, self.task, map(self._to_device, split), self.device)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
