"""Weighted mixtures of corpora: the sources, and which source fills each row of each batch.

A mixture is one config string (ml_collections overrides a string on the command line as
easily as in a config file, where a list of dicts cannot be):

  --config.mixture='wiki=data/wiki/*.txt:0.7,books=tfds:pg19/train/book_text:0.3'

Each comma-separated entry is NAME=SOURCE:WEIGHT, or NAME=SOURCE:WEIGHT:TEXT_KEY. SOURCE is
a file, directory, glob or hf:NAME/CONFIG/SPLIT (as data_path: text, JSON Lines, Parquet or a
save_to_disk folder), or tfds:DATASET/SPLIT/TEXT_KEY (DATASET may hold a config, e.g.
wiki40b/en). TEXT_KEY names the field or column of JSON, Parquet and Arrow records that holds
the text; without it the entry uses config.text_key:

  --config.mixture='web=data/web/*.parquet:0.8,books=data/books.jsonl.zst:0.2:body'
 Weights are positive and need not sum to 1. An empty mixture is the single source
of data_path (or tfds_name): a mixture of one, which trains on exactly the batches it always did.

Rows are given to sources in blocks of BLOCK_ROWS rows, as in Levanter's MixtureDataset: each
block holds a fixed count of rows of each source (weight x BLOCK_ROWS, by largest remainders) in
an order shuffled by (seed, block). This sits between a per-row draw, whose shares wander (a
source of weight 0.01 misses 100 rows in a row 37% of the time), and fixed counts per
batch, which give a source of weight below 1/rows no rows at all. Every 4,096 rows the shares are
exact; within a block each row's source is random. The source and position of row g follow from
g alone, so a resumed run starts at any step in O(BLOCK_ROWS) and every data shard, on any
number of processes, draws the same pattern.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from muomni_jax.data import document_files
from muomni_jax.errors import UserError

BLOCK_ROWS = 4096
_NAME = re.compile(r'[A-Za-z0-9_-]+')
_SYNTAX = (
    'write NAME=SOURCE:WEIGHT[:TEXT_KEY] entries separated by commas, with SOURCE a '
    'file, directory, glob, hf:NAME/CONFIG/SPLIT or tfds:DATASET/SPLIT/TEXT_KEY, e.g. '
    "--config.mixture='wiki=data/wiki/*.txt:0.7,books=data/books.jsonl:0.3:body'"
)
# Seeds the block shuffles apart from the epoch orders of input_pipeline.epoch_order.
_BLOCK_SEED_TAG = 0x6D6978


@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus of a mixture."""

    name: str  # Short name: in metric keys (val/<name>/loss), TensorBoard tags and log lines.
    weight: float  # Share of the training rows; the weights of a mixture sum to 1.
    data_path: str = ''  # File, directory, glob or hf:NAME/CONFIG/SPLIT; '' for TFDS.
    tfds_name: str = ''
    tfds_split: str = 'train'
    tfds_text_key: str = 'text'
    text_key: str = ''  # The entry's :TEXT_KEY; '' uses the run's text_key.

    def describe(self) -> str:
        if self.tfds_name:
            return f'TFDS {self.tfds_name}/{self.tfds_split}'
        # Without a key the description is as before, so checkpoints' mixtures still match.
        return f'{self.data_path}:{self.text_key}' if self.text_key else self.data_path


def parse(spec: str) -> list[Source]:
    """The sources of a mixture string, weights normalized; a one-line UserError if it is bad."""
    entries = [entry.strip() for entry in spec.split(',')]
    if not spec.strip() or not all(entries):
        raise UserError(f'mixture {spec!r} has an empty entry: {_SYNTAX}')
    sources = []
    for entry in entries:
        name, equals, rest = entry.partition('=')
        where, colon, weight_text = rest.rpartition(':')
        text_key = ''
        if colon and not _is_number(weight_text):
            # NAME=SOURCE:WEIGHT:TEXT_KEY
            candidate, colon2, weight2 = where.rpartition(':')
            if colon2 and _is_number(weight2):
                where, weight_text, text_key = candidate, weight2, weight_text.strip()
        name = name.strip()
        if not equals or not colon or not where.strip():
            raise UserError(f'mixture entry {entry!r} does not parse: {_SYNTAX}')
        if not _NAME.fullmatch(name):
            raise UserError(
                f'mixture source name {name!r} must be letters, digits, _ or -: '
                'it names metrics such as val/<name>/loss'
            )
        try:
            weight = float(weight_text)
        except ValueError:
            raise UserError(
                f'mixture entry {entry!r} has weight {weight_text!r}, not a number: {_SYNTAX}'
            ) from None
        if not weight > 0 or not np.isfinite(weight):
            raise UserError(
                f'mixture source {name!r} has weight {weight_text}: weights must be '
                '> 0 (drop the source to leave it out)'
            )
        if name in [s.name for s in sources]:
            raise UserError(
                f'mixture source name {name!r} appears twice: give each source its own name'
            )
        source = _source(name, weight, where.strip(), entry)
        if text_key:
            if source.tfds_name:
                raise UserError(
                    f'mixture entry {entry!r}: a TFDS source names its text feature '
                    'in tfds:DATASET/SPLIT/TEXT_KEY, not after its weight'
                )
            source = dataclasses.replace(source, text_key=text_key)
        sources.append(source)
    total = sum(s.weight for s in sources)
    sources = [dataclasses.replace(s, weight=s.weight / total) for s in sources]
    block_rows(sources)  # Checks that every source gets rows.
    return sources


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _source(name: str, weight: float, where: str, entry: str) -> Source:
    if not where.startswith('tfds:'):
        return Source(name, weight, data_path=where)
    parts = where[len('tfds:') :].rsplit('/', 2)
    if len(parts) != 3 or not all(parts):
        raise UserError(
            f'mixture entry {entry!r}: a TFDS source is tfds:DATASET/SPLIT/TEXT_KEY, '
            'e.g. tfds:lm1b/train/text'
        )
    return Source(name, weight, tfds_name=parts[0], tfds_split=parts[1], tfds_text_key=parts[2])


def canonical(sources: Sequence[Source]) -> str:
    """A mixture as a checkpoint records it: names, sources and normalized weights, so that a
    resume with another mixture is refused."""
    return ','.join(f'{s.name}={s.describe()}:{s.weight:.6g}' for s in sources)


def no_text_message(source: Source, is_mixture: bool) -> str:
    """Also for an empty dataset or records whose text is all blank."""
    if is_mixture:
        return (
            f'mixture source {source.name!r} ({source.describe()}) holds no training text '
            '(empty, blank documents only, or all in validation): point it at '
            f'{document_files.FORMATS_HELP}, or drop it from --config.mixture'
        )
    return (
        f'{source.describe()} holds no training text (empty, blank documents only, or all '
        f'in validation): point data_path at {document_files.FORMATS_HELP}'
    )


def block_rows(sources: list[Source], size: int = BLOCK_ROWS) -> np.ndarray:
    """(S,) int64 rows of each source per block: weight x size, largest remainders first."""
    exact = np.array([s.weight for s in sources]) * size
    counts = np.floor(exact).astype(np.int64)
    # Stable: equal remainders go to the earlier source.
    extra = np.argsort(-(exact - counts), kind='stable')[: size - counts.sum()]
    counts[extra] += 1
    if not counts.all():
        small = [s.name for s, c in zip(sources, counts) if not c]
        raise UserError(
            f'mixture source(s) {", ".join(small)} have a weight below 1/{size} of '
            'the total and would never be drawn: raise their weight'
        )
    return counts


class RowAssignment:
    """The source of every row of the endless row sequence, and its position in that source.

    Row g (= step * rows + j for row j of a step, per data shard) lies in block g // BLOCK_ROWS.
    A source's position counts its earlier rows, so positions 0, 1, 2, ... of each source are
    drawn in order, each once.
    """

    def __init__(self, counts: np.ndarray, seed: int):
        self.counts = np.asarray(counts, np.int64)
        self.seed = seed
        self.size = int(self.counts.sum())
        self._block_index, self._block = -1, None

    def _block_of(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """((size,) source of each row of the block, (size,) its rank among that source's rows)."""
        if block != self._block_index:
            source = np.repeat(np.arange(len(self.counts)), self.counts)
            if len(self.counts) > 1:
                np.random.default_rng([_BLOCK_SEED_TAG, self.seed, block]).shuffle(source)
            order = np.argsort(source, kind='stable')
            first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            rank = np.empty(self.size, np.int64)
            rank[order] = np.arange(self.size) - first[source[order]]
            self._block_index, self._block = block, (source, rank)
        return self._block

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """((n,) source, (n,) position in that source) of rows start .. stop - 1."""
        sources, positions = [], []
        g = start
        while g < stop:
            block, offset = divmod(g, self.size)
            end = min(stop - g, self.size - offset) + offset
            source, rank = self._block_of(block)
            sources.append(source[offset:end])
            positions.append(block * self.counts[source[offset:end]] + rank[offset:end])
            g += end - offset
        if not sources:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(sources), np.concatenate(positions)

    def rows_before(self, g: int) -> np.ndarray:
        """(S,) rows of each source among rows 0 .. g - 1."""
        block, offset = divmod(g, self.size)
        source, _ = self._block_of(block)
        return block * self.counts + np.bincount(source[:offset], minlength=len(self.counts))
