"""Exact resume after SIGKILL (also mid-save) and a clean stop on SIGTERM, through the launcher.

Each run is a subprocess on one CPU device, as a user runs it. A chain of runs, killed or stopped
at several points and each rerun with the same command, must end bitwise equal to one
uninterrupted run: the same training_log.json losses and the same final state.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from muomni_jax.training import checkpointing
from tests.conftest import REPO, one_device_env
from tests.test_launch import SMALL

# Dropout on, a log interval cut by checkpoints (3 does not divide 2), evaluation in between.
RESUME_ARGS = [*SMALL, '--config.dropout=0.1', '--config.max_steps=12', '--config.log_every=3',
               '--config.save_every=2', '--config.eval_every=4']
# Fields of a training_log record that depend on wall-clock time, not on the computation.
TIMING_FIELDS = ('tokens_per_s', 'mfu', 'elapsed_s')


def _launch(save_dir, data_path, compilation_cache, pause_in_save_of=None):
    env = one_device_env()
    if pause_in_save_of is not None:
        env[checkpointing.PAUSE_IN_SAVE_ENV] = str(pause_in_save_of)
    env['PYTHONUNBUFFERED'] = '1'  # What a killed run printed is not lost in its buffers.
    # Reruns load the compiled steps from JAX's persistent cache instead of compiling again.
    env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    return subprocess.Popen(
        [sys.executable, '-m', 'launch.stage_a', '--config=configs/tiny.py', *RESUME_ARGS,
         f'--config.data_path={data_path}', f'--config.save_dir={save_dir}'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, condition, what, timeout=240):
    """Polls every millisecond until condition() holds; fails if the run ends first."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f'run ended before {what}:\n{proc.stdout.read()[-3000:]}'
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(0.001)


def _names(save_dir):
    return os.listdir(save_dir) if os.path.isdir(save_dir) else []


def _saving(save_dir, step):
    return any(n.startswith(f'{step}.orbax-checkpoint-tmp') for n in _names(save_dir))


def _kill(proc) -> str:
    """SIGKILLs the run and returns what it printed."""
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def _final_state(save_dir, step):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Orbax warns that it reads the shardings from the files.
        state = ocp.PyTreeCheckpointer().restore(os.path.join(save_dir, str(step), 'state'))
    return jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state))[0]


def _log_without_timing(save_dir):
    with open(os.path.join(save_dir, 'training_log.json')) as f:
        return [{k: v for k, v in record.items() if k not in TIMING_FIELDS}
                for record in json.load(f)]


def test_kill_anywhere_then_rerun_is_bitwise_identical(tmp_path, corpus_sample):
    reference_dir, resumed_dir = str(tmp_path / 'reference'), str(tmp_path / 'resumed')
    cache = tmp_path / 'jax_cache'
    reference = _launch(reference_dir, corpus_sample, cache)

    # 1. SIGKILL while step 4 is being written (step 2 is complete): the run pauses inside that
    #    save, after its files went into Orbax's temporary folder and before the commit.
    run = _launch(resumed_dir, corpus_sample, cache, pause_in_save_of=4)
    lines = iter(run.stdout.readline, '')
    assert any(line.startswith('Paused in the save of step 4') for line in lines)
    assert _saving(resumed_dir, 4)
    _kill(run)
    names = _names(resumed_dir)
    assert '2' in names and '4' not in names, names
    assert any(n.startswith('4.orbax-checkpoint-tmp') for n in names), names

    # 2. The rerun resumes from step 2, never from the incomplete step 4; SIGKILL it as soon as
    #    step 6 is complete, wherever it then is.
    run = _launch(resumed_dir, corpus_sample, cache)
    _wait_for(run, lambda: '6' in _names(resumed_dir), 'step 6')
    assert 'Resuming from checkpoint step 2 ' in _kill(run)

    # 3. SIGTERM: the run finishes its step, saves it, says where, and exits 0.
    run = _launch(resumed_dir, corpus_sample, cache)
    _wait_for(run, lambda: '8' in _names(resumed_dir), 'step 8')
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out[-3000:]
    assert 'Resuming from checkpoint step 6' in out, out[-3000:]
    stopped = [line for line in out.splitlines()
               if line.startswith('Stopped by SIGTERM after step')]
    assert stopped, out[-3000:]
    stop_step = int(stopped[0].split('after step ')[1].split('/')[0])
    assert 8 <= stop_step < 12
    saved_to = os.path.join(resumed_dir, str(stop_step))
    assert f'✓ Saved checkpoint: step {stop_step} ({saved_to})' in out
    assert str(stop_step) in _names(resumed_dir)
    assert 'Training complete' not in out

    # 4. The last rerun completes.
    run = _launch(resumed_dir, corpus_sample, cache)
    out, _ = run.communicate(timeout=240)
    assert run.returncode == 0, out[-3000:]
    assert f'Resuming from checkpoint step {stop_step}' in out
    assert not any('orbax-checkpoint-tmp' in n for n in _names(resumed_dir))

    reference_out, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, reference_out[-3000:]
    assert _log_without_timing(resumed_dir) == _log_without_timing(reference_dir)
    expected, actual = _final_state(reference_dir, 12), _final_state(resumed_dir, 12)
    assert [path for path, _ in expected] == [path for path, _ in actual]
    for (path, a), (_, b) in zip(expected, actual):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)


def test_second_ctrl_c_aborts_with_status_130(tmp_path, corpus_sample):
    save_dir = str(tmp_path / 'run')
    run = _launch(save_dir, corpus_sample, tmp_path / 'jax_cache')
    _wait_for(run, lambda: '2' in _names(save_dir), 'step 2')
    run.send_signal(signal.SIGINT)
    # Python runs a handler once for signals that arrive together: send the second after the first
    # was handled, as a person pressing Ctrl-C twice does.
    lines = iter(run.stdout.readline, '')
    assert any(line.startswith('SIGINT received') for line in lines)
    run.send_signal(signal.SIGINT)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 130, out[-3000:]
    assert out.rstrip().endswith('Aborted: nothing was saved after the last checkpoint.')
    assert 'Stopped by' not in out and 'Training complete' not in out


def test_time_budget_saves_exits_0_and_resumes_bitwise(tmp_path, corpus_sample):
    """max_train_seconds stops like SIGTERM: it saves the step it stops at and exits 0, and the
    rerun continues exactly where an uninterrupted run would be."""
    common = [sys.executable, '-m', 'launch.stage_a', '--config=configs/tiny.py', *SMALL,
              '--config.num_epochs=2', '--config.max_steps=400', '--config.log_every=100',
              '--config.eval_every=400', '--config.save_every=400',
              f'--config.data_path={corpus_sample}']
    run = lambda save_dir, *extra: subprocess.run(
        [*common, f'--config.save_dir={save_dir}', *extra], cwd=REPO, env=one_device_env(),
        capture_output=True, text=True, timeout=600)
    reference_dir, budget_dir = tmp_path / 'reference', tmp_path / 'budget'
    reference = run(reference_dir)
    assert reference.returncode == 0, reference.stderr[-3000:]

    first = run(budget_dir, '--config.max_train_seconds=2')
    assert first.returncode == 0, first.stderr[-3000:]
    stopped = [line for line in first.stdout.splitlines() if line.startswith('Stopped by')]
    assert stopped and stopped[0].startswith(
        'Stopped by the time budget (max_train_seconds=2) after step '), first.stdout[-3000:]
    stop_step = int(stopped[0].split('after step ')[1].split('/')[0])
    assert 1 <= stop_step < 400
    assert f'✓ Saved checkpoint: step {stop_step} ' in first.stdout
    assert 'Training complete' not in first.stdout

    second = run(budget_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f'Resuming from checkpoint step {stop_step} ' in second.stdout
    assert _log_without_timing(budget_dir) == _log_without_timing(reference_dir)
    expected, actual = _final_state(reference_dir, 400), _final_state(budget_dir, 400)
    for (path, a), (_, b) in zip(expected, actual):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)
