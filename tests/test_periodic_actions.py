"""The training loop alone, with a fake step and fake batches: which action runs after which step."""

import dataclasses

import numpy as np
import pytest

from muomni_jax.errors import UserError
from muomni_jax.training import periodic_actions
from muomni_jax.training import steps


@dataclasses.dataclass
class Recorder:
    every: int
    on_stop: bool = False
    calls: list = dataclasses.field(default_factory=list)

    def __call__(self, step, state, last):
        self.calls.append((step, state, last))


def _fake_step(state, batch):
    metrics = {'loss_sum': np.float32(batch), 'weight_sum': np.float32(1), 'grad_norm': 0.0,
               'nonfinite': np.int32(0), 'nonfinite_limit_step': np.int32(steps.NO_STEP),
               'steps': np.int32(1)}
    return state + batch, metrics


def test_actions_run_on_their_multiples_and_after_the_final_step():
    every2, every3 = Recorder(every=2), Recorder(every=3)
    interval = periodic_actions.Interval()
    state, stopped = periodic_actions.train_loop(
        0, range(3, 8), iter([10, 20, 30, 40, 50, 60]), _fake_step, interval, [every2, every3])
    assert (state, stopped) == (150, False)  # Five steps, 3..7: the sixth batch is never read.
    assert every2.calls == [(4, 30, False), (6, 100, False), (7, 150, True)]
    assert every3.calls == [(3, 10, False), (6, 100, False), (7, 150, True)]
    assert interval.steps == 5 and float(interval.host_sums()['loss_sum']) == 150


def test_a_stop_runs_only_the_on_stop_actions_and_ends_the_loop():
    periodic, on_stop = Recorder(every=4), Recorder(every=4, on_stop=True)
    state, stopped = periodic_actions.train_loop(
        0, range(1, 11), iter(range(1, 11)), _fake_step, periodic_actions.Interval(),
        [periodic, on_stop], should_stop=lambda step: step == 3)
    assert (state, stopped) == (6, True)
    assert periodic.calls == [] and on_stop.calls == [(3, 6, True)]


def test_nothing_runs_when_there_is_no_step_left():
    action = Recorder(every=1)
    state, stopped = periodic_actions.train_loop(
        7, range(5, 5), iter([1]), _fake_step, periodic_actions.Interval(), [action])
    assert (state, stopped, action.calls) == (7, False, [])


def test_the_nonfinite_limit_names_the_streak_and_the_newest_checkpoint():
    periodic_actions.check_nonfinite_limit({'nonfinite_limit_step': steps.NO_STEP}, 3, 0)
    with pytest.raises(UserError, match=r'^steps 4-6 all had NaN/Inf .*\(newest checkpoint: '
                                        r'step 2\)'):
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


@pytest.mark.parametrize('every_s, expected', [(3600.0, [100.0, 100.0]), (0.0, [1.0, 2.0])])
def test_the_cpu_peak_is_measured_again_once_it_is_old(monkeypatch, every_s, expected):
    """A shared host's speed changes with its load: an old peak is measured again, so the MFU
    of a line compares the steps with what the machine could do then."""
    monkeypatch.setattr(periodic_actions, 'PEAK_EVERY_S', every_s)
    measured = iter([1.0, 2.0])
    interval, history, reporter = periodic_actions.Interval(), _History(), _Reporter()
    log = periodic_actions.LogMetrics(
        every=1, total_steps=2, steps_per_epoch=2, tokens_per_step=1,
        schedule=lambda step: 0.0, interval=interval, history=history, reporter=reporter,
        summary={}, max_consecutive_nonfinite=5, last_saved=lambda: 0, flops_per_step=1.0,
        peak_flops=100.0, measure_peak=lambda: next(measured))
    periodic_actions.train_loop(0, range(1, 3), iter([1, 2]), _fake_step, interval, [log])
    peaks = [r['tokens_per_s'] / r['mfu'] for r in history.records]
    np.testing.assert_allclose(peaks, expected)
    assert f'of {expected[-1] / 1e9:.3g} GFLOP/s' in reporter.lines[-1]  # The line names it.
