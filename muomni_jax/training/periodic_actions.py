"""The training loop and what it does every N steps (the shape of clu's periodic actions and of
Levanter's `add_hook(every=N)`).

`train_loop` runs the step, adds its metrics to the `Interval`, then calls each action whose
`every` divides the step, every action after the final step, and those with `on_stop` after the
step a signal stops the run at. Each action is a small object with its own state and can be
tested alone; what the actions of a run share (its plan, reporter, history, interval ...) is one
`RunContext`. To add one: write a class with `every`, `on_stop` and `__call__(step, state, last)`,
and put it in the list `train_actions.make_actions` builds; the order of that list is the order
actions run in within a step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import jax
import numpy as np

from muomni_jax.errors import UserError
from muomni_jax.model import lm_loss
from muomni_jax.parallel import partitioning
from muomni_jax.training import reporting, run_plan, training_log
from muomni_jax.training import steps as steps_lib


class PeriodicAction(Protocol):
    every: int  # Runs after each step divisible by it, and after the final step.
    on_stop: bool  # Also runs after the step a signal stopped the run at.

    def __call__(self, step: int, state: steps_lib.TrainState, last: bool) -> None:
        """last: the run ends after this step (its final step, or a signal asked to stop)."""


@dataclasses.dataclass
class Interval:
    """The summed step metrics since the last log line (on the devices) and the time they took.

    A resumed run starts from the sums its checkpoint saved mid-interval, so logged losses after
    a resume equal those of an uninterrupted run.
    """

    sums: dict[str, jax.Array] | None = None
    steps: int = 0
    start: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def resumed(cls, saved: Mapping[str, Any] | None, mesh) -> Interval:
        """From a checkpoint's host sums, replicated like the step's metrics: multi-process runs
        add global arrays to global arrays."""
        if saved is None:
            return cls()
        return cls(
            sums={
                k: jax.device_put(
                    np.asarray(v, np.int32 if isinstance(v, int) else np.float32),
                    partitioning.replicated(mesh),
                )
                for k, v in saved.items()
            }
        )

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.sums = steps_lib.add_metrics(self.sums, metrics)
        self.steps += 1

    def host_sums(self) -> dict[str, Any] | None:
        return None if self.sums is None else jax.device_get(self.sums)

    def restart(self) -> None:
        self.sums, self.steps, self.start = None, 0, time.time()


@dataclasses.dataclass
class LastSaved:
    """The step of the newest checkpoint this run saved (or resumed from)."""

    step: int = 0


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the periodic actions of one run share. A length fitted mid-run gives a new plan and
    so a new context (with_context); the parts that change as the run goes (interval, history,
    summary, last_saved) are shared objects that carry over."""

    plan: run_plan.RunPlan
    schedule: Callable[[int], Any]  # The learning rate of each update (the plan's schedule).
    interval: Interval
    history: training_log.TrainingLog
    reporter: reporting.Reporter
    summary: dict[str, float]  # What train_and_evaluate returns: the last metrics.
    last_saved: LastSaved

    @property
    def total_steps(self) -> int:
        return self.plan.length.total_steps


def with_context(actions: list[PeriodicAction], context: RunContext) -> list[PeriodicAction]:
    """The same actions, each with its own state kept, reading a new context."""
    return [
        dataclasses.replace(action, context=context) if hasattr(action, 'context') else action
        for action in actions
    ]


def train_loop(
    state: steps_lib.TrainState,
    steps: range,
    batches: Iterable[Any],
    train_step: Callable,
    interval: Interval,
    actions: list[PeriodicAction],
    should_stop: Callable[[int], bool] = lambda step: False,
    final_step: int | None = None,
    hold_last_actions: bool = False,
) -> tuple[steps_lib.TrainState, bool]:
    """Runs train_step on each batch for the given step numbers (each the step count after it).

    final_step is the run's final step (default: the last of `steps`; a loop may be one phase of
    a run). hold_last_actions: the actions of the last of `steps` are left to the caller
    (run_actions), which measures something first (schedule_fit). Returns the last state and
    whether should_stop asked to end the run.
    """
    final_step = steps[-1] if final_step is None and len(steps) else final_step
    for step, batch in zip(steps, batches):
        state, metrics = train_step(state, batch)
        interval.add(metrics)
        stop = should_stop(step)
        if hold_last_actions and step == steps[-1]:
            return state, stop
        run_actions(actions, step, state, final=step == final_step, stop=stop)
        if stop:
            return state, True
    return state, False


def run_actions(
    actions: list[PeriodicAction],
    step: int,
    state: steps_lib.TrainState,
    *,
    final: bool,
    stop: bool,
) -> None:
    """The actions due after `step`, in order."""
    for action in actions:
        if step % action.every == 0 or final or (stop and action.on_stop):
            action(step, state, final or stop)


def check_nonfinite_limit(
    m: Mapping[str, Any], max_consecutive_nonfinite: int, last_saved: int
) -> None:
    """Stops the run once max_consecutive_nonfinite steps in a row were NaN/Inf (host metrics)."""
    limit_step = int(m['nonfinite_limit_step'])
    if limit_step != steps_lib.NO_STEP:
        first = limit_step - max_consecutive_nonfinite + 1
        raise UserError(
            f'steps {first}-{limit_step} all had NaN/Inf loss or gradients '
            f'(max_consecutive_nonfinite={max_consecutive_nonfinite}); they were skipped '
            f'and nothing after them was saved (newest checkpoint: step {last_saved}): lower '
            'learning_rate, check the data, or raise max_consecutive_nonfinite'
        )


@dataclasses.dataclass
class Progress:
    """Advances the progress bar and starts or stops the profile (reporting.Reporter)."""

    context: RunContext
    every: int = 1
    on_stop: bool = False

    def __call__(self, step, state, last):
        del last
        self.context.reporter.advance(step, state)


@dataclasses.dataclass
class FirstStepTime:
    """After the first step of a launch: one line with its time from the loop's start, the
    batch, the compilation (or the compilation cache's load) and the step itself. It waits for
    that one step; later steps pass straight through."""

    context: RunContext
    start: float = dataclasses.field(default_factory=time.time)
    every: int = 1
    on_stop: bool = False
    done: bool = False

    def __call__(self, step, state, last):
        del step, last
        if self.done:
            return
        self.done = True
        jax.block_until_ready(state.step)
        self.context.reporter.log(
            f'First step: {time.time() - self.start:.1f} s (compilation included)'
        )


# A host shared with other work changes speed with its load; a CPU peak older than this is
# measured again at the next log line, so the MFU follows (at a cost under 1% of the time).
PEAK_EVERY_S = 60.0


@dataclasses.dataclass
class LogMetrics:
    """Every log_every steps: one console line, a training_log record and TensorBoard scalars."""

    context: RunContext
    flops_per_step: float = 0.0
    peak_flops: float | None = None  # None: MFU not logged.
    # Measures peak_flops again (CPU), at a log line at most every PEAK_EVERY_S seconds; its
    # time (about 0.6 s) is kept out of the interval's.
    measure_peak: Callable[[], float] | None = None
    peak_measured_at: float = dataclasses.field(default_factory=time.time)
    # step -> {source name: epochs drawn} of a mixture, logged as epochs/<name>; None: one source.
    source_epochs: Callable[[int], dict[str, float]] | None = None
    run_start: float = dataclasses.field(default_factory=time.time)
    on_stop: bool = False

    @property
    def every(self) -> int:
        return self.context.plan.output.log_every

    def __call__(self, step, state, last):
        del state, last
        context, plan = self.context, self.context.plan
        m = context.interval.host_sums()
        check_nonfinite_limit(m, plan.step.max_consecutive_nonfinite, context.last_saved.step)
        elapsed = time.time() - context.interval.start
        steps = context.interval.steps
        tokens_per_step = plan.step.batch_size * plan.data.ctx_len
        record = interval_record(
            m,
            (step - 1) // plan.length.steps_per_epoch,
            tokens_per_step * steps / elapsed,
            float(context.schedule(step - 1)),
            time.time() - self.run_start,
        )
        record['tokens'] = step * tokens_per_step  # Seen so far: plots against data.
        context.summary.clear()
        context.summary.update(loss=record['loss'], ppl=record['ppl'])
        mfu = ''
        if self.measure_peak is not None and time.time() - self.peak_measured_at >= PEAK_EVERY_S:
            self.peak_flops, self.peak_measured_at = self.measure_peak(), time.time()
        if self.peak_flops:
            record['mfu'] = self.flops_per_step * steps / elapsed / self.peak_flops
            mfu = f' | MFU {100 * record["mfu"]:.1f}% of {_flops(self.peak_flops)}'
        epochs = ''
        if self.source_epochs:
            drawn = self.source_epochs(step)
            record.update({f'epochs/{name}': value for name, value in drawn.items()})
            epochs = ' | epochs ' + ' '.join(f'{name} {n:.3g}' for name, n in drawn.items())
        context.history.add(step, **record)
        context.reporter.write_scalars(step, record)
        skipped = (
            f' | {record["nonfinite_steps"]} non-finite steps skipped'
            if record['nonfinite_steps']
            else ''
        )
        context.reporter.log(
            f'[Step {step}/{context.total_steps}] loss={record["loss"]:.3f} '
            f'ppl={record["ppl"]:.1f} lr={record["lr"]:.5f} | '
            f'{elapsed / steps:.2f}s/step | '
            f'{record["tokens_per_s"]:,.0f} tok/s{mfu}{epochs}{skipped}'
        )
        context.interval.restart()


def _flops(per_second: float) -> str:
    """'0.195 TFLOP/s', '989 TFLOP/s', '52.1 GFLOP/s'."""
    if per_second >= 1e11:
        return f'{per_second / 1e12:.3g} TFLOP/s'
    return f'{per_second / 1e9:.3g} GFLOP/s'


def interval_record(
    m: Mapping[str, Any], epoch: int, tokens_per_s: float, lr: float, elapsed_s: float
) -> dict[str, Any]:
    """A training_log record from the summed metrics of one log interval (host values)."""
    loss = float(m['loss_sum']) / max(float(m['weight_sum']), 1.0)
    finite_steps = max(int(m['steps']) - int(m['nonfinite']), 1)
    record = dict(
        epoch=epoch + 1,
        loss=loss,
        ppl=lm_loss.perplexity(loss),
        lr=lr,
        grad_norm=float(m['grad_norm']) / finite_steps,
        tokens_per_s=tokens_per_s,
        elapsed_s=elapsed_s,
        nonfinite_steps=int(m['nonfinite']),
    )
    if 'z_sum' in m:  # z_loss_weight > 0: the mean logsumexp^2 (its loss is weight x this).
        record['z_loss'] = float(m['z_sum']) / max(float(m['weight_sum']), 1.0)
    return record


@dataclasses.dataclass
class Evaluate:
    """Every eval_every steps: validation loss, then sample lines; its time is not training time."""

    context: RunContext
    # params -> {'val_loss', 'val_ppl', and a mixture's 'val/<name>/loss' and /ppl} or {}.
    evaluate: Callable[[Any], dict[str, float]]
    sampler: Callable[[Any], list[str]] | None  # params -> lines, or None: no samples.
    on_stop: bool = False

    @property
    def every(self) -> int:
        return self.context.plan.output.eval_every

    def __call__(self, step, state, last):
        del last
        context = self.context
        eval_start = time.time()
        val = self.evaluate(state.params)
        average = getattr(state, 'ema_params', None)
        if val and average is not None:
            # The raw params keep val_loss, comparable with runs without an average.
            ema = self.evaluate(average)
            val.update(val_ema_loss=ema['val_loss'], val_ema_ppl=ema['val_ppl'])
        if val:
            context.summary.update(val)
            context.history.add(step, **val)
            context.reporter.write_scalars(step, val)
            prefix = 'Final validation' if step == context.total_steps else 'Validation'
            names = [
                key.split('/')[1] for key in val if key.startswith('val/') and key.endswith('/loss')
            ]
            per_source = ''.join(
                f' | {name} loss={val[f"val/{name}/loss"]:.3f} ppl={val[f"val/{name}/ppl"]:.1f}'
                for name in names
            )
            ema_line = (
                f' | EMA loss={val["val_ema_loss"]:.3f} ppl={val["val_ema_ppl"]:.1f}'
                if 'val_ema_loss' in val
                else ''
            )
            context.reporter.log(
                f'→ {prefix}: loss={val["val_loss"]:.3f} '
                f'ppl={val["val_ppl"]:.1f}'
                f'{" (weighted)" if names else ""}{per_source}{ema_line}'
            )
        if self.sampler:  # Every process joins: the params may span them all.
            # The samples are of the model load() gives: the average where there is one.
            samples = self.sampler(state.params if average is None else average)
            for line in samples:
                context.reporter.log(line)
            context.reporter.write_texts(
                step, {f'samples/{i}': line.strip() for i, line in enumerate(samples)}
            )
        # Validation time is not training time: keep it out of s/step and tokens/s.
        context.interval.start += time.time() - eval_start


@dataclasses.dataclass
class WriteHistory:
    """Rewrites training_log.json when a record changed. Runs before SaveCheckpoint, so a
    checkpoint is never ahead of the log it resumes."""

    context: RunContext
    enabled: bool  # Process 0 only.
    every: int = 1
    on_stop: bool = True

    def __call__(self, step, state, last):
        del step, state, last
        if self.enabled and self.context.history.unwritten:
            self.context.history.write()


@dataclasses.dataclass
class SaveCheckpoint:
    """Every save_every steps (and on the last): the state, the data position and the metric sums
    of an interval the checkpoint cuts."""

    context: RunContext
    checkpointer: Any  # checkpointing.Checkpointer, writable.
    on_stop: bool = True

    @property
    def every(self) -> int:
        return self.context.plan.output.save_every

    def __call__(self, step, state, last):
        plan, last_saved = self.context.plan, self.context.last_saved
        interval = self.context.interval.host_sums()
        if interval is not None:
            check_nonfinite_limit(interval, plan.step.max_consecutive_nonfinite, last_saved.step)
        if not bool(steps_lib.all_finite(state.params)):
            raise UserError(
                f'the params became NaN/Inf at step {step}, so it was not '
                f'saved (newest checkpoint: step {last_saved.step}): lower '
                'learning_rate or max_grad_norm'
            )
        steps_per_epoch = plan.length.steps_per_epoch
        self.checkpointer.save(
            step,
            state,
            {
                'step': step,
                'epoch': step // steps_per_epoch,
                'step_in_epoch': step % steps_per_epoch,
                'steps_per_epoch': steps_per_epoch,
                # A resume with another mixture is refused.
                'mixture': plan.data.mixture_record,
                # A length fitted to schedule_seconds is kept: a resume never measures it again.
                'schedule_steps': plan.length.total_steps if plan.length.fitted else None,
                'interval_metrics': None
                if interval is None
                else {k: v.item() for k, v in interval.items()},
            },
        )
        last_saved.step = step
        if last:  # A stopped run must not exit before its save is on disk.
            self.checkpointer.wait()
        self.context.reporter.log(
            f'✓ Saved checkpoint: step {step} ({os.path.join(plan.output.save_dir, str(step))})'
        )
