"""The tokenized corpus on disk: tokenize once, then every run and every resume memory-maps it.

Layout, one directory per cache key under the cache directory (cache_dir):

  <cache_dir>/<key>/cache.json                 what the key covers, for people (not read back)
  <cache_dir>/<key>/train-00000-of-00004.tokens    ids end to end: uint16 (vocab <= 65,536) or
                                                   uint32, little-endian
  <cache_dir>/<key>/train-00000-of-00004.docs      int64 offset of each document's BOS
  <cache_dir>/<key>/train-00000-of-00004.json      header: format, key, dtype and counts
  ... the same for every data shard, and for the validation split.

The key hashes everything the streams depend on: the source (each file's path, size and
modification time, and text_key where records are read; or the TFDS dataset's full name, split
and text feature), the tokenizer model's bytes, val_split, the number of data shards and
FORMAT_VERSION. Anything else (ctx_len,
batch_size, seed) is applied when batches are read, so changing it reuses the cache.

Crash safety: a build writes `*.partial-<host>-<pid>` files and renames them into place, and
writes each header last. A shard is used only when its header is readable, names this key and
matches its files' sizes, so a build killed at any point is never used half done: the next run
finds the stale partial files, says so, and builds again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
from etils import epath

from muomni_jax.data import document_files, input_pipeline
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.io.atomic_write import fsync_directory, write_atomically

# 2: documents over 100,000 characters encode to exactly encode(doc) (version 1 cut them at fixed
# offsets, inside words): every cache of version 1 is built again.
FORMAT_VERSION = 2
_PARTIAL = '.partial-'


class BuildProgress(Protocol):
    """Told how a build advances (the caller shows it: training/tokenizing_progress.py)."""

    def start(self, total: int, unit: str) -> None:
        """The source's size in `unit` ('B' of text, or TFDS 'examples'; 0: unknown)."""

    def update(self, done: int, tokens: int) -> None:
        """One more chunk written: `done` units of the source read, `tokens` tokens made."""

    def close(self) -> None:
        """The build ended (also when it failed)."""


def default_dir() -> str:
    """$XDG_CACHE_HOME/muomni_jax/token_cache, else ~/.cache/muomni_jax/token_cache."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'muomni_jax', 'token_cache')


def cache_key(
    source: input_pipeline.DocumentSource, tokenizer: tokenizer_lib.Tokenizer, num_shards: int
) -> tuple[str, dict]:
    """(key, what it covers): equal keys mean equal token streams."""
    spec = source.spec
    if spec.tfds_name:
        info = source.tfds_builder.info
        described = {
            'tfds': info.full_name,
            'split': spec.tfds_split,
            'text_key': spec.tfds_text_key,
        }
    else:
        # Modification times in whole seconds, as nanoseconds: the key TensorFlow's stat gave,
        # so caches built before TensorFlow left this path are still found.
        stats = [epath.Path(path).stat() for path in source.paths]
        described = {
            'files': [
                [path, stat.length, int(stat.mtime) * 10**9]
                for path, stat in zip(source.paths, stats)
            ]
        }
        if document_files.has_records(source.paths):
            # Only where records are read, so the keys of text caches built before stay.
            described['text_key'] = source.text_key
    material = {
        'format': FORMAT_VERSION,
        'source': described,
        'tokenizer_sha256': hashlib.sha256(tokenizer.model_proto).hexdigest(),
        'val_split': spec.val_split,
        'num_shards': num_shards,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return digest[:20], material


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f'{split}-{shard:05d}-of-{num_shards:05d}'


class _Damaged(Exception):
    """A shard whose files cannot be used; the message says why."""


def _check_doc_starts(path: str, starts: np.ndarray, num_tokens: int) -> None:
    """Document offsets must start at 0, increase and stay inside the tokens: O(documents),
    read once at open, so damaged offsets never become wrong document boundaries."""
    if not len(starts):
        return
    if starts[0] != 0 or starts[-1] >= num_tokens or np.any(np.diff(starts) <= 0):
        raise _Damaged(
            f'{path} holds document offsets that do not start at 0, increase and '
            f'stay below its {num_tokens:,} tokens'
        )


def _open_stream(
    directory: str, name: str, key: str, vocab_size: int = 0
) -> input_pipeline.TokenStream | None:
    """The memory-mapped stream of one shard; None if it was never finished. Its windows are
    checked against vocab_size as they are read."""
    header_path = os.path.join(directory, name + '.json')
    if not os.path.exists(header_path):
        return None
    try:
        with open(header_path, encoding='utf-8') as f:
            header = json.load(f)
        dtype = np.dtype(header['dtype'])
        num_tokens, num_documents = int(header['num_tokens']), int(header['num_documents'])
        if header['format'] != FORMAT_VERSION or header['key'] != key:
            raise _Damaged(f'{header_path} belongs to another cache')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Damaged(f'{header_path} is not a valid header ({type(e).__name__})') from None
    arrays = []
    for ext, array_dtype, count in (
        ('tokens', dtype, num_tokens),
        ('docs', np.dtype('<i8'), num_documents),
    ):
        path = os.path.join(directory, f'{name}.{ext}')
        try:
            size = os.path.getsize(path)
            if size != count * array_dtype.itemsize:
                raise _Damaged(
                    f'{path} holds {size:,} bytes where its header says '
                    f'{count * array_dtype.itemsize:,} (truncated?)'
                )
            arrays.append(
                np.memmap(path, array_dtype, mode='r', shape=(count,))
                if count
                else np.zeros(0, array_dtype)
            )
        except OSError as e:
            raise _Damaged(f'{path} cannot be read ({e.strerror})') from None
    _check_doc_starts(os.path.join(directory, f'{name}.docs'), arrays[1], num_tokens)
    return input_pipeline.TokenStream(
        tokens=arrays[0],
        doc_starts=arrays[1],
        vocab_size=vocab_size,
        path=os.path.join(directory, f'{name}.tokens'),
    )


def _stale_partials(directory: str, names: Sequence[str]) -> list[str]:
    """Partial files of these shards. Called under their build lock, so whoever wrote them no
    longer builds: a process that died, on this host or on another one sharing the folder."""
    if not os.path.isdir(directory):
        return []
    return [
        os.path.join(directory, entry)
        for entry in os.listdir(directory)
        if _PARTIAL in entry and entry.startswith(tuple(n + '.' for n in names))
    ]


# One decision, in order: open an intact cache, else say why and build it under the lock.
def open_or_build(
    cache_dir: str,
    source: input_pipeline.DocumentSource,
    tokenizer: tokenizer_lib.Tokenizer,
    num_shards: int,
    shards: Sequence[int],
    log: Callable[[str], None] = print,
    progress: BuildProgress | None = None,
) -> dict[tuple[str, int], input_pipeline.TokenStream]:
    """The (split, shard) -> stream of every split of `shards`, building them if needed.

    cache_dir: the cache's root; '' for default_dir(). `log` prints one line of what happened
    (opened, built, or rebuilt and why); `progress`, when given, is told how a build advances.
    """
    root = cache_dir or default_dir()
    key, material = cache_key(source, tokenizer, num_shards)
    directory = os.path.join(root, key)
    names = {
        (split, shard): shard_name(split, shard, num_shards)
        for shard in shards
        for split in input_pipeline.SPLITS
    }
    streams, damaged = _open_all(directory, names, key, tokenizer.vocab_size)
    if streams is not None:
        tokens = sum(s.num_tokens for s in streams.values())
        log(
            f'Token cache: {directory} ({tokens:,} tokens in {len(streams)} streams); '
            'nothing to tokenize.'
        )
        return streams
    _make_writable(directory)
    # Two runs that build the same shards (a sweep on the default cache) take turns; the second
    # then finds them built.
    with _build_lock(directory, names.values(), log):
        streams, damaged = _open_all(directory, names, key, tokenizer.vocab_size)
        if streams is not None:
            log(f'Token cache: {directory} was built by another run meanwhile; using it.')
            return streams
        stale = _stale_partials(directory, list(names.values()))
        if damaged:
            log(f'Token cache: {damaged[0]}; rebuilding {directory}.')
        elif stale:
            log(f'Token cache: an earlier build of {directory} was interrupted; rebuilding it.')
        else:
            log(f'Token cache: building {directory} (tokenized once; later runs reuse it).')
        _build(
            source,
            tokenizer,
            directory,
            key,
            material,
            num_shards,
            list(shards),
            stale,
            progress=progress,
            log=log,
        )
    return {
        where: _open_stream(directory, name, key, tokenizer.vocab_size)
        for where, name in names.items()
    }


def _open_all(
    directory: str, names: dict, key: str, vocab_size: int
) -> tuple[dict | None, list[str]]:
    """(every stream, []) when all of `names` are complete and sound, else (None, why not)."""
    streams, damaged = {}, []
    for where, name in names.items():
        try:
            streams[where] = _open_stream(directory, name, key, vocab_size)
        except _Damaged as e:
            damaged.append(str(e))
    if damaged or any(stream is None for stream in streams.values()):
        return None, damaged
    return streams, []


@contextlib.contextmanager
def _build_lock(directory: str, names, log: Callable[[str], None] = print) -> Iterator[None]:
    """An exclusive lock (fcntl.lockf, which NFS carries) on building these shards; waits for a
    builder that holds it, saying so first (a run that seems stuck says why). The kernel frees
    it if its holder dies."""
    names = sorted(names)
    path = os.path.join(directory, f'.build-lock-{names[0]}-{len(names)}')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # EACCES or EAGAIN: another process holds it.
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            log(f'Token cache: waiting for another run building {directory}...')
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f'.write-test{_PARTIAL}{os.getpid()}'), 'wb'):
            pass
        os.remove(os.path.join(directory, f'.write-test{_PARTIAL}{os.getpid()}'))
    except OSError as e:
        raise UserError(
            f'token cache directory {directory} is not writable ({e.strerror}): set '
            '--config.cache_dir to a writable directory (or delete a damaged cache '
            'there)'
        ) from None


class _StreamWriter:
    """Appends documents to the partial files of one (split, shard) stream."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        self.final = {ext: os.path.join(directory, f'{name}.{ext}') for ext in ('tokens', 'docs')}
        suffix = f'{_PARTIAL}{socket.gethostname()}-{os.getpid()}'
        self.partial = {ext: path + suffix for ext, path in self.final.items()}
        self.files = {ext: open(path, 'wb') for ext, path in self.partial.items()}
        self.dtype = dtype
        self.num_tokens = self.num_documents = self.invalid_utf8 = 0

    def append(self, tokens: np.ndarray, lengths: np.ndarray, invalid: int) -> None:
        starts = self.num_tokens + np.cumsum(lengths) - lengths
        self.files['tokens'].write(tokens.astype(self.dtype).tobytes())
        self.files['docs'].write(starts.astype('<i8').tobytes())
        self.num_tokens += len(tokens)
        self.num_documents += len(lengths)
        self.invalid_utf8 += invalid

    def commit(self) -> None:
        """Makes the data files durable and moves them into place (the header comes after)."""
        for ext, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.partial[ext], self.final[ext])

    def discard(self) -> None:
        """Closes and removes the partial files, even on a full disk (where closing, which
        flushes, fails again)."""
        for ext, f in self.files.items():
            try:
                f.close()
            except OSError:
                pass
            if os.path.exists(self.partial[ext]):
                os.remove(self.partial[ext])


def _tokenize_groups(groups: dict, tokenizer, dtype) -> dict:
    return {
        where: input_pipeline.tokenize(docs, tokenizer, dtype) for where, docs in groups.items()
    }


# One streaming pipeline (read, tokenize in a pool, write in order); split, its parts would
# share every local.
def _build(
    source: input_pipeline.DocumentSource,
    tokenizer: tokenizer_lib.Tokenizer,
    directory: str,
    key: str,
    material: dict,
    num_shards: int,
    shards: list[int],
    stale: list[str],
    *,
    progress: BuildProgress | None,
    log: Callable[[str], None],
) -> None:
    """Tokenizes the source once, streaming: memory holds a few chunks in flight, never the corpus.

    The main thread reads and routes chunks; a thread pool with one worker per core tokenizes
    them (SentencePiece releases the GIL), and results are written in source order.
    """
    for path in stale:
        os.remove(path)
    names = {
        (split, shard): shard_name(split, shard, num_shards)
        for shard in shards
        for split in input_pipeline.SPLITS
    }
    for name in names.values():  # A shard being rebuilt is unusable until its new header.
        if os.path.exists(os.path.join(directory, name + '.json')):
            os.remove(os.path.join(directory, name + '.json'))
    dtype = np.dtype('<u2' if tokenizer.vocab_size <= 2**16 else '<u4')
    workers = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    start = time.time()
    if progress is not None:
        progress.start(*source.size())
    mine = set(shards)
    writers = {}
    try:
        write_atomically(
            os.path.join(directory, 'cache.json'), json.dumps(material, indent=1, sort_keys=True)
        )
        for where, name in names.items():
            writers[where] = _StreamWriter(directory, name, dtype)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            in_flight = collections.deque()
            for chunk in source.routed(num_shards):
                groups = collections.defaultdict(list)
                for doc, split, shard in zip(chunk.docs, chunk.split, chunk.shard):
                    if int(shard) in mine:
                        groups[input_pipeline.SPLITS[split], int(shard)].append(doc)
                in_flight.append(
                    (pool.submit(_tokenize_groups, groups, tokenizer, dtype), chunk.progress)
                )
                while len(in_flight) > 2 * workers:
                    _write(writers, progress, *in_flight.popleft())
            while in_flight:
                _write(writers, progress, *in_flight.popleft())
        for writer in writers.values():
            writer.commit()
    except BaseException as e:
        for writer in writers.values():
            writer.discard()
        _raise_if_disk_full(e, directory)
        raise
    finally:
        if progress is not None:
            progress.close()
    fsync_directory(directory)  # The renamed data files survive a power loss.
    try:
        _finish(directory, key, dtype, names, writers, time.time() - start, log)
    except OSError as e:
        _raise_if_disk_full(e, directory)
        raise


def _raise_if_disk_full(error: BaseException, directory: str) -> None:
    """A full disk (or quota) is the user's to fix: one line naming the folder."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(
            f'no space left while building the token cache in {directory} '
            f'({error.strerror}); no partial file was kept: free space there, or '
            'set --config.cache_dir to a folder with room'
        ) from None


def _finish(
    directory: str,
    key: str,
    dtype: np.dtype,
    names: dict,
    writers: dict,
    seconds: float,
    log: Callable[[str], None],
) -> None:
    """Writes each stream's header (the mark that it is complete) and reports the build."""
    for where, writer in writers.items():
        write_atomically(
            os.path.join(directory, names[where] + '.json'),
            json.dumps(
                {
                    'format': FORMAT_VERSION,
                    'key': key,
                    'dtype': dtype.str,
                    'num_tokens': writer.num_tokens,
                    'num_documents': writer.num_documents,
                    'invalid_utf8': writer.invalid_utf8,
                }
            ),
        )
    invalid = sum(w.invalid_utf8 for w in writers.values())
    if invalid:
        print(
            f'Warning: {invalid} documents had invalid UTF-8; their bad bytes were replaced by '
            'U+FFFD.',
            file=sys.stderr,
        )
    tokens = sum(w.num_tokens for w in writers.values())
    size = sum(os.path.getsize(p) for w in writers.values() for p in w.final.values())
    log(
        f'Token cache: {tokens:,} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} '
        f'tokens/s), {size:,} bytes on disk.'
    )


def _write(writers, progress: BuildProgress | None, future, done: int) -> None:
    tokens = 0
    for where, (ids, lengths, invalid) in future.result().items():
        writers[where].append(ids, lengths, invalid)
        tokens += len(ids)
    if progress is not None:
        progress.update(done, tokens)
