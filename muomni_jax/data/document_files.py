"""Documents from files, in the formats corpora come in. Knows nothing of tokens or splits.

  plain text    .txt, .text, any other name (also .txt.gz, .txt.zst): one document per line
  JSON Lines    .jsonl, .json (also .gz, .zst): one JSON object per line; its text_key field
                is one document, newlines and all
  Parquet       .parquet: the text_key column, one document per row
  Arrow         a folder written by datasets' Dataset.save_to_disk, its .arrow files, or a
                Hugging Face Hub dataset's local cache (hf:NAME/CONFIG/SPLIT): the text_key
                column, one document per row

Every reader streams: it holds one bounded chunk in memory (about 1 MB of text, or one record
batch of Parquet or Arrow), never a whole file. A file's format follows from its name alone, so
a glob or directory may mix formats.

One bad record stops the run with one line naming the file (and line, for JSON): a skipped
record would silently train on a corpus other than the one asked for, and a count of skips is
easy to miss in a long log.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Iterator

from etils import epath

from muomni_jax.errors import UserError, first_line
from muomni_jax.io import storage

TEXT, JSONL, PARQUET, ARROW = 'text', 'jsonl', 'parquet', 'arrow'
_COMPRESSED = ('.gz', '.zst')
_JSON_SUFFIXES = ('.jsonl', '.json')
# What a directory source takes (other files there, such as a README, are left out). A plain
# .json beside the data is more often metadata (a config, a dataset card) than JSON Lines, so a
# directory leaves it out; named as a file or by a glob it is read as JSON Lines.
_DIRECTORY_SUFFIXES = tuple(
    base + c for base in ('.txt', '.text', '.jsonl') for c in ('', *_COMPRESSED)
) + ('.json.gz', '.json.zst', '.parquet', '.arrow')
# A folder that Dataset.save_to_disk wrote holds both.
_SAVED_DATASET_FILES = ('state.json', 'dataset_info.json')
HF_PREFIX = 'hf:'
# One line (a text document, or one JSON record) is held in memory whole: longer ones are
# refused. JSON records hold whole documents, so their bound is larger.
MAX_LINE_BYTES = 10 * 2**20
MAX_RECORD_BYTES = 64 * 2**20
_SNIFF_BYTES = 64 * 2**10  # How much of each text file is checked for binary content.
_READ_CHUNK_BYTES = 2**20  # Text is read and split into documents in chunks this size.
_BATCH_ROWS = 1024  # Parquet and Arrow rows read per chunk.
FORMATS_HELP = (
    'text with one document per line (.txt), JSON Lines (.jsonl, .jsonl.gz, '
    '.jsonl.zst), Parquet (.parquet), or a datasets save_to_disk folder'
)


def file_format(path: str) -> str:
    """TEXT, JSONL, PARQUET or ARROW, from the file's name."""
    name = path.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    if name.endswith(_JSON_SUFFIXES):
        return JSONL
    if name.endswith('.parquet'):
        return PARQUET
    if name.endswith('.arrow'):
        return ARROW
    return TEXT


def has_records(paths: list[str]) -> bool:
    """Whether any file holds records (so text_key decides what is read)."""
    return any(file_format(path) != TEXT for path in paths)


def _is_saved_dataset(path: epath.Path) -> bool:
    return all((path / name).exists() for name in _SAVED_DATASET_FILES)


def _saved_dataset_files(folder: epath.Path, label: str) -> list[str]:
    """The .arrow files of a save_to_disk folder, in the dataset's order."""
    try:
        state = json.loads((folder / 'state.json').read_text())
        names = [entry['filename'] for entry in state['_data_files']]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f'{label} {folder} looks like a datasets save_to_disk folder, but its '
            f'state.json cannot be read ({type(e).__name__}): save the dataset '
            'again with Dataset.save_to_disk'
        ) from None
    if not names:
        raise UserError(
            f'{label} {folder} is a saved dataset with no data files: save a non-empty dataset'
        )
    return [str(folder / name) for name in names]


def _hub_dataset_files(spec: str, label: str) -> list[str]:
    """The local cache files (.arrow) of hf:NAME/CONFIG/SPLIT; NAME may hold a slash."""
    parts = spec[len(HF_PREFIX) :].rsplit('/', 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise UserError(
            f'{label} {spec!r}: a Hugging Face source is hf:NAME/CONFIG/SPLIT, e.g. '
            'hf:wikitext/wikitext-103-raw-v1/train (CONFIG may be empty: '
            'hf:NAME//train)'
        )
    name, config_name, split = parts
    try:
        import datasets
    except ImportError:
        raise UserError(
            f'{label} {spec} needs the datasets package: pip install datasets, or give local files'
        ) from None
    try:
        dataset = datasets.load_dataset(name, config_name or None, split=split)
    except Exception as e:
        raise UserError(
            f'{label} {spec}: cannot load Hugging Face dataset {name!r} '
            f'({first_line(e, 200)}): check the name, config and split, or '
            'download it once with internet access (it is then read offline, '
            'with HF_DATASETS_OFFLINE=1)'
        ) from None
    files = [entry['filename'] for entry in getattr(dataset, 'cache_files', [])]
    if not files:
        raise UserError(
            f'{label} {spec} has no files on disk (an in-memory dataset): save it '
            'with Dataset.save_to_disk and point data_path at that folder'
        )
    return files


def expand(data_path: str, label: str = 'data_path') -> list[str]:
    """The sorted files of a file, a directory (recursively), a glob or hf:NAME/CONFIG/SPLIT.

    A save_to_disk folder, alone or inside a directory, gives its .arrow files in the
    dataset's order. label names the path in errors: 'data_path', or "mixture source 'wiki'".
    """
    if not data_path:
        raise UserError(
            'data_path is empty: set --config.data_path to a file, directory or glob of '
            f'{FORMATS_HELP}, or set --config.tfds_name'
        )
    if data_path.startswith(HF_PREFIX):
        return _hub_dataset_files(data_path, label)
    path = epath.Path(data_path)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_files(path, label)
        files, datasets_found = [], []
        for root, _, names in path.walk():
            if _is_saved_dataset(root):
                datasets_found.append(root)
            files.extend(
                root / name for name in names if name.lower().endswith(_DIRECTORY_SUFFIXES)
            )
        # A saved dataset's own files are read through its state.json, never one by one.
        inside = lambda p: any(str(p).startswith(str(d) + '/') for d in datasets_found)
        paths = [str(p) for p in files if not inside(p)]
        paths += [f for d in sorted(datasets_found) for f in _saved_dataset_files(d, label)]
        if not paths:
            raise UserError(
                f'{label} {data_path} is a directory with no data files (.txt, .text, .jsonl, '
                'maybe .gz or .zst; .parquet, .arrow; or a save_to_disk folder): point it at a '
                'data file, or a glob such as "dir/*.json"'
            )
        return sorted(paths)
    if any(c in data_path for c in '*?['):
        paths = _glob(data_path)
        if not paths:
            raise UserError(f'{label} glob {data_path} matches no files: check the pattern')
        return sorted(paths)
    if path.exists():
        return [data_path]
    flag = '--config.data_path' if label == 'data_path' else 'it'
    raise UserError(
        f'{label} {data_path} does not exist: point {flag} at a data file, '
        'directory or glob that exists'
    )


def _glob(pattern: str) -> list[str]:
    """The files a glob matches, locally or on gs:// (where epath's client expands it)."""
    if not storage.is_url(pattern):
        import glob

        return [p for p in glob.glob(pattern) if os.path.isfile(p)]
    wild = min(pattern.find(c) for c in '*?[' if c in pattern)
    root = pattern[: pattern.rfind('/', 0, wild)]
    return [str(p) for p in epath.Path(root).glob(pattern[len(root) + 1 :])]


def chunks(path: str, text_key: str, label: str) -> Iterator[tuple[list[bytes], int]]:
    """(documents as UTF-8 bytes, stripped, blanks left out; bytes of the file consumed) per
    chunk of one file."""
    kind = file_format(path)
    reader = {
        TEXT: _text_chunks,
        JSONL: _jsonl_chunks,
        PARQUET: _parquet_chunks,
        ARROW: _arrow_chunks,
    }[kind]
    if kind == TEXT:
        yield from reader(path, label)
    else:
        yield from reader(path, text_key, label)


def _decompressed(path: str, label: str) -> Iterator[tuple[bytes, int]]:
    """(decompressed bytes, bytes of the file on disk read so far) per block, by the suffix.

    A compressed stream that ends early raises EOFError, so a file cut at a line boundary is
    not read as a shorter corpus.
    """
    with epath.Path(path).open('rb') as raw:
        name = path.lower()
        if name.endswith('.gz'):
            with gzip.GzipFile(fileobj=raw, mode='rb') as stream:
                while block := stream.read(_READ_CHUNK_BYTES):
                    yield block, raw.tell()
        elif name.endswith('.zst'):
            yield from _zstd_blocks(raw, _zstandard(path, label))
        else:
            while block := raw.read(_READ_CHUNK_BYTES):
                yield block, raw.tell()


def _zstd_blocks(raw, zstandard) -> Iterator[tuple[bytes, int]]:
    """Every frame of a .zst file, one after another (zstd -c a b > c writes two)."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    ended = True  # No frame open: an empty file is an empty stream.
    while block := raw.read(_READ_CHUNK_BYTES):
        while block:
            out = decompressor.decompress(block)
            ended = decompressor.eof
            block = decompressor.unused_data if ended else b''
            if ended:
                decompressor = zstandard.ZstdDecompressor().decompressobj()
            # Text comes out several times the size that went in: blocks of the usual size
            # keep the tokenizer threads as busy as for plain text.
            for start in range(0, len(out), _READ_CHUNK_BYTES):
                yield out[start : start + _READ_CHUNK_BYTES], raw.tell()
    if not ended:
        raise EOFError('the zstd stream ends before its last frame does')


def _zstandard(path: str, label: str):
    try:
        import zstandard
    except ImportError:
        raise UserError(
            f'{label} file {path} is zstd-compressed, which needs the zstandard '
            'package: pip install -r requirements.txt'
        ) from None
    return zstandard


def _damaged(path: str, label: str, error: BaseException, kind: str) -> UserError:
    return UserError(
        f'{label} file {path} is not a readable {kind} ({first_line(error, 160)}): '
        'it may be damaged or truncated; write it again'
    )


def _stream_errors():
    """The exceptions of a damaged compressed stream (gzip's EOFError and BadGzipFile, zstd's
    ZstdError), beside plain OSErrors."""
    errors = [OSError, EOFError, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _lines(path: str, label: str, limit: int, what: str) -> Iterator[tuple[list[bytes], int, int]]:
    """(whole lines, bytes of the file consumed, number of the first line) per block."""
    try:
        line_number, done, pending = 1, 0, b''  # pending: the start of an unended line.
        sniffed = False
        for block, consumed in _decompressed(path, label):
            if not sniffed:
                _check_not_binary(path, block[:_SNIFF_BYTES], label)
                sniffed = True
            lines = (pending + block).split(b'\n')
            pending = lines.pop()
            if max([len(pending), *map(len, lines)]) > limit:
                raise UserError(
                    f'{label} file {path} has a line of over {limit // 2**20} MB (near line '
                    f'{line_number + len(lines):,}); each line is {what}: split it'
                )
            yield lines, consumed - done, line_number
            done, line_number = consumed, line_number + len(lines)
        if pending:
            yield [pending], 0, line_number
    except _stream_errors() as e:
        kind = 'compressed file' if path.lower().endswith(_COMPRESSED) else 'file'
        raise _damaged(path, label, e, kind) from None


def _check_not_binary(path: str, head: bytes, label: str) -> None:
    """Refuses a file whose first 64 KB hold a NUL byte or are >10% undecodable.

    Text with a few invalid UTF-8 bytes is accepted: tokenize() replaces them by U+FFFD and
    counts the documents so changed.
    """
    # A multi-byte character cut at the end of the sniffed block is not an error.
    replaced = head.decode('utf-8', errors='replace')[:-1].count('\ufffd')
    if b'\0' in head or replaced > 0.1 * len(head):
        raise UserError(
            f'{label} file {path} looks binary, not UTF-8 text: a file is read by '
            f'its name, so give {FORMATS_HELP}'
        )


def _text_chunks(path: str, label: str) -> Iterator[tuple[list[bytes], int]]:
    for lines, read, _ in _lines(path, label, MAX_LINE_BYTES, 'one document'):
        yield [doc for doc in (line.strip() for line in lines) if doc], read


_JSON_TYPES = {
    int: 'a number',
    float: 'a number',
    bool: 'true/false',
    list: 'an array',
    dict: 'an object',
    type(None): 'null',
}


def _document(value, where: str, text_key: str, keys) -> bytes:
    """One record's text as UTF-8 bytes (a lone surrogate is kept, and counted as invalid UTF-8
    when tokenized)."""
    if value is None and text_key not in keys:
        raise UserError(
            f'{where} has no field {text_key!r} (it has '
            f'{", ".join(map(repr, keys)) or "no fields"}): set --config.text_key '
            "(or the mixture entry's :TEXT_KEY) to the field that holds the text"
        )
    if not isinstance(value, str):
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        raise UserError(
            f'{where} holds {kind} in field {text_key!r}, not a string: point '
            'text_key at a text field, or fix the record'
        )
    return value.strip().encode('utf-8', errors='surrogatepass')


def _jsonl_chunks(path: str, text_key: str, label: str) -> Iterator[tuple[list[bytes], int]]:
    for lines, read, first in _lines(path, label, MAX_RECORD_BYTES, 'one JSON record'):
        docs = []
        for offset, line in enumerate(lines):
            if not line.strip():
                continue
            where = f'{label} file {path}:{first + offset}'
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(
                    f'{where} is not valid JSON ({first_line(e, 100)}): JSON Lines '
                    'hold one JSON object per line; fix or remove that line'
                ) from None
            if not isinstance(record, dict):
                raise UserError(
                    f'{where} holds a JSON {type(record).__name__}, not an object: '
                    f'JSON Lines hold one object per line, with the text in '
                    f'{text_key!r}'
                )
            doc = _document(record.get(text_key), where, text_key, list(record))
            if doc:
                docs.append(doc)
        yield docs, read


def _column_chunks(
    batches, path: str, text_key: str, label: str, kind: str, schema, total_rows: int, size: int
) -> Iterator[tuple[list[bytes], int]]:
    """Documents of the text_key column of record batches; progress in bytes of the file,
    by rows read."""
    import pyarrow as pa

    if text_key not in schema.names:
        raise UserError(
            f'{label} file {path} has no column {text_key!r} (it has '
            f'{", ".join(map(repr, schema.names))}): set --config.text_key (or the '
            "mixture entry's :TEXT_KEY) to the column that holds the text"
        )
    field = schema.field(text_key)
    if not (
        pa.types.is_string(field.type)
        or pa.types.is_large_string(field.type)
        or pa.types.is_string_view(field.type)
    ):
        raise UserError(
            f'{label} file {path} column {text_key!r} holds {field.type}, not '
            'strings: point text_key at a text column'
        )
    rows = done = 0
    try:
        for batch in batches:
            column = batch.column(text_key)
            if column.null_count:
                row = rows + column.is_null().to_pylist().index(True)
                raise UserError(
                    f'{label} file {path} row {row:,} has no {text_key!r} (null): '
                    'drop or fill the rows without text'
                )
            docs = [
                doc
                for doc in (
                    value.strip().encode('utf-8', errors='surrogatepass')
                    for value in column.to_pylist()
                )
                if doc
            ]
            rows += batch.num_rows
            now = size * rows // max(total_rows, 1)
            yield docs, now - done
            done = now
    except (pa.ArrowException, OSError) as e:
        raise _damaged(path, label, e, kind) from None


@functools.cache
def _pyarrow_parquet():
    import pyarrow.parquet as pq

    return pq


def _parquet_chunks(path: str, text_key: str, label: str) -> Iterator[tuple[list[bytes], int]]:
    import pyarrow as pa

    with epath.Path(path).open('rb') as f:
        try:
            # Footer only: the row groups are read one batch at a time below.
            parquet = _pyarrow_parquet().ParquetFile(f, pre_buffer=False)
            schema = parquet.schema_arrow
        except (pa.ArrowException, OSError) as e:
            raise _damaged(path, label, e, 'Parquet file') from None
        columns = [text_key] if text_key in schema.names else None
        yield from _column_chunks(
            parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns, use_threads=False),
            path,
            text_key,
            label,
            'Parquet file',
            schema,
            parquet.metadata.num_rows,
            epath.Path(path).stat().length,
        )


def _arrow_chunks(path: str, text_key: str, label: str) -> Iterator[tuple[list[bytes], int]]:
    """An Arrow IPC file: the stream format datasets writes, or the random-access file format."""
    import pyarrow as pa

    local = not storage.is_url(path)
    with pa.memory_map(path) if local else epath.Path(path).open('rb') as f:
        try:
            try:
                reader = pa.ipc.open_stream(f)
                total = None
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
                total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        except (pa.ArrowException, OSError) as e:
            raise _damaged(path, label, e, 'Arrow file') from None
        if total is None:
            batches = reader
            # The stream format does not say its length: progress is reported at the end.
            total = 2**62
        else:
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        size = epath.Path(path).stat().length
        read = 0
        for docs, progress in _column_chunks(
            batches, path, text_key, label, 'Arrow file', reader.schema, total, size
        ):
            read += progress
            yield docs, progress
        if read < size:
            yield [], size - read
