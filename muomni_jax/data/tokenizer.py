"""SentencePiece BPE tokenizer: trained from the training text on the first run, then reused.

Special ids follow SentencePiece's defaults, as in the original μOmni Thinker:
  UNK_ID = 0, BOS_ID = 1, EOS_ID = 2, and no pad piece.
Packed batches never need a pad token: the few filler slots at the very end of the data are
filled with PAD_ID (= 0, the unknown piece) and masked by position, never by id.
"""

import functools
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from muomni_jax.errors import UserError
from muomni_jax.io.atomic_write import write_atomically

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
PAD_ID = 0  # Filler only; the loss mask is positional, so this id is never trained on.

# SentencePiece skips longer sentences when training, so long documents are cut to this size.
_MAX_SENTENCE_CHARS = 4096
# A space between two non-space characters: where a word of SentencePiece's starts.
_WORD_BOUNDARY = re.compile(r'(?<=\S) (?=\S)')


class Tokenizer:
    """A thin wrapper over a SentencePiece model that keeps our special ids explicit."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) != (UNK_ID, BOS_ID, EOS_ID):
            raise UserError(
                f'tokenizer has unk/bos/eos ids {self._sp.unk_id()}/{self._sp.bos_id()}/'
                f'{self._sp.eos_id()}, '
                f'expected {UNK_ID}/{BOS_ID}/{EOS_ID}: train it with SentencePiece default ids'
            )

    @classmethod
    def load(cls, path: str) -> 'Tokenizer':
        try:
            return cls(epath.Path(path).read_bytes())
        # On gs:// the reader is tf.io.gfile, whose errors are not OSErrors.
        except Exception as e:
            if isinstance(e, UserError):
                raise
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(
                f'cannot load tokenizer {path}: {reason}; point tokenizer_path at a SentencePiece '
                '.model file or leave it empty to train one'
            ) from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def pieces(self, text: str, max_chars: int) -> list[str]:
        """text cut into pieces of about max_chars (SentencePiece's memory grows with its input)
        whose encodings, end to end, are exactly encode(text).

        SentencePiece encodes each whitespace-separated word on its own, after a normalizer that
        may prepend a space (the dummy prefix) and drop spaces at the ends (remove extra
        whitespace). A cut at a space between two words is therefore exact: with the dummy
        prefix the space is dropped and the next piece's prefix stands for it; without one the
        next piece keeps it. A piece runs past max_chars to the next such space; a model where
        no cut is exact (no word split, or stripped spaces without a prefix) gets one piece.
        """
        if len(text) <= max_chars or self._seam is None:
            return [text]
        skip = 1 if self._seam == 'drop' else 0
        pieces, start = [], 0
        while len(text) - start > max_chars:
            cut = None
            for match in _WORD_BOUNDARY.finditer(text, start + 1, start + max_chars + 1):
                cut = match.start()  # The last boundary within max_chars.
            if cut is None:
                match = _WORD_BOUNDARY.search(text, start + max_chars)
                if match is None:
                    break
                cut = match.start()
            pieces.append(text[start:cut])
            start = cut + skip
        pieces.append(text[start:])
        return pieces

    @functools.cached_property
    def _seam(self) -> str | None:
        """How a text is cut at a word boundary (see pieces): 'drop' the space, 'keep' it in
        the next piece, or None: no cut is exact."""
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(self.model_proto)
        normalizer, trainer = model.normalizer_spec, model.trainer_spec
        if (
            not trainer.split_by_whitespace
            or trainer.treat_whitespace_as_suffix
            or not normalizer.escape_whitespaces
        ):
            return None
        if normalizer.add_dummy_prefix:
            return 'drop'
        return None if normalizer.remove_extra_whitespaces else 'keep'

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def decode_continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text that new_ids add after prompt_ids, with its leading space: decoded alone,
        SentencePiece would drop the space of a continuation's first word."""
        prompt = self.decode(prompt_ids)
        return self.decode([*prompt_ids, *new_ids])[len(prompt) :]

    def save(self, path: str) -> None:
        """Writes atomically, so a crash never leaves a truncated tokenizer.model behind."""
        write_atomically(path, self.model_proto)


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for start in range(0, len(text), _MAX_SENTENCE_CHARS):
            yield text[start : start + _MAX_SENTENCE_CHARS]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, sample_size: int, seed: int = 0
) -> Tokenizer:
    """Trains a BPE model on `texts` (an iterable of documents), sampling at most `sample_size`.

    SentencePiece reservoir-samples its input, so memory stays bounded for a corpus of any size.
    The sample is seeded, so a run killed before it saved its tokenizer trains the same one again.
    """
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_writer=model,
            model_type='bpe',
            vocab_size=vocab_size,
            character_coverage=1.0,
            input_sentence_size=sample_size,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_CHARS * 4,  # Bytes; our chunks are characters.
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1]
        largest = re.search(r'value <= (\d+)', message)
        if largest:
            raise UserError(
                f'the training text supports at most vocab_size={largest.group(1)}, not '
                f'{vocab_size}: lower --config.vocab_size or add more text'
            ) from None
        raise UserError(f'tokenizer training failed: {message}') from None
    return Tokenizer(model.getvalue())
