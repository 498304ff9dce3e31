"""The training loop: a step (loss, backward, optimizer steps, LR schedule) and the policies
around it: logging, throughput, evaluation with early stopping, checkpoints and preemption."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from recsys import checkpoint
from recsys.checkpoint import Restored
from recsys.config import LrDecay, LrScheduleConfig, TrainerConfig
from recsys.data.batches import DataQuality
from recsys.data.mix import MixedReader, MixPosition, SourceEvaluation
from recsys.data.reader import ReaderPosition, SplitReader
from recsys.distributed import row_sparse_adam
from recsys.errors import DataError, RecsysError, S3Unavailable
from recsys.metrics import higher_is_better
from recsys.preemption import Preempted, Preemption
from recsys.sparse_adam import PROBE_LR
from recsys.tasks import TrainingTask, evaluate
from recsys.tracking import RunLogger

log = logging.getLogger(__name__)
TrainData = SplitReader | MixedReader  # one train split, or several sources mixed (data.mix)


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

    @property
    def stopped(self) -> bool:
        return self.bad_evals >= self.patience

    def progress(self) -> dict:
        """What a checkpoint keeps of it (`TrainingState.early_stopping`)."""
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def go_on_from(self, progress: dict) -> None:
        self.best, self.best_step = progress["best"], progress["best_step"]
        self.bad_evals = progress["bad_evals"]


@dataclass
class TrainingState:
    """Where training stands; checkpointed (as `to_dict`, key "fit"), so that a resumed run goes
    on exactly from there, and what `Trainer.fit` ends with."""

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
    early_stopping: dict = field(default_factory=dict)  # EarlyStopping.progress()
    source_batches: dict[str, int] = field(default_factory=dict)  # a mix's steps per source
    source_samples: dict[str, int] = field(default_factory=dict)  # and its rows, all ranks

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainingState:
        return cls(**saved)


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


class Throughput:
    """Training time (evaluations and checkpoints left out) and samples/s between log lines."""

    def __init__(self, state: TrainingState):
        self.state = state
        self.start()

    def start(self) -> None:
        self.tick = self.window_start = time.perf_counter()
        self.window_samples = 0

    def pause(self) -> None:
        self.state.train_seconds += time.perf_counter() - self.tick

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.start()

    def add(self, samples: int) -> None:
        self.state.samples += samples
        self.window_samples += samples

    def rate(self) -> float:
        """Samples/s since the last call (or the last start)."""
        now = time.perf_counter()
        rate = self.window_samples / (now - self.window_start)
        self.window_start, self.window_samples = now, 0
        return rate


class LossLog:
    """Every `log_every_steps`: the loss, learning rate and samples/s, to TensorBoard and the log
    (or the progress bar)."""

    def __init__(self, trainer: Trainer, state: TrainingState, total: int):
        cfg = trainer.cfg
        self.every, self.total, self.scalar = cfg.log_every_steps, total, trainer._scalar
        self.show_bar = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=state.steps, unit="step", dynamic_ncols=True,
                        disable=not self.show_bar)  # fmt: skip

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def record(self, state: TrainingState, loss: float, lr: float, rate: float) -> None:
        if not math.isfinite(loss):
            raise RecsysError(
                f"the training loss became {loss} at step {state.steps}: lower "
                "trainer.dense_optimizer.lr / trainer.sparse_optimizer.lr, or set "
                "trainer.grad_clip_norm"
            )
        state.final_loss = loss
        state.losses.append([state.steps, loss])
        self.scalar("train/loss", loss, state.steps)
        self.scalar("train/lr", lr, state.steps)
        self.scalar("train/samples_per_s", rate, state.steps)
        for name, batches in state.source_batches.items():  # a mix's realised proportions
            self.scalar(f"mix/{name}/proportion", batches / state.steps, state.steps)
        if self.show_bar:
            self.bar.set_postfix(epoch=state.epoch + 1, loss=f"{loss:.4f}", sps=f"{rate:,.0f}")
        else:
            log.info("epoch %d step %d/%d  loss %.4f  lr %.2e  %s samples/s", state.epoch + 1,
                     state.steps, self.total, loss, lr, f"{rate:,.0f}")  # fmt: skip


class Evaluation:
    """Validation every `eval_every_steps` and after each epoch; early stopping or the caller's
    callback decide whether training stops."""

    def __init__(
        self,
        trainer: Trainer,
        validation: Iterable[Batch] | SourceEvaluation | None,
        stopper: EarlyStopping | None,
        on_evaluation: Callable[[int, dict[str, float]], bool] | None,
    ):
        self.trainer, self.validation = trainer, validation
        self.stopper, self.on_evaluation = stopper, on_evaluation
        self.every = trainer.cfg.eval_every_steps

    def due(self, step: int) -> bool:
        return self.validation is not None and bool(self.every) and step % self.every == 0

    def due_at_epoch_end(self, state: TrainingState) -> bool:
        return self.validation is not None and state.last_eval_step != state.steps

    def run(self, state: TrainingState) -> bool:
        """Evaluate and record; True when training should stop."""
        trainer = self.trainer
        metrics = trainer.evaluate(self.validation)
        state.last_eval_step = state.steps
        state.evaluations.append({"step": state.steps, **metrics})
        for name, value in metrics.items():
            trainer._scalar(f"validation/{name}", value, state.steps)
        text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.info("validation at step %d: %s", state.steps, text)
        trainer.model.train()
        if self.on_evaluation is not None and self.on_evaluation(state.samples, metrics):
            log.info("stopping at step %d: the evaluation callback asked to", state.steps)
            state.stopped_by_callback = True
            return True
        stopper = self.stopper
        if stopper is None or not stopper.update(metrics[stopper.metric], state.steps):
            return False
        log.info("early stopping: validation %s has not improved for %d evaluations "
                 "(best %.4f at step %d)", stopper.metric, stopper.patience, stopper.best,
                 stopper.best_step)  # fmt: skip
        return True


class CheckpointPolicy:
    """When to checkpoint (every N steps or minutes, or after a signal), what a checkpoint holds,
    and stopping the run after a signal's checkpoint."""

    def __init__(self, trainer: Trainer, train: TrainData, stopper: EarlyStopping | None):
        self.trainer, self.train, self.stopper = trainer, train, stopper
        self.ck, self.cfg = trainer.checkpointing, trainer.cfg.checkpoint
        self.last_save = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.ck is not None and self.cfg.enabled

    def due(self, step: int) -> bool:
        """Whether to checkpoint now: every N steps or minutes, or a signal; agreed by all ranks."""
        if self.ck is None:
            return False
        c = self.cfg
        timed = bool(c.enabled and c.every_minutes)
        timed = timed and time.monotonic() - self.last_save >= c.every_minutes * 60
        signalled = self.ck.preemption.pending()
        if self.trainer.world_size > 1:  # rank 0's clock decides; a signal to any rank counts
            flags = torch.tensor([int(timed and dist.get_rank() == 0), int(signalled)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            timed, signalled = bool(flags[0]), bool(flags[1])
        if signalled:
            return True
        return timed or bool(c.enabled and c.every_steps and step % c.every_steps == 0)

    def save(self, state: TrainingState) -> None:
        """Checkpoint the run as it stands; after a signal, stop the run there."""
        ck, trainer, train = self.ck, self.trainer, self.train
        preempted = ck.preemption.received is not None and not state.finished
        stop = preempted or ck.preemption.outage is not None
        state.preemptions += int(preempted)
        if self.stopper is not None:
            state.early_stopping = self.stopper.progress()
        trainer_state = {"fit": state.to_dict(), "steps_per_epoch": len(train),
                         "dense_optimizer": trainer.dense_optimizer.state_dict()}  # fmt: skip
        rank_state = {
            "rng": rng_state(),
            "position": train.position.to_dict(),
            "sparse_adam": trainer.row_sparse and trainer.row_sparse.state_dict(),
            "quality": train.converter.quality.to_dict(),
        }
        started = time.perf_counter()
        path = checkpoint.save(ck.root, state.steps, trainer.model, trainer_state, rank_state,
                               ck.description, self.cfg.keep_last)  # fmt: skip
        self.last_save = time.monotonic()
        log.info("checkpoint %s written in %.1f s", path, time.perf_counter() - started)
        if stop:
            ck.preemption.stop(state.steps, state.preemptions, self.cfg.max_requeues,
                               str(ck.run_dir))  # fmt: skip


@dataclass
class _Run:
    """One call of `Trainer.fit`: its data, its state, and the policies around the step."""

    train: TrainData
    total: int  # steps of the whole run
    state: TrainingState
    log: LossLog
    evaluation: Evaluation
    checkpoints: CheckpointPolicy
    throughput: Throughput


class Trainer:
    """Trains a sharded model: dense parameters by `dense_optimizer`, tables fused in backward."""

    def __init__(
        self,
        model: nn.Module,
        dense_optimizer: torch.optim.Optimizer,
        cfg: TrainerConfig,
        task: TrainingTask,
        device: torch.device,
        writer: RunLogger | None,
        monitor: str,
        checkpointing: Checkpointing | None = None,
    ):
        self.model = model
        self.dense_optimizer = dense_optimizer
        self.fused_optimizer = getattr(model, "fused_optimizer", None)
        # on CPU, Adam of the tables runs after backward over the fused SGD's rows
        self.row_sparse = row_sparse_adam(
            model, device, cfg.sparse_optimizer, cfg.first_order_optimizer
        )
        self.cfg = cfg
        self.task = task
        self.device = device
        self.writer = writer
        self.monitor = monitor
        self.checkpointing = checkpointing
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self._optimizers()]
        self._dense_params = [p for g in dense_optimizer.param_groups for p in g["params"]]
        self.lr = self._base_lrs[0][0]

    def _optimizers(self) -> list:
        """The optimizers whose learning rates the schedule scales."""
        optimizers = (self.dense_optimizer, self.fused_optimizer, self.row_sparse)
        return [o for o in optimizers if o is not None]

    def _set_lr(self, step: int, total: int) -> None:
        """The learning rates of the schedule at a step."""
        factor = lr_factor(self.cfg.lr_schedule, step, total)
        for opt, bases in zip(self._optimizers(), self._base_lrs, strict=True):
            for group, base in zip(opt.param_groups, bases, strict=True):
                if base != PROBE_LR:  # the fused SGD under Adam keeps its rate
                    group["lr"] = base * factor
        if self.fused_optimizer is not None:
            self.fused_optimizer.step()  # hands the new lr to FBGEMM; the update ran in backward
        self.lr = self._base_lrs[0][0] * factor

    def _to_device(self, batch: Batch) -> Batch:
        return batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)

    def fit(
        self,
        train: TrainData,
        validation: Iterable[Batch] | SourceEvaluation | None,
        on_evaluation: Callable[[int, dict[str, float]], bool] | None = None,
        restored: Restored | None = None,
    ) -> TrainingState:
        """Train, from the start or from `restored`; `on_evaluation(rows trained on, metrics)`
        sees every validation and returns True to stop."""
        cfg = self.cfg
        total = cfg.max_epochs * len(train)
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        stopper = None
        if cfg.early_stopping.enabled and validation is not None:
            es = cfg.early_stopping
            stopper = EarlyStopping(self.monitor, es.patience, es.min_delta)
        state, position = self._resume(restored, train, stopper)
        stopped = state.stopped_early or state.stopped_by_callback
        state.finished = state.finished and (stopped or state.steps >= total)  # or go on
        run = _Run(train, total, state, LossLog(self, state, total),
                   Evaluation(self, validation, stopper, on_evaluation),
                   CheckpointPolicy(self, train, stopper), Throughput(state))  # fmt: skip
        self._set_lr(state.steps, total)
        done = state.finished
        stopped_in_evaluation = state.last_eval_step != state.steps and state.steps > 0
        if not done and stopped_in_evaluation and run.evaluation.due(state.steps):  # S3 went away
            done = self._reading(run, lambda: run.evaluation.run(state))
        while not done and state.epoch < cfg.max_epochs:
            done = self._epoch(run, position)
            position = None
        run.log.bar.close()
        state.stopped_early = bool(stopper and stopper.stopped)
        if not state.finished:
            state.finished = True
            if run.checkpoints.enabled:
                run.checkpoints.save(state)
        return state

    def _epoch(self, run: _Run, position: ReaderPosition | None) -> bool:
        """Train (the rest of) one epoch, then evaluate; True when training is done."""
        state, throughput = run.state, run.throughput
        self.model.train()
        throughput.start()
        state.epochs = state.epoch + 1
        done = state.steps >= run.total  # already: an outage stopped the last evaluation
        # none left when the checkpoint was taken at the epoch's last step
        if not done and state.epoch_batches < len(run.train):
            done = self._reading(run, lambda: self._steps(run, position))
        throughput.pause()
        if run.evaluation.due_at_epoch_end(state):
            done = self._reading(run, lambda: run.evaluation.run(state)) or done
        if state.epoch_batches >= len(run.train) and not done:
            state.epoch, state.epoch_batches = state.epoch + 1, 0
        return done

    def _steps(self, run: _Run, position: ReaderPosition | MixPosition | None) -> bool:
        """The epoch's batches from `position`, each a step; True when training is done."""
        for batch in run.train.iterate(run.state.epoch, position):
            if self._step_with_policies(run, batch):
                return True
        return False

    def _reading(self, run: _Run, work: Callable[[], bool]) -> bool:
        """`work()` (steps or an evaluation): a data file gone bad ends the run naming the
        checkpoint to resume from; S3 unavailable for longer than its budget checkpoints before
        the batch it could not read and stops as after a signal (exit 75)."""
        state = run.state
        try:
            return work()
        except DataError as e:
            raise DataError(f"{e}; {self._resume_hint(state, 'the data is fixed')}") from None
        except S3Unavailable as e:
            boundary = state.steps % self.cfg.grad_accumulation == 0 or state.steps >= run.total
            if self.checkpointing is None or not boundary:  # resume from the last checkpoint
                raise Preempted(f"{e}; {self._resume_hint(state, 'it answers')}") from None
            self.checkpointing.preemption.outage = str(e)
            run.checkpoints.save(state)
            raise  # not reached: save stops the run

    def _step_with_policies(self, run: _Run, batch: Batch) -> bool:
        """A step, then the logging, evaluation and checkpoint due after it; True when done."""
        state = run.state
        loss, boundary = self._step(self._to_device(batch), state, run.total, run.train.loss_weight)
        samples = batch.labels.shape[0] * self.world_size
        run.throughput.add(samples)
        if (source := run.train.source) is not None:
            state.source_batches[source] = state.source_batches.get(source, 0) + 1
            state.source_samples[source] = state.source_samples.get(source, 0) + samples
        if run.log.due(state.steps):
            loss_value = self._mean_over_ranks(loss.detach())
            run.log.record(state, loss_value, self.lr, run.throughput.rate())
        run.log.bar.update(1)
        done = False
        if run.evaluation.due(state.steps):
            with run.throughput.paused():
                done = run.evaluation.run(state)
        done = done or state.steps >= run.total
        if boundary and not done and run.checkpoints.due(state.steps):
            with run.throughput.paused():
                run.checkpoints.save(state)
        return done

    def _step(
        self, batch: Batch, state: TrainingState, total: int, weight: float = 1.0
    ) -> tuple[torch.Tensor, bool]:
        """One batch: loss (times its source's `weight`), backward, the tables' update, and at
        the end of an accumulation the dense optimizer's step and the next learning rate.
        Returns the loss and whether the dense parameters stepped."""
        loss = self.task.loss(self.model, batch)
        scaled = loss if weight == 1.0 else loss * weight
        (scaled / self.cfg.grad_accumulation).backward()
        if self.row_sparse is not None:
            self.row_sparse.step()
        state.steps += 1
        state.epoch_batches += 1
        state.first_step_at = state.first_step_at or time.time()
        boundary = state.steps % self.cfg.grad_accumulation == 0 or state.steps == total
        if boundary:
            if self.cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._dense_params, self.cfg.grad_clip_norm)
            self.dense_optimizer.step()
            self.dense_optimizer.zero_grad(set_to_none=True)
            self._set_lr(state.steps, total)
        return loss, boundary

    def _resume(
        self, restored: Restored | None, train: TrainData, stopper: EarlyStopping | None
    ) -> tuple[TrainingState, ReaderPosition | MixPosition | None]:
        """The state to go on from, and the data position within its epoch (None: its start)."""
        if restored is None:
            return TrainingState(), None
        saved = restored.trainer_state
        state = TrainingState.from_dict(saved["fit"])
        if stopper is not None and state.early_stopping:
            stopper.go_on_from(state.early_stopping)
        rank_state = restored.rank_state
        set_rng_state(rank_state["rng"])
        if restored.same_layout and self.row_sparse is not None:
            self.row_sparse.load_state_dict(rank_state["sparse_adam"])
        elif self.row_sparse is not None:
            log.warning("the tables' Adam moments restart: they are kept per rank layout")
        position = train.position.from_dict(rank_state["position"])
        if restored.same_layout and train.fits(position):
            train.converter.quality.add(DataQuality.from_dict(rank_state["quality"]))
            how = "exactly where it stopped"
        else:
            position = train.resume_position(position, saved["steps_per_epoch"])
            state.epoch_batches = position.skip
            how = (
                f"on {self.world_size} ranks x {train.workers} read_threads, where the "
                f"checkpoint had {restored.manifest['world_size']} ranks: weights, optimizers "
                "and step are restored; the epoch's data restarts and skips "
                f"{position.skip}/{len(train)} batches, so this run will not be identical to "
                "an uninterrupted one"
            )
        log.info("resuming from %s (step %d, epoch %d): %s", restored.path, state.steps,
                 state.epoch + 1, how)  # fmt: skip
        return state, position if state.epoch_batches else None

    def _resume_hint(self, state: TrainingState, when: str) -> str:
        """How a rerun goes on, `when` the cause is gone, after the run stopped at `state.steps`."""
        ck = self.checkpointing
        saved = checkpoint.candidates(ck.root, "auto") if ck is not None else []
        if not saved:
            return f"stopped at step {state.steps} with no checkpoint: a rerun starts over"
        return (
            f"stopped at step {state.steps}; checkpoint {saved[0]} is intact: once {when}, "
            f"run the same command with hydra.run.dir={ck.run_dir} to resume from it"
        )

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value.item()

    def evaluate(self, split: Iterable[Batch] | SourceEvaluation) -> dict[str, float]:
        """The task's metrics of the current weights over a whole split (each source's)."""
        if isinstance(split, SourceEvaluation):
            return split.evaluate(self.evaluate)
        return evaluate(self.model, self.task, map(self._to_device, split), self.device)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.scalar(tag, value, step)
