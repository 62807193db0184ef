import collections

import numpy as np
import pytest

from muomni_jax.data import input_pipeline
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from tests import stream_batches
from tests.support.environment import CORPUS

DOCS = [
    f'document number {i} says {" ".join(["word"] * (i % 7 + 1))} and stops.' for i in range(200)
]


def _corpus(data_path, **fields) -> input_pipeline.CorpusSpec:
    return input_pipeline.CorpusSpec(**{'data_path': str(data_path), 'val_split': 0.2, **fields})


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / 'docs.txt'
    path.write_text(
        '\n\n'.join(DOCS) + '\n   \n', encoding='utf-8'
    )  # Blank lines are not documents.
    return path


def _texts(docs):
    return list(docs)


def _stream(corpus, tokenizer, split='train'):
    docs = (d.encode('utf-8') for d in input_pipeline.documents(corpus, split))
    return input_pipeline.in_memory_stream(docs, tokenizer)[0]


def _all_windows(stream, ctx):
    return stream.windows(np.arange(stream.num_windows(ctx)), ctx)


def test_train_and_validation_partition_the_documents(corpus_file):
    corpus = _corpus(corpus_file)
    train = _texts(input_pipeline.documents(corpus, 'train'))
    val = _texts(input_pipeline.documents(corpus, 'validation'))
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(DOCS)
    assert 0.1 < len(val) / len(DOCS) < 0.3  # val_split 0.2, by hash.
    # Deterministic: the same split on every call.
    assert _texts(input_pipeline.documents(corpus, 'validation')) == val


def test_process_shards_partition_the_split(corpus_file):
    corpus = _corpus(corpus_file)
    shards = [_texts(input_pipeline.documents(corpus, 'train', i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(_texts(input_pipeline.documents(corpus, 'train')))
    assert all(shards)


def test_packing_has_eos_between_documents_and_padding_only_at_the_end(corpus_file, tokenizer):
    ctx = 16
    corpus = _corpus(corpus_file, val_split=0.0)
    split = _stream(corpus, tokenizer)
    assert split.num_documents == len(DOCS)
    tokens, segment_ids = _all_windows(split, ctx)
    # Reassemble the stream: window k covers stream[k*ctx : k*ctx + ctx + 1].
    valid = segment_ids > 0
    assert valid[:-1].all(), 'only the last window may hold padding'
    assert not valid[-1][np.argmin(valid[-1]) :].any(), 'padding is a suffix of the last window'
    stream = np.concatenate([tokens[:-1, :ctx].ravel(), tokens[-1][valid[-1]]])
    assert len(stream) == split.num_tokens
    expected = np.concatenate(
        [[tokenizer_lib.BOS_ID] + tokenizer.encode(d) + [tokenizer_lib.EOS_ID] for d in DOCS]
    )
    np.testing.assert_array_equal(stream, expected)
    # Overlap by one: the last token of a window is the first of the next.
    np.testing.assert_array_equal(tokens[:-1, -1], tokens[1:, 0])


def test_features_mask_document_boundaries_and_restart_positions(corpus_file, tokenizer):
    corpus = _corpus(corpus_file, val_split=0.0)
    split = _stream(corpus, tokenizer)
    f = input_pipeline.features(*_all_windows(split, 16))
    assert f['inputs'].shape == f['weights'].shape == (split.num_windows(16), 16)
    # No loss across a boundary: EOS is never asked to predict the next document's BOS.
    assert not (f['weights'][f['inputs'] == tokenizer_lib.EOS_ID]).any()
    assert (f['weights'][f['targets'] == tokenizer_lib.EOS_ID] == 1).all()
    # Every BOS starts a segment at position 0; positions count up inside a segment.
    bos = f['inputs'] == tokenizer_lib.BOS_ID
    assert (f['positions'][bos] == 0).all()
    same = f['segment_ids'][:, 1:] == f['segment_ids'][:, :-1]
    assert (f['positions'][:, 1:][same] == f['positions'][:, :-1][same] + 1).all()
    assert (f['positions'][:, 1:][~same] == 0).all()
    # Padding is masked by position: targets past the stream's end carry no weight.
    assert f['weights'][-1].sum() < 16 and f['weights'][:-1].sum() > 0


def test_train_batches_are_seeded_and_resume_without_replay(corpus_file, tokenizer):
    corpus = _corpus(corpus_file, val_split=0.0)
    split = _stream(corpus, tokenizer)
    full = list(stream_batches.train_batches(split, 8, 4, seed=3, epoch=0))
    assert len(full) == split.num_windows(8) // 4 > 3
    again = list(stream_batches.train_batches(split, 8, 4, seed=3, epoch=0))
    resumed = list(stream_batches.train_batches(split, 8, 4, seed=3, epoch=0, start_step=3))
    next_epoch = list(stream_batches.train_batches(split, 8, 4, seed=3, epoch=1))
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a['inputs'], b['inputs'])
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a['inputs'], b['inputs'])
    assert any((a['inputs'] != b['inputs']).any() for a, b in zip(full, next_epoch))
    # One epoch visits each window at most once: its rows are a sub-multiset of the windows.
    seen = collections.Counter(r.tobytes() for b in full for r in b['inputs'])
    windows = collections.Counter(r.tobytes() for r in _all_windows(split, 8)[0][:, :-1])
    assert sum(seen.values()) == len(full) * 4 and not seen - windows


def test_eval_batches_cover_the_split_and_mask_filler_rows(corpus_file, tokenizer):
    corpus = _corpus(corpus_file)
    split = _stream(corpus, tokenizer, 'validation')
    batches = list(input_pipeline.eval_batches(split, 8, 4, -(-split.num_windows(8) // 4)))
    weights = np.concatenate([b['weights'] for b in batches])
    full = input_pipeline.features(*_all_windows(split, 8))['weights']
    assert weights.sum() == full.sum()
    assert split.num_windows(8) % 4, 'the test needs filler rows'
    assert weights[split.num_windows(8) :].sum() == 0


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer):
    path = tmp_path / 'bad.txt'
    path.write_bytes(b'good line of text here\nbad \xff\xfe bytes here\n')
    docs = [d.encode() for d in input_pipeline.documents(_corpus(path, val_split=0.0), 'train')]
    assert docs[1] == 'bad \ufffd\ufffd bytes here'.encode()
    split, invalid = input_pipeline.in_memory_stream(iter([b'good', b'bad \xff\xfe']), tokenizer)
    assert split.num_documents == 2 and invalid == 1


@pytest.mark.parametrize(
    'make, message',
    [
        (lambda d: str(d / 'missing.txt'), 'does not exist'),
        (lambda d: str(d), r'a directory with no data files \(\.txt'),
        (lambda d: str(d / '*.nothing'), 'matches no files'),
    ],
)
def test_bad_data_paths_are_named(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        input_pipeline.documents(_corpus(make(tmp_path)), 'train')


def test_directory_and_glob_sources(tmp_path):
    (tmp_path / 'a.txt').write_text('alpha one\nalpha two\n')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'b.txt').write_text('beta one\n')
    (tmp_path / 'c.md').write_text('gamma one\n')
    docs = lambda path: sorted(
        _texts(input_pipeline.documents(_corpus(path, val_split=0.0), 'train'))
    )
    assert docs(tmp_path) == ['alpha one', 'alpha two', 'beta one']
    assert docs(str(tmp_path / '*.md')) == ['gamma one']


def test_tfds_source_offline_with_mock_data(tokenizer):
    import tensorflow_datasets as tfds

    corpus = _corpus('', tfds_name='lm1b', tfds_split='train', tfds_text_key='text', val_split=0.0)
    with tfds.testing.mock_data(num_examples=12):
        docs = _texts(input_pipeline.documents(corpus, 'train'))
        split = _stream(corpus, tokenizer)
    assert len(docs) == 12 and all(isinstance(d, str) and d for d in docs)
    assert split.num_documents == 12


def test_tfds_source_from_a_locally_built_dataset(tmp_path, tokenizer):
    import tensorflow_datasets as tfds

    class MuomniTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({'body': tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            for i, doc in enumerate(DOCS[:30]):
                yield i, {'body': doc}

    MuomniTinyText(data_dir=str(tmp_path)).download_and_prepare()
    corpus = _corpus(
        '',
        tfds_name='muomni_tiny_text',
        tfds_text_key='body',
        tfds_data_dir=str(tmp_path),
        val_split=0.0,
    )
    assert sorted(_texts(input_pipeline.documents(corpus, 'train'))) == sorted(DOCS[:30])
    with pytest.raises(UserError, match="no feature 'text'"):
        input_pipeline.documents(
            _corpus(
                '', tfds_name='muomni_tiny_text', tfds_text_key='text', tfds_data_dir=str(tmp_path)
            ),
            'train',
        )


def test_unknown_tfds_dataset_is_named():
    with pytest.raises(UserError, match="TFDS dataset 'no_such_dataset_xyz' does not exist"):
        input_pipeline.documents(_corpus('', tfds_name='no_such_dataset_xyz'), 'train')


# ----------------------------------------------------------------------------------------------
# Documents longer than one encode call (input_pipeline._MAX_ENCODE_CHARS, cut by
# Tokenizer.pieces): their ids must be exactly those of the whole document.


def _tokenizer_with(add_dummy_prefix: bool, remove_extra_whitespaces: bool):
    """A BPE model on the bundled corpus with the given normalizer (our own trainer keeps
    SentencePiece's defaults, True and True; Llama's tokenizer, loaded with tokenizer_path, has
    True and False)."""
    import io

    import sentencepiece as spm

    with open(CORPUS, encoding='utf-8') as f:
        lines = [next(f) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type='bpe',
        vocab_size=400,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra_whitespaces,
    )
    return tokenizer_lib.Tokenizer(model.getvalue())


def _long_documents() -> dict[str, str]:
    """Documents of 100k-1M characters whose fixed 100k-character cuts would fall inside a
    word, on a space, after a multi-byte character, in a run of spaces or in a space-free run."""
    with open(CORPUS, encoding='utf-8') as f:
        prose = ' '.join(line.strip() for line in f)
    limit = input_pipeline._MAX_ENCODE_CHARS
    return {
        'a word across the cut': 'x' * (limit - 2) + ' method defined here',
        'a space at the cut': 'y' * limit + ' after the space',
        'prose, 150k': prose[:150_000],
        'prose, 1M': prose[17:1_000_017],
        'multi-byte characters': ('héllo wörld 日本語のテキスト 🙂 ' * 40_000)[:300_001],
        'a space-free run past the limit': 'ab ' + 'é' * (limit + 5_000) + ' tail words',
        'runs of spaces and tabs': ('word  \t two   three\tfour \n' * 20_000)[:250_000],
        'spaces at both ends': '  ' + prose[:120_000] + '   ',
    }


@pytest.mark.parametrize(
    'add_dummy_prefix,remove_extra_whitespaces',
    [(True, True), (True, False), (False, False), (False, True)],
)
def test_long_documents_encode_exactly_as_a_whole(add_dummy_prefix, remove_extra_whitespaces):
    tokenizer = _tokenizer_with(add_dummy_prefix, remove_extra_whitespaces)
    docs = _long_documents()
    tokens, lengths, _ = input_pipeline.tokenize([d.encode() for d in docs.values()], tokenizer)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for i, (name, doc) in enumerate(docs.items()):
        expected = [tokenizer_lib.BOS_ID, *tokenizer.encode(doc), tokenizer_lib.EOS_ID]
        assert tokens[starts[i] : starts[i + 1]].tolist() == expected, name
    if add_dummy_prefix or not remove_extra_whitespaces:  # Cut into pieces near the limit.
        pieces = tokenizer.pieces(docs['prose, 1M'], 100_000)
        assert len(pieces) >= 10 and max(map(len, pieces)) <= 100_000
