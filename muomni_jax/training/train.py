"""Stage A: pretrain the Thinker by next-token prediction (the shape of Flax's lm1b train.py).

This module is the set-up and the loop only: `train_and_evaluate(config)` checks the config,
loads the data, creates or restores the state (steps.py: the pure steps, jitted over the mesh),
and runs periodic_actions.train_loop with the logging, evaluation, checkpoint and profile
actions. The launcher and a notebook call the same function.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
from flax import nnx

from muomni_jax.data import host_data
from muomni_jax.data import mixture
from muomni_jax.data import tokenizer_setup
from muomni_jax.errors import UserError
from muomni_jax.inference import sampling
from muomni_jax.io import storage
from muomni_jax.io.atomic_write import write_atomically
from muomni_jax.model import flops
from muomni_jax.model import lm_loss
from muomni_jax.model.thinker import ThinkerConfig, count_params
from muomni_jax.parallel import distributed
from muomni_jax.parallel import partitioning
from muomni_jax.training import checkpointing
from muomni_jax.training import compilation_cache
from muomni_jax.training import config_checks
from muomni_jax.training import periodic_actions
from muomni_jax.training import preemption
from muomni_jax.training import reporting
from muomni_jax.training import run_lock
from muomni_jax.training import schedule_fit
from muomni_jax.training import steps
from muomni_jax.training import training_log


# ----------------------------------------------------------------------------------------------
# Checks that run before anything is written


def _check_inputs(config, devices) -> tuple[ThinkerConfig, jax.sharding.Mesh]:
    """Every check of the config and devices (none reads save_dir, whose lock is not yet held);
    returns the model config and the mesh."""
    model_config = config_checks.validate_config(config)
    storage.check_writable(config.save_dir)
    mesh = partitioning.make_mesh(config.mesh, devices)
    config_checks.check_platform(model_config, mesh.devices.flat[0].platform)
    partitioning.check_batch_size(config.batch_size, mesh, config.gradient_accumulation_steps)
    host_data.num_shards(config)
    return model_config, mesh


@contextlib.contextmanager
def _save_dir_locked(save_dir: str, is_main: bool, log) -> Iterator[None]:
    """Holds save_dir's run lock (taken by process 0) for the block, on every process: a second
    run on a live save_dir stops here, before it reads a checkpoint or loads data."""
    lock = run_lock.RunLock(save_dir, log=log) if is_main else None
    with distributed.fail_together():
        if lock is not None:
            lock.acquire()
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _describe_sources(config) -> str:
    sources = mixture.sources(config)
    if not config.mixture:
        return sources[0].describe()
    return f'a mixture of {len(sources)} sources: ' + ', '.join(
        f'{s.name} {s.weight:.0%} ({s.describe()})' for s in sources)


def _log_totals(data: host_data.HostData, log) -> None:
    def line(totals):
        return (f'{totals["train_documents"]:,} documents ({totals["train_tokens"]:,} tokens); '
                f'validation: {totals["validation_documents"]:,} documents '
                f'({totals["validation_tokens"]:,} tokens)')

    log(f'Training samples: {line(data.totals)}')
    if data.is_mixture:
        for source in data.sources:
            log(f'  {source.source.name}: {line(source.totals)}')
            if not source.totals['validation_documents']:
                log(f'  {source.source.name}: no validation documents (raise val_split to '
                    'validate it); the weighted validation loss leaves it out')


def _format_duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f'{hours}h {rest // 60:02d}m {rest % 60:02d}s'


def _devices_line(mesh) -> str:
    devices = list(mesh.devices.flat)
    kind = devices[0].platform if devices[0].platform == 'cpu' else devices[0].device_kind
    count = f'{len(devices)} device{"s" if len(devices) > 1 else ""}'
    if jax.process_count() > 1:
        count += f' over {jax.process_count()} processes'
    axes = ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
    return f'Using device: {kind} ({count}); mesh {axes}'


# ----------------------------------------------------------------------------------------------
# Set-up and the loop


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once by train_and_evaluate."""
    config: Any
    mesh: Any
    data: host_data.HostData
    steps_per_epoch: int
    total_steps: int
    setup: steps.TrainSetup
    sampler: Any  # params -> sample lines to print after validation, or None.
    is_main: bool
    log: Any  # print on process 0, nothing elsewhere.
    # schedule_seconds: the fitted length, once fixed (recorded in checkpoints); else None.
    schedule_steps: int | None = None


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
    # The checks that need only the config run before save_dir's lock is taken, and a check
    # that fails on one host stops them all.
    with distributed.fail_together():
        model_config, mesh = _check_inputs(config, devices)
    with _save_dir_locked(config.save_dir, is_main, log):
        summary, stopped_by = _set_up_and_train(config, model_config, mesh, is_main, log)
    if stopped_by:
        return summary
    log(f'Training complete! Time: {_format_duration(time.time() - start_time)}')
    if 'val_ppl' in summary:
        log(f'Final validation PPL: {summary["val_ppl"]:.2f}')
    return summary


def _set_up_and_train(config, model_config: ThinkerConfig, mesh, is_main: bool, log
                      ) -> tuple[dict[str, float], str | None]:
    """Everything that reads or writes save_dir, under its lock: (summary, stopped_by)."""
    save_dir = config.save_dir
    with distributed.fail_together():
        config_checks.check_same_model(config, save_dir)
    compile_cache = compilation_cache.enable(config)  # Before the first compilation.

    log(f'Loading data from {_describe_sources(config)}...')
    tokenizer = tokenizer_setup.shared_tokenizer(config)
    log(f'Vocab size: {tokenizer.vocab_size}')
    sampler = sampling.training_sampler(config, model_config, tokenizer)
    data = host_data.load(config, tokenizer, log)
    _log_totals(data, log)
    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    # Model and optimizer state, laid out on the mesh; made only when there is nothing to restore.
    setup = steps.create_train_state(config, mesh, total_steps, initialize=False)
    run = _Run(config=config, mesh=mesh, data=data, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, setup=setup, sampler=sampler, is_main=is_main, log=log)

    _log_layout(run)
    log(f'Compilation cache: {compile_cache or "off"}')
    checkpointer = checkpointing.Checkpointer(save_dir, max_to_keep=config.max_to_keep)
    state, start_step, interval = _restore_or_init(run, checkpointer)
    if is_main:
        tokenizer_setup.keep_in_save_dir(save_dir, tokenizer)
        write_atomically(os.path.join(save_dir, 'config.json'),
                         config.to_json_best_effort(indent=1, sort_keys=True))
    checkpointer.start_writing(start_step)
    return _train(run, state, start_step, interval, checkpointer)


def prepare_data(config) -> dict[str, int]:
    """The tokenizer and token cache of a run, without training (launch.prepare_data).

    On one machine with the later run's data_shards it builds every shard, so a pod only opens
    the cache; on every host of a pod it builds each host's own shards. Returns the split totals.
    """
    with distributed.fail_together():
        config_checks.validate_config(config)
        storage.check_writable(config.save_dir)
        num_shards = host_data.num_shards(config)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    with _save_dir_locked(config.save_dir, is_main, log):
        tokenizer = tokenizer_setup.shared_tokenizer(config)
        data = host_data.load(config, tokenizer, log)
        if is_main:  # Last, so a bad input leaves save_dir untouched.
            tokenizer_setup.keep_in_save_dir(config.save_dir, tokenizer)
    totals = data.totals
    log(f'Ready: {totals["train_tokens"]:,} training and {totals["validation_tokens"]:,} '
        f'validation tokens in {num_shards} data shard(s); the tokenizer is in '
        f'{config.save_dir}.')
    return totals


def _log_layout(run: _Run) -> None:
    run.log(f'Initializing Thinker ({count_params(run.setup.abstract_state.params) / 1e6:.1f}M '
            'parameters)...')
    run.log(_devices_line(run.mesh))
    note = steps.short_run_note(run.config, run.total_steps)
    if note:
        run.log(note)
    if jax.process_count() > 1:
        print(distributed.describe(run.mesh), flush=True)


def _restore_or_init(run: _Run, checkpointer: checkpointing.Checkpointer
                     ) -> tuple[steps.TrainState, int, dict | None]:
    """(state, its step, the metric sums of a log interval the checkpoint cut, or None)."""
    restored = checkpointer.restore_latest(run.setup.abstract_state, run.config.restore_step)
    if restored is None:
        return run.setup.init(jax.random.PRNGKey(run.config.seed)), 0, None
    state, meta = restored
    start_step = int(meta['step'])
    recorded = meta.get('schedule_steps')
    if recorded and run.config.get('schedule_seconds', 0):
        _set_length(run, int(recorded))
        run.log(f'Schedule: {recorded} steps, as fitted to schedule_seconds when this run began.')
    # Step 0 (an imported checkpoint, see launch.convert) has no data position to keep.
    if start_step and meta.get('mixture') != mixture.canonical(run.config):
        raise UserError(f'the checkpoint in {checkpointer.directory} was trained on '
                        f'{meta.get("mixture") or "a single data_path"}, not on '
                        f'{mixture.canonical(run.config) or "a single data_path"}: resume with '
                        'the same --config.mixture, or use a new save_dir')
    if start_step and meta.get('steps_per_epoch') != run.steps_per_epoch:
        raise UserError(f'the checkpoint in {checkpointer.directory} was trained with '
                        f'{meta.get("steps_per_epoch")} steps per epoch, this data and '
                        f'batch_size give {run.steps_per_epoch}: '
                        'resume with the same data, batch_size and data_shards (0 means one '
                        'per process), or use a new save_dir')
    run.log(f'Resuming from checkpoint step {start_step} (epoch {meta["epoch"] + 1}).')
    return state, start_step, meta.get('interval_metrics')


def _set_length(run: _Run, total_steps: int) -> None:
    """Fixes the run's length to a fitted one: the steps are jitted again for its schedule (the
    state's tree does not change)."""
    run.schedule_steps = run.total_steps = total_steps
    run.setup = steps.create_train_state(run.config, run.mesh, total_steps, initialize=False)


def _model_flops(run: _Run) -> tuple[float, float | None, Callable[[], float] | None]:
    """(model FLOPs of one optimizer step, peak FLOP/s of all devices or None: no MFU, and on CPU
    the function that measures the peak again)."""
    config = run.config
    devices = list(run.mesh.devices.flat)
    flops_per_token = flops.flops_per_token(run.setup.model_config)['total']
    peak_flops, peak_source = flops.system_peak_flops(config.peak_flops_per_device,
                                                      devices=devices)
    measured = devices[0].platform == 'cpu' and not config.peak_flops_per_device
    if peak_flops:
        again = '; measured again each minute' if measured else ''
        run.log(f'Model FLOPs: {flops_per_token / 1e6:.1f} MFLOP/token; MFU against '
                f'{peak_flops / 1e12:.3g} TFLOP/s ({peak_source}{again})')
    # A host shared with other work changes speed as its load does: the peak must follow.
    measure = (lambda: flops.system_peak_flops(devices=devices)[0]) if measured else None
    return flops_per_token * config.batch_size * config.ctx_len, peak_flops, measure


def _train(run: _Run, state: steps.TrainState, start_step: int, interval: dict | None,
           checkpointer: checkpointing.Checkpointer) -> tuple[dict[str, float], str | None]:
    """Trains from start_step to run.total_steps, or until a signal asks to stop; closes the
    checkpointer (waiting for its last save) even when training fails.

    Returns the final metrics and the name of the signal that stopped the run (None when it ran
    to the end).
    """
    model_flops = _model_flops(run)
    reporter = reporting.Reporter(
        run.config.save_dir, total_steps=run.total_steps, start_step=start_step,
        enabled=run.is_main, profile_steps=reporting.parse_profile_steps(run.config.profile_steps),
        wandb_project=run.config.wandb_project, run_config=run.config.to_dict())
    try:
        return _train_with(run, state, start_step, interval, checkpointer, reporter, model_flops)
    except OSError as e:
        # A write of save_dir's log or history (a failed checkpoint raises its own line).
        if storage.is_url(run.config.save_dir) or not (e.filename and os.path.abspath(
                e.filename).startswith(os.path.abspath(run.config.save_dir))):
            raise
        checkpointer.wait()  # A save that failed before it (a full disk) is the news.
        raise checkpointing.write_failed(e.filename, run.config.save_dir, e,
                                         checkpointer.newest_intact) from e
    finally:
        reporter.close()
        checkpointer.close()


def _train_with(run: _Run, state: steps.TrainState, start_step: int, interval: dict | None,
                checkpointer: checkpointing.Checkpointer, reporter: reporting.Reporter,
                model_flops: tuple) -> tuple[dict[str, float], str | None]:
    config = run.config
    if start_step >= run.total_steps:
        reporter.log(f'Nothing to do: save_dir is already at step {start_step} of '
                     f'{run.total_steps}.')
    reporter.log('Starting training...')
    summary = {}
    actions = _actions(run, checkpointer, reporter, summary, start_step,
                       periodic_actions.Interval.resumed(interval, run.mesh), *model_flops)
    budget = preemption.TimeBudget(config.max_train_seconds,
                                   wait_for=lambda: actions.interval.sums)
    fit = _schedule_fit(run, actions, reporter, start_step)
    phases = [fit.fit_at] if fit else []
    batches = _batches(run, start_step, reporter.log)
    with preemption.StopSignals(sync_every=config.log_every) as signals:
        first, stopped = start_step + 1, False
        for last in phases + [None]:
            # run.total_steps (and the jitted step) may change at the fit, between phases.
            last = run.total_steps if last is None else min(last, run.total_steps)
            state, stopped = periodic_actions.train_loop(
                state, range(first, last + 1), batches, run.setup.train_step, actions.interval,
                actions.in_order, lambda step: signals.should_stop(step) or budget.should_stop(step),
                last_step=lambda: run.total_steps)
            if stopped or last == run.total_steps:
                break
            first = last + 1
    if not stopped:
        return summary, None
    reason = signals.received or f'the time budget (max_train_seconds={config.max_train_seconds:g})'
    reporter.log(f'Stopped by {reason} after step {actions.save.last_saved}/'
                 f'{run.total_steps}. Rerun the same command to resume from this checkpoint.')
    return summary, reason


def _schedule_fit(run: _Run, actions, reporter, start_step: int
                  ) -> schedule_fit.ScheduleFit | None:
    """The action that fixes the run's length (schedule_seconds), first in the step's order; None
    when the length is already fixed, or not fitted to time."""
    config = run.config
    if not config.get('schedule_seconds', 0) or run.schedule_steps is not None:
        return None
    if start_step >= run.total_steps:
        return None

    def on_fit(total: int, line: str) -> None:
        _set_length(run, total)
        actions.log_metrics.total_steps = actions.evaluate.total_steps = total
        actions.log_metrics.schedule = steps.learning_rate_schedule(config, total)
        actions.save.schedule_steps = total
        reporter.set_total_steps(total)
        reporter.log(line)

    fit = schedule_fit.ScheduleFit(
        budget_s=config.schedule_seconds, start_step=start_step,
        fit_at=schedule_fit.fit_step(config, start_step, run.total_steps),
        upper_steps=run.total_steps, eval_every=config.eval_every,
        # Each validation reads every source's eval_batches (host_data agreed on them).
        eval_batches=sum(source.eval_batches for source in run.data.sources), on_fit=on_fit)
    actions.in_order.insert(0, fit)
    return fit


@dataclasses.dataclass
class _Actions:
    interval: periodic_actions.Interval
    save: periodic_actions.SaveCheckpoint
    log_metrics: periodic_actions.LogMetrics
    evaluate: periodic_actions.Evaluate
    in_order: list[periodic_actions.PeriodicAction]


def _actions(run: _Run, checkpointer, reporter, summary, start_step, interval, flops_per_step,
             peak_flops, measure_peak) -> _Actions:
    """The periodic actions of a run, in the order they run after a step."""
    config = run.config
    history = training_log.TrainingLog(os.path.join(config.save_dir, 'training_log.json'),
                                       resume_step=start_step, set_aside_damaged=run.is_main)
    save = periodic_actions.SaveCheckpoint(
        every=config.save_every, checkpointer=checkpointer, save_dir=config.save_dir,
        steps_per_epoch=run.steps_per_epoch, interval=interval,
        max_consecutive_nonfinite=config.max_consecutive_nonfinite, reporter=reporter,
        last_saved=start_step, mixture=mixture.canonical(config),
        schedule_steps=run.schedule_steps)
    log_metrics = periodic_actions.LogMetrics(
        every=config.log_every, total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
        tokens_per_step=config.batch_size * config.ctx_len,
        schedule=steps.learning_rate_schedule(config, run.total_steps), interval=interval,
        history=history, reporter=reporter, summary=summary,
        max_consecutive_nonfinite=config.max_consecutive_nonfinite,
        last_saved=lambda: save.last_saved, flops_per_step=flops_per_step,
        peak_flops=peak_flops, measure_peak=measure_peak,
        source_epochs=(lambda step: run.data.source_epochs(step, config.seed))
        if run.data.is_mixture else None)
    evaluate_action = periodic_actions.Evaluate(
        every=config.eval_every, total_steps=run.total_steps,
        evaluate=lambda params: evaluate(run, params), sampler=run.sampler, interval=interval,
        history=history, reporter=reporter, summary=summary)
    return _Actions(interval=interval, save=save, log_metrics=log_metrics,
                    evaluate=evaluate_action, in_order=[
        periodic_actions.FirstStepTime(reporter), periodic_actions.Progress(reporter),
        log_metrics, evaluate_action,
        periodic_actions.WriteHistory(history, enabled=run.is_main), save])


def _batches(run: _Run, start_step: int, log) -> Iterator[dict[str, jax.Array]]:
    """Global batches from start_step on, epoch after epoch, placed on the devices ahead."""
    epoch = start_step // run.steps_per_epoch
    start = start_step - epoch * run.steps_per_epoch
    batch_sharding = partitioning.batch_sharding(run.mesh)
    while True:
        log(f'Epoch {epoch + 1}/{run.config.num_epochs}:')
        batches = run.data.train_batches(run.config.seed, epoch, start)
        yield from prefetch((partitioning.global_batch(batch, batch_sharding)
                             for batch in batches), _PREFETCH_BATCHES)
        epoch, start = epoch + 1, 0


# Batches placed on the devices ahead of the step that reads them; transfers are asynchronous.
_PREFETCH_BATCHES = 2


def prefetch(iterator: Iterator[Any], size: int) -> Iterator[Any]:
    """Yields the iterator's items while keeping `size` more already made (device-placed)."""
    queue = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def evaluate(run: _Run, params: nnx.State) -> dict[str, float]:
    """Validation loss and perplexity (all windows, or eval_batches per shard) of each source,
    and their mixture-weighted mean; {} when there is no validation text.

    A mixture's record also holds val/<name>/loss and val/<name>/ppl of each source.
    """
    batch_sharding = partitioning.batch_sharding(run.mesh)
    losses = {}
    for index, data in enumerate(run.data.sources):
        total = None
        for batch in run.data.validation_batches(index):
            total = steps.add_metrics(total, run.setup.eval_step(
                params, partitioning.global_batch(batch, batch_sharding)))
        if total is not None and float(total['weight_sum']) > 0:
            losses[data.source] = float(total['loss_sum']) / float(total['weight_sum'])
    if not losses:
        return {}
    # Sources without validation text are left out; the others keep their relative weights.
    loss = sum(s.weight * value for s, value in losses.items()) / sum(s.weight for s in losses)
    result = {'val_loss': loss, 'val_ppl': lm_loss.perplexity(loss)}
    if run.data.is_mixture:
        for source, value in losses.items():
            result[f'val/{source.name}/loss'] = value
            result[f'val/{source.name}/ppl'] = lm_loss.perplexity(value)
    return result
