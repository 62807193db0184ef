"""TensorBoard events, console progress, profiling and plots: what a person watching a run sees."""

import contextlib
import io
import json
import os
import pathlib
import shutil
import struct
import types

import jax
import numpy as np
import pytest

from muomni_jax.errors import UserError
from muomni_jax.inference import loading, plotting
from muomni_jax.training import reporting, run_plan, train
from tests.support.configs import small_config
from tests.support.logs import read_events
from tests.support.processes import run_module

CONTROL_CHARACTERS = ('\r', '\x1b')


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the PNG signature."""
    with open(path, 'rb') as f:
        header = f.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    assert header[12:16] == b'IHDR'
    return struct.unpack('>II', header[16:24])


@pytest.fixture(scope='module')
def profiled_run(trained_run):
    """conftest.trained_run: one run whose output is not a terminal (as under CI or nohup),
    profiling steps 2-3, with the default sample_prompts. In process; the launcher's own
    output, in a subprocess, is checked the same way by test_launch's CLI smoke run."""
    save_dir, stdout, stderr = trained_run
    return pathlib.Path(save_dir), types.SimpleNamespace(stdout=stdout, stderr=stderr)


def test_plain_lines_without_control_characters_when_not_a_terminal(profiled_run):
    _, result = profiled_run
    for stream in (result.stdout, result.stderr):
        for character in CONTROL_CHARACTERS:
            assert character not in stream, repr(stream)
    lines = result.stdout.splitlines()
    assert '[Step 2/6] loss=' in result.stdout and '[Step 6/6] loss=' in result.stdout
    assert not any(line.startswith('Step ') for line in lines), 'progress bar when not a TTY'


def test_event_files_hold_the_logged_scalars_and_samples(profiled_run):
    save_dir, result = profiled_run
    events = read_events(save_dir)
    log = json.load(open(save_dir / 'training_log.json'))
    train_records = [r for r in log if 'loss' in r]
    val_records = [r for r in log if 'val_loss' in r]
    for field, tag in (
        ('loss', 'train/loss'),
        ('ppl', 'train/ppl'),
        ('lr', 'train/lr'),
        ('grad_norm', 'train/grad_norm'),
        ('tokens_per_s', 'train/tokens_per_s'),
        ('nonfinite_steps', 'train/nonfinite_steps'),
        ('tokens', 'train/tokens'),
    ):
        assert [s for s, _ in events[tag]] == [2, 4, 6], tag
        np.testing.assert_allclose(
            [v for _, v in events[tag]], [r[field] for r in train_records], rtol=1e-5, err_msg=tag
        )
    for field, tag in (('val_loss', 'val/loss'), ('val_ppl', 'val/ppl')):
        assert [s for s, _ in events[tag]] == [3, 6], tag
        np.testing.assert_allclose(
            [v for _, v in events[tag]], [r[field] for r in val_records], rtol=1e-5, err_msg=tag
        )
    # The evaluation samples of the default sample_prompts, as text summaries.
    for tag, prompt in (('samples/0', 'The cat sat on the'), ('samples/1', 'Python is a')):
        assert [s for s, _ in events[tag]] == [3, 6], tag
        assert all(text.startswith(f'Sample: {prompt!r} → ') for _, text in events[tag])
        assert f'  {events[tag][-1][1]}\n' in result.stdout  # The line printed at step 6.
    # Tokens seen: step * batch_size * ctx_len, so runs can be plotted against data seen.
    assert [r['tokens'] for r in train_records] == [2 * 8 * 32, 4 * 8 * 32, 6 * 8 * 32]


def _rerun(save_dir, corpus_sample, **fields):
    """small_config on save_dir again (one device), its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.train_and_evaluate(small_config(save_dir, corpus_sample, **fields))
    return out.getvalue()


def test_a_finished_run_says_so_once_and_names_the_profile_it_drops(
    trained_run, tmp_path, corpus_sample
):
    save_dir = tmp_path / 'run'
    shutil.copytree(trained_run[0], save_dir)
    before = sorted(os.listdir(save_dir / 'plugins' / 'profile'))
    out = _rerun(save_dir, corpus_sample, profile_steps='4,5')
    assert out.count('Nothing to train') == 1
    assert (
        f'Nothing to train: {save_dir} is complete at step 6 of 6. To train further, raise '
        '--config.max_steps (or --config.num_epochs), or give a new --config.save_dir. '
        'profile_steps=4,5 is not traced: no step runs.'
    ) in out.splitlines()
    for contradiction in ('Starting training', 'Training complete', 'Final validation', '[Step'):
        assert contradiction not in out
    assert sorted(os.listdir(save_dir / 'plugins' / 'profile')) == before
    assert loading.available_steps(str(save_dir)) == [3, 6]


def test_a_profile_behind_the_resumed_step_is_named(trained_run, tmp_path, corpus_sample):
    save_dir = tmp_path / 'run'
    shutil.copytree(trained_run[0], save_dir)
    before = sorted(os.listdir(save_dir / 'plugins' / 'profile'))
    out = _rerun(save_dir, corpus_sample, max_steps=7, profile_steps='2,3')
    assert (
        'profile_steps=2,3 is not traced: this run resumes after step 6. Give later steps to trace.'
    ) in out.splitlines()
    assert '[Step 7/7]' in out and 'Training complete!' in out
    assert sorted(os.listdir(save_dir / 'plugins' / 'profile')) == before


def test_profile_steps_write_a_trace_under_save_dir(profiled_run):
    save_dir, result = profiled_run
    profile_dir = save_dir / 'plugins' / 'profile'
    traces = os.listdir(profile_dir)
    assert len(traces) == 1
    files = os.listdir(profile_dir / traces[0])
    assert any(f.endswith('.xplane.pb') for f in files), files  # TensorBoard's Profile tab.
    assert 'perfetto_trace.json.gz' in files, files  # ui.perfetto.dev
    assert 'Profiling steps 2-3...' in result.stdout
    assert f'Profile of steps 2-3 written to {profile_dir / traces[0]}' in result.stdout


@pytest.mark.slow
def test_plot_command_writes_png_comparing_runs(profiled_run, tmp_path):
    save_dir, _ = profiled_run
    # A second, different run beside the trained one: a hand-written log.
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'training_log.json').write_text(
        json.dumps(
            [
                {'step': 1, 'loss': 6.0, 'ppl': 403.4, 'tokens': 256},
                {'step': 2, 'loss': 5.5, 'ppl': 244.7, 'tokens': 512},
                {'step': 2, 'val_loss': 5.75, 'val_ppl': 314.2},
            ]
        )
    )
    output = tmp_path / 'curves.png'
    result = run_module(
        'launch.plot',
        f'--checkpoint_dir={save_dir}',
        f'--checkpoint_dir={other}',
        f'--output={output}',
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Wrote {output}' in result.stdout
    assert png_size(output) == (1200, 800)
    # What is drawn of the same two runs: each run's own curves against step, from its log.
    log = json.load(open(save_dir / 'training_log.json'))
    fig = plotting.plot_runs([str(save_dir), str(other)])
    drawn = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in fig.axes[0].get_lines()
    }
    assert drawn == {
        'run train': ([2, 4, 6], [r['loss'] for r in log if 'loss' in r]),
        'run validation': ([3, 6], [r['val_loss'] for r in log if 'val_loss' in r]),
        'other train': ([1, 2], [6.0, 5.5]),
        'other validation': ([2], [5.75]),
    }

    missing = run_module('launch.plot', f'--checkpoint_dir={tmp_path / "nope"}', timeout=120)
    assert missing.returncode == 2
    assert f'error: {tmp_path / "nope" / "training_log.json"} does not exist' in missing.stderr
    assert 'Traceback' not in missing.stderr


def test_plot_runs_uses_tokens_or_config_for_the_tokens_axis(tmp_path):
    new, old = tmp_path / 'new', tmp_path / 'old'
    new.mkdir(), old.mkdir()
    (new / 'training_log.json').write_text(
        json.dumps(
            [
                {'step': 10, 'loss': 5.0, 'ppl': 148.4, 'tokens': 1000},
                {'step': 20, 'val_loss': 4.5, 'val_ppl': 90.0},  # A validation-only record.
                {'step': 30, 'loss': 4.0, 'ppl': 54.6, 'tokens': 3000},
            ]
        )
    )
    # A log from before 'tokens' existed: tokens come from config.json's batch_size * ctx_len.
    (old / 'training_log.json').write_text(json.dumps([{'step': 10, 'loss': 6.0, 'ppl': 403.4}]))
    (old / 'config.json').write_text(json.dumps({'batch_size': 4, 'ctx_len': 8}))

    fig = plotting.plot_runs([str(new), str(old)], str(tmp_path / 'both.png'))
    assert png_size(tmp_path / 'both.png') == (1200, 800)
    loss_vs_tokens = fig.axes[1]
    lines = {line.get_label(): list(line.get_xdata()) for line in loss_vs_tokens.get_lines()}
    assert lines == {'new train': [1000, 3000], 'new validation': [2000], 'old train': [320]}
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [5.0, 4.0]

    (old / 'config.json').unlink()
    with pytest.raises(UserError, match='cannot plot against tokens'):
        plotting.plot_runs([str(old)])
    (old / 'training_log.json').write_text('not json')
    with pytest.raises(UserError, match='is not valid JSON'):
        plotting.plot_runs([str(old)])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_progress_bar_with_loss_and_eta(tmp_path):
    terminal = _Terminal()
    reporter = reporting.Reporter(str(tmp_path), total_steps=10, start_step=2, stream=terminal)
    for step in range(3, 6):
        reporter.advance(step, state=None)
    reporter.write_scalars(5, {'step': 5, 'loss': 4.25, 'tokens_per_s': 12345.0})
    reporter.log('[Step 5/10] loss=4.250')
    reporter.close()
    screen = terminal.getvalue()
    assert '\r' in screen  # The bar redraws in place...
    assert '[Step 5/10] loss=4.250\n' in screen  # ...while log lines stay whole above it.
    last_bar = screen.rstrip('\n').split('\r')[-1]
    assert last_bar.startswith('Step 5/10 |'), last_bar
    assert 'ETA ' in last_bar and 'loss=4.250, 12,345 tok/s' in last_bar, last_bar


def test_not_a_terminal_gets_only_the_lines(tmp_path):
    stream = io.StringIO()
    reporter = reporting.Reporter(str(tmp_path), total_steps=10, start_step=0, stream=stream)
    reporter.advance(1, state=None)
    reporter.write_scalars(1, {'step': 1, 'loss': 4.25})
    reporter.log('[Step 1/10] loss=4.250')
    reporter.close()
    assert stream.getvalue() == '[Step 1/10] loss=4.250\n'


def test_write_texts_and_numeric_fields_reach_tensorboard(tmp_path):
    reporter = reporting.Reporter(str(tmp_path), total_steps=10, start_step=0, stream=io.StringIO())
    # Any numeric field a record gains (MFU, say) is written; strings and bookkeeping are not.
    reporter.write_scalars(
        4,
        {
            'step': 4,
            'epoch': 1,
            'elapsed_s': 3.0,
            'loss': 2.5,
            'mfu': 0.25,
            'val_loss': 2.75,
            'note': 'text',
        },
    )
    reporter.write_texts(4, {'samples/0': 'The cat sat on the mat.'})
    reporter.close()
    events = read_events(tmp_path)
    assert events == {
        'train/loss': [(4, 2.5)],
        'train/mfu': [(4, 0.25)],
        'val/loss': [(4, 2.75)],
        'samples/0': [(4, 'The cat sat on the mat.')],
    }


def test_reporter_on_other_processes_writes_nothing(tmp_path):
    stream = io.StringIO()
    reporter = reporting.Reporter(
        str(tmp_path / 'run'),
        total_steps=10,
        start_step=0,
        profile_steps=(1, 2),
        enabled=False,
        stream=stream,
    )
    reporter.advance(1, state=None)
    reporter.write_scalars(1, {'loss': 1.0})
    reporter.write_texts(1, {'samples/0': 'x'})
    reporter.log('hello')
    reporter.close()
    assert stream.getvalue() == '' and not (tmp_path / 'run').exists()


@pytest.mark.parametrize('text', ['5', '3,2', '0,4', 'a,b', '1,2,3', '-1,2'])
def test_bad_profile_steps_is_a_clear_error(tmp_path, corpus_sample, text):
    config = small_config(tmp_path / 'run', corpus_sample, profile_steps=text)
    with pytest.raises(UserError, match=r'profile_steps .* must be "start,end" with 1 <= start'):
        run_plan.resolve(config)
    assert reporting.parse_profile_steps(' ') is None
    assert reporting.parse_profile_steps('4,9') == (4, 9)


def test_profile_of_a_resumed_run_that_ends_early(tmp_path):
    # Resumed at step 2 inside profile_steps 2-5, and stopped after step 3: the trace covers step 3.
    stream = io.StringIO()
    reporter = reporting.Reporter(
        str(tmp_path), total_steps=3, start_step=2, profile_steps=(2, 5), stream=stream
    )
    state = jax.numpy.ones((4, 4))
    reporter.advance(3, state @ state)
    reporter.close()
    traces = os.listdir(tmp_path / 'plugins' / 'profile')
    assert len(traces) == 1
    assert stream.getvalue().splitlines() == [
        'Profiling steps 3-5...',
        f'Profile of steps 3-3 written to {tmp_path / "plugins" / "profile" / traces[0]}',
    ]
