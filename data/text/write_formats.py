#!/usr/bin/env python3
"""Write the bundled corpus in the formats corpora come in, to try them on shipped data.

Usage:
    python data/text/write_formats.py [data/text/corpus.txt] [data/text/formats]

Each line of the corpus becomes one record {"id": N, "text": LINE} of:
  corpus.jsonl, corpus.jsonl.gz, corpus.jsonl.zst   JSON Lines, plain and compressed
  corpus.parquet                                    Parquet, row groups of ROW_GROUP_ROWS rows
  saved/                                            datasets' Dataset.save_to_disk (if installed)
The output is generated, not shipped: data/text/formats/ is git-ignored. The tests write the
same files from their own documents with write_all().
"""

import gzip
import json
import os
import sys

ROW_GROUP_ROWS = 4096


def write_jsonl(docs, path: str) -> None:
    """One {"id", "text"} object per line; .gz and .zst compress by the name."""
    lines = ''.join(json.dumps({'id': i, 'text': doc}) + '\n' for i, doc in enumerate(docs))
    data = lines.encode('utf-8')
    if path.endswith('.gz'):
        data = gzip.compress(data, mtime=0)
    elif path.endswith('.zst'):
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    with open(path, 'wb') as f:
        f.write(data)


def write_parquet(docs, path: str, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({'id': pa.array(range(len(docs)), pa.int64()), 'text': pa.array(docs)})
    pq.write_table(table, path, row_group_size=row_group_rows)


def write_saved_dataset(docs, path: str) -> None:
    import datasets

    dataset = datasets.Dataset.from_dict({'id': list(range(len(docs))), 'text': list(docs)})
    dataset.save_to_disk(path)


def write_all(docs, output: str, saved: bool = True) -> dict:
    """Every format of `docs` in `output`; {format: path}."""
    os.makedirs(output, exist_ok=True)
    paths = {
        name: os.path.join(output, 'corpus' + name)
        for name in ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')
    }
    for name in ('.jsonl', '.jsonl.gz', '.jsonl.zst'):
        write_jsonl(docs, paths[name])
    write_parquet(docs, paths['.parquet'])
    if saved:
        paths['saved'] = os.path.join(output, 'saved')
        write_saved_dataset(docs, paths['saved'])
    return paths


def main(corpus: str = 'data/text/corpus.txt', output: str = 'data/text/formats') -> None:
    with open(corpus, encoding='utf-8') as f:
        docs = [line.strip() for line in f if line.strip()]
    try:
        import datasets  # noqa: F401  (the save_to_disk format needs it)

        saved = True
    except ImportError:
        saved = False
        print('datasets is not installed: no saved/ folder (pip install datasets)')
    paths = write_all(docs, output, saved=saved)
    for path in paths.values():
        print(f'{len(docs):,} documents in {path}')


if __name__ == '__main__':
    main(*sys.argv[1:])
