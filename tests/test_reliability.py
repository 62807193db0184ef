"""Nothing lost, nothing silently wrong (issue 22): one run per save_dir, checkpoints and token
caches that prove themselves, damaged side files, failures forwarded to every process, test hooks
that are inert outside the tests, durable whole-file writes."""

import errno
import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from muomni_jax.data import token_cache
from muomni_jax.errors import UserError, first_line
from muomni_jax.io import atomic_write, run_dir
from muomni_jax.parallel import distributed
from muomni_jax.training import checkpointing, train
from tests.support.checkpoints import restore_state
from tests.support.configs import SMALL, corpus_config, small_config
from tests.support.environment import REPO
from tests.support.logs import log_without_timing
from tests.support.processes import (
    launched,
    module_command,
    one_device_env,
    run_code,
    run_module,
    run_stage_a,
    stage_a_command,
)
from tests.support.token_caches import open_cache, random_documents
from tests.support.trees import assert_trees_equal


def _flip_bytes(path, count=64):
    """Inverts `count` bytes in the middle of a file, keeping its size."""
    with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(count)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _largest_file(folder):
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return max(files, key=os.path.getsize)


# ----------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.slow  # Trains in process.
def test_a_step_with_flipped_bytes_is_named_and_the_rerun_resumes_bitwise_from_the_one_before(
    tmp_path, corpus_sample, capsys
):
    reference_dir, save_dir = tmp_path / 'reference', tmp_path / 'run'
    config = lambda d: small_config(d, corpus_sample, max_steps=6, save_every=3, log_every=1)
    train.train_and_evaluate(config(reference_dir))
    train.train_and_evaluate(config(save_dir))
    _flip_bytes(_largest_file(save_dir / '6' / 'state'))
    capsys.readouterr()

    train.train_and_evaluate(config(save_dir))
    captured = capsys.readouterr()
    # Where the bytes land decides who sees them: tensorstore, when they hit a structure it
    # checks, or else our checksums (OCDBT lays its files out in the order of async writes), as
    # test_restore_checks_the_checksums_and_finiteness_of_every_array shows alone. Either way
    # the step is named and skipped.
    assert f'Warning: checkpoint step 6 in {save_dir} is unreadable (' in captured.err
    assert (
        'differ from the checksums of their save' in captured.err
        or 'Encountered error while reading' in captured.err
    ), captured.err
    assert 'Resuming from checkpoint step 3' in captured.out
    assert log_without_timing(save_dir) == log_without_timing(reference_dir)
    assert_trees_equal(
        restore_state(config(reference_dir), reference_dir, 6),
        restore_state(config(save_dir), save_dir, 6),
    )


def test_restore_checks_the_checksums_and_finiteness_of_every_array(tmp_path):
    state = {
        'w': jax.numpy.arange(12, dtype=jax.numpy.float32).reshape(3, 4),
        'step': jax.numpy.int32(7),
    }
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    saver = checkpointing.Checkpointer(str(tmp_path / 'ckpt'))
    saver.start_writing(0)
    saver.save(1, state, {'step': 1})
    saver.save(2, {'w': state['w'].at[0, 0].set(np.nan), 'step': state['step']}, {'step': 2})
    saver.close()
    reader = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), read_only=True)
    restored, meta = reader.restore(1, abstract)
    np.testing.assert_array_equal(restored['w'], state['w'])
    assert set(meta['checksums']) == {"['step']", "['w']"}
    with pytest.raises(checkpointing.DamagedCheckpoint, match='NaN/Inf'):
        reader.restore(2, abstract)
    # The same array with two elements swapped has the same plain sum: the weighted one differs.
    swapped = np.asarray(state['w']).copy()
    swapped[0, 1], swapped[0, 2] = swapped[0, 2], swapped[0, 1]
    assert checkpointing.tree_checksums({'w': swapped})["['w']"][0] == meta['checksums']["['w']"][0]
    assert checkpointing.tree_checksums({'w': swapped}) != {"['w']": meta['checksums']["['w']"]}
    with pytest.raises(checkpointing.DamagedCheckpoint, match=r"first \['w'\]"):
        checkpointing.verify({'w': swapped, 'step': state['step']}, meta, 'step 1')
    reader.close()


def test_checksums_do_not_depend_on_the_mesh():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    mesh = jax.make_mesh((8,), ('d',), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
    assert checkpointing.tree_checksums(x) == checkpointing.tree_checksums(sharded)


# ----------------------------------------------------------------------------------------------
# One run per save_dir


@pytest.mark.slow
def test_a_second_run_on_a_live_save_dir_stops_at_once_and_a_dead_holder_is_taken_over(
    tmp_path, corpus_sample
):
    save_dir = tmp_path / 'run'
    args = [*SMALL, f'--config.data_path={corpus_sample}', f'--config.save_dir={save_dir}']
    with launched(
        stage_a_command(*args, '--config.max_steps=100000', '--config.save_every=2')
    ) as first:
        first.wait_for_line('✓ Saved checkpoint: step 2')  # Between steps.
        second = run_stage_a(*args, '--config.max_steps=4')
        assert second.returncode == 2, second.stderr[-3000:]
        assert (
            f'error: save_dir {save_dir} is in use by another run: pid {first.pid} on host '
        ) in second.stderr
        # Refused before it reads a checkpoint, loads data or compiles.
        assert 'Loading data' not in second.stdout, second.stdout
        assert 'Resuming' not in second.stdout and 'Initializing' not in second.stdout
        assert first.process.poll() is None  # The first run trains on, untouched.
        first.kill()
    third = run_stage_a(*args, '--config.max_steps=6')
    assert third.returncode == 0, third.stderr[-3000:]
    assert (
        f'Took over the lock of save_dir {save_dir} from pid {first.pid} on host ' in third.stdout
    ), third.stdout[-3000:]
    assert 'Resuming from checkpoint step ' in third.stdout


def _locked_for_another_process(save_dir) -> bool:
    """POSIX locks belong to a process (it may lock its own file again): ask another one."""
    probe = subprocess.run(
        [
            sys.executable,
            '-c',
            'import sys; from muomni_jax.training import run_lock; '
            'run_lock.RunLock(sys.argv[1]).acquire()',
            str(save_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode == 0:
        return False
    assert 'is in use by another run' in probe.stderr, probe.stderr
    return True


def test_the_lock_leaves_no_trace_and_relocks_a_file_removed_under_it(tmp_path, monkeypatch):
    from muomni_jax.training import run_lock

    save_dir = tmp_path / 'new' / 'run'
    lock = run_lock.RunLock(str(save_dir))
    lock.acquire()
    assert (save_dir / run_dir.LOCK).exists()
    assert _locked_for_another_process(save_dir)
    lock.release()
    assert not save_dir.exists()  # It made save_dir, and nothing else was written there.
    assert (tmp_path / 'new').exists()

    # A holder that ends between a run's open and its lockf removes the file that run opened:
    # the run must lock the new file, or two runs would hold two files.
    save_dir.mkdir()
    (save_dir / 'kept').write_text('x')
    real_lockf = run_lock.fcntl.lockf
    calls = []

    def holder_ends_first(fd, flags):
        if not calls:
            os.remove(save_dir / run_dir.LOCK)
            (save_dir / run_dir.LOCK).write_text('')  # The next run's file.
        calls.append(fd)
        return real_lockf(fd, flags)

    monkeypatch.setattr(run_lock.fcntl, 'lockf', holder_ends_first)
    lock = run_lock.RunLock(str(save_dir))
    lock.acquire()
    monkeypatch.setattr(run_lock.fcntl, 'lockf', real_lockf)
    assert len(calls) == 2
    assert _locked_for_another_process(save_dir)
    lock.release()
    assert sorted(p.name for p in save_dir.iterdir()) == ['kept']  # An existing save_dir stays.


# ----------------------------------------------------------------------------------------------
# A save that fails


HELD_LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'held_launch.py')


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs of the test's own (needs root, as in this project's CI container)."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    mounted = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        pytest.skip(
            f'cannot mount a tmpfs here ({mounted.stderr.strip()[:200]}); '
            'test_a_save_that_fails_in_orbax_is_one_line covers a failed save'
        )
    try:
        yield disk
    finally:
        subprocess.run(['umount', '-l', str(disk)], check=False)


def _fill(disk, leave: int):
    """Fills the filesystem of `disk`, then frees `leave` bytes; returns the filler's path."""
    filler = disk / 'filler'
    chunk = b'\0' * 65536
    with open(filler, 'wb') as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def _committed(step_dir) -> bool:
    metadata = step_dir / '_CHECKPOINT_METADATA'
    try:
        return json.loads(metadata.read_text()).get('commit_timestamp_nsecs') is not None
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_a_full_disk_fails_the_save_in_one_line_and_the_rerun_resumes(
    small_disk, tmp_path, corpus_sample
):
    save_dir = small_disk / 'run'
    release = tmp_path / 'release'
    args = [
        *SMALL,
        f'--config.data_path={corpus_sample}',
        '--config.save_every=2',
        '--config.max_steps=8',
    ]
    held = [
        sys.executable,
        HELD_LAUNCH,
        '3',
        f'until={release}',
        '--config=configs/tiny.py',
        *args,
        f'--config.save_dir={save_dir}',
    ]
    with launched(held, stderr=True) as run:
        run.wait_for_line('Holding before step 3')
        run.wait_until(lambda: _committed(save_dir / '2'), 'step 2 to be committed')
        filler = _fill(small_disk, leave=64 * 1024)  # The log fits; a checkpoint does not.
        release.touch()
        assert run.wait() == 2, run.output_tail()
    assert run.stderr.strip().splitlines() == [
        'error: the checkpoint of step 4 could not be written (No space left on device); the '
        f'newest intact checkpoint is step 2: free space in {save_dir}; rerun to continue from '
        'step 2'
    ], run.stderr[-3000:]
    assert '4' not in os.listdir(save_dir)  # Half-written: never listed, never resumed.
    assert not (save_dir / 'run.lock').exists()

    filler.unlink()
    rerun = run_stage_a(*args, f'--config.save_dir={save_dir}')
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'Resuming from checkpoint step 2 ' in rerun.stdout
    reference_dir = tmp_path / 'reference'
    reference = run_stage_a(*args, f'--config.save_dir={reference_dir}')
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert log_without_timing(save_dir) == log_without_timing(reference_dir)


# launch.stage_a with Orbax's commit of step 4 (the rename of its temporary folder) failing as
# on a mount that went away: a genuine failure inside Orbax's background save, with no mount.
_LOST_MOUNT_AT_STEP_4 = """
import errno, os, runpy, sys
from orbax.checkpoint._src.path import async_path
real_rename = async_path.rename
async def rename(src, dst):
    if os.path.basename(str(dst)) == '4':
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN), str(dst))
    return await real_rename(src, dst)
async_path.rename = rename
sys.argv = ['launch.stage_a', *sys.argv[1:]]
runpy.run_module('launch.stage_a', run_name='__main__', alter_sys=True)
"""


def test_a_save_that_fails_in_orbax_is_one_line(tmp_path, corpus_sample):
    save_dir = tmp_path / 'run'
    result = run_code(
        _LOST_MOUNT_AT_STEP_4,
        '--config=configs/tiny.py',
        *SMALL,
        f'--config.data_path={corpus_sample}',
        f'--config.save_dir={save_dir}',
        '--config.save_every=2',
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        'error: the checkpoint of step 4 could not be written (Transport endpoint is not '
        f'connected); the newest intact checkpoint is step 2: check that {save_dir} is still '
        'mounted and writable; rerun to continue from step 2'
    ], result.stderr[-3000:]
    assert '4' not in os.listdir(save_dir) and '2' in os.listdir(save_dir)
    assert not (save_dir / 'run.lock').exists()


def test_a_bug_in_a_save_keeps_its_traceback(tmp_path, monkeypatch):
    """Only storage failures become SaveFailed's one line; a bug must not read as a full disk."""
    checkpointer = checkpointing.Checkpointer(str(tmp_path / 'run'), max_to_keep=2)
    checkpointer.start_writing(0)

    def broken(*args, **kwargs):
        raise TypeError('a bug in the save')

    monkeypatch.setattr(checkpointer._manager, 'save', broken)
    with pytest.raises(TypeError, match='a bug in the save'):
        checkpointer.save(1, {'w': np.ones(3, np.float32)}, {'step': 1})
    checkpointer.close()  # Closes without raising again.
    assert checkpointing.is_io_error(
        ValueError('RESOURCE_EXHAUSTED: Error writing "rng/0" [os_error_code=28]')
    )
    assert checkpointing.is_io_error(RuntimeError('wrapped')) is False


# ----------------------------------------------------------------------------------------------
# Token caches


def test_damaged_document_offsets_are_named_and_rebuilt(tmp_path, tokenizer):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n'.join(random_documents(300)) + '\n')
    config = corpus_config(corpus, tmp_path / 'cache')
    clean = {w: np.array(s.doc_starts) for w, s in open_cache(config, tokenizer).items()}
    directory = next((tmp_path / 'cache').iterdir())
    _flip_bytes(directory / 'train-00000-of-00001.docs', count=16)
    lines = []
    rebuilt = open_cache(config, tokenizer, lines=lines)
    assert (
        'train-00000-of-00001.docs holds document offsets that do not start at 0, increase'
        in lines[0]
        and 'rebuilding' in lines[0]
    )
    for where, starts in clean.items():
        np.testing.assert_array_equal(rebuilt[where].doc_starts, starts)


def test_token_ids_past_the_vocabulary_stop_the_read_and_name_the_file(tmp_path, tokenizer):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n'.join(random_documents(300)) + '\n')
    config = corpus_config(corpus, tmp_path / 'cache')
    open_cache(config, tokenizer)
    path = next((tmp_path / 'cache').iterdir()) / 'train-00000-of-00001.tokens'
    with open(path, 'r+b') as f:  # Sizes intact: ids 65535 in the uint16 file.
        f.seek(200)
        f.write(b'\xff\xff' * 4)
    stream = open_cache(config, tokenizer)[('train', 0)]  # Opening reads no token: no full scan.
    stream.windows(np.array([stream.num_windows(16) - 1]), 16)  # Windows elsewhere read fine.
    with pytest.raises(
        UserError,
        match=rf'token cache file {path} holds token id 65535, past '
        r'the vocabulary \(256\): the file is damaged; delete',
    ):
        stream.windows(np.arange(stream.num_windows(16)), 16)


def test_a_full_disk_during_a_build_is_one_line_and_leaves_no_partial_file(
    tmp_path, tokenizer, monkeypatch
):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n'.join(random_documents(300)) + '\n')

    def full(self, *args):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(token_cache._StreamWriter, 'append', full)
    with pytest.raises(
        UserError,
        match=r'^no space left while building the token cache in '
        r'.*\(No space left on device\); no partial file was kept: free space',
    ):
        open_cache(corpus_config(corpus, tmp_path / 'cache'), tokenizer)
    directory = next((tmp_path / 'cache').iterdir())
    assert not [n for n in os.listdir(directory) if '.partial-' in n or n.endswith('.tokens')]


@pytest.mark.slow
def test_two_builders_of_one_cache_take_turns(tmp_path):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n'.join(random_documents(3000)) + '\n')
    paused = tmp_path / 'paused'
    args = [
        '--config=configs/tiny.py',
        *SMALL,
        f'--config.data_path={corpus}',
        f'--config.cache_dir={tmp_path / "cache"}',
        '--config.vocab_size=80',
    ]
    built = run_module('launch.prepare_data', *args, f'--config.save_dir={tmp_path / "run"}')
    assert built.returncode == 0, built.stderr[-3000:]
    for name in os.listdir(tmp_path / 'cache'):  # Built; now a rebuild of the same key.
        shutil.rmtree(tmp_path / 'cache' / name)
    # Two runs (two save_dirs: one save_dir has one run) with the same tokenizer and data.
    shutil.copytree(tmp_path / 'run', tmp_path / 'other_run')
    prepare = [
        sys.executable,
        os.path.join(REPO, 'tests', 'paused_cache_build.py'),
        str(paused),
        'launch.prepare_data',
        *args,
        f'--config.save_dir={tmp_path / "run"}',
    ]
    with launched(prepare, env=one_device_env()) as first:
        # Paused inside its build, holding the build lock.
        first.wait_until(paused.exists, 'the first build pausing mid-build', timeout=120)
        with launched(
            module_command(
                'launch.prepare_data', *args, f'--config.save_dir={tmp_path / "other_run"}'
            )
        ) as second:
            # It waits its turn (it says so, then blocks on the lock): it neither builds nor
            # deletes.
            waiting = second.wait_for_line(
                'Token cache: waiting for another run building ', timeout=120
            )
            directory = next((tmp_path / 'cache').iterdir())
            assert str(directory) in waiting and second.process.poll() is None
            assert any('.partial-' in n for n in os.listdir(directory))
            assert 'Token cache: building' not in second.stdout
            first.kill()
            assert second.wait(timeout=300) == 0, second.output_tail()
            out = second.stdout
            assert 'an earlier build of' in out and 'was interrupted; rebuilding it' in out, out


# ----------------------------------------------------------------------------------------------
# Side files


@pytest.mark.slow  # Trains in process.
def test_an_emptied_training_log_is_set_aside_and_the_run_continues(
    tmp_path, corpus_sample, capsys
):
    save_dir = tmp_path / 'run'
    train.train_and_evaluate(small_config(save_dir, corpus_sample, max_steps=3, save_every=3))
    (save_dir / 'training_log.json').write_text('')
    capsys.readouterr()
    train.train_and_evaluate(small_config(save_dir, corpus_sample, max_steps=6, save_every=3))
    err = capsys.readouterr().err
    damaged = [n for n in os.listdir(save_dir) if n.startswith('training_log.json.damaged-')]
    assert len(damaged) == 1 and (save_dir / damaged[0]).read_text() == ''
    assert f'{save_dir}/training_log.json is damaged (JSONDecodeError: ' in err
    # The log starts again at the resume.
    assert [r['step'] for r in log_without_timing(save_dir)] == [4, 6]


@pytest.mark.slow  # Trains in process.
def test_a_damaged_config_json_is_one_line(tmp_path, corpus_sample):
    save_dir = tmp_path / 'run'
    config = small_config(save_dir, corpus_sample, max_steps=3, save_every=3)
    train.train_and_evaluate(config)
    (save_dir / 'config.json').write_text('{"vocab_size": 25')
    with pytest.raises(
        UserError,
        match=r'config.json is damaged \(JSONDecodeError: .*\), so '
        'this run cannot check that save_dir holds its model shape',
    ):
        train.train_and_evaluate(config)


# ----------------------------------------------------------------------------------------------
# Processes, hooks, writes


def test_any_error_on_one_process_stops_all_with_one_line(monkeypatch):
    """fail_together's exchange, with the other process's answers given (the two-process
    launcher tests run the real one)."""
    monkeypatch.setattr(distributed.jax, 'process_count', lambda: 2)
    sent = []
    answers = {'failing': [b'', b''], 'other': [b'', b'OSError: [Errno 28] No space left']}

    def allgather(payload):
        sent.append(payload)
        return answers['failing'] if payload else answers['other']

    monkeypatch.setattr(distributed, 'allgather_bytes', allgather)
    with pytest.raises(OSError):  # The failing process keeps its own traceback...
        with distributed.fail_together():
            raise OSError(errno.ENOSPC, 'No space left')
    assert sent == [b'OSError: [Errno 28] No space left']  # ...and tells the others.
    with pytest.raises(UserError, match=r'^process 1: OSError: \[Errno 28\] No space left$'):
        with distributed.fail_together():
            pass
    assert first_line(MemoryError()) == 'MemoryError'  # An empty message cannot crash a line.
    assert first_line(KeyError()) == 'KeyError'


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'config.json'
    atomic_write.write_atomically(str(path), 'old')
    with pytest.raises(TypeError):
        atomic_write.write_atomically(str(path), 12345)  # Neither str nor bytes: write fails.
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['config.json']
    atomic_write.write_atomically(str(path), b'new')
    assert path.read_bytes() == b'new' and os.listdir(tmp_path) == ['config.json']


@pytest.mark.slow
def test_the_gs_lease_refuses_a_second_run_and_is_taken_over_once_its_heartbeat_stops(
    gcs, monkeypatch
):
    from muomni_jax.training import run_lock

    url = f'gs://{gcs.bucket}/runs/leased'
    lines = []
    first = run_lock.RunLock(url, log=lines.append)
    first.acquire()
    with pytest.raises(
        UserError,
        match=rf'save_dir {url} is in use by another run: pid '
        rf'{os.getpid()} on host ',
    ):
        run_lock.RunLock(url).acquire()
    first.release()  # Released: the next run takes it without a word.
    second = run_lock.RunLock(url, log=lines.append)
    second.acquire()
    assert lines == []
    # A holder that stops beating (a lost VM) is taken over after LEASE_S.
    second._lease._stop.set()
    second._lease._thread.join()
    monkeypatch.setattr(run_lock, 'LEASE_S', 0.5)
    threading.Event().wait(1.0)
    third = run_lock.RunLock(url, log=lines.append)
    third.acquire()
    assert len(lines) == 1 and lines[0].startswith(
        f'Took over the lease of save_dir {url} from pid {os.getpid()} on host '
    )
    third.release()
