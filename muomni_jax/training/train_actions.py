"""The periodic actions of a training run, and the context they share (periodic_actions.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from muomni_jax.data import host_data
from muomni_jax.io import run_dir
from muomni_jax.model import flops
from muomni_jax.training import (
    periodic_actions,
    reporting,
    run_plan,
    steps,
    training_log,
    validation,
)


def make_context(
    plan: run_plan.RunPlan,
    setup: steps.TrainSetup,
    reporter: reporting.Reporter,
    mesh,
    *,
    start_step: int,
    saved_interval: dict | None,
    is_main: bool,
) -> periodic_actions.RunContext:
    """The context of a run (re)started at start_step; saved_interval: the metric sums of a log
    interval its checkpoint cut, or None."""
    history = training_log.TrainingLog(
        run_dir.training_log_path(plan.output.save_dir),
        resume_step=start_step,
        set_aside_damaged=is_main,
    )
    return periodic_actions.RunContext(
        plan=plan,
        schedule=setup.schedule,
        interval=periodic_actions.Interval.resumed(saved_interval, mesh),
        history=history,
        reporter=reporter,
        summary={},
        last_saved=periodic_actions.LastSaved(start_step),
    )


def make_actions(
    context: periodic_actions.RunContext,
    *,
    data: host_data.HostData,
    eval_step: Callable,
    mesh,
    checkpointer: Any,
    sampler: Callable[[Any], list[str]] | None,
    model_flops: tuple[float, float | None, Callable[[], float] | None],
    is_main: bool,
) -> list[periodic_actions.PeriodicAction]:
    """The periodic actions of a run, in the order they run after a step.

    model_flops: (FLOPs of one step, peak FLOP/s or None, a measure of the peak or None), as
    model_flops() gives them.
    """
    flops_per_step, peak_flops, measure_peak = model_flops
    seed = context.plan.step.seed
    log_metrics = periodic_actions.LogMetrics(
        context,
        flops_per_step=flops_per_step,
        peak_flops=peak_flops,
        measure_peak=measure_peak,
        source_epochs=(lambda step: data.source_epochs(step, seed)) if data.is_mixture else None,
    )
    evaluate = periodic_actions.Evaluate(
        context,
        evaluate=functools.partial(validation.validation_metrics, data, eval_step, mesh),
        sampler=sampler,
    )
    return [
        periodic_actions.FirstStepTime(context),
        periodic_actions.Progress(context),
        log_metrics,
        evaluate,
        periodic_actions.WriteHistory(context, enabled=is_main),
        periodic_actions.SaveCheckpoint(context, checkpointer),
    ]


def model_flops(
    plan: run_plan.RunPlan, mesh, log: Callable[[str], None]
) -> tuple[float, float | None, Callable[[], float] | None]:
    """(model FLOPs of one optimizer step, peak FLOP/s of all devices or None: no MFU, and on CPU
    the function that measures the peak again); logs the line that says what MFU is against."""
    devices = list(mesh.devices.flat)
    flops_per_token = flops.flops_per_token(plan.model)['total']
    peak_per_device = plan.output.peak_flops_per_device
    peak_flops, peak_source = flops.system_peak_flops(peak_per_device, devices=devices)
    measured = devices[0].platform == 'cpu' and not peak_per_device
    if peak_flops:
        again = '; measured again each minute' if measured else ''
        log(
            f'Model FLOPs: {flops_per_token / 1e6:.1f} MFLOP/token; MFU against '
            f'{peak_flops / 1e12:.3g} TFLOP/s ({peak_source}{again})'
        )
    # A host shared with other work changes speed as its load does: the peak must follow.
    measure = (lambda: flops.system_peak_flops(devices=devices)[0]) if measured else None
    return flops_per_token * plan.step.batch_size * plan.data.ctx_len, peak_flops, measure
