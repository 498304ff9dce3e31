"""The training loop: loss, optimizer steps, LR schedule, periodic evaluation, early stopping."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from recsys.config import LrDecay, LrScheduleConfig, TrainerConfig
from recsys.errors import RecsysError
from recsys.metrics import higher_is_better
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
    steps: int = 0
    epochs: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    stopped_by_callback: bool = False  # on_evaluation asked to stop (a sweep pruned the run)
    first_step_at: float | None = None  # wall clock (time.time) when the first step finished
    final_loss: float = float("nan")
    evaluations: list[dict] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds else 0.0


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
    ):
        self.model = model
        self.dense_optimizer = dense_optimizer
        self.fused_optimizer = getattr(model, "fused_optimizer", None)
        self.cfg = cfg
        self.task = task
        self.device = device
        self.writer = writer
        self.monitor = monitor
        self._base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self._optimizers()]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.dense_optimizer, self.fused_optimizer) if o is not None]

    def _set_lr(self, factor: float) -> float:
        for opt, bases in zip(self._optimizers(), self._base_lrs, strict=True):
            for group, base in zip(opt.param_groups, bases, strict=True):
                group["lr"] = base * factor
        if self.fused_optimizer is not None:
            self.fused_optimizer.step()  # hands the new lr to FBGEMM; the update ran in backward
        return self._base_lrs[0][0] * factor

    def _to_device(self, batch: Batch) -> Batch:
        return batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)

    def fit(
        self,
        train: Iterable[Batch],
        validation: Iterable[Batch] | None,
        on_evaluation: Callable[[int, dict[str, float]], bool] | None = None,
    ) -> FitResult:
        """Train; `on_evaluation(step, metrics)` sees every validation and returns True to stop."""
        cfg = self.cfg
        steps_per_epoch = len(train)
        total = cfg.max_epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        stopper = None
        if cfg.early_stopping.enabled and validation is not None:
            es = cfg.early_stopping
            stopper = EarlyStopping(self.monitor, es.patience, es.min_delta)
        result = FitResult()
        show_bar = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
        bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=not show_bar)
        accum = cfg.grad_accumulation
        dense_params = [p for g in self.dense_optimizer.param_groups for p in g["params"]]
        window_start, window_samples, last_eval_step = time.perf_counter(), 0, -1
        lr = self._set_lr(lr_factor(cfg.lr_schedule, 0, total))
        done = False
        for epoch in range(cfg.max_epochs):
            self.model.train()
            tick = time.perf_counter()
            for batch in train:
                batch = self._to_device(batch)
                loss = self.task.loss(self.model, batch)
                (loss / accum).backward()
                result.steps += 1
                result.first_step_at = result.first_step_at or time.time()
                if result.steps % accum == 0 or result.steps == total:
                    if cfg.grad_clip_norm is not None:
                        torch.nn.utils.clip_grad_norm_(dense_params, cfg.grad_clip_norm)
                    self.dense_optimizer.step()
                    self.dense_optimizer.zero_grad(set_to_none=True)
                    lr = self._set_lr(lr_factor(cfg.lr_schedule, result.steps, total))
                n = batch.labels.shape[0]
                result.samples += n
                window_samples += n
                if result.steps % cfg.log_every_steps == 0 or result.steps == total:
                    value = loss.item()
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
                    self._scalar("train/loss", value, result.steps)
                    self._scalar("train/lr", lr, result.steps)
                    self._scalar("train/samples_per_s", rate, result.steps)
                    if show_bar:
                        bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", sps=f"{rate:,.0f}")
                    else:
                        log.info(
                            "epoch %d step %d/%d  loss %.4f  lr %.2e  %s samples/s",
                            epoch + 1,
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
                    done = self._evaluate_and_check(validation, result, stopper, on_evaluation)
                    last_eval_step = result.steps
                    tick = window_start = time.perf_counter()
                    window_samples = 0
                if done or result.steps >= total:
                    done = True
                    break
            result.train_seconds += time.perf_counter() - tick
            result.epochs = epoch + 1
            if validation is not None and last_eval_step != result.steps:
                stop = self._evaluate_and_check(validation, result, stopper, on_evaluation)
                last_eval_step = result.steps
                done = done or stop
            window_start, window_samples = time.perf_counter(), 0
            if done:
                break
        bar.close()
        result.stopped_early = bool(stopper and stopper.bad_evals >= stopper.patience)
        return result

    def _evaluate_and_check(
        self,
        validation: Iterable[Batch],
        result: FitResult,
        stopper: EarlyStopping | None,
        on_evaluation: Callable[[int, dict[str, float]], bool] | None,
    ) -> bool:
        metrics = self.evaluate(validation)
        result.evaluations.append({"step": result.steps, **metrics})
        for name, value in metrics.items():
            self._scalar(f"validation/{name}", value, result.steps)
        text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.info("validation at step %d: %s", result.steps, text)
        self.model.train()
        if on_evaluation is not None and on_evaluation(result.steps, metrics):
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
