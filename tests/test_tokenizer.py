import pytest

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError

TEXTS = [
    'The cat sat on the mat.',
    'A dog slept on the couch.',
    'Naïve café — déjà vu!',
    'Python is a programming language.',
] * 20


def test_trains_saves_reloads_and_round_trips(tmp_path):
    tok = tokenizer_lib.train_tokenizer(TEXTS, vocab_size=80, sample_size=1000)
    assert tok.vocab_size == 80
    path = tmp_path / 'tokenizer.model'
    tok.save(str(path))
    reloaded = tokenizer_lib.Tokenizer.load(str(path))
    assert reloaded.vocab_size == 80
    for text in set(TEXTS):
        ids = reloaded.encode(text)
        assert ids == tok.encode(text)
        assert reloaded.decode(ids) == text
    # character_coverage=1.0: every character seen in training survives, accents included.
    assert tokenizer_lib.UNK_ID not in reloaded.encode('déjà vu café')


def test_special_ids_are_sentencepiece_defaults():
    tok = tokenizer_lib.train_tokenizer(TEXTS, vocab_size=80, sample_size=1000)
    pieces = [tok._sp.id_to_piece(i) for i in range(3)]
    assert pieces == ['<unk>', '<s>', '</s>']
    assert (tokenizer_lib.UNK_ID, tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID) == (0, 1, 2)


def test_vocab_too_large_names_the_largest_that_works():
    with pytest.raises(UserError, match=r'supports at most vocab_size=\d+, not 5000'):
        tokenizer_lib.train_tokenizer(TEXTS, vocab_size=5000, sample_size=1000)


def test_long_documents_are_not_dropped_from_training():
    # One 20k-character document: SentencePiece would skip it whole without our chunking.
    tok = tokenizer_lib.train_tokenizer(['zebra quokka ' * 1600], vocab_size=20, sample_size=1000)
    assert tokenizer_lib.UNK_ID not in tok.encode('zebra quokka')


def test_load_rejects_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / 'tokenizer.model'
    path.write_bytes(b'not a model')
    with pytest.raises(UserError, match='cannot load tokenizer'):
        tokenizer_lib.Tokenizer.load(str(path))


def test_continuation_keeps_the_space_before_its_first_word():
    tok = tokenizer_lib.train_tokenizer(TEXTS, vocab_size=80, sample_size=1000)
    prompt = [tokenizer_lib.BOS_ID] + tok.encode('The cat sat on the')
    assert tok.decode_continuation(prompt, tok.encode('the mat.')) == ' the mat.'
    assert tok.decode(prompt + tok.encode('the mat.')) == 'The cat sat on the the mat.'
