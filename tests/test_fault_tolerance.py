"""In-process fault tolerance: signals, NaN steps, corrupted checkpoints, restore_step, and the
two-process stop decision."""

import contextlib
import json
import os
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muomni_jax.errors import UserError
from muomni_jax.training import periodic_actions, preemption, steps, train
from tests.support.checkpoints import restore_state
from tests.support.configs import small_config
from tests.support.logs import log_without_timing
from tests.support.processes import free_port, launched
from tests.support.trees import assert_trees_equal


def _signal_before_step(monkeypatch, step, signum=signal.SIGINT, times=1):
    """Sends `signum` to this process `times` times while the batch of `step` is fetched."""
    real = periodic_actions.train_loop

    def train_loop(state, step_numbers, batches, *args, **kwargs):
        def signalling_batches():
            for index, batch in zip(step_numbers, batches):
                if index == step:
                    for _ in range(times):
                        os.kill(os.getpid(), signum)
                yield batch

        return real(state, step_numbers, signalling_batches(), *args, **kwargs)

    monkeypatch.setattr(periodic_actions, 'train_loop', train_loop)


def _steps(save_dir):
    return sorted(int(n) for n in os.listdir(save_dir) if n.isdigit())


@pytest.mark.slow  # A training.
def test_first_ctrl_c_finishes_the_step_saves_and_returns(
    monkeypatch, tmp_path, corpus_sample, capsys
):
    _signal_before_step(monkeypatch, 4)
    save_dir = tmp_path / 'run'
    handler = signal.getsignal(signal.SIGINT)
    train.train_and_evaluate(small_config(save_dir, corpus_sample, save_every=10, eval_every=100))
    out = capsys.readouterr().out
    assert 'SIGINT received: finishing this step and saving a checkpoint' in out
    assert f'✓ Saved checkpoint: step 4 ({save_dir / "4"})' in out
    assert 'Stopped by SIGINT after step 4/6. Rerun the same command' in out
    assert 'Training complete' not in out
    assert _steps(save_dir) == [4]
    assert signal.getsignal(signal.SIGINT) is handler  # The run's handlers are gone.


@pytest.mark.slow  # A training.
def test_second_ctrl_c_aborts_without_saving(monkeypatch, tmp_path, corpus_sample):
    _signal_before_step(monkeypatch, 4, times=2)
    save_dir = tmp_path / 'run'
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(
            small_config(save_dir, corpus_sample, save_every=10, eval_every=100)
        )
    assert _steps(save_dir) == []
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_ask_to_stop_once_then_abort_on_the_second(signum, capsys):
    """StopSignals alone, on this process: the first signal only asks the loop to stop, the
    second raises at once, and the handlers before it are back afterwards. The runs above and
    test_resume.py's launcher runs go through the same handler."""
    before = signal.getsignal(signum)
    name = signal.Signals(signum).name
    with preemption.StopSignals(sync_every=4) as stop:
        assert not stop.should_stop(1) and stop.received is None
        os.kill(os.getpid(), signum)  # Python runs the handler before os.kill returns.
        assert (
            f'{name} received: finishing this step and saving a checkpoint'
            in capsys.readouterr().out
        )
        assert stop.should_stop(2) and stop.received == name
        with pytest.raises(KeyboardInterrupt, match=rf'second signal \({name}\)'):
            os.kill(os.getpid(), signum)
        assert signal.getsignal(signum) is before  # Restored by the second signal already.
    assert signal.getsignal(signum) is before


def _nan_on_steps(monkeypatch, bad_steps):
    """Makes the loss of the given (1-based) steps NaN, as a bad batch or an overflow would."""
    real = steps.train_step

    def train_step(state, batch, **kwargs):
        bad = jnp.isin(state.step + 1, jnp.asarray(bad_steps))
        batch = dict(batch, weights=batch['weights'] * jnp.where(bad, jnp.nan, 1.0))
        return real(state, batch, **kwargs)

    monkeypatch.setattr(steps, 'train_step', train_step)


@pytest.mark.slow  # A training, its step compiled with the NaNs.
def test_nonfinite_steps_are_skipped_and_counted(monkeypatch, tmp_path, corpus_sample, capsys):
    _nan_on_steps(monkeypatch, [3, 4])
    save_dir = tmp_path / 'run'
    summary = train.train_and_evaluate(
        small_config(
            save_dir, corpus_sample, max_consecutive_nonfinite=3, log_every=2, save_every=6
        )
    )
    log = json.load(open(save_dir / 'training_log.json'))
    assert [r.get('nonfinite_steps') for r in log if 'loss' in r] == [0, 2, 0]
    assert all(np.isfinite(r['loss']) for r in log if 'loss' in r)
    assert np.isfinite(summary['loss'])
    assert '[Step 4/6]' in capsys.readouterr().out.split('2 non-finite steps skipped')[0]


@pytest.mark.slow  # A training, its step compiled with the NaNs.
def test_nonfinite_streak_stops_the_run_and_is_never_saved(monkeypatch, tmp_path, corpus_sample):
    _nan_on_steps(monkeypatch, list(range(4, 20)))
    save_dir = tmp_path / 'run'
    config = small_config(
        save_dir,
        corpus_sample,
        max_steps=12,
        max_consecutive_nonfinite=3,
        log_every=5,
        save_every=2,
        eval_every=100,
    )
    with pytest.raises(UserError) as error:
        train.train_and_evaluate(config)
    assert str(error.value).startswith(
        'steps 4-6 all had NaN/Inf loss or gradients (max_consecutive_nonfinite=3); they were '
        'skipped and nothing after them was saved (newest checkpoint: step 4)'
    )
    # Step 4's save came before the limit; its params are step 3's, finite and unchanged.
    assert _steps(save_dir) == [2, 4]
    restored = _restore(config, save_dir, 4)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
    assert int(restored.opt_state.notfinite_count) == 1


@pytest.mark.slow  # A training, its step compiled with the overflow.
def test_params_that_overflow_are_never_saved(monkeypatch, tmp_path, corpus_sample):
    """Finite gradients can still push a param to Inf (say, a huge learning rate)."""
    real = steps.train_step

    def train_step(state, batch, **kwargs):
        state, metrics = real(state, batch, **kwargs)
        overflow = lambda x: jnp.where(state.step == 3, jnp.inf, x)
        return state.replace(params=jax.tree.map(overflow, state.params)), metrics

    monkeypatch.setattr(steps, 'train_step', train_step)
    save_dir = tmp_path / 'run'
    with pytest.raises(
        UserError,
        match=r'^the params became NaN/Inf at step 4, so it was not '
        r'saved \(newest checkpoint: step 2\)',
    ):
        train.train_and_evaluate(
            small_config(save_dir, corpus_sample, save_every=2, log_every=5, eval_every=100)
        )
    assert _steps(save_dir) == [2]


def _restore(config, save_dir, step):
    return restore_state(config, save_dir, step)


def _truncate_files(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'r+b') as f:
                f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow  # Four trainings.
def test_corrupted_newest_checkpoint_falls_back_and_restore_step_picks(
    tmp_path, corpus_sample, capsys
):
    save_dir = tmp_path / 'run'
    config = small_config(save_dir, corpus_sample, max_steps=6, save_every=3, log_every=1)
    train.train_and_evaluate(config)
    expected_log = log_without_timing(save_dir)
    shutil.copytree(save_dir / '6', tmp_path / 'good' / '6')
    capsys.readouterr()

    # Truncated files in step 6: the run warns, resumes from step 3 and redoes steps 4-6 exactly.
    _truncate_files(save_dir / '6')
    train.train_and_evaluate(config)
    captured = capsys.readouterr()
    assert f'Warning: checkpoint step 6 in {save_dir} is unreadable' in captured.err
    assert 'Resuming from checkpoint step 3' in captured.out
    set_aside = [n for n in os.listdir(save_dir) if n.startswith('6.set-aside-')]
    assert len(set_aside) == 1 and 'moved checkpoint steps [6]' in captured.err
    assert log_without_timing(save_dir) == expected_log
    assert_trees_equal(_restore(config, tmp_path / 'good', 6), _restore(config, save_dir, 6))

    # --config.restore_step=3 goes back to step 3 although step 6 is fine.
    config.restore_step = 3
    train.train_and_evaluate(config)
    captured = capsys.readouterr()
    assert 'Resuming from checkpoint step 3' in captured.out
    assert 'unreadable' not in captured.err
    assert _steps(save_dir) == [3, 6]

    # Every checkpoint unreadable: a clear error, never a silent fresh start, and nothing moved.
    config.restore_step = 0
    _truncate_files(save_dir / '3')
    _truncate_files(save_dir / '6')
    before = sorted(os.listdir(save_dir))
    with pytest.raises(
        UserError, match=r'no checkpoint in .* could be restored \(steps \[3, 6\]\)'
    ):
        train.train_and_evaluate(config)
    assert sorted(os.listdir(save_dir)) == before


@pytest.mark.slow
@pytest.mark.parametrize('signum, target', [(signal.SIGTERM, 1), (signal.SIGINT, 0)])
def test_two_processes_agree_on_the_step_to_stop(signum, target):
    """A signal to one of two processes stops both at one step (tests/multihost_stop_worker.py)."""
    port = free_port()
    worker = os.path.join('tests', 'multihost_stop_worker.py')
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(launched([sys.executable, worker, str(port), str(i)], stderr=True))
            for i in range(2)
        ]
        for process in workers:  # Gloo prints its own lines first.
            process.wait_for_line('ready', timeout=120)
        workers[target].send_signal(signum)
        assert [process.wait(timeout=120) for process in workers] == [0, 0], [
            process.output_tail() for process in workers
        ]
        outs = [
            [line for line in process.stdout.splitlines() if line.startswith('stop ')]
            for process in workers
        ]
    assert all(len(out) == 1 for out in outs), outs
    outs = [out[0].split() for out in outs]
    assert outs[0][1] == outs[1][1], outs  # The same step on both processes.
    received = ' '.join(outs[target][2:])
    assert received == signal.Signals(signum).name
