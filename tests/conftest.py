"""Fixtures and hooks of the test session. What the tests share besides fixtures is in
tests/support/; its environment module, imported first, gives the session eight virtual CPU
devices and caches of its own."""

import contextlib
import io
import os

import jax
import pytest

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.training import train

# Sets the session up on import: before any test or fixture touches a JAX backend.
from tests.support import environment
from tests.support.configs import small_config


def pytest_configure(config):
    # Registered here, so `-m "not slow"` and `--strict-markers` know the marker.
    config.addinivalue_line(
        'markers',
        'slow: starts a launcher or another subprocess, an emulator or several '
        'processes, or works for many seconds in process (trainings of its own, or many '
        'compiles of the full model); `-m "not slow"` leaves them out (the fast tier).',
    )


@pytest.fixture(scope='session')
def corpus_sample(tmp_path_factory):
    """The first 600 documents of the bundled corpus: real English, small enough for tests."""
    path = tmp_path_factory.mktemp('corpus') / 'sample.txt'
    with open(environment.CORPUS, encoding='utf-8') as f:
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


@pytest.fixture(scope='session')
def corpus_tokenizer(tmp_path_factory, corpus_sample) -> str:
    """The path of one 256-piece tokenizer of corpus_sample, trained once per session, for
    tests that need a tokenizer of real text but do not test its training."""
    path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.model'
    lines = corpus_sample.read_text(encoding='utf-8').splitlines()
    tokenizer_lib.train_tokenizer(lines, 256, 20000).save(str(path))
    return str(path)


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, corpus_sample):
    """(save_dir, stdout, stderr) of one small run, trained once per session: 6 steps on a mesh
    that shards the params 8 ways, logs at steps 2, 4 and 6, checkpoints and validations at
    steps 3 and 6, each validation followed by the greedy samples of the default two prompts,
    and a profile of steps 2-3. Its output is not a terminal, as under CI or nohup. Read-only:
    a test that changes a save_dir copies it first (shutil.copytree)."""
    save_dir = tmp_path_factory.mktemp('trained') / 'run'
    config = small_config(
        save_dir,
        corpus_sample,
        sample_prompts='The cat sat on the|Python is a',
        sample_max_new_tokens=5,
        profile_steps='2,3',
    )
    config.mesh.data, config.mesh.fsdp = 1, 8
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        train.train_and_evaluate(config)
    return str(save_dir), out.getvalue(), err.getvalue()


@pytest.fixture(scope='session')
def tokenizer(corpus_tokenizer) -> tokenizer_lib.Tokenizer:
    """corpus_tokenizer, loaded: for tests that tokenize text but do not test the tokenizer."""
    return tokenizer_lib.Tokenizer.load(corpus_tokenizer)


@pytest.fixture(scope='module')
def gcs():
    """A local GCS emulator (support/gcs_emulator.py), with this process's own clients pointed
    at it too."""
    from tests.support.gcs_emulator import LocalGcs

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


def pytest_report_header(config):
    del config
    return f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices'
