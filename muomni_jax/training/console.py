"""The lines a run prints as it starts and ends (the loop's own lines are periodic_actions')."""

from __future__ import annotations

from collections.abc import Callable

import jax

from muomni_jax.data import host_data
from muomni_jax.model.thinker import count_params
from muomni_jax.parallel import distributed
from muomni_jax.training import run_plan, steps


def log_totals(data: host_data.HostData, log: Callable[[str], None]) -> None:
    def line(totals):
        return (
            f'{totals["train_documents"]:,} documents ({totals["train_tokens"]:,} tokens); '
            f'validation: {totals["validation_documents"]:,} documents '
            f'({totals["validation_tokens"]:,} tokens)'
        )

    log(f'Training samples: {line(data.totals)}')
    if data.is_mixture:
        for source in data.sources:
            log(f'  {source.source.name}: {line(source.totals)}')
            if not source.totals['validation_documents']:
                log(
                    f'  {source.source.name}: no validation documents (raise val_split to '
                    'validate it); the weighted validation loss leaves it out'
                )


def log_layout(
    plan: run_plan.RunPlan, setup: steps.TrainSetup, mesh, log: Callable[[str], None]
) -> None:
    """The model's size, the devices and mesh, and a note on a run too short to decay."""
    log(
        f'Initializing Thinker ({count_params(setup.abstract_state.params) / 1e6:.1f}M '
        'parameters)...'
    )
    log(devices_line(mesh))
    note = steps.short_run_note(plan.optimizer, plan.length.total_steps)
    if note:
        log(note)
    if jax.process_count() > 1:
        print(distributed.describe(mesh), flush=True)


def devices_line(mesh) -> str:
    devices = list(mesh.devices.flat)
    kind = devices[0].platform if devices[0].platform == 'cpu' else devices[0].device_kind
    count = f'{len(devices)} device{"s" if len(devices) > 1 else ""}'
    if jax.process_count() > 1:
        count += f' over {jax.process_count()} processes'
    axes = ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
    return f'Using device: {kind} ({count}); mesh {axes}'


def nothing_to_train(plan: run_plan.RunPlan, step: int) -> str:
    """The one line of a run that has nothing left to train, naming any request it drops."""
    total, save_dir = plan.length.total_steps, plan.output.save_dir
    where = f'at step {step} of {total}' if step == total else f'at step {step}, past step {total}'
    line = (
        f'Nothing to train: {save_dir} is complete {where}. To train further, raise '
        '--config.max_steps (or --config.num_epochs), or give a new --config.save_dir.'
    )
    if plan.output.profile_steps:
        first, last = plan.output.profile_steps
        line += f' profile_steps={first},{last} is not traced: no step runs.'
    return line


def unreachable_requests(plan: run_plan.RunPlan, start_step: int) -> list[str]:
    """A line for each request of the plan that this run's steps cannot honour."""
    if not plan.output.profile_steps:
        return []
    (first, last), total = plan.output.profile_steps, plan.length.total_steps
    if last <= start_step:
        return [
            f'profile_steps={first},{last} is not traced: this run resumes after step '
            f'{start_step}. Give later steps to trace.'
        ]
    if first > total:
        return [
            f'profile_steps={first},{last} is not traced: this run ends at step {total}. '
            'Give steps up to the last to trace.'
        ]
    return []


def format_duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f'{hours}h {rest // 60:02d}m {rest % 60:02d}s'
