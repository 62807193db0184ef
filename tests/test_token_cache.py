"""The token cache: the same batches as the in-memory path, built once, keyed, crash-safe."""

import json
import os
import sys

import numpy as np
import pytest

from muomni_jax.data import host_data, input_pipeline, token_cache
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.training import run_plan, tokenizing_progress
from tests import stream_batches
from tests.support import legacy_input_pipeline as legacy
from tests.support.configs import corpus_config
from tests.support.environment import REPO
from tests.support.processes import launched, one_device_env, run_module
from tests.support.token_caches import corpus_source, open_cache, random_documents


@pytest.fixture
def corpus(tmp_path):
    """Two files with what a real corpus holds: CRLF ends, blank and whitespace-only lines,
    invalid UTF-8, a document longer than one SentencePiece call, no final newline."""
    root = tmp_path / 'corpus'
    root.mkdir()
    docs = random_documents(700)
    first = '\r\n'.join(docs[:300]) + '\n\n   \t\n'
    long_doc = ' '.join(random_documents(6000, seed=1))  # Over 100,000 characters.
    assert len(long_doc) > 100_000
    (root / 'a.txt').write_bytes(
        first.encode() + b'bad \xff\xfe bytes\n' + long_doc.encode() + b'\n'
    )
    (root / 'b.txt').write_text('\n'.join(docs[300:]))
    return root


def _assert_same_batches(expected, actual, rows_that_exist=None):
    expected, actual = list(expected), list(actual)
    assert len(expected) == len(actual) > 0
    for a, b in zip(expected, actual):
        assert a.keys() == b.keys()
        for key in a:
            if rows_that_exist is not None and key in ('inputs', 'targets'):
                # The old path filled empty eval rows with window 0's tokens, the cache with
                # padding; both mask them entirely.
                a, b = dict(a), dict(b)
                a[key], b[key] = a[key][:rows_that_exist], b[key][:rows_that_exist]
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        rows_that_exist = (
            None if rows_that_exist is None else max(rows_that_exist - len(a['weights']), 0)
        )


@pytest.mark.parametrize('num_shards', [1, pytest.param(3, marks=pytest.mark.slow)])
def test_cached_batches_equal_the_in_memory_path(corpus, tmp_path, tokenizer, num_shards):
    config = corpus_config(corpus, tmp_path / 'cache')
    streams = open_cache(config, tokenizer, num_shards, range(num_shards))
    ctx, rows = 16, 4
    for shard in range(num_shards):
        train = legacy.pack(legacy.documents(config, 'train', shard, num_shards), tokenizer, ctx)
        cached = streams['train', shard]
        assert (cached.num_windows(ctx), cached.num_documents, cached.num_tokens) == (
            train.num_windows,
            train.num_documents,
            train.num_tokens,
        )
        for epoch, start in ((0, 0), (1, 5)):
            _assert_same_batches(
                legacy.train_batches(train, rows, seed=7, epoch=epoch, start_step=start),
                stream_batches.train_batches(
                    cached, ctx, rows, seed=7, epoch=epoch, start_step=start
                ),
            )
        validation = legacy.pack(
            legacy.documents(config, 'validation', shard, num_shards), tokenizer, ctx
        )
        num_batches = validation.num_windows // rows + 2  # Past the end: fully masked rows.
        _assert_same_batches(
            legacy.eval_batches(validation, rows, num_batches),
            input_pipeline.eval_batches(streams['validation', shard], ctx, rows, num_batches),
            rows_that_exist=validation.num_windows,
        )


def test_training_batches_of_a_single_source_equal_the_in_memory_path(corpus, tmp_path, tokenizer):
    """host_data reads a data_path as a mixture of one source: the batches must not change."""
    config = corpus_config(
        corpus, tmp_path / 'cache', ctx_len=16, batch_size=4, data_shards=1, seed=7
    )
    data = host_data.load(run_plan.resolve(config).data, tokenizer, log=lambda line: None)
    train = legacy.pack(legacy.documents(config, 'train'), tokenizer, 16)
    assert data.steps_per_epoch == train.num_windows // 4
    for epoch, start in ((0, 0), (1, 5)):
        _assert_same_batches(
            legacy.train_batches(train, 4, seed=7, epoch=epoch, start_step=start),
            data.train_batches(7, epoch, start),
        )


def test_a_second_open_reads_the_cache_without_tokenizing(corpus, tmp_path, tokenizer, monkeypatch):
    config = corpus_config(corpus, tmp_path / 'cache')
    lines = []
    first = open_cache(config, tokenizer, lines=lines)
    assert 'building' in lines[0] and 'tokens/s' in lines[1]
    stamps = {p: os.stat(p).st_mtime_ns for p in (tmp_path / 'cache').rglob('*')}

    def no_tokenizing(*args, **kwargs):
        raise AssertionError('tokenized again')

    monkeypatch.setattr(input_pipeline, 'tokenize', no_tokenizing)
    lines.clear()
    second = open_cache(config, tokenizer, lines=lines)
    assert len(lines) == 1 and 'nothing to tokenize' in lines[0]
    assert stamps == {p: os.stat(p).st_mtime_ns for p in (tmp_path / 'cache').rglob('*')}
    assert isinstance(second['train', 0].tokens, np.memmap)
    assert second['train', 0].tokens.dtype == np.uint16
    np.testing.assert_array_equal(first['train', 0].tokens, second['train', 0].tokens)


def test_the_key_changes_with_the_files_tokenizer_val_split_and_shards(corpus, tmp_path, tokenizer):
    config = corpus_config(corpus, tmp_path / 'cache')
    key = lambda cfg, tok=tokenizer, shards=1: token_cache.cache_key(
        corpus_source(cfg), tok, shards
    )[0]
    base = key(config)
    assert key(config) == base
    assert key(corpus_config(corpus, tmp_path / 'cache', ctx_len=64, batch_size=3, seed=9)) == base
    assert key(corpus_config(corpus, tmp_path / 'cache', val_split=0.3)) != base
    assert key(config, shards=2) != base
    other = tokenizer_lib.train_tokenizer(
        random_documents(300, seed=5), vocab_size=80, sample_size=5000
    )
    assert key(config, other) != base
    with open(corpus / 'b.txt', 'a', encoding='utf-8') as f:
        f.write('\none more document.')
    assert key(config) != base


def test_a_cache_of_the_old_format_is_built_again_with_exact_long_documents(
    corpus, tmp_path, tokenizer, monkeypatch
):
    """Version 1 cut long documents at fixed offsets: its caches hold wrong ids and must never
    be read again."""
    config = corpus_config(corpus, tmp_path / 'cache', val_split=0.0)
    limit = input_pipeline._MAX_ENCODE_CHARS
    with monkeypatch.context() as old:
        old.setattr(token_cache, 'FORMAT_VERSION', 1)
        old.setattr(
            tokenizer,
            'pieces',
            lambda text, n: [text[i : i + limit] for i in range(0, len(text), limit)],
        )
        stale = open_cache(config, tokenizer)['train', 0]
    lines = []
    fresh = open_cache(config, tokenizer, lines=lines)['train', 0]
    assert any('building' in line for line in lines), lines
    assert len(list((tmp_path / 'cache').iterdir())) == 2
    long_doc = (corpus / 'a.txt').read_bytes().splitlines()[-1].decode()
    expected = [tokenizer_lib.BOS_ID, *tokenizer.encode(long_doc), tokenizer_lib.EOS_ID]

    def longest_document(stream):
        ends = np.append(stream.doc_starts[1:], len(stream.tokens))
        i = int(np.argmax(ends - stream.doc_starts))
        return stream.tokens[stream.doc_starts[i] : ends[i]].tolist()

    assert longest_document(fresh) == expected
    assert longest_document(stale) != expected  # What the old cache held.


def test_a_changed_file_builds_a_new_cache(corpus, tmp_path, tokenizer):
    config = corpus_config(corpus, tmp_path / 'cache')
    before = open_cache(config, tokenizer)
    with open(corpus / 'b.txt', 'a', encoding='utf-8') as f:
        f.write('\nthe last document of all.')
    lines = []
    after = open_cache(config, tokenizer, lines=lines)
    assert 'building' in lines[0]
    assert len(list((tmp_path / 'cache').iterdir())) == 2  # The old cache is never reused.
    total = lambda streams: sum(s.num_documents for s in streams.values())
    assert total(after) == total(before) + 1


@pytest.mark.parametrize(
    'damage, message',
    [
        (
            lambda d: (d / 'train-00000-of-00001.json').write_text('{"format": 1, "key"'),
            'is not a valid header',
        ),
        (
            lambda d: (d / 'validation-00000-of-00001.json').write_bytes(b'\xff\x00'),
            'is not a valid header',
        ),
        (lambda d: os.truncate(d / 'train-00000-of-00001.tokens', 1000), 'truncated'),
        (lambda d: os.truncate(d / 'train-00000-of-00001.docs', 8), 'truncated'),
    ],
)
def test_a_damaged_cache_is_named_and_rebuilt(corpus, tmp_path, tokenizer, damage, message):
    config = corpus_config(corpus, tmp_path / 'cache')
    # Copied out of the memmaps first: truncating a mapped file would fault on reading it.
    clean = {
        where: (np.array(s.tokens), np.array(s.doc_starts))
        for where, s in open_cache(config, tokenizer).items()
    }
    directory = next((tmp_path / 'cache').iterdir())
    damage(directory)
    lines = []
    rebuilt = open_cache(config, tokenizer, lines=lines)
    assert message in lines[0] and 'rebuilding' in lines[0]
    for where, (tokens, doc_starts) in clean.items():
        np.testing.assert_array_equal(tokens, rebuilt[where].tokens)
        np.testing.assert_array_equal(doc_starts, rebuilt[where].doc_starts)


def test_an_unwritable_cache_dir_is_one_clear_error(corpus, tmp_path, tokenizer):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    with pytest.raises(
        UserError,
        match=r'token cache directory .* is not writable .*'
        r'--config.cache_dir',
    ):
        open_cache(corpus_config(corpus, blocker / 'cache'), tokenizer)


def test_shards_of_one_cache_can_be_built_apart(corpus, tmp_path, tokenizer):
    """Processes that share a cache_dir each build their own shards into one directory."""
    config = corpus_config(corpus, tmp_path / 'cache')
    apart = {**open_cache(config, tokenizer, 2, [1]), **open_cache(config, tokenizer, 2, [0])}
    directory = next((tmp_path / 'cache').iterdir())
    assert sorted(p.name for p in directory.glob('*.json')) == [
        'cache.json',
        'train-00000-of-00002.json',
        'train-00001-of-00002.json',
        'validation-00000-of-00002.json',
        'validation-00001-of-00002.json',
    ]
    lines = []
    together = open_cache(config, tokenizer, 2, [0, 1], lines=lines)
    assert 'nothing to tokenize' in lines[0]
    for where, stream in together.items():
        np.testing.assert_array_equal(stream.tokens, apart[where].tokens)


def test_a_vocab_over_65536_is_stored_as_uint32(corpus, tmp_path, tokenizer):
    class BigVocab(tokenizer_lib.Tokenizer):
        vocab_size = 70_000

    big = BigVocab(tokenizer.model_proto)
    small_streams = open_cache(corpus_config(corpus, tmp_path / 'small'), tokenizer)
    big_streams = open_cache(corpus_config(corpus, tmp_path / 'big'), big)
    assert big_streams['train', 0].tokens.dtype == np.uint32
    np.testing.assert_array_equal(big_streams['train', 0].tokens, small_streams['train', 0].tokens)


def test_build_progress_and_invalid_utf8_are_reported(
    corpus, tmp_path, tokenizer, monkeypatch, capsys
):
    monkeypatch.setattr(tokenizing_progress, '_LINE_EVERY_S', 0.0)
    config = corpus_config(corpus, tmp_path / 'cache')
    token_cache.open_or_build(
        config.cache_dir,
        corpus_source(config),
        tokenizer,
        1,
        [0],
        log=print,
        progress=tokenizing_progress.TokenizingProgress(),
    )
    out, err = capsys.readouterr()
    progress = [line for line in out.splitlines() if line.startswith('Tokenizing:')]
    assert progress and 'MB of' in progress[-1] and 'tokens/s' in progress[-1]
    assert '1 documents had invalid UTF-8' in err


class _RecordedProgress:
    """A token_cache.BuildProgress that keeps what it was told."""

    def __init__(self):
        self.started, self.done, self.tokens, self.closed = None, 0, 0, False

    def start(self, total, unit):
        self.started = (total, unit)

    def update(self, done, tokens):
        self.done += done
        self.tokens += tokens

    def close(self):
        self.closed = True


def test_a_build_tells_the_caller_its_progress(corpus, tmp_path, tokenizer):
    progress = _RecordedProgress()
    config = corpus_config(corpus, tmp_path / 'cache')
    streams = token_cache.open_or_build(
        config.cache_dir,
        corpus_source(config),
        tokenizer,
        2,
        [0, 1],
        log=lambda line: None,
        progress=progress,
    )
    text_bytes = sum(path.stat().st_size for path in corpus.iterdir())
    assert progress.started == (text_bytes, 'B') and progress.done == text_bytes
    assert progress.tokens == sum(stream.num_tokens for stream in streams.values()) > 0
    assert progress.closed


def test_tfds_input_goes_through_the_cache(tmp_path, tokenizer):
    import tensorflow_datasets as tfds

    config = corpus_config(
        '',
        tmp_path / 'cache',
        tfds_name='lm1b',
        tfds_split='train',
        tfds_text_key='text',
        val_split=0.0,
    )
    with tfds.testing.mock_data(num_examples=12):
        lines = []
        streams = open_cache(config, tokenizer, lines=lines)
        assert 'building' in lines[0]
        lines.clear()
        again = open_cache(config, tokenizer, lines=lines)
        assert 'nothing to tokenize' in lines[0]
        expected = legacy.pack(legacy.documents(config, 'train'), tokenizer, 8)
    assert streams['train', 0].num_documents == 12
    np.testing.assert_array_equal(again['train', 0].tokens, streams['train', 0].tokens)
    assert streams['train', 0].num_tokens == expected.num_tokens


@pytest.mark.slow
def test_a_build_killed_midway_is_never_used_and_the_next_run_rebuilds(tmp_path, corpus_sample):
    """SIGKILL while the cache is half written (paused there by tests/paused_cache_build.py,
    not a timer); launch.prepare_data's CLI smoke run."""
    cache, paused = tmp_path / 'cache', tmp_path / 'paused'
    args = [
        '--config=configs/tiny.py',
        f'--config.data_path={corpus_sample}',
        f'--config.cache_dir={cache}',
        f'--config.save_dir={tmp_path / "run"}',
        '--config.vocab_size=256',
        '--config.tokenizer_sample_size=20000',
    ]
    paused_build = [
        sys.executable,
        os.path.join(REPO, 'tests', 'paused_cache_build.py'),
        str(paused),
        'launch.prepare_data',
        *args,
    ]
    with launched(paused_build, env=one_device_env()) as process:
        process.wait_until(paused.exists, 'the paused build')
        process.kill()
    directory = next(cache.iterdir())
    assert any('.partial-' in p.name for p in directory.iterdir())
    assert not list(directory.glob('train-*.json')), 'a half-built shard must have no header'

    rerun = run_module('launch.prepare_data', *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f'an earlier build of {directory} was interrupted; rebuilding it' in rerun.stdout
    assert not any('.partial-' in p.name for p in directory.iterdir())
    header = json.loads((directory / 'train-00000-of-00001.json').read_text())
    assert header['num_tokens'] * 2 == (directory / 'train-00000-of-00001.tokens').stat().st_size
    assert (tmp_path / 'run' / 'tokenizer.model').exists()
