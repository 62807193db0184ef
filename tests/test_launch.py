"""The launcher end to end, as a user runs it: a subprocess, one CPU device, a tiny config."""

import json
import os

import jax
import pytest

from muomni_jax.training import compilation_cache
from tests.support.configs import SMALL, small_config
from tests.support.processes import one_device_env, run_stage_a

CONTROL_CHARACTERS = ('\r', '\x1b')


@pytest.mark.slow
def test_trains_saves_and_resumes(tmp_path, corpus_sample):
    """stage_a's CLI smoke run: what CI or nohup sees (stdout not a terminal), the files of a
    save_dir, and a rerun with a later max_steps."""
    save_dir = tmp_path / 'run'
    # A relative save_dir, as in the shipped configs (Orbax itself wants absolute paths).
    common = [*SMALL, f'--config.data_path={corpus_sample}', '--config.save_dir=run']
    first = run_stage_a(*common, '--config.max_steps=6', cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    for line in (
        f'Loading data from {corpus_sample}...',
        'Training a 256-piece BPE tokenizer',
        'Vocab size: 256',
        'Training samples: ',
        'Initializing Thinker (0.1M parameters)...',
        'Using device: cpu (1 device)',
        'Starting training...',
        'Epoch 1/1:',
        '[Step 2/6] loss=',
        '[Step 6/6] loss=',
        '→ Validation: loss=',
        '→ Final validation: loss=',
        '✓ Saved checkpoint: step 3',
        '✓ Saved checkpoint: step 6',
        'Training complete! Time: ',
        'Final validation PPL: ',
    ):
        assert line in out, f'missing {line!r} in:\n{out}'
    assert 'Traceback' not in first.stderr, first.stderr[-3000:]
    assert ' tok/s' in out and 's/step' in out
    # Not a terminal: plain lines, no progress bar redrawn in place, no colours.
    for stream in (first.stdout, first.stderr):
        for character in CONTROL_CHARACTERS:
            assert character not in stream, repr(stream)
    assert not any(line.startswith('Step ') for line in out.splitlines()), 'a progress bar'
    assert sorted(f for f in os.listdir(save_dir) if not f.startswith('events.out.tfevents')) == [
        '3',
        '6',
        'config.json',
        'tokenizer.model',
        'training_log.json',
    ]
    config = json.load(open(save_dir / 'config.json'))
    assert config['vocab_size'] == 256 and config['max_steps'] == 6
    # SMALL is small_config as flags: the in-process tests train what the launcher trains.
    assert config == json.loads(small_config('run', corpus_sample).to_json_best_effort())
    log = json.load(open(save_dir / 'training_log.json'))
    assert [r['step'] for r in log] == [2, 3, 4, 6]
    for record in log:
        if record['step'] % 2 == 0:
            assert {
                'step',
                'epoch',
                'loss',
                'ppl',
                'lr',
                'grad_norm',
                'tokens_per_s',
                'elapsed_s',
            } <= set(record)
    assert {'val_loss', 'val_ppl'} <= set(log[1]) and {'val_loss', 'val_ppl'} <= set(log[-1])

    # The same command with a later max_steps continues from step 6, reusing the tokenizer.
    second = run_stage_a(*common, '--config.max_steps=8', cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'Resuming from checkpoint step 6' in second.stdout
    assert 'Training a' not in second.stdout
    assert '[Step 8/8]' in second.stdout and '[Step 2/8]' not in second.stdout
    log = json.load(open(save_dir / 'training_log.json'))
    assert [r['step'] for r in log] == [2, 3, 4, 6, 8]


@pytest.mark.slow
def test_bad_config_is_one_clear_line(tmp_path, corpus_sample):
    result = run_stage_a(
        *SMALL,
        f'--config.data_path={corpus_sample}',
        f'--config.save_dir={tmp_path / "run"}',
        '--config.d_model=66',
    )
    assert result.returncode == 2
    assert 'error: d_model (66) must be divisible by n_heads (4)' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_the_compilation_cache_is_filled_once_then_reused(tmp_path, corpus_sample):
    cache = tmp_path / 'jax_cache'
    common = [
        *SMALL,
        f'--config.data_path={corpus_sample}',
        '--config.max_steps=2',
        '--config.eval_every=2',
        '--config.save_every=2',
    ]
    env = one_device_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    first = run_stage_a(
        *common,
        f'--config.save_dir={tmp_path / "a"}',
        f'--config.compilation_cache_dir={cache}',
        env=env,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert f'Compilation cache: {cache}' in first.stdout
    entries = set(os.listdir(cache))
    assert entries
    # A second run of the same steps compiles nothing new: every entry is read back.
    second = run_stage_a(
        *common,
        f'--config.save_dir={tmp_path / "b"}',
        f'--config.compilation_cache_dir={cache}',
        env=env,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert set(os.listdir(cache)) == entries


def test_the_compilation_cache_has_an_off_switch():
    enabled = jax.config.jax_enable_compilation_cache
    try:
        assert compilation_cache.enable(False, 'x') is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update('jax_enable_compilation_cache', enabled)
