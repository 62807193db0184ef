"""schedule_seconds: the run's length fitted to a time budget, so its schedule decays in time.

A run given only a time budget would otherwise never decay: its cosine or WSD is laid over the
steps of max_steps or num_epochs, which it never reaches. Here the first launch times
MEASURED_STEPS steps after its first (which compiles), then fixes the run's total steps so the
whole run, validations included, ends at schedule_seconds of training time:

  total = fit_step + floor((schedule_seconds - elapsed - compile) / (step_s * (1 + validation)))

where elapsed is the training time so far, compile the first step's time (the step is compiled
again for the fitted schedule) and validation the share of eval batches, each a forward pass
(a third of a training step), in the steps. The total never exceeds the steps of max_steps or
num_epochs. It is recorded in every checkpoint after the fit, and a resumed run takes it from
there: a length that depends on timing is never measured again, so resume stays bitwise.

The steps before the fit ran with the provisional schedule. They lie within warmup (cosine;
run_plan.resolve asks for warmup_steps >= 3) or before the decay (WSD), where both schedules give
the same rates, so the run is exactly the run that knew its length from the start. The fit is a
measurement between two phases of the loop (train.py): it gives a new plan (run_plan.
with_total_steps), and the second phase runs with it.
max_train_seconds stays the limit of one launch (a SLURM-style chunk): a run of
schedule_seconds=3600 launched with max_train_seconds=1200 saves and stops three times, and the
third launch ends at the fitted step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax

from muomni_jax.parallel import distributed
from muomni_jax.training import periodic_actions, run_plan, steps

MEASURED_STEPS = 10  # Steps timed after a launch's first, before the length is fixed.
# A validation batch is a forward pass: about a third of a training step's FLOPs.
EVAL_BATCH_PER_STEP = 1 / 3


def now() -> float:
    """The fit's clock, in seconds."""
    return time.monotonic()


def fit_step(optimizer: run_plan.OptimizerPlan, start_step: int, upper_steps: int) -> int:
    """The step after which the length is fixed: MEASURED_STEPS timed steps after this launch's
    first; for cosine at most the last warmup step (past it the rate depends on the length)."""
    step = start_step + 1 + MEASURED_STEPS
    if optimizer.lr_schedule == 'cosine':
        step = min(step, max(optimizer.warmup_steps, start_step + 2))
    return min(step, upper_steps)


def fitted_total_steps(
    *,
    budget_s: float,
    elapsed_s: float,
    compile_s: float,
    step_s: float,
    done_steps: int,
    upper_steps: int,
    eval_every: int,
    eval_batches: int,
) -> int:
    """The run's total steps: as many as fit in what is left of budget_s, validations included,
    between done_steps and upper_steps."""
    validation = eval_batches * EVAL_BATCH_PER_STEP / eval_every
    left = budget_s - elapsed_s - compile_s
    more = math.floor(left / (step_s * (1 + validation))) if step_s > 0 else upper_steps
    return int(min(upper_steps, done_steps + max(more, 0)))


@dataclasses.dataclass
class ScheduleFit:
    """Times this launch's steps up to fit_at, then fits the run's length (fitted_length).

    As a periodic action, first in the step's order, it notes when the launch's first step
    (which compiles) ends; the loop stops after fit_at, before that step's actions, and the
    trainer calls fitted_length. Its clock is injectable, so tests fit on a fake one."""

    budget_s: float
    start_step: int  # The step this launch started from (earlier launches' steps count too).
    fit_at: int
    upper_steps: int
    eval_every: int
    eval_batches: int  # Validation batches per validation, over every source.
    clock: Callable[[], float] | None = None  # Default: now() (tests patch it).
    every: int = 1
    on_stop: bool = False

    def __post_init__(self):
        self.clock = self.clock or now
        self._loop_start = self.clock()
        self._first_done = None

    def __call__(self, step: int, state: Any, last: bool) -> None:
        del last
        if self._first_done is None and step == self.start_step + 1:
            jax.block_until_ready(state.step)  # The device's time, not the host's dispatch.
            self._first_done = self.clock()

    def fitted_length(self, state: Any) -> tuple[int, str]:
        """After step fit_at: (the run's total steps, the line that says so). Every process
        gets process 0's length."""
        jax.block_until_ready(state.step)
        now_s = self.clock()
        if self._first_done is None:  # fit_at is the launch's first step.
            self._first_done = now_s
        step = self.fit_at
        timed = step - self.start_step - 1
        compile_s = self._first_done - self._loop_start
        step_s = (now_s - self._first_done) / timed if timed else compile_s
        total = fitted_total_steps(
            budget_s=self.budget_s,
            elapsed_s=now_s - self._loop_start + self.start_step * step_s,
            compile_s=compile_s,
            step_s=step_s,
            done_steps=step,
            upper_steps=self.upper_steps,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
        )
        total = distributed.allgather_json(total)[0]  # Every process ends at the same step.
        end = (
            'the data or max_steps ends first'
            if total == self.upper_steps
            else 'the decay ends at the budget'
        )
        return total, (
            f'Schedule fitted to schedule_seconds={self.budget_s:g}: '
            f'{step_s:.3f} s/step over steps {self.start_step + 2}-{step}, '
            f'{compile_s:.1f} s to compile -> {total} steps ({end}).'
        )


def for_plan(plan: run_plan.RunPlan, data: Any, start_step: int) -> ScheduleFit | None:
    """The measurement that fixes the run's length (schedule_seconds); None when the length is
    already fixed, or not fitted to time. data: the run's host_data.HostData."""
    length = plan.length
    if not length.schedule_seconds or length.fitted or start_step >= length.total_steps:
        return None
    return ScheduleFit(
        budget_s=length.schedule_seconds,
        start_step=start_step,
        fit_at=fit_step(plan.optimizer, start_step, length.total_steps),
        upper_steps=length.total_steps,
        eval_every=plan.output.eval_every,
        # Each validation reads every source's eval_batches (host_data agreed on them).
        eval_batches=sum(source.eval_batches for source in data.sources),
    )


def train_through_fit(state, fit, batches, setup, context, actions, should_stop, mesh):
    """The first phase of a run fitted to schedule_seconds: the steps before fit.fit_at, step
    fit_at, the fit (a new plan, schedule and actions), then step fit_at's actions under the
    fitted length.

    Returns (state, stopped, setup, context, actions), the last three for the fitted plan.
    """
    state, stopped = periodic_actions.train_loop(
        state,
        range(fit.start_step + 1, fit.fit_at),
        batches,
        setup.train_step,
        context.interval,
        [fit] + actions,
        should_stop,
        final_step=context.plan.length.total_steps,
    )
    if stopped:
        return state, stopped, setup, context, actions
    state, stopped = periodic_actions.train_loop(
        state,
        range(fit.fit_at, fit.fit_at + 1),
        batches,
        setup.train_step,
        context.interval,
        actions,
        should_stop,
        hold_last_actions=True,
    )
    total, line = fit.fitted_length(state)
    plan = run_plan.with_total_steps(context.plan, total)
    setup = steps.with_length(setup, plan, mesh)
    context = dataclasses.replace(context, plan=plan, schedule=setup.schedule)
    actions = periodic_actions.with_context(actions, context)
    context.reporter.set_total_steps(total)
    context.reporter.log(line)
    periodic_actions.run_actions(
        actions, fit.fit_at, state, final=fit.fit_at == total, stop=stopped
    )
    return state, stopped, setup, context, actions
