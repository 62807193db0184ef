"""Stage A: pretrain the Thinker by next-token prediction (the shape of Flax's lm1b train.py).

`train_and_evaluate(config)` reads top-down: it plans the run (run_plan.resolve checks the
config), checks the devices, and under save_dir's lock loads the data, creates or restores the
state (steps.py: the pure steps, jitted over the mesh) and runs periodic_actions.train_loop with
the logging, evaluation, checkpoint and profile actions (train_actions.py). The launcher and a
notebook call the same function.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

from muomni_jax.data import host_data, tokenizer_setup
from muomni_jax.io import run_dir, storage
from muomni_jax.parallel import distributed, partitioning
from muomni_jax.training import (
    checkpointing,
    compilation_cache,
    config_checks,
    console,
    device_batches,
    periodic_actions,
    preemption,
    reporting,
    run_plan,
    sample_prompts,
    save_dir_lock,
    schedule_fit,
    steps,
    tokenizing_progress,
    train_actions,
)


def train_and_evaluate(config, devices: list[jax.Device] | None = None) -> dict[str, float]:
    """Runs Stage A as configured; resumes from save_dir if it holds checkpoints.

    Args:
      config: a configs/tiny.py-style ConfigDict.
      devices: the devices to train on; default all. A multi-process run (after
        distributed.initialize, which the launcher calls) must use all of them.
    Returns the final train and validation metrics.
    """
    start_time = time.time()
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    # The checks that need only the config and devices run before save_dir's lock is taken,
    # and a check that fails on one host stops them all.
    with distributed.fail_together():
        plan = run_plan.resolve(config)
        mesh = _checked_mesh(plan, devices)
    with save_dir_lock.locked(plan.output.save_dir, is_main, log):
        summary, stopped_by = _set_up_and_train(plan, mesh, is_main, log)
    if stopped_by:
        return summary
    log(f'Training complete! Time: {console.format_duration(time.time() - start_time)}')
    if 'val_ppl' in summary:
        log(f'Final validation PPL: {summary["val_ppl"]:.2f}')
    return summary


# Set-up

# The stopped_by of a run whose save_dir already holds the plan's last step.
ALREADY_COMPLETE = 'already complete'


def _checked_mesh(plan: run_plan.RunPlan, devices) -> jax.sharding.Mesh:
    """The mesh, once save_dir is writable and the devices can run the plan (none of these
    checks reads save_dir, whose lock is not yet held)."""
    storage.check_writable(plan.output.save_dir)
    mesh = partitioning.make_mesh(plan.mesh, devices)
    config_checks.check_platform(plan.model, mesh.devices.flat[0].platform)
    partitioning.check_batch_size(plan.step.batch_size, mesh, plan.step.gradient_accumulation_steps)
    return mesh


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where the loop starts: a fresh state at step 0, or a checkpoint's."""

    plan: run_plan.RunPlan  # With a length recorded by the checkpoint, where one was fitted.
    setup: steps.TrainSetup
    state: steps.TrainState
    step: int
    saved_interval: dict | None  # The metric sums of a log interval the checkpoint cut.


def _set_up_and_train(
    plan: run_plan.RunPlan, mesh, is_main: bool, log
) -> tuple[dict[str, float], str | None]:
    """Everything that reads or writes save_dir, under its lock: (summary, stopped_by)."""
    save_dir = plan.output.save_dir
    with distributed.fail_together():
        config_checks.check_same_model(plan.model, plan.optimizer.optimizer, save_dir)
    compile_cache = compilation_cache.enable(  # Before the first compilation.
        plan.output.compilation_cache, plan.output.compilation_cache_dir
    )

    log(f'Loading data from {plan.data.describe()}...')
    tokenizer = tokenizer_setup.shared_tokenizer(plan.data, save_dir)
    log(f'Vocab size: {tokenizer.vocab_size}')
    sampler = sample_prompts.training_sampler(
        plan.output.sample_prompts, plan.output.sample_max_new_tokens, plan.model, tokenizer
    )
    data = host_data.load(plan.data, tokenizer, log, tokenizing_progress.on_main(is_main))
    console.log_totals(data, log)
    plan = run_plan.with_steps_per_epoch(plan, data.steps_per_epoch)

    # Model and optimizer state, laid out on the mesh; made only when there is nothing to restore.
    setup = steps.make_train_setup(plan, mesh, initialize=False)
    console.log_layout(plan, setup, mesh, log)
    log(f'Compilation cache: {compile_cache or "off"}')
    checkpointer = checkpointing.Checkpointer(save_dir, max_to_keep=plan.output.max_to_keep)
    start = _restore_or_init(plan, setup, mesh, checkpointer, log)
    if is_main:
        tokenizer_setup.keep_in_save_dir(save_dir, tokenizer)
        run_dir.write_config(save_dir, plan.config_fields)
    checkpointer.start_writing(start.step)
    if start.step >= start.plan.length.total_steps:
        checkpointer.close()
        log(console.nothing_to_train(start.plan, start.step))
        return {}, ALREADY_COMPLETE
    for line in console.unreachable_requests(start.plan, start.step):
        log(line)
    return _train(start, mesh, data, sampler, checkpointer, is_main, log)


def _restore_or_init(
    plan: run_plan.RunPlan,
    setup: steps.TrainSetup,
    mesh,
    checkpointer: checkpointing.Checkpointer,
    log,
) -> _Start:
    restored = checkpointer.restore_latest(setup.abstract_state, plan.output.restore_step)
    if restored is None:
        return _Start(plan, setup, setup.init(jax.random.PRNGKey(plan.step.seed)), 0, None)
    state, meta = restored
    start_step = int(meta['step'])
    recorded = meta.get('schedule_steps')
    if recorded and plan.length.schedule_seconds:
        plan = run_plan.with_total_steps(plan, int(recorded))
        setup = steps.with_length(setup, plan, mesh)
        log(f'Schedule: {recorded} steps, as fitted to schedule_seconds when this run began.')
    checkpointing.check_resumable(
        meta, checkpointer.directory, plan.data.mixture_record, plan.length.steps_per_epoch
    )
    log(f'Resuming from checkpoint step {start_step} (epoch {meta["epoch"] + 1}).')
    return _Start(plan, setup, state, start_step, meta.get('interval_metrics'))


# The loop


def _train(
    start: _Start,
    mesh,
    data: host_data.HostData,
    sampler,
    checkpointer: checkpointing.Checkpointer,
    is_main: bool,
    log,
) -> tuple[dict[str, float], str | None]:
    """Trains from start.step to the plan's total steps, or until a signal asks to stop; closes
    the checkpointer (waiting for its last save) even when training fails.

    Returns the final metrics and the name of the signal that stopped the run (None when it ran
    to the end).
    """
    plan, output = start.plan, start.plan.output
    model_flops = train_actions.model_flops(plan, mesh, log)
    reporter = reporting.Reporter(
        output.save_dir,
        total_steps=plan.length.total_steps,
        start_step=start.step,
        enabled=is_main,
        profile_steps=output.profile_steps,
        wandb_project=output.wandb_project,
        run_config=dict(plan.config_fields),
    )
    try:
        context = train_actions.make_context(
            plan,
            start.setup,
            reporter,
            mesh,
            start_step=start.step,
            saved_interval=start.saved_interval,
            is_main=is_main,
        )
        actions = train_actions.make_actions(
            context,
            data=data,
            eval_step=start.setup.eval_step,
            mesh=mesh,
            checkpointer=checkpointer,
            sampler=sampler,
            model_flops=model_flops,
            is_main=is_main,
        )
        return _loop(start, context, actions, data, mesh)
    except OSError as e:
        # A write of save_dir's log or history (a failed checkpoint raises its own line).
        if storage.is_url(output.save_dir) or not (
            e.filename and os.path.abspath(e.filename).startswith(os.path.abspath(output.save_dir))
        ):
            raise
        checkpointer.wait()  # A save that failed before it (a full disk) is the news.
        raise checkpointing.write_failed(
            e.filename, output.save_dir, e, checkpointer.newest_intact
        ) from e
    finally:
        reporter.close()
        checkpointer.close()


def _loop(
    start: _Start,
    context: periodic_actions.RunContext,
    actions: list[Any],
    data: host_data.HostData,
    mesh,
) -> tuple[dict[str, float], str | None]:
    """The loop, in two phases where the length is fitted to schedule_seconds: the steps up to
    the fit, the measurement (a new plan), then the rest."""
    plan, setup, state, reporter = start.plan, start.setup, start.state, context.reporter
    reporter.log('Starting training...')
    budget = preemption.TimeBudget(
        plan.length.max_train_seconds, wait_for=lambda: context.interval.sums
    )
    fit = schedule_fit.for_plan(plan, data, start.step)
    batches = device_batches.train_batches(
        data,
        mesh,
        seed=plan.step.seed,
        num_epochs=plan.length.num_epochs,
        start_step=start.step,
        log=reporter.log,
    )
    with preemption.StopSignals(sync_every=plan.output.log_every) as signals:
        should_stop = lambda step: signals.should_stop(step) or budget.should_stop(step)
        first, stopped = start.step + 1, False
        if fit is not None:
            state, stopped, setup, context, actions = schedule_fit.train_through_fit(
                state, fit, batches, setup, context, actions, should_stop, mesh
            )
            plan, first = context.plan, fit.fit_at + 1
        if not stopped:
            state, stopped = periodic_actions.train_loop(
                state,
                range(first, plan.length.total_steps + 1),
                batches,
                setup.train_step,
                context.interval,
                actions,
                should_stop,
                final_step=plan.length.total_steps,
            )
    if not stopped:
        return context.summary, None
    reason = signals.received or (
        f'the time budget (max_train_seconds={plan.length.max_train_seconds:g})'
    )
    reporter.log(
        f'Stopped by {reason} after step {context.last_saved.step}/'
        f'{plan.length.total_steps}. Rerun the same command to resume from this '
        'checkpoint.'
    )
    return context.summary, reason
