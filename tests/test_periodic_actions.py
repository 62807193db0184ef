"""The training loop alone, with a fake step and fake batches: which action runs after which
step."""

import dataclasses

import numpy as np
import pytest

from configs import tiny
from muomni_jax.errors import UserError
from muomni_jax.training import periodic_actions, run_plan, steps


@dataclasses.dataclass
class Recorder:
    every: int
    on_stop: bool = False
    calls: list = dataclasses.field(default_factory=list)

    def __call__(self, step, state, last):
        self.calls.append((step, state, last))


def _fake_step(state, batch):
    metrics = {
        'loss_sum': np.float32(batch),
        'weight_sum': np.float32(1),
        'grad_norm': 0.0,
        'nonfinite': np.int32(0),
        'nonfinite_limit_step': np.int32(steps.NO_STEP),
        'steps': np.int32(1),
    }
    return state + batch, metrics


def test_actions_run_on_their_multiples_and_after_the_final_step():
    every2, every3 = Recorder(every=2), Recorder(every=3)
    interval = periodic_actions.Interval()
    state, stopped = periodic_actions.train_loop(
        0, range(3, 8), iter([10, 20, 30, 40, 50, 60]), _fake_step, interval, [every2, every3]
    )
    assert (state, stopped) == (150, False)  # Five steps, 3..7: the sixth batch is never read.
    assert every2.calls == [(4, 30, False), (6, 100, False), (7, 150, True)]
    assert every3.calls == [(3, 10, False), (6, 100, False), (7, 150, True)]
    assert interval.steps == 5 and float(interval.host_sums()['loss_sum']) == 150


def test_a_stop_runs_only_the_on_stop_actions_and_ends_the_loop():
    periodic, on_stop = Recorder(every=4), Recorder(every=4, on_stop=True)
    state, stopped = periodic_actions.train_loop(
        0,
        range(1, 11),
        iter(range(1, 11)),
        _fake_step,
        periodic_actions.Interval(),
        [periodic, on_stop],
        should_stop=lambda step: step == 3,
    )
    assert (state, stopped) == (6, True)
    assert periodic.calls == [] and on_stop.calls == [(3, 6, True)]


def test_nothing_runs_when_there_is_no_step_left():
    action = Recorder(every=1)
    state, stopped = periodic_actions.train_loop(
        7, range(5, 5), iter([1]), _fake_step, periodic_actions.Interval(), [action]
    )
    assert (state, stopped, action.calls) == (7, False, [])


def test_the_nonfinite_limit_names_the_streak_and_the_newest_checkpoint():
    periodic_actions.check_nonfinite_limit({'nonfinite_limit_step': steps.NO_STEP}, 3, 0)
    with pytest.raises(
        UserError,
        match=r'^steps 4-6 all had NaN/Inf .*\(newest checkpoint: '
        r'step 2\)',
    ):
        periodic_actions.check_nonfinite_limit({'nonfinite_limit_step': 6}, 3, 2)


class _History:
    def __init__(self):
        self.records = []

    def add(self, step, **fields):
        self.records.append({'step': step, **fields})


class _Reporter:
    def __init__(self):
        self.lines = []

    def write_scalars(self, step, record):
        del step, record

    def log(self, line):
        self.lines.append(line)


def _context(total_steps=2):
    """A run of total_steps steps of one epoch, logged after every step."""
    config = tiny.get_config()
    config.update(dict(max_steps=total_steps, num_epochs=1, log_every=1))
    plan = run_plan.with_steps_per_epoch(run_plan.resolve(config), total_steps)
    return periodic_actions.RunContext(
        plan=plan,
        schedule=lambda step: 0.0,
        interval=periodic_actions.Interval(),
        history=_History(),
        reporter=_Reporter(),
        summary={},
        last_saved=periodic_actions.LastSaved(),
    )


@pytest.mark.parametrize('every_s, expected', [(3600.0, [100.0, 100.0]), (0.0, [1.0, 2.0])])
def test_the_cpu_peak_is_measured_again_once_it_is_old(monkeypatch, every_s, expected):
    """A shared host's speed changes with its load: an old peak is measured again, so the MFU
    of a line compares the steps with what the machine could do then."""
    monkeypatch.setattr(periodic_actions, 'PEAK_EVERY_S', every_s)
    measured = iter([1.0, 2.0])
    context = _context()
    # FLOPs per step equal to its tokens: tokens/s over MFU is then the peak.
    tokens_per_step = context.plan.step.batch_size * context.plan.data.ctx_len
    log = periodic_actions.LogMetrics(
        context,
        flops_per_step=tokens_per_step,
        peak_flops=100.0,
        measure_peak=lambda: next(measured),
    )
    periodic_actions.train_loop(0, range(1, 3), iter([1, 2]), _fake_step, context.interval, [log])
    peaks = [r['tokens_per_s'] / r['mfu'] for r in context.history.records]
    np.testing.assert_allclose(peaks, expected)
    # The line names it.
    assert f'of {expected[-1] / 1e9:.3g} GFLOP/s' in context.reporter.lines[-1]


def test_actions_held_after_the_last_step_run_with_a_new_context_and_keep_their_state():
    """The fitted-length path (schedule_fit): the loop stops before the actions of its last
    step; they then run against a plan with another length, their own state carried over."""
    context = _context(total_steps=8)
    log = periodic_actions.LogMetrics(context)
    state, stopped = periodic_actions.train_loop(
        0,
        range(1, 3),
        iter([1, 2]),
        _fake_step,
        context.interval,
        [log],
        final_step=context.total_steps,
        hold_last_actions=True,
    )
    assert (state, stopped) == (3, False)
    assert [line.split(']')[0] for line in context.reporter.lines] == ['[Step 1/8']
    fitted = dataclasses.replace(context, plan=run_plan.with_total_steps(context.plan, 2))
    [log_again] = periodic_actions.with_context([log], fitted)
    assert log_again.run_start == log.run_start and log_again.context is fitted
    periodic_actions.run_actions([log_again], 2, state, final=True, stop=False)
    assert context.reporter.lines[-1].startswith('[Step 2/2] loss=2.000')
