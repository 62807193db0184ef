"""Corpora as users keep them: JSON Lines (plain, .gz, .zst), Parquet and datasets' save_to_disk
folders read as the same documents, token caches and trainings as plain text."""

import gzip
import importlib.util
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest

from configs import tiny
from muomni_jax.data import document_files, input_pipeline, mixture, token_cache
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.training import run_plan, train
from tests.support.configs import corpus_config, small_config
from tests.support.environment import CORPUS, REPO
from tests.support.logs import log_without_timing
from tests.support.processes import run_module
from tests.support.token_caches import corpus_source, corpus_spec

_spec = importlib.util.spec_from_file_location(
    'write_formats', os.path.join(REPO, 'data', 'text', 'write_formats.py')
)
write_formats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_formats)

FORMATS = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet', 'saved')


def _corpus_lines(count):
    with open(CORPUS, encoding='utf-8') as f:
        return [line.strip() for line, _ in zip(f, range(count)) if line.strip()]


@pytest.fixture(scope='module')
def formats(tmp_path_factory):
    """{format: path} of the same 600 documents (no newlines inside, so text can match)."""
    folder = tmp_path_factory.mktemp('formats')
    docs = _corpus_lines(600)
    paths = write_formats.write_all(docs, str(folder))
    paths['.txt'] = str(folder / 'corpus.txt')
    (folder / 'corpus.txt').write_text('\n'.join(docs) + '\n', encoding='utf-8')
    return paths


def _documents(data_path, split='train', **overrides):
    return list(
        input_pipeline.document_bytes(corpus_spec(corpus_config(data_path, **overrides)), split)
    )


def test_every_format_gives_the_same_documents_and_split(formats):
    expected = {split: _documents(formats['.txt'], split) for split in input_pipeline.SPLITS}
    assert len(expected['train']) > 2 * len(expected['validation']) > 0
    for name in FORMATS[1:]:
        for split in input_pipeline.SPLITS:
            assert _documents(formats[name], split) == expected[split], (name, split)


def test_every_format_builds_the_same_token_cache(tmp_path, formats, tokenizer):
    built = {}
    for name in FORMATS:
        config = corpus_config(formats[name], cache_dir=str(tmp_path / name))
        built[name] = token_cache.open_or_build(
            config.cache_dir, corpus_source(config), tokenizer, 2, [0, 1], log=lambda _: None
        )
    for name in FORMATS[1:]:
        assert built[name].keys() == built['.txt'].keys()
        for where, stream in built['.txt'].items():
            np.testing.assert_array_equal(built[name][where].tokens, stream.tokens)
            np.testing.assert_array_equal(built[name][where].doc_starts, stream.doc_starts)


@pytest.mark.slow  # Six short trainings.
def test_every_format_trains_to_the_same_losses(tmp_path, formats):
    logs = {}
    for name in FORMATS:
        save_dir = tmp_path / name.strip('.')
        train.train_and_evaluate(
            small_config(save_dir, formats[name], max_steps=4, eval_every=4, save_every=4)
        )
        logs[name] = log_without_timing(save_dir)
    assert any('val_loss' in record for record in logs['.txt'])
    for name in FORMATS[1:]:
        assert logs[name] == logs['.txt'], name
        assert (tmp_path / name.strip('.') / 'tokenizer.model').read_bytes() == (
            tmp_path / 'txt' / 'tokenizer.model'
        ).read_bytes()


def test_a_record_with_newlines_stays_one_document(tmp_path, tokenizer):
    text = 'First paragraph of an article.\n\nSecond paragraph,\nwith a line break.'
    path = tmp_path / 'article.jsonl'
    path.write_text(
        json.dumps({'text': text}) + '\n' + json.dumps({'text': 'Another one.'}) + '\n',
        encoding='utf-8',
    )
    docs = _documents(path, val_split=0.0)
    assert docs == [text.encode(), b'Another one.']
    config = corpus_config(path, val_split=0.0, cache_dir=str(tmp_path / 'cache'))
    streams = token_cache.open_or_build(
        config.cache_dir, corpus_source(config), tokenizer, 1, [0], log=lambda _: None
    )
    stream = streams['train', 0]
    assert stream.num_documents == 2
    expected = [tokenizer_lib.BOS_ID, *tokenizer.encode(text), tokenizer_lib.EOS_ID]
    np.testing.assert_array_equal(stream.tokens[: stream.doc_starts[1]], expected)


def test_text_key_chooses_the_field_and_keys_the_cache(tmp_path, tokenizer):
    path = tmp_path / 'books.jsonl'
    path.write_text(
        ''.join(
            json.dumps({'title': f'Title {i}', 'body': f'Body number {i}.'}) + '\n'
            for i in range(20)
        ),
        encoding='utf-8',
    )
    assert _documents(path, val_split=0.0, text_key='body')[:2] == [
        b'Body number 0.',
        b'Body number 1.',
    ]
    assert _documents(path, val_split=0.0, text_key='title')[0] == b'Title 0'
    keys = []
    for text_key in ('body', 'title'):
        config = corpus_config(path, text_key=text_key)
        keys.append(token_cache.cache_key(corpus_source(config), tokenizer, 1)[0])
    assert keys[0] != keys[1]
    # A text source's key is what it was before text_key existed: old caches are still found.
    text = tmp_path / 'plain.txt'
    text.write_text('one\ntwo\n', encoding='utf-8')
    config = corpus_config(text, text_key='body')
    _, material = token_cache.cache_key(corpus_source(config), tokenizer, 1)
    assert set(material['source']) == {'files'}


def test_a_directory_or_glob_mixes_formats_and_finds_a_saved_dataset(tmp_path, formats):
    docs = _corpus_lines(60)
    folder = tmp_path / 'mixed'
    (folder / 'sub').mkdir(parents=True)
    (folder / 'a.txt').write_text('\n'.join(docs[:20]) + '\n', encoding='utf-8')
    write_formats.write_jsonl(docs[20:30], str(folder / 'b.jsonl.gz'))
    write_formats.write_parquet(docs[30:40], str(folder / 'c.parquet'))
    write_formats.write_saved_dataset(docs[40:60], str(folder / 'sub' / 'saved'))
    (folder / 'README.md').write_text('# not a document\n', encoding='utf-8')
    (folder / 'config.json').write_text('{"vocab": 3}\n', encoding='utf-8')  # Metadata.
    got = _documents(folder, val_split=0.0)
    assert sorted(got) == sorted(d.encode() for d in docs)
    files = document_files.expand(str(folder))
    assert not any(f.endswith(('README.md', '.json')) for f in files)
    assert _documents(f'{folder}/*.parquet', val_split=0.0) == [d.encode() for d in docs[30:40]]


def test_a_mixture_of_parquet_and_jsonl_names_a_text_key_per_entry():
    sources = mixture.parse('web=data/web/*.parquet:0.8,books=gs://b/books.jsonl.zst:0.2:body')
    assert [(s.name, s.data_path, s.text_key) for s in sources] == [
        ('web', 'data/web/*.parquet', ''),
        ('books', 'gs://b/books.jsonl.zst', 'body'),
    ]
    assert sources[1].weight == pytest.approx(0.2)
    # Without a key an entry is described as before, so a checkpoint's mixture still matches.
    config = tiny.get_config()
    config.mixture = 'a=x.txt:1,b=y.jsonl:1:body'
    assert run_plan.resolve(config).data.mixture_record == 'a=x.txt:0.5,b=y.jsonl:body:0.5'
    config.text_key = 'content'
    data = run_plan.resolve(config).data
    assert [data.corpus(s).text_key for s in data.sources] == ['content', 'body']
    with pytest.raises(UserError, match='a TFDS source names its text feature'):
        mixture.parse('a=tfds:lm1b/train/text:1:body')


@pytest.mark.slow  # Two trainings.
def test_a_parquet_and_jsonl_mixture_trains_and_validates_like_its_text(tmp_path, two_sources):
    prose = (two_sources / 'prose.txt').read_text(encoding='utf-8').splitlines()
    code = (two_sources / 'code.txt').read_text(encoding='utf-8').splitlines()
    write_formats.write_parquet(prose, str(tmp_path / 'prose.parquet'), row_group_rows=64)
    (tmp_path / 'code.jsonl').write_text(
        ''.join(json.dumps({'body': doc}) + '\n' for doc in code), encoding='utf-8'
    )
    runs = {
        'text': f'prose={two_sources / "prose.txt"}:0.7,code={two_sources / "code.txt"}:0.3',
        'records': f'prose={tmp_path / "prose.parquet"}:0.7,'
        f'code={tmp_path / "code.jsonl"}:0.3:body',
    }
    for name, spec in runs.items():
        train.train_and_evaluate(
            small_config(tmp_path / name, '', mixture=spec, max_steps=4, eval_every=4, save_every=4)
        )
    records = log_without_timing(tmp_path / 'records')
    assert records == log_without_timing(tmp_path / 'text')
    final = records[-1]
    assert final['val/prose/loss'] > 0 and final['val/code/loss'] > 0
    assert final['val_loss'] == pytest.approx(
        0.7 * final['val/prose/loss'] + 0.3 * final['val/code/loss'], rel=1e-12
    )


def _bad(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _first_error(path, **overrides) -> str:
    with pytest.raises(UserError) as raised:
        _documents(path, val_split=0.0, **overrides)
    message = str(raised.value)
    assert '\n' not in message and str(path) in message
    return message


def test_bad_records_stop_with_one_line_naming_the_file(tmp_path, formats):
    good = json.dumps({'text': 'fine'}).encode() + b'\n'
    message = _first_error(_bad(tmp_path, 'keys.jsonl', good + b'{"body": "x", "id": 3}\n'))
    assert "keys.jsonl:2 has no field 'text' (it has 'body', 'id')" in message
    assert '--config.text_key' in message
    message = _first_error(_bad(tmp_path, 'type.jsonl', good + b'{"text": 5}\n'))
    assert "type.jsonl:2 holds a number in field 'text', not a string" in message
    message = _first_error(_bad(tmp_path, 'null.jsonl', good + good + b'{"text": null}\n'))
    assert "null.jsonl:3 holds null in field 'text'" in message
    message = _first_error(_bad(tmp_path, 'json.jsonl', good + b'\n{"text": "cut\n'))
    assert 'json.jsonl:3 is not valid JSON' in message
    message = _first_error(_bad(tmp_path, 'array.jsonl', b'["text"]\n'))
    assert 'array.jsonl:1 holds a JSON list, not an object' in message
    message = _first_error(formats['.parquet'], text_key='body')
    assert "has no column 'body' (it has 'id', 'text')" in message
    message = _first_error(formats['saved'], text_key='id')
    assert "column 'id' holds int64, not strings" in message


@pytest.mark.parametrize('name', ['.jsonl.gz', '.jsonl.zst', '.parquet'])
def test_a_truncated_or_damaged_file_is_one_line_not_a_shorter_corpus(tmp_path, formats, name):
    data = open(formats[name], 'rb').read()
    if name == '.parquet':
        damaged = bytearray(data)
        damaged[len(data) // 3 : len(data) // 3 + 512] = b'\xff' * 512
        cases = {'truncated': data[: len(data) // 2], 'damaged': bytes(damaged)}
    else:
        # Cut at a line boundary of the decompressed text: a reader that stops at the end of
        # the data without checking the stream would read a shorter corpus without a word.
        plain = open(formats['.jsonl'], 'rb').read()
        head = plain[: plain.index(b'\n', len(plain) // 2) + 1]
        whole = (
            gzip.compress(head, mtime=0)
            if name.endswith('.gz')
            else __import__('zstandard').ZstdCompressor().compress(head)
        )
        cases = {'truncated': whole[:-4], 'cut mid-stream': data[: len(data) // 2]}
    for case, content in cases.items():
        message = _first_error(_bad(tmp_path, 'corpus' + name, content))
        assert 'damaged or truncated' in message, (case, message)


def test_a_concatenated_zstd_file_reads_every_frame(tmp_path, formats):
    import zstandard

    docs = _corpus_lines(40)
    halves = [
        ''.join(json.dumps({'text': d}) + '\n' for d in part).encode()
        for part in (docs[:20], docs[20:])
    ]
    path = _bad(
        tmp_path, 'two.jsonl.zst', b''.join(zstandard.ZstdCompressor().compress(h) for h in halves)
    )
    assert _documents(path, val_split=0.0) == [d.encode() for d in docs]


def test_an_empty_dataset_says_it_holds_no_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({'text': pa.array([], pa.string())}), tmp_path / 'empty.parquet')
    with pytest.raises(UserError, match=r'empty\.parquet holds no training text .*Parquet'):
        train.train_and_evaluate(small_config(tmp_path / 'run', tmp_path / 'empty.parquet'))
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_parquet_memory_stays_bounded_by_the_batch_not_the_file(tmp_path):
    """A file of 40 row groups is read in batches: peak memory (Arrow's pool and Python's heap)
    stays far below the text it holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = np.array(['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'theta', 'iota'])
    docs = [' '.join(rng.choice(words, 150)) for _ in range(1024)]
    path = tmp_path / 'big.parquet'
    with pq.ParquetWriter(path, pa.schema([('text', pa.string())])) as writer:
        for _ in range(40):
            writer.write_table(pa.table({'text': docs}), row_group_size=1024)
    text_bytes = 40 * sum(len(d) + 1 for d in docs)
    assert text_bytes > 32 * 2**20
    source = corpus_source(corpus_config(path))
    arrow_peak, count = 0, 0
    tracemalloc.start()
    try:
        for chunk, _ in source._chunks():
            count += len(chunk)
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 40 * 1024
    assert arrow_peak < text_bytes / 8 and python_peak < text_bytes / 8, (arrow_peak, python_peak)


def test_a_hub_dataset_is_read_from_its_local_cache(tmp_path, monkeypatch):
    """hf:NAME/CONFIG/SPLIT loads through datasets.load_dataset (here patched: nothing can reach
    the Hub) and reads the dataset's cache files."""
    import datasets

    docs = _corpus_lines(30)
    write_formats.write_saved_dataset(docs, str(tmp_path / 'cached'))
    calls = []

    def load_dataset(name, config_name=None, split=None):
        calls.append((name, config_name, split))
        return datasets.load_from_disk(str(tmp_path / 'cached'))

    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    assert _documents('hf:HuggingFaceFW/fineweb-edu/sample-10BT/train', val_split=0.0) == [
        d.encode() for d in docs
    ]
    assert _documents('hf:wikitext//test', val_split=0.0)
    assert calls == [
        ('HuggingFaceFW/fineweb-edu', 'sample-10BT', 'train'),
        ('wikitext', None, 'test'),
    ]
    with pytest.raises(UserError, match=r'a Hugging Face source is hf:NAME/CONFIG/SPLIT'):
        _documents('hf:wikitext')

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nope/nothing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(
        UserError,
        match=r"cannot load Hugging Face dataset 'nope/nothing' "
        r'\(ConnectionError',
    ):
        _documents('hf:nope/nothing/x/train')


def test_the_example_script_writes_the_bundled_corpus_in_every_format(tmp_path):
    """data/text/write_formats.py, which the README's JSONL and Parquet examples run."""
    shutil.copy(CORPUS, tmp_path / 'corpus.txt')
    write_formats.main(str(tmp_path / 'corpus.txt'), str(tmp_path / 'formats'))
    expected = _documents(tmp_path / 'corpus.txt', val_split=0.0)
    for name in ('corpus.jsonl.zst', 'corpus.parquet'):
        assert _documents(tmp_path / 'formats' / name, val_split=0.0) == expected


def test_the_format_bench_builds_the_same_tokens_from_every_format(
    tmp_path, formats, corpus_tokenizer
):
    """cache_formats.bench_cache_build (launch.bench_formats): the figures are of equal work."""
    from benchmarks import cache_formats

    config = small_config(tmp_path / 'run', formats['.txt'], tokenizer_path=corpus_tokenizer)
    figures = cache_formats.bench_cache_build(config, {name: formats[name] for name in FORMATS}, 1)
    assert list(figures) == list(FORMATS)
    tokens = input_pipeline.in_memory_stream(
        (
            d.encode()
            for split in input_pipeline.SPLITS
            for d in input_pipeline.documents(corpus_spec(config), split)
        ),
        tokenizer_lib.Tokenizer.load(corpus_tokenizer),
    )[0].num_tokens
    assert {f['tokens'] for f in figures.values()} == {tokens}


@pytest.mark.slow  # A launcher subprocess.
def test_bench_formats_cli_prints_every_format_and_refuses_a_missing_folder(
    tmp_path, formats, corpus_tokenizer
):
    folder = os.path.dirname(formats['.parquet'])
    args = [
        f'--config={os.path.join(REPO, "configs", "tiny.py")}',
        f'--config.data_path={formats[".txt"]}',
        f'--config.tokenizer_path={corpus_tokenizer}',
        '--config.vocab_size=256',
        f'--config.save_dir={tmp_path / "run"}',
        '--repeats=1',
    ]
    result = run_module('launch.bench_formats', *args, f'--folder={folder}')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:6]] == [
        'text',
        'jsonl',
        'jsonl.gz',
        'jsonl.zst',
        'parquet',
        'saved',
    ]
    figures = json.loads(lines[-1])['figures']
    assert len({f['tokens'] for f in figures.values()}) == 1
    result = run_module('launch.bench_formats', *args, f'--folder={tmp_path / "none"}')
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f'error: {tmp_path / "none"}/corpus.jsonl does not exist: run python '
            'data/text/write_formats.py'
        )
    )
