"""Two processes on localhost, 2 CPU devices each, joined by jax.distributed with gloo collectives.

Every process is the launcher in a subprocess, ended (killed if need be) when its test ends, and
waited for with a timeout, so a hang fails the test instead of stalling CI.
"""

import contextlib
import json
import os
import re

import jax
import numpy as np
import pytest

from muomni_jax.training import train
from tests.support.configs import SMALL, mixture_spec, small_config
from tests.support.processes import free_port, launched, one_device_env, stage_a_command

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
# data=2 x fsdp=2 splits both the batch and the parameters across the two processes.
OVERRIDES = dict(
    max_steps=3,
    log_every=1,
    eval_every=3,
    save_every=3,
    n_layers=1,
    d_model=128,
    d_ff=256,
    data_shards=2,
)
COMMON = [
    *SMALL,
    *(f'--config.{k}={v}' for k, v in OVERRIDES.items()),
    '--config.mesh.data=2',
    '--config.mesh.fsdp=2',
    '--config.distributed.timeout_s=60',
]


@contextlib.contextmanager
def _pairs(*pair_args) -> list:
    """Starts a two-process run per entry of pair_args (the flags of process 0 and of process
    1); yields their Launched processes, in order, and ends them all on leaving."""
    env = one_device_env(XLA_FLAGS='--xla_force_host_platform_device_count=2')
    with contextlib.ExitStack() as stack:
        processes = []
        for args in pair_args:
            address = f'127.0.0.1:{free_port()}'
            processes += [
                stack.enter_context(
                    launched(
                        stage_a_command(
                            *args[i],
                            f'--config.distributed.coordinator_address={address}',
                            '--config.distributed.num_processes=2',
                            f'--config.distributed.process_id={i}',
                        ),
                        env=env,
                        stderr=True,
                    )
                )
                for i in range(2)
            ]
        yield processes


def _finish(processes) -> list[tuple[int, str, str]]:
    return [
        (process.wait(timeout=TIMEOUT_S), process.stdout, process.stderr) for process in processes
    ]


def _without_gloo(stdout: str) -> str:
    """Drops the '[Gloo] Rank N is connected' lines that gloo prints itself."""
    return '\n'.join(line for line in stdout.splitlines() if not line.startswith('[Gloo]'))


def _log(save_dir):
    with open(save_dir / 'training_log.json') as f:
        return json.load(f)


@pytest.mark.parametrize('data', ['data_path', 'mixture'])
def test_two_processes_train_like_one_process_with_four_devices(
    tmp_path, corpus_sample, two_sources, data
):
    one_dir, two_dir = tmp_path / 'one_process', tmp_path / 'two_processes'
    sources = 2 if data == 'mixture' else 1
    data = (
        f'--config.mixture={mixture_spec(two_sources)}'
        if data == 'mixture'
        else f'--config.data_path={corpus_sample}'
    )
    # A token cache on each process's own disk, as on TPU VMs: each builds only its own shard.
    caches = [tmp_path / f'cache_{i}' for i in range(3)]
    pair_args = [
        [*COMMON, data, f'--config.save_dir={two_dir}', f'--config.cache_dir={caches[i]}']
        for i in range(2)
    ]
    with _pairs(pair_args) as processes:
        # The one-process run of 4 devices, in this process while the pair runs: losses agree
        # to float32 rounding, not bitwise, so it need not be a launcher of its own.
        one = small_config(
            one_dir,
            corpus_sample if sources == 1 else '',
            mixture=mixture_spec(two_sources) if sources == 2 else '',
            cache_dir=str(caches[2]),
            **OVERRIDES,
        )
        one.mesh.data, one.mesh.fsdp = 2, 2
        train.train_and_evaluate(one, devices=jax.devices()[:4])
        (rc0, out0, err0), (rc1, out1, err1) = _finish(processes)
    assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])

    # Each process names its devices and the mesh; only process 0 reports progress.
    out0, out1 = _without_gloo(out0), _without_gloo(out1)
    mesh_line = r'Process {}/2: 2 local cpu devices \(ids \d+,\d+\) of 4; mesh data=2 x fsdp=2'
    assert re.search(mesh_line.format(0), out0), out0
    assert re.search(mesh_line.format(1), out1), out1
    # gloo's own C++ lines can interleave mid-line with ours, so check for what must be absent.
    for progress in ('Loading data', 'Vocab size', '[Step', 'Validation', 'Training complete'):
        assert progress not in out1, out1
    assert 'Using device: cpu (4 devices over 2 processes)' in out0
    assert '[Step 3/3] loss=' in out0 and 'Training complete!' in out0
    events = [f for f in os.listdir(two_dir) if f.startswith('events.out.tfevents')]
    assert len(events) == 1  # TensorBoard events from process 0 only.
    assert sorted(set(os.listdir(two_dir)) - set(events)) == [
        '3',
        'config.json',
        'tokenizer.model',
        'training_log.json',
    ]

    shard_files = lambda cache: sorted(p.name for p in cache.glob('*/*-of-*.tokens'))
    # A cache per source; each process builds its own shard of each.
    assert shard_files(caches[0]) == sorted(
        ['train-00000-of-00002.tokens', 'validation-00000-of-00002.tokens'] * sources
    )
    assert shard_files(caches[1]) == sorted(
        ['train-00001-of-00002.tokens', 'validation-00001-of-00002.tokens'] * sources
    )
    assert len(shard_files(caches[2])) == 4 * sources  # One process builds both shards.

    # Process 0 trained the tokenizer on all the text, as the single process did.
    assert (one_dir / 'tokenizer.model').read_bytes() == (two_dir / 'tokenizer.model').read_bytes()
    one, two = _log(one_dir), _log(two_dir)
    assert [r['step'] for r in one] == [r['step'] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        np.testing.assert_allclose(b['loss'], a['loss'], rtol=1e-5, err_msg=f'step {a["step"]}')
    validation = [key for key in one[-1] if key.startswith('val')]
    assert len(validation) == (2 if sources == 1 else 6)  # val_loss, val_ppl, val/<name>/...
    for key in validation:
        np.testing.assert_allclose(two[-1][key], one[-1][key], rtol=1e-5, err_msg=key)


def test_an_error_on_one_process_stops_both(tmp_path, corpus_sample):
    """A check that fails on one process, and one on process 0's own work, end every process."""
    missing = tmp_path / 'missing.txt'
    # Process 1 alone cannot find its data.
    missing_data = [
        [*COMMON, f'--config.save_dir={tmp_path / "a"}', f'--config.data_path={path}']
        for path in (corpus_sample, missing)
    ]
    # Process 0 alone trains the tokenizer, and fails.
    big_vocab = [
        [
            *COMMON,
            f'--config.save_dir={tmp_path / "b"}',
            f'--config.data_path={corpus_sample}',
            '--config.vocab_size=60000',
        ]
    ] * 2
    with _pairs(missing_data, big_vocab) as processes:
        results = _finish(processes)
    for rc, _, err in results:
        assert rc == 2, err[-3000:]
        assert 'Traceback' not in err
    for _, _, err in results[:2]:
        assert f'data_path {missing} does not exist' in err
    for _, _, err in results[2:]:
        assert 'error: the training text supports at most vocab_size=' in err
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_a_step_only_one_process_cannot_read_is_skipped_by_both(tmp_path, corpus_sample):
    """Process 1's files of the newest step are truncated: both processes name it, fall back to
    the same older step and train on together (no hang, no mixed steps)."""
    save_dir = tmp_path / 'run'
    args = lambda steps: [
        [
            *COMMON,
            f'--config.data_path={corpus_sample}',
            f'--config.save_dir={save_dir}',
            f'--config.max_steps={steps}',
            f'--config.cache_dir={tmp_path}/cache{i}',
        ]
        for i in range(2)
    ]
    with _pairs(args(6)) as processes:
        first = _finish(processes)
    assert all(rc == 0 for rc, _, _ in first), [err[-2000:] for _, _, err in first]
    shard = [
        os.path.join(root, name)
        for root, _, names in os.walk(save_dir / '6' / 'state')
        for name in names
        if 'process_1' in root
    ]
    assert shard, sorted(os.listdir(save_dir / '6' / 'state'))
    for path in shard:
        os.truncate(path, os.path.getsize(path) // 2)
    with _pairs(args(9)) as processes:
        (rc0, out0, err0), (rc1, out1, err1) = _finish(processes)
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    warnings = [
        [
            line
            for line in err.splitlines()
            if line.startswith(f'Warning: checkpoint step 6 in {save_dir} is unreadable (')
        ]
        for err in (err0, err1)
    ]
    # One verdict, the same on both, naming the process whose read failed first.
    assert len(warnings[0]) == 1 and warnings[0] == warnings[1], warnings
    assert re.search(r' on process [01]\); trying an older one\.$', warnings[0][0])
    assert 'Resuming from checkpoint step 3' in out0
    assert [r['step'] for r in _log(save_dir) if 'loss' in r][-1] == 9
