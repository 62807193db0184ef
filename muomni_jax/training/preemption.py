"""Stopping a run cleanly on SIGTERM, Ctrl-C or a time budget, at a step every process agrees on.

The first SIGTERM (what a preempted TPU VM or a scheduler sends) or Ctrl-C only sets a flag; the
training loop reads it at the next step boundary, saves a checkpoint and returns. A second signal
raises KeyboardInterrupt at once, without saving.

On a multi-process run a signal may reach only some processes, or reach them at different steps,
yet every process must save the same step or the save hangs. `StopSignals.should_stop(step)` makes
that decision collectively:
  - SIGTERM goes to JAX's preemption service (started by jax.distributed.initialize), which picks a
    step all processes reach; `reached_preemption_sync_point` is checked at every step, locally,
    without a collective. So a preemption stops the run within a step or two.
  - Ctrl-C, and SIGTERM when JAX's preemption service is off, set a local flag that the processes
    share by an allgather every `sync_every` steps (the training loop passes log_every, where it
    already waits for the devices). The stop then lags the signal by up to sync_every steps.
A single-process run checks its flag at every step, with no collective at all.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def _jax_preemption_service_running() -> bool:
    # jax.distributed.initialize starts the service unless jax_enable_preemption_service is off.
    return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


class StopSignals:
    """A context manager that owns SIGTERM and SIGINT for the duration of a training run.

    Handlers are installed on entry and the previous ones restored on exit. Outside the main thread
    (where Python cannot install handlers) it installs nothing and never asks to stop.
    """

    def __init__(self, sync_every: int):
        self.sync_every = sync_every
        self.received: str | None = None  # Name of the first signal this process received.
        self._previous: dict[int, Any] = {}
        self._multiprocess = jax.process_count() > 1
        self._jax_handles_sigterm = self._multiprocess and _jax_preemption_service_running()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        # JAX's preemption service has its own SIGTERM notifier; replacing it would blind it.
        signals = [signal.SIGINT] if self._jax_handles_sigterm else [signal.SIGINT, signal.SIGTERM]
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt(f'second signal ({name}): aborted without saving')
        self.received = name
        print(
            f'\n{name} received: finishing this step and saving a checkpoint '
            '(send it again to abort without saving)...',
            flush=True,
        )

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; all processes get the same answer at each step.

        Every process must call this after every step, with the same step numbers.
        """
        if not self._multiprocess:
            return self.received is not None
        if self._jax_handles_sigterm and multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or 'SIGTERM'
            return True
        if step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        if np.any(flags) and self.received is None:
            self.received = 'a signal on another process'
        return bool(np.any(flags))


class TimeBudget:
    """Stops training before max_train_seconds of it have passed (0: no budget).

    The clock starts when the loop does (the first step's compile counts). After each step it
    waits for that step's metrics, so the time is what the devices did, not how far ahead the
    host dispatched, and stops when one more step as long as the last would cross the budget.
    At least one step always runs. Every process gets the same answer: with several processes
    the decision is allgathered after each step.
    """

    def __init__(
        self,
        seconds: float,
        wait_for: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.seconds = seconds
        self._wait_for = wait_for  # () -> device values the last step produced.
        self._clock = clock  # Seconds; tests pass a fake one.
        self._start = self._last = clock()

    def should_stop(self, step: int) -> bool:
        del step
        if not self.seconds:
            return False
        jax.block_until_ready(self._wait_for())
        now = self._clock()
        last_step, self._last = now - self._last, now
        stop = now - self._start + last_step > self.seconds
        if jax.process_count() > 1:
            stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
        return stop
