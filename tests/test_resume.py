"""Exact resume after SIGKILL (also mid-save), a clean stop on SIGTERM, and a time budget.

The signal tests run the launcher in a subprocess on one CPU device, as a user runs it: a chain
of runs, killed or stopped at several points and each rerun with the same command, must end
bitwise equal to one uninterrupted run: the same training_log.json losses and the same final
state. Each signal goes to a run held at a known step (tests/held_launch.py) or paused inside a
save (tests/paused_save_launch.py), so no test races the steps that are left.
"""

import functools
import os
import signal
import sys

import pytest

from muomni_jax.training import preemption, train
from tests import paused_save_launch
from tests.support.checkpoints import saved_state
from tests.support.clock import Clock
from tests.support.configs import RESUME_ARGS, small_config
from tests.support.logs import log_without_timing
from tests.support.processes import launched, one_device_env, stage_a_command
from tests.support.trees import assert_trees_equal


def _args(save_dir, data_path):
    return [*RESUME_ARGS, f'--config.data_path={data_path}', f'--config.save_dir={save_dir}']


def _env():
    # Reruns, and the other test's runs of the same config, load every compiled step from the
    # session's persistent cache instead of compiling again.
    return one_device_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _held(step, signals, *args):
    """tests/held_launch.py: the launcher, held before `step` until it handled `signals`."""
    held = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'held_launch.py')
    return [sys.executable, held, str(step), str(signals), '--config=configs/tiny.py', *args]


def _names(save_dir):
    return os.listdir(save_dir) if os.path.isdir(save_dir) else []


@pytest.mark.slow
def test_kill_anywhere_then_rerun_is_bitwise_identical(tmp_path, corpus_sample):
    reference_dir, resumed_dir = str(tmp_path / 'reference'), str(tmp_path / 'resumed')
    with launched(stage_a_command(*_args(reference_dir, corpus_sample)), env=_env()) as reference:
        # 1. SIGKILL while step 4 is being written (step 2 is complete): the run pauses inside
        #    that save, after its files went into Orbax's temporary folder and before the commit.
        with launched(
            paused_save_launch.command(
                4, '--config=configs/tiny.py', *_args(resumed_dir, corpus_sample)
            ),
            env=_env(),
        ) as run:
            run.wait_for_line('Paused in the save of step 4')
            names = _names(resumed_dir)
            assert any(n.startswith('4.orbax-checkpoint-tmp') for n in names), names
            run.kill()
        names = _names(resumed_dir)
        assert '2' in names and '4' not in names, names
        assert any(n.startswith('4.orbax-checkpoint-tmp') for n in names), names

        # 2. The rerun resumes from step 2, never from the incomplete step 4; SIGKILL it as soon
        #    as step 6 is complete, wherever it then is (it holds before step 8 at the latest).
        with launched(_held(8, 99, *_args(resumed_dir, corpus_sample)), env=_env()) as run:
            run.wait_until(lambda: '6' in _names(resumed_dir), 'step 6')
            run.kill()
            assert 'Resuming from checkpoint step 2 ' in run.stdout, run.output_tail()

        # 3. SIGTERM, here before step 9: the run finishes that step, saves it, says where, and
        #    exits 0.
        with launched(_held(9, 1, *_args(resumed_dir, corpus_sample)), env=_env()) as run:
            run.wait_for_line('Holding before step 9')
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=120) == 0, run.output_tail()
            out = run.stdout
        assert 'Resuming from checkpoint step 6' in out, out[-3000:]
        saved_to = os.path.join(resumed_dir, '9')
        assert 'SIGTERM received: finishing this step and saving a checkpoint' in out
        assert f'✓ Saved checkpoint: step 9 ({saved_to})' in out
        assert 'Stopped by SIGTERM after step 9/12. Rerun the same command' in out, out[-3000:]
        assert '9' in _names(resumed_dir)
        assert 'Training complete' not in out

        # 4. The last rerun completes.
        with launched(stage_a_command(*_args(resumed_dir, corpus_sample)), env=_env()) as run:
            assert run.wait(timeout=240) == 0, run.output_tail()
            assert 'Resuming from checkpoint step 9' in run.stdout
            assert 'Training complete' in run.stdout
        assert not any('orbax-checkpoint-tmp' in n for n in _names(resumed_dir))

        assert reference.wait(timeout=240) == 0, reference.output_tail()
    assert log_without_timing(resumed_dir) == log_without_timing(reference_dir)
    assert_trees_equal(saved_state(reference_dir, 12), saved_state(resumed_dir, 12))


@pytest.mark.slow
def test_second_ctrl_c_aborts_with_status_130(tmp_path, corpus_sample):
    save_dir = str(tmp_path / 'run')
    # Held before step 3 until it handled two signals: the second Ctrl-C finds it still there.
    with launched(_held(3, 2, *_args(save_dir, corpus_sample)), env=_env()) as run:
        run.wait_for_line('Holding before step 3')
        run.send_signal(signal.SIGINT)
        # Python runs a handler once for signals that arrive together: send the second after
        # the first was handled, as a person pressing Ctrl-C twice does.
        run.wait_for_line('SIGINT received')
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 130, run.output_tail()
        out = run.stdout
    assert out.rstrip().endswith('Aborted: nothing was saved after the last checkpoint.')
    assert 'Stopped by' not in out and 'Training complete' not in out
    assert sorted(n for n in _names(save_dir) if n.isdigit()) == ['2']


@pytest.mark.parametrize(
    'seconds, times, steps, stop_after',
    [
        (0, [0.0], 3, None),  # No budget: never stops, and never reads the clock after the start.
        # 6 s in, a 3 s step would end at 9 s: go on; 9 s in, at 12 s: stop after step 3.
        (10, [0.0, 3.0, 6.0, 9.0], 3, 3),
        (10, [0.0, 2.0, 9.0], 2, 2),  # The second step took 7 s: another would cross the budget.
        (1, [0.0, 30.0], 1, 1),  # The first step runs, however long it takes, and is the last.
    ],
)
def test_the_time_budget_stops_when_one_more_step_would_cross_it(seconds, times, steps, stop_after):
    waited = []
    budget = preemption.TimeBudget(seconds, wait_for=lambda: waited.append(1), clock=Clock(times))
    decisions = [budget.should_stop(step) for step in range(1, steps + 1)]
    if stop_after is None:
        assert decisions == [False] * steps and not waited
    else:
        assert decisions == [False] * (stop_after - 1) + [True]
        assert len(waited) == steps  # It waited for each step's metrics before reading the clock.


@pytest.mark.slow  # Three trainings.
def test_time_budget_saves_returns_and_resumes_bitwise(
    monkeypatch, tmp_path, corpus_sample, capsys
):
    """max_train_seconds stops like SIGTERM: it saves the step it stops at and returns (the
    launcher then exits 0, as after SIGTERM above), and the rerun continues exactly where an
    uninterrupted run would be. A fake clock makes each step take 1 s, so a 4 s budget stops
    after step 4: 4 s in, a fifth step would end at 5 s."""
    config = lambda save_dir, **extra: small_config(
        save_dir,
        corpus_sample,
        dropout=0.1,
        max_steps=10,
        log_every=3,
        eval_every=4,
        save_every=5,
        **extra,
    )
    reference_dir, budget_dir = tmp_path / 'reference', tmp_path / 'budget'
    train.train_and_evaluate(config(reference_dir))

    ticks = iter(range(1000))
    monkeypatch.setattr(
        preemption,
        'TimeBudget',
        functools.partial(preemption.TimeBudget, clock=lambda: float(next(ticks))),
    )
    capsys.readouterr()
    train.train_and_evaluate(config(budget_dir, max_train_seconds=4))
    out = capsys.readouterr().out
    assert 'Stopped by the time budget (max_train_seconds=4) after step 4/10. Rerun' in out
    assert f'✓ Saved checkpoint: step 4 ({budget_dir / "4"})' in out
    assert 'Training complete' not in out
    assert sorted(n for n in _names(budget_dir) if n.isdigit()) == ['4']

    train.train_and_evaluate(config(budget_dir))
    assert 'Resuming from checkpoint step 4 ' in capsys.readouterr().out
    assert log_without_timing(budget_dir) == log_without_timing(reference_dir)
    assert_trees_equal(saved_state(reference_dir, 10), saved_state(budget_dir, 10))
