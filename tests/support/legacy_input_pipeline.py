"""muomni_jax/data/input_pipeline.py as of commit b7c1f33: the in-memory packing path, frozen.

The oracle for the token cache: the cached path must give exactly these windows, in this order,
with these masks. Nothing in muomni_jax/ imports this file; only the equality tests read it.
"""

import dataclasses
import difflib
import os
import sys
from collections.abc import Iterator

import numpy as np

os.environ.setdefault(
    'TF_CPP_MIN_LOG_LEVEL', '2'
)  # Keep TensorFlow's C++ info lines out of the console.
import tensorflow as tf

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError

# tf.data is host-side work: never let TensorFlow grab accelerator memory that JAX needs.
tf.config.set_visible_devices([], 'GPU')

_HASH_BUCKETS = 1_000_000
_DOCS_PER_TOKENIZE_CALL = 256
_TEXT_SUFFIXES = ('.txt', '.text')
# One line is one document and tf.data holds a whole line in memory: longer lines are refused.
MAX_LINE_BYTES = 10 * 2**20
_SNIFF_BYTES = 64 * 2**10  # How much of each file is checked for binary content.
_SCAN_CHUNK_BYTES = 2**20


@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """One split of the corpus as fixed windows.

    tokens:      (N, ctx_len + 1) int32 token ids; padding slots hold PAD_ID.
    segment_ids: (N, ctx_len + 1) int32, 1, 2, ... per document piece in a window; 0 is padding.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    num_documents: int
    num_tokens: int

    @property
    def num_windows(self) -> int:
        return self.tokens.shape[0]


def text_files(data_path: str) -> list[str]:
    """Expands a file, a directory (its text files, recursively) or a glob into sorted paths."""
    if not data_path:
        raise UserError(
            'data_path is empty: set --config.data_path to a text file, directory or glob, '
            'or set --config.tfds_name'
        )
    if tf.io.gfile.isdir(data_path):
        paths = [
            os.path.join(root, name)
            for root, _, names in tf.io.gfile.walk(data_path)
            for name in names
            if name.endswith(_TEXT_SUFFIXES)
        ]
        if not paths:
            raise UserError(
                f'data_path {data_path} is a directory with no {"/".join(_TEXT_SUFFIXES)} '
                'files: point it at a text file or a glob such as "dir/*.md"'
            )
    elif any(c in data_path for c in '*?['):
        paths = tf.io.gfile.glob(data_path)
        if not paths:
            raise UserError(f'data_path glob {data_path} matches no files: check the pattern')
    elif tf.io.gfile.exists(data_path):
        paths = [data_path]
    else:
        raise UserError(
            f'data_path {data_path} does not exist: point --config.data_path at a text file'
        )
    return sorted(paths)


def check_text_file(path: str) -> None:
    """Refuses a file that looks binary or has a line too long to hold, reading it in chunks.

    Text with a few invalid UTF-8 bytes is accepted: pack() replaces them by U+FFFD and warns
    with a count. A file is binary if its first 64 KB hold a NUL byte or are >10% undecodable.
    """
    with tf.io.gfile.GFile(path, 'rb') as f:
        head = f.read(_SNIFF_BYTES)
        if head:
            # A multi-byte character cut at the end of the sniffed block is not an error.
            replaced = head.decode('utf-8', errors='replace')[:-1].count('\ufffd')
            if b'\0' in head or replaced > 0.1 * len(head):
                raise UserError(
                    f'data_path file {path} looks binary, not UTF-8 text: point data_path at '
                    'text files with one document per line'
                )
        in_progress, offset, chunk = 0, 0, head  # in_progress: bytes of the line not yet ended.
        while chunk:
            pieces = chunk.split(b'\n')
            lengths = [in_progress + len(pieces[0])] + [len(piece) for piece in pieces[1:]]
            if max(lengths) > MAX_LINE_BYTES:
                raise UserError(
                    f'data_path file {path} has a line of over {MAX_LINE_BYTES // 2**20} MB '
                    f'(before byte {offset + len(chunk):,}); each line is one document: '
                    'split the text into lines'
                )
            in_progress = lengths[-1]
            offset += len(chunk)
            chunk = f.read(_SCAN_CHUNK_BYTES)


def _tfds_documents(config) -> tf.data.Dataset:
    import tensorflow_datasets as tfds  # Imported only for TFDS sources: it is slow to import.

    try:
        builder = tfds.builder(config.tfds_name, data_dir=config.tfds_data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(config.tfds_name, tfds.list_builders(), n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise UserError(
            f'TFDS dataset {config.tfds_name!r} does not exist: {hint}check '
            '--config.tfds_name (see tfds.list_builders())'
        ) from None
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise UserError(
            f'cannot download or prepare TFDS dataset {config.tfds_name!r} '
            f'({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}): check the '
            'network, or set --config.tfds_data_dir to a prepared copy'
        ) from None
    features = builder.info.features
    if config.tfds_text_key not in features:
        raise UserError(
            f'TFDS dataset {config.tfds_name!r} has no feature {config.tfds_text_key!r}: '
            f'set --config.tfds_text_key to one of {sorted(features.keys())}'
        )
    try:
        ds = builder.as_dataset(split=config.tfds_split, shuffle_files=False)
    except ValueError as e:
        raise UserError(f'TFDS split {config.tfds_split!r} of {config.tfds_name!r}: {e}') from None
    return ds.map(
        lambda example: example[config.tfds_text_key], num_parallel_calls=tf.data.AUTOTUNE
    )


def documents(
    config, split: str, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
    """The documents of one split ('train' or 'validation') as a dataset of tf.string.

    A document is one non-empty line of a text file or one TFDS example. The split is decided by a
    stable hash of the document's text, so duplicates always fall on the same side.
    """
    if config.tfds_name:
        ds = _tfds_documents(config)
    else:
        paths = text_files(config.data_path)
        if split == 'train':  # Once per run is enough.
            for path in paths:
                check_text_file(path)
        ds = tf.data.TextLineDataset(paths)
    ds = ds.map(tf.strings.strip).filter(lambda doc: tf.strings.length(doc) > 0)
    threshold = int(round(config.val_split * _HASH_BUCKETS))
    in_validation = lambda doc: tf.strings.to_hash_bucket_fast(doc, _HASH_BUCKETS) < threshold
    if split == 'train':
        ds = ds.filter(lambda doc: tf.logical_not(in_validation(doc)))
    elif split == 'validation':
        ds = ds.filter(in_validation)
    else:
        raise ValueError(f'unknown split {split!r}')
    return ds.shard(process_count, process_index)


def document_texts(ds: tf.data.Dataset) -> Iterator[str]:
    """Python strings from a documents() dataset, e.g. to train the tokenizer."""
    for doc in ds.as_numpy_iterator():
        yield doc.decode('utf-8', errors='replace')


def _tokenize_fn(tokenizer: tokenizer_lib.Tokenizer):
    """A numpy function: a batch of documents -> (flat ids, document-start flags, the number
    of invalid UTF-8 documents)."""

    def tokenize(docs: np.ndarray):
        ids, starts, invalid = [], [], 0
        for raw in docs:
            try:
                text = raw.decode('utf-8')
            except UnicodeDecodeError:
                text = raw.decode('utf-8', errors='replace')
                invalid += 1
            # The whole document in one call: the ids the library's piecewise encoding must give.
            doc = [tokenizer_lib.BOS_ID, *tokenizer.encode(text), tokenizer_lib.EOS_ID]
            ids.append(np.asarray(doc, np.int32))
            flags = np.zeros(len(doc), np.bool_)
            flags[0] = True
            starts.append(flags)
        return np.concatenate(ids), np.concatenate(starts), np.int64(invalid)

    return tokenize


def pack(docs: tf.data.Dataset, tokenizer: tokenizer_lib.Tokenizer, ctx_len: int) -> PackedSplit:
    """Tokenizes documents in a parallel tf.data map and packs them into overlapping windows."""
    tokenize = _tokenize_fn(tokenizer)
    ds = (
        docs.batch(_DOCS_PER_TOKENIZE_CALL)
        .map(
            lambda batch: tf.numpy_function(tokenize, [batch], (tf.int32, tf.bool, tf.int64)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
    ids, starts, num_documents, invalid = [], [], 0, 0
    for batch_ids, batch_starts, batch_invalid in ds.as_numpy_iterator():
        ids.append(batch_ids)
        starts.append(batch_starts)
        num_documents += int(batch_starts.sum())
        invalid += int(batch_invalid)
    if invalid:
        print(
            f'Warning: {invalid} documents had invalid UTF-8; their bad bytes were replaced by '
            'U+FFFD.',
            file=sys.stderr,
        )
    stream = np.concatenate(ids) if ids else np.zeros([0], np.int32)
    stream_starts = np.concatenate(starts) if starts else np.zeros([0], np.bool_)
    return _windows(stream, stream_starts, ctx_len, num_documents)


def _windows(
    stream: np.ndarray, starts: np.ndarray, ctx_len: int, num_documents: int
) -> PackedSplit:
    """Cuts a token stream into windows of ctx_len + 1 tokens; window k starts at k * ctx_len."""
    length = len(stream)
    num_windows = -(-(length - 1) // ctx_len) if length > 1 else 0
    padded = num_windows * ctx_len + 1
    valid = np.zeros(padded, np.bool_)
    valid[:length] = True
    stream = np.pad(stream, (0, max(padded - length, 0)), constant_values=tokenizer_lib.PAD_ID)
    starts = np.pad(starts, (0, max(padded - length, 0)))
    index = np.arange(num_windows)[:, None] * ctx_len + np.arange(ctx_len + 1)[None, :]
    window_starts = starts[index]
    # A document continued from the previous window starts a fresh segment at slot 0.
    segment_ids = np.cumsum(window_starts, axis=1, dtype=np.int32) + (~window_starts[:, :1])
    segment_ids = np.where(valid[index], segment_ids, 0).astype(np.int32)
    return PackedSplit(
        tokens=stream[index],
        segment_ids=segment_ids,
        num_documents=num_documents,
        num_tokens=length,
    )


def features(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for a batch of windows.

    Args:
      tokens, segment_ids: (B, ctx_len + 1) from a PackedSplit.
    Returns:
      inputs, targets, segment_ids, positions: (B, ctx_len) int32, and weights:
      (B, ctx_len) float32,
      1 where the target is the next token of the same document.
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


def steps_per_epoch(split: PackedSplit, batch_size: int) -> int:
    """Whole batches per epoch; the remainder windows wait for the next epoch's permutation."""
    return split.num_windows // batch_size


def _batched(split: PackedSplit, batch_index: np.ndarray) -> tf.data.Dataset:
    """A prefetched dataset of feature dicts; batch_index is (num_batches, B) window indices
    (-1: empty)."""

    def gather(index):
        rows = np.maximum(index, 0)
        tokens, segment_ids = split.tokens[rows], split.segment_ids[rows].copy()
        segment_ids[index < 0] = 0
        f = features(tokens, segment_ids)
        return [f[k] for k in _FEATURE_KEYS]

    dtypes = [tf.float32 if k == 'weights' else tf.int32 for k in _FEATURE_KEYS]
    ds = tf.data.Dataset.from_tensor_slices(batch_index.astype(np.int64))
    ds = ds.map(
        lambda index: dict(zip(_FEATURE_KEYS, tf.numpy_function(gather, [index], dtypes))),
        num_parallel_calls=2,
        deterministic=True,
    )
    return ds.prefetch(2)


_FEATURE_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def train_batches(
    split: PackedSplit,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    num_steps: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of epoch `epoch`, from `start_step` within it, in an order fixed by (seed, epoch).

    Each epoch is a fresh permutation of all windows, so resuming at step s costs the same for
    any s.
    """
    num_steps = steps_per_epoch(split, batch_size) if num_steps is None else num_steps
    order = np.random.default_rng([seed, epoch]).permutation(split.num_windows)
    batch_index = order[: num_steps * batch_size].reshape(num_steps, batch_size)[start_step:]
    return _batched(split, batch_index).as_numpy_iterator()


def eval_batches(
    split: PackedSplit, batch_size: int, num_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """The first num_batches batches of a split, in order; missing rows are fully masked."""
    index = np.full(num_batches * batch_size, -1, np.int64)
    count = min(split.num_windows, len(index))
    index[:count] = np.arange(count)
    return _batched(split, index.reshape(num_batches, batch_size)).as_numpy_iterator()
