"""A gs:// save_dir, end to end, on a local GCS emulator (tests/gcs_emulator.py says how each
client is pointed at it): train, SIGKILL inside a save, resume bitwise, load(), export; and an
unreachable bucket fails in one line, quickly."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from muomni_jax.errors import UserError
from muomni_jax.inference import loading
from muomni_jax.inference import plotting
from muomni_jax.interop import original_checkpoints
from muomni_jax.io import storage
from muomni_jax.training import checkpointing
from tests.conftest import REPO, one_device_env
from tests.gcs_emulator import LocalGcs
from tests.test_resume import (RESUME_ARGS, TIMING_FIELDS, _final_state, _kill,
                               _log_without_timing)


@pytest.fixture(scope='module')
def gcs():
    """The emulator, with this process's own clients pointed at it too."""
    with LocalGcs() as local_gcs:
        saved = {k: os.environ.get(k) for k in local_gcs.env}
        os.environ.update(local_gcs.env)
        try:
            yield local_gcs
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _stage_a(save_dir, data_path):
    # test_resume's run, cut to 6 steps: every save to the emulator takes seconds.
    return [sys.executable, '-m', 'launch.stage_a', '--config=configs/tiny.py', *RESUME_ARGS,
            '--config.max_steps=6', f'--config.data_path={data_path}',
            f'--config.save_dir={save_dir}']


def _env(gcs, **extra):
    env = one_device_env(PYTHONUNBUFFERED='1', **gcs.env)
    env.update(extra)
    return env


def test_train_kill_resume_bitwise_then_load_and_export(gcs, tmp_path, corpus_sample):
    reference_dir, url = str(tmp_path / 'reference'), f'gs://{gcs.bucket}/runs/resumed'
    start = time.time()
    reference = subprocess.Popen(_stage_a(reference_dir, corpus_sample), cwd=REPO,
                                 env=one_device_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)

    # SIGKILL inside the save of step 4, after its files went to the bucket and before the
    # commit: on gs:// Orbax writes into 4/ itself and commits with 4/commit_success.txt.
    run = subprocess.Popen(
        _stage_a(url, corpus_sample), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=_env(gcs, **{checkpointing.PAUSE_IN_SAVE_ENV: '4'}))
    lines = []
    for line in iter(run.stdout.readline, ''):
        lines.append(line)
        if line.startswith('Paused in the save of step 4'):
            break
    else:
        pytest.fail('the run ended before the save of step 4:\n' + ''.join(lines)[-3000:])
    _kill(run)
    root = epath.Path(url)
    assert (root / '4' / 'meta').exists() and not (root / '4' / 'commit_success.txt').exists()
    assert loading.available_steps(url) == [2]

    rerun = subprocess.run(_stage_a(url, corpus_sample), cwd=REPO, env=_env(gcs),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert 'Resuming from checkpoint step 2 ' in rerun.stdout
    assert f'✓ Saved checkpoint: step 6 ({url}/6)' in rerun.stdout
    reference_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_out[-3000:]
    train_seconds = time.time() - start

    # The same records and the same final state, bit for bit, as the uninterrupted local run.
    records = json.loads((root / 'training_log.json').read_text())
    assert [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
            for r in records] == _log_without_timing(reference_dir)
    expected, actual = _final_state(reference_dir, 6), _final_state(url, 6)
    assert [path for path, _ in expected] == [path for path, _ in actual]
    for (path, a), (_, b) in zip(expected, actual):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)

    # Everything else a run keeps is in the bucket; the write probes left nothing behind.
    names = {p.name for p in root.iterdir()}
    assert {'config.json', 'tokenizer.model', 'training_log.json', '6'} <= names, names
    assert not [n for n in names if n.startswith('.write-test')], names
    assert (root / '4' / 'commit_success.txt').exists()  # Saved again by the rerun.
    events = [n for n in names if n.startswith('events.out.tfevents')]
    assert len(events) == 2, names  # One per launch, each written through TensorFlow's client.
    assert (root / 'tokenizer.model').read_bytes() == (
        epath.Path(reference_dir) / 'tokenizer.model').read_bytes()

    assert [r['step'] for r in plotting.load_run(url)] == [r['step'] for r in records]
    plotting.plot_runs([url], f'{url}/training_curves.png')  # launch.plot's default output.
    assert (root / 'training_curves.png').read_bytes().startswith(b'\x89PNG')
    loaded, reference_loaded = loading.load(url), loading.load(reference_dir)
    assert loaded.config.save_dir == url
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(reference_loaded.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # launch.convert's export, which only parses flags and calls this.
    export = tmp_path / 'export' / 'thinker.safetensors'
    assert str(export) in original_checkpoints.export_checkpoint(url, str(export), None)
    assert export.exists()
    # Going back to step 2 (--config.restore_step=2) sets steps 4 and 6 aside, here as on a disk,
    # and Orbax's clean-up of uncommitted folders leaves them be: they hold their commit file.
    checkpointer = checkpointing.Checkpointer(url, max_to_keep=3)
    checkpointer.start_writing(2)
    checkpointer.close()
    names = {p.name for p in root.iterdir()}
    assert loading.available_steps(url) == [2] and '4' not in names and '6' not in names, names
    [aside] = [n for n in names if n.startswith('6.set-aside-')]
    assert (root / aside / 'commit_success.txt').exists() and (root / aside / 'state').is_dir()
    print(f'train, kill and resume on the emulator: {train_seconds:.0f} s')


def test_missing_bucket_is_one_line_within_seconds(gcs, corpus_sample):
    url = 'gs://no-such-bucket/run'
    start = time.time()
    result = subprocess.run(_stage_a(url, corpus_sample), cwd=REPO, env=_env(gcs),
                            capture_output=True, text=True, timeout=120)
    seconds = time.time() - start
    assert result.returncode == 2, result.stderr[-3000:]
    # Other stderr lines are library INFO logs (the emulator's test token, matplotlib's cache).
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert errors[0].startswith(f'error: save_dir {url} is not writable (NOT_FOUND'), errors[0]
    assert seconds < 60, seconds


def test_unreachable_server_fails_within_seconds(gcs, monkeypatch):
    monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', 'http://127.0.0.1:9')  # Nothing listens.
    start = time.time()
    with pytest.raises(UserError, match=r'^save_dir gs://bucket/run is not writable \(ABORTED: '
                                        r'.*Could not connect'):
        storage.check_writable('gs://bucket/run')
    assert time.time() - start < 10
