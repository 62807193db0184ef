"""A gs:// save_dir, end to end, on a local GCS emulator (support/gcs_emulator.py says how each
client is pointed at it): train, SIGKILL inside a save, resume bitwise, load(), export; and an
unreachable or missing bucket fails in one line, after few retries."""

import json

import pytest
import tensorstore
from etils import epath

from muomni_jax.errors import UserError
from muomni_jax.inference import loading, plotting
from muomni_jax.interop import original_checkpoints
from muomni_jax.io import storage
from muomni_jax.training import checkpointing, train
from tests import paused_save_launch
from tests.support.checkpoints import saved_state
from tests.support.configs import RESUME_ARGS, small_config
from tests.support.logs import log_without_timing
from tests.support.processes import launched, one_device_env, run_stage_a, stage_a_command
from tests.support.trees import assert_trees_equal

# The whole module starts fake-gcs-server and its TLS proxy.
pytestmark = pytest.mark.slow


def _args(save_dir, data_path):
    # test_resume's run, cut to 6 steps: every save to the emulator takes seconds.
    return [
        *RESUME_ARGS,
        '--config.max_steps=6',
        f'--config.data_path={data_path}',
        f'--config.save_dir={save_dir}',
    ]


def _env(gcs, **extra):
    return one_device_env(**gcs.env, **extra)


def test_train_kill_resume_bitwise_then_load_and_export(gcs, tmp_path, corpus_sample):
    reference_dir, url = str(tmp_path / 'reference'), f'gs://{gcs.bucket}/runs/resumed'
    with launched(stage_a_command(*_args(reference_dir, corpus_sample))) as reference:
        # SIGKILL inside the save of step 4, after its files went to the bucket and before the
        # commit: on gs:// Orbax writes into 4/ itself and commits with 4/commit_success.txt.
        with launched(
            paused_save_launch.command(4, '--config=configs/tiny.py', *_args(url, corpus_sample)),
            env=_env(gcs),
        ) as run:
            run.wait_for_line('Paused in the save of step 4', timeout=300)
            run.kill()
        root = epath.Path(url)
        assert (root / '4' / 'meta').exists() and not (root / '4' / 'commit_success.txt').exists()
        assert loading.available_steps(url) == [2]

        rerun = run_stage_a(*_args(url, corpus_sample), env=_env(gcs))
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert 'Resuming from checkpoint step 2 ' in rerun.stdout
        assert f'✓ Saved checkpoint: step 6 ({url}/6)' in rerun.stdout
        assert reference.wait(timeout=300) == 0, reference.output_tail()

    # The same records and the same final state, bit for bit, as the uninterrupted local run.
    records = json.loads((root / 'training_log.json').read_text())
    assert log_without_timing(url) == log_without_timing(reference_dir)
    assert_trees_equal(saved_state(reference_dir, 6), saved_state(url, 6))

    # Everything else a run keeps is in the bucket; the write probes left nothing behind.
    names = {p.name for p in root.iterdir()}
    assert {'config.json', 'tokenizer.model', 'training_log.json', '6'} <= names, names
    assert not [n for n in names if n.startswith('.write-test')], names
    assert (root / '4' / 'commit_success.txt').exists()  # Saved again by the rerun.
    events = [n for n in names if n.startswith('events.out.tfevents')]
    assert len(events) == 2, names  # One per launch, each written through TensorFlow's client.
    assert (root / 'tokenizer.model').read_bytes() == (
        epath.Path(reference_dir) / 'tokenizer.model'
    ).read_bytes()

    assert [r['step'] for r in plotting.load_run(url)] == [r['step'] for r in records]
    plotting.plot_runs([url], f'{url}/training_curves.png')  # launch.plot's default output.
    assert (root / 'training_curves.png').read_bytes().startswith(b'\x89PNG')
    loaded, reference_loaded = loading.load(url), loading.load(reference_dir)
    assert loaded.config.save_dir == url
    assert_trees_equal(reference_loaded.params, loaded.params)

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


def _recorded_contexts(monkeypatch):
    """The tensorstore Context specs storage.check_writable opens its probe with."""
    specs, real = [], tensorstore.Context

    def context(spec=None, *args, **kwargs):
        specs.append(spec)
        return real(spec, *args, **kwargs) if spec is not None else real(*args, **kwargs)

    monkeypatch.setattr(tensorstore, 'Context', context)
    return specs


def _assert_few_retries(specs):
    # tensorstore's default is 32 retries backing off to 32 s: minutes before the error. The
    # probe must try a couple of times, briefly, and then say what is wrong.
    [spec] = specs
    retries = spec['gcs_request_retries']
    assert retries['max_retries'] <= 3 and retries['max_delay'] in ('1s', '0.5s'), retries


def test_missing_bucket_is_one_line_after_few_retries(gcs, corpus_sample, monkeypatch):
    """In process: the launcher's path to this error (its `error:` line and status 2 for any
    UserError) is test_launch's and test_bad_inputs'."""
    url = 'gs://no-such-bucket/run'
    specs = _recorded_contexts(monkeypatch)
    with pytest.raises(UserError) as error:
        train.train_and_evaluate(small_config(url, corpus_sample))
    message = str(error.value)
    assert message.startswith(f'save_dir {url} is not writable (NOT_FOUND'), message
    assert '\n' not in message
    _assert_few_retries(specs)


def test_unreachable_server_fails_after_few_retries(gcs, monkeypatch):
    monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', 'http://127.0.0.1:9')  # Nothing listens.
    specs = _recorded_contexts(monkeypatch)
    with pytest.raises(
        UserError,
        match=r'^save_dir gs://bucket/run is not writable \(ABORTED: '
        r'.*Could not connect',
    ):
        storage.check_writable('gs://bucket/run')
    _assert_few_retries(specs)
