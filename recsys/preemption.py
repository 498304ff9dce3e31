"""Preemption: SIGUSR1/SIGUSR2 (SLURM's warning before a time-out or preemption) and SIGTERM ask
the run to checkpoint at the next step boundary and stop; under submitit, a USR signal then
requeues the job, which resumes from that checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import torch.distributed as dist

from recsys.errors import RecsysError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on purpose, resumable


class Preempted(RecsysError):
    """The run checkpointed after a signal (or an S3 outage) and stopped without being requeued."""


class Preemption:
    """While active, remembers the first of SIGNALS received instead of dying of it."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.outage: str | None = None  # S3 unavailable past its budget: stop as after a signal
        self._announced = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        # no logging here: a write from a handler can re-enter a stream the main thread is writing
        if self.received is None:
            self.received = signal.Signals(signum)

    def pending(self) -> bool:
        """Whether a signal came; said once, outside the handler, where logging is safe."""
        if self.received is not None and not self._announced:
            self._announced = True
            log.warning("%s received: checkpointing at the next step", self.received.name)
        return self.received is not None

    def stop(self, step: int, preemptions: int, max_requeues: int, run_dir: str) -> NoReturn:
        """After the checkpoint of `step`: have submitit requeue the job, or end the run."""
        again = f"run the same command with hydra.run.dir={run_dir} to resume from step {step}"
        if self.outage is not None:
            raise Preempted(f"checkpointed at step {step} and stopped: {self.outage}; "
                            f"once it answers, {again}")  # fmt: skip
        name = self.received.name if self.received else "a signal"
        if self.received in (signal.SIGUSR1, signal.SIGUSR2) and "SUBMITIT_EXECUTOR" in os.environ:
            if preemptions > max_requeues:
                raise Preempted(
                    f"checkpointed at step {step} after {name}; not requeued: the job was "
                    f"preempted {preemptions} times, more than trainer.checkpoint.max_requeues="
                    f"{max_requeues}: {again}"
                )
            self._requeue(step)
        raise Preempted(f"checkpointed at step {step} after {name} and stopped: {again}")

    def _requeue(self, step: int) -> NoReturn:
        """Hand over to submitit's own handler: rank 0 requeues the job, then all ranks exit."""
        from submitit import JobEnvironment

        submitit_signal = JobEnvironment._usr_sig()
        handler = self._previous.get(submitit_signal)
        log.info("checkpointed at step %d: requeueing the job", step)
        self.__exit__()
        if callable(handler):
            handler(submitit_signal, None)  # rank 0: requeues and exits; other ranks: returns
        if dist.is_initialized() and dist.get_world_size() > 1:
            with contextlib.suppress(RuntimeError):  # until rank 0's requeue ends this task
                dist.barrier()
        sys.exit(-1)  # what submitit's handler exits with after a requeue
