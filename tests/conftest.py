"""Test set-up: eight virtual CPU devices, so every test also exercises sharding.

The device count must be fixed before JAX first touches a backend, hence here.
"""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The default token cache (~/.cache/...) of every run the tests start, in-process or not: shared
# by the tests, so a corpus is tokenized once per session, and never the user's own cache.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='muomni-test-cache-')
atexit.register(shutil.rmtree, os.environ['XDG_CACHE_HOME'], ignore_errors=True)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CORPUS = os.path.join(REPO, 'data', 'text', 'corpus.txt')

# One persistent compilation cache for this session, in-process and in every launcher subprocess:
# the tests compile the same tiny train and eval steps many times. Fresh per session, so a run's
# time never depends on an earlier one.
COMPILATION_CACHE = tempfile.mkdtemp(prefix='muomni_jax_test_cache_')
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

from configs import tiny  # pylint: disable=g-import-not-at-top
from muomni_jax.parallel import partitioning  # pylint: disable=g-import-not-at-top
from muomni_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
from muomni_jax.training import steps  # pylint: disable=g-import-not-at-top


def small_config(save_dir, data_path, **overrides):
    """configs/tiny.py shrunk to seconds on a CPU; overrides win."""
    config = tiny.get_config()
    config.update(dict(
        vocab_size=256, n_layers=2, d_model=64, n_heads=4, d_ff=128, ctx_len=32, dropout=0.0,
        batch_size=8, num_epochs=1, max_steps=6, warmup_steps=2, learning_rate=1e-3,
        log_every=2, eval_every=3, eval_batches=2, save_every=3, data_path=str(data_path),
        save_dir=str(save_dir), tokenizer_sample_size=20000))
    config.update(overrides)
    return config


def one_device_env(**extra: str) -> dict[str, str]:
    """This environment without the 8-device XLA_FLAGS, so a subprocess sees one CPU device as a
    user's run does; it shares the session's compilation cache. extra: variables to add."""
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5', PYTHONPATH=REPO,
               MUOMNI_ENABLE_TEST_HOOKS='1')  # muomni_jax.test_hooks: only tests set it.
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: str = REPO, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` to completion, output captured (default: one_device_env())."""
    return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd,
                          env=env or one_device_env(), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def one_device_mesh():
    return partitioning.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])


def restore_state(config, save_dir, step, mesh=None):
    """The whole train state of save_dir/<step>, on `mesh` (default one device)."""
    setup = steps.create_train_state(config, mesh or one_device_mesh(), initialize=False)
    checkpointer = checkpointing.Checkpointer(str(save_dir), read_only=True)
    state, _ = checkpointer.restore(step, setup.abstract_state)
    checkpointer.close()
    return state


@pytest.fixture(scope='session')
def corpus_sample(tmp_path_factory):
    """The first 600 documents of the bundled corpus: real English, small enough for tests."""
    path = tmp_path_factory.mktemp('corpus') / 'sample.txt'
    with open(CORPUS, encoding='utf-8') as f:
        lines = [next(f) for _ in range(600)]
    path.write_text(''.join(lines), encoding='utf-8')
    return path


@pytest.fixture(scope='session')
def two_sources(tmp_path_factory, corpus_sample):
    """corpus_sample split in two by a fixed rule, as data/text/split_corpus.py splits the
    corpus: a folder holding prose.txt and code.txt (the paragraphs with a '(')."""
    folder = tmp_path_factory.mktemp('sources')
    lines = open(corpus_sample, encoding='utf-8').read().splitlines()
    code = [line for line in lines if '(' in line]
    prose = [line for line in lines if '(' not in line]
    assert len(prose) > 2 * len(code) > 200
    (folder / 'prose.txt').write_text('\n'.join(prose) + '\n', encoding='utf-8')
    (folder / 'code.txt').write_text('\n'.join(code) + '\n', encoding='utf-8')
    return folder


def mixture_spec(folder, prose_weight=0.7, code_weight=0.3) -> str:
    """config.mixture of two_sources's folder."""
    return f'prose={folder / "prose.txt"}:{prose_weight},code={folder / "code.txt"}:{code_weight}'


def pytest_report_header(config):
    del config
    return f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices'
