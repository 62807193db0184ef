"""Text to packed next-token batches, on the host. Knows nothing of the model.

Data flow:
  documents: the non-empty stripped lines of text files, the text fields of JSON Lines, Parquet
     and Arrow records (document_files.py), or TFDS examples, read once, in order
  -> split by a stable hash of each document's text (validation never trains)
  -> data shard by position in the split: document i of a split goes to shard i % num_shards
  -> SentencePiece: [BOS] + ids + [EOS] per document, appended to one token stream per
     (split, shard). token_cache.py writes these streams to disk once; later runs memory-map them.
  -> windows of ctx_len + 1 tokens, cut from a stream when a batch is read: window k is
     stream[k * ctx_len : k * ctx_len + ctx_len + 1], so windows overlap by one token and every
     next-token pair inside a document is trained once per epoch
  -> step-indexed batches: epoch e reads a seeded permutation of the windows, so a resumed run
     starts at any step in O(1), with no replay.

Packing wastes no compute on padding: only the last window of a stream is padded, and padding is
masked by position (segment id 0), never by token id. Segment ids restart the attention mask and
the RoPE positions at every document, as in Flax's lm1b example.
"""

import dataclasses
import difflib
import functools
import os
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

from muomni_jax.data import document_files, fingerprint
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError, first_line

SPLITS = ('train', 'validation')
_HASH_BUCKETS = 1_000_000
# SentencePiece's memory grows with the input; longer documents are encoded piecewise, cut
# between words so that the ids are those of the whole (Tokenizer.pieces).
_MAX_ENCODE_CHARS = 100_000
_TFDS_BATCH = 1024  # TFDS examples read per chunk.


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where one corpus's documents are and how they are read and split.

    The defaults are those of a corpus read on its own (launch.evaluate's text file); a training
    run fills every field from its plan (data_plan.DataPlan.corpus).
    """

    data_path: str = ''  # File, directory, glob or hf:NAME/CONFIG/SPLIT; '' for TFDS.
    tfds_name: str = ''  # When set, the corpus is this TFDS dataset's split.
    tfds_split: str = 'train'
    tfds_text_key: str = 'text'  # The TFDS feature that holds the text.
    tfds_data_dir: str = ''  # '': the TFDS default.
    text_key: str = 'text'  # The field or column of JSON, Parquet and Arrow records.
    val_split: float = 0.0  # Fraction of documents held out for validation.
    label: str = 'data_path'  # How errors name the corpus ("mixture source 'web'").


@functools.cache
def _tensorflow():
    """TensorFlow, for TFDS sources only: text files are read without it (it costs a text run
    11 s and 650 MB to import, and an accelerator box may not have it)."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Its C++ info lines stay off the console.
    try:
        import tensorflow as tf
    except ImportError as e:
        raise UserError(
            f'TFDS sources need TensorFlow, which does not import here ({e}): pip '
            'install -r requirements.txt, or give text files as data_path'
        ) from None
    # Host-side work here: it must never take accelerator memory that JAX needs.
    tf.config.set_visible_devices([], 'GPU')
    return tf


def _tfds_dataset(spec: CorpusSpec, builder):
    """The tf.data.Dataset of the text feature of the corpus's TFDS split."""
    tf = _tensorflow()
    features = builder.info.features
    if spec.tfds_text_key not in features:
        raise UserError(
            f'TFDS dataset {spec.tfds_name!r} has no feature {spec.tfds_text_key!r}: '
            f'set --spec.tfds_text_key to one of {sorted(features.keys())}'
        )
    try:
        ds = builder.as_dataset(split=spec.tfds_split, shuffle_files=False)
    except ValueError as e:
        raise UserError(f'TFDS split {spec.tfds_split!r} of {spec.tfds_name!r}: {e}') from None
    return ds.map(lambda example: example[spec.tfds_text_key], num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_builder(spec: CorpusSpec):
    """The prepared TFDS builder of the corpus's tfds_name (downloading it if needed)."""
    _tensorflow()
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec.tfds_name, data_dir=spec.tfds_data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(spec.tfds_name, tfds.list_builders(), n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise UserError(
            f'TFDS dataset {spec.tfds_name!r} does not exist: {hint}check '
            '--spec.tfds_name (see tfds.list_builders())'
        ) from None
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise UserError(
            f'cannot download or prepare TFDS dataset {spec.tfds_name!r} '
            f'({first_line(e, 200)}): check the '
            'network, or set --spec.tfds_data_dir to a prepared copy'
        ) from None
    return builder


@dataclasses.dataclass(frozen=True)
class RoutedChunk:
    """Consecutive documents of the source, each assigned to a split and a data shard.

    docs: the documents as UTF-8 bytes (maybe invalid); split: (D,) int8 index into SPLITS;
    shard: (D,) int64 data shard; progress: bytes (text) or examples (TFDS) consumed by this
    chunk, for progress bars.
    """

    docs: list[bytes]
    split: np.ndarray
    shard: np.ndarray
    progress: int


class DocumentSource:
    """The documents of a corpus's files (document_files.py) or TFDS split, read once, in order,
    by chunk.

    Construction checks the source (files exist, TFDS dataset and feature), so a bad path fails
    before anything is built.
    """

    def __init__(self, spec: CorpusSpec):
        self.spec = spec
        self.label = spec.label  # How errors name this source.
        if spec.tfds_name:
            # Prepared once: its info also keys the token cache and sizes the progress bar.
            self.tfds_builder = _tfds_builder(spec)
            self._dataset = _tfds_dataset(spec, self.tfds_builder)
            self.paths = []
        else:
            self.tfds_builder = None
            self.paths = document_files.expand(spec.data_path, self.label)
        # The field or column of JSON, Parquet and Arrow records that holds the text.
        self.text_key = spec.text_key
        self._threshold = int(round(spec.val_split * _HASH_BUCKETS))

    @property
    def name(self) -> str:
        spec = self.spec
        return f'TFDS {spec.tfds_name}/{spec.tfds_split}' if spec.tfds_name else spec.data_path

    def size(self) -> tuple[int, str]:
        """(total, unit) of the progress chunks report: bytes, or TFDS examples (0: unknown)."""
        if not self.spec.tfds_name:
            return sum(epath.Path(path).stat().length for path in self.paths), 'B'
        splits = self.tfds_builder.info.splits
        try:
            return splits[self.spec.tfds_split].num_examples, 'examples'
        except (KeyError, ValueError):
            return 0, 'examples'

    def _chunks(self) -> Iterator[tuple[list[bytes], int]]:
        """(stripped non-empty documents, progress) per chunk."""
        if self.spec.tfds_name:
            for batch in self._dataset.batch(_TFDS_BATCH).prefetch(2).as_numpy_iterator():
                yield [doc for doc in (raw.strip() for raw in batch) if doc], len(batch)
        else:
            for path in self.paths:
                yield from document_files.chunks(path, self.text_key, self.label)

    def routed(self, num_shards: int) -> Iterator[RoutedChunk]:
        """Every document with its split (by a stable hash of its text) and data shard."""
        counts = np.zeros(len(SPLITS), np.int64)  # Documents of each split so far.
        for docs, progress in self._chunks():
            if not docs:
                yield RoutedChunk([], np.zeros(0, np.int8), np.zeros(0, np.int64), progress)
                continue
            # Duplicated documents always fall on the same side.
            buckets = fingerprint.hash_buckets(docs, _HASH_BUCKETS)
            split = (buckets < self._threshold).astype(np.int8)
            position = np.empty(len(docs), np.int64)
            for index in range(len(SPLITS)):
                mine = split == index
                position[mine] = counts[index] + np.arange(mine.sum())
                counts[index] += mine.sum()
            yield RoutedChunk(docs, split, position % num_shards, progress)


def document_bytes(
    spec: CorpusSpec, split: str, shard: int = 0, num_shards: int = 1
) -> Iterator[bytes]:
    """The documents of one split ('train' or 'validation') and data shard, as UTF-8 bytes (maybe
    invalid: tokenize() replaces and counts bad bytes).

    Checks the source now and reads it lazily.
    """
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}')
    source = DocumentSource(spec)
    split_index = SPLITS.index(split)

    def read():
        for chunk in source.routed(num_shards):
            for doc, s, d in zip(chunk.docs, chunk.split, chunk.shard):
                if s == split_index and d == shard:
                    yield doc

    return read()


def documents(spec: CorpusSpec, split: str, shard: int = 0, num_shards: int = 1) -> Iterator[str]:
    """document_bytes as text (bad UTF-8 bytes become U+FFFD), e.g. to train the tokenizer."""
    return (
        doc.decode('utf-8', errors='replace')
        for doc in document_bytes(spec, split, shard, num_shards)
    )


def tokenize(
    docs: Sequence[bytes], tokenizer: tokenizer_lib.Tokenizer, dtype=np.int32
) -> tuple[np.ndarray, np.ndarray, int]:
    """[BOS] + ids + [EOS] per document, end to end.

    Returns (tokens (N,) of dtype, lengths (D,) int64 of each document's tokens, number of
    documents with invalid UTF-8, whose bad bytes became U+FFFD).
    """
    pieces, counts, invalid = [], [], 0
    for raw in docs:
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError:
            text = raw.decode('utf-8', errors='replace')
            invalid += 1
        chunks = tokenizer.pieces(text, _MAX_ENCODE_CHARS)
        pieces.extend(chunks)
        counts.append(len(chunks))
    encoded = iter(tokenizer.encode_batch(pieces))
    ids, lengths = [], np.empty(len(counts), np.int64)
    for d, count in enumerate(counts):
        doc = [tokenizer_lib.BOS_ID]
        for _ in range(count):
            doc.extend(next(encoded))
        doc.append(tokenizer_lib.EOS_ID)
        ids.extend(doc)
        lengths[d] = len(doc)
    return np.asarray(ids, dtype), lengths, invalid


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """One split of one data shard: its documents' tokens end to end, and where each starts.

    tokens: (num_tokens,) unsigned or int32 ids, [BOS] ... [EOS] per document (maybe a memmap).
    doc_starts: (num_documents,) int64 offset of each document's BOS in tokens (maybe a memmap).
    vocab_size: when set, every window read is checked to hold only ids below it (a damaged
      cache file would otherwise train on ids the model has no row for, without a word).
    path: the file the tokens come from, for that error.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    vocab_size: int = 0
    path: str = ''

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)

    def num_windows(self, ctx_len: int) -> int:
        return -(-(self.num_tokens - 1) // ctx_len) if self.num_tokens > 1 else 0

    def windows(self, index: np.ndarray, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows by number; reads only their tokens, so a memmapped stream stays on disk.

        Args:
          index: (N,) window numbers; -1 gives an empty row (padding only).
        Returns:
          tokens: (N, ctx_len + 1) int32, PAD_ID past the end of the stream;
          segment_ids: (N, ctx_len + 1) int32, 1, 2, ... per document piece; 0 is padding.
        """
        width = ctx_len + 1
        tokens = np.full((len(index), width), tokenizer_lib.PAD_ID, np.int32)
        starts = np.zeros((len(index), width), np.bool_)
        valid = np.zeros((len(index), width), np.bool_)
        for row, k in enumerate(index):
            if k < 0:
                continue
            lo = int(k) * ctx_len
            hi = min(lo + width, self.num_tokens)
            tokens[row, : hi - lo] = self.tokens[lo:hi]
            valid[row, : hi - lo] = True
            first, last = np.searchsorted(self.doc_starts, [lo, hi])
            starts[row, self.doc_starts[first:last] - lo] = True
        if self.vocab_size and tokens.size and int(tokens.max()) >= self.vocab_size:
            # O(tokens read): the whole file is never scanned, yet no bad id reaches a step.
            raise UserError(
                f'token cache file {self.path or "(in memory)"} holds token id '
                f'{int(tokens.max())}, past the vocabulary ({self.vocab_size}): the '
                f'file is damaged; delete {os.path.dirname(self.path) or "it"} and '
                'rerun, which builds it again'
            )
        # A document continued from the previous window starts a fresh segment at slot 0.
        segment_ids = np.cumsum(starts, axis=1, dtype=np.int32) + (~starts[:, :1])
        return tokens, np.where(valid, segment_ids, 0).astype(np.int32)


def in_memory_stream(
    docs: Iterator[bytes], tokenizer: tokenizer_lib.Tokenizer, chunk_docs: int = 1024
) -> tuple[TokenStream, int]:
    """A TokenStream held in memory, for small texts (launch.evaluate); (stream, #invalid UTF-8)."""
    parts, lengths, invalid, chunk = [], [], 0, []

    def flush():
        nonlocal invalid
        ids, doc_lengths, bad = tokenize(chunk, tokenizer)
        parts.append(ids)
        lengths.append(doc_lengths)
        invalid += bad
        chunk.clear()

    for doc in docs:
        chunk.append(doc)
        if len(chunk) == chunk_docs:
            flush()
    if chunk:
        flush()
    doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return TokenStream(tokens, starts[: len(doc_lengths)]), invalid


def features(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for a batch of windows.

    Args:
      tokens, segment_ids: (B, ctx_len + 1) from TokenStream.windows.
    Returns:
      inputs, targets, segment_ids, positions: (B, ctx_len) int32, and weights: (B, ctx_len)
      float32, 1 where the target is the next token of the same document.
    """
    seg_in, seg_out = segment_ids[:, :-1], segment_ids[:, 1:]
    t = np.arange(seg_in.shape[1], dtype=np.int32)[None, :]
    is_start = np.concatenate(
        [np.ones_like(seg_in[:, :1], np.bool_), seg_in[:, 1:] != seg_in[:, :-1]], axis=1
    )
    positions = t - np.maximum.accumulate(np.where(is_start, t, 0), axis=1)
    return {
        'inputs': tokens[:, :-1].astype(np.int32),
        'targets': tokens[:, 1:].astype(np.int32),
        'segment_ids': seg_in.astype(np.int32),
        'positions': positions.astype(np.int32),
        'weights': ((seg_in == seg_out) & (seg_out > 0)).astype(np.float32),
    }


def epoch_order(num_windows: int, seed: int, epoch: int, source: int = 0) -> np.ndarray:
    """(num_windows,) int64: the order of epoch `epoch`, fixed by (seed, epoch, source).

    Source 0 (also the only source of a single corpus) keeps the seed's original order.
    Memory: 8 bytes per window of this stream while the epoch runs (e.g. 15 M windows of a
    30 GB corpus at ctx_len 512, spread over the data shards: 120 MB in all).
    """
    entropy = [seed, epoch, source] if source else [seed, epoch]
    return np.random.default_rng(entropy).permutation(num_windows)


class EpochOrder:
    """Window numbers of positions 0, 1, 2, ... in an endless run of epochs over one stream.

    Position p is index p % epoch_windows of epoch p // epoch_windows's order; an epoch reads
    the first epoch_windows windows of a fresh permutation of all num_windows, so every data
    shard's epoch has the same length and the windows left over differ from epoch to epoch.
    """

    def __init__(self, num_windows: int, epoch_windows: int, seed: int, source: int = 0):
        if not 0 < epoch_windows <= num_windows:
            raise ValueError(f'epoch_windows {epoch_windows} not in [1, {num_windows}]')
        self.num_windows, self.epoch_windows = num_windows, epoch_windows
        self.seed, self.source = seed, source
        self._orders: dict[int, np.ndarray] = {}  # The newest two epochs: a step may span both.

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = epoch_order(self.num_windows, self.seed, epoch, self.source)
        return self._orders[epoch]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """(N,) window numbers of (N,) positions."""
        epochs, index = np.divmod(np.asarray(positions, np.int64), self.epoch_windows)
        windows = np.empty(len(index), np.int64)
        for epoch in np.unique(epochs):
            mine = epochs == epoch
            windows[mine] = self._order(int(epoch))[index[mine]]
        return windows


def eval_batches(
    stream: TokenStream, ctx_len: int, batch_size: int, num_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """The first num_batches batches of a stream, in order; missing rows are fully masked."""
    index = np.full(num_batches * batch_size, -1, np.int64)
    count = min(stream.num_windows(ctx_len), len(index))
    index[:count] = np.arange(count)
    for rows in index.reshape(num_batches, batch_size):
        yield features(*stream.windows(rows, ctx_len))
