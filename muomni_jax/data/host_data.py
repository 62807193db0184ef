"""This process's rows of every global batch, read from its own shards of each source.

Each source of the mixture (mixture.py; a single data_path is a mixture of one) is cut by
document into `num_shards` shards (document i of a split goes to shard i % num_shards), and
each shard is tokenized into its own stream in that source's token cache. Process p of P reads
shards p*k .. p*k + k - 1 (k = num_shards / P), and each shard fills batch_size / num_shards
rows of every global batch, drawing each row's source from mixture.RowAssignment. So the batches
depend on the number of shards, never on how many processes read them: with the data shards
fixed, one CPU and a pod slice train on the same batches, and a checkpoint resumes on either.

Shards pack into different window counts, so the processes agree on each source's epoch length
(its smallest shard's windows, in whole batches of a shard's rows where it holds one) and on
the validation batches (the largest shard's; the others are padded with fully masked rows).
The mixture's steps per epoch are the steps that draw as many windows as the sources hold.
"""

import dataclasses
from collections.abc import Callable, Iterator

import jax
import numpy as np

from muomni_jax.data import data_plan, input_pipeline, mixture, token_cache
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.parallel import distributed

_STATS = ('windows', 'documents', 'tokens')


@dataclasses.dataclass
class SourceData:
    """One source's streams on this process and the counts every process agreed on."""

    source: mixture.Source
    train: list[input_pipeline.TokenStream]  # This process's shards, in shard order.
    validation: list[input_pipeline.TokenStream]
    epoch_windows: int  # Windows of each shard that one epoch of this source reads.
    eval_batches: int
    totals: dict[str, int]  # Windows, documents and tokens of each split over all shards.


@dataclasses.dataclass
class HostData:
    """The streams of this process's shards of every source, and how batches are cut from them."""

    sources: list[SourceData]
    is_mixture: bool  # A configured mixture (even of one source): report each source apart.
    ctx_len: int
    rows_per_shard: int  # Rows of each global batch that one shard fills.
    steps_per_epoch: int
    totals: dict[str, int]  # Documents and tokens of each split over all sources and shards.

    def train_batches(
        self, seed: int, epoch: int, start_step: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """(B / P, T) local batches of epoch `epoch` from `start_step` on."""
        rows = self.rows_per_shard
        assignment = mixture.RowAssignment(self.block_rows(), seed)
        orders = [
            [
                input_pipeline.EpochOrder(
                    stream.num_windows(self.ctx_len), s.epoch_windows, seed, source=i
                )
                for stream in s.train
            ]
            for i, s in enumerate(self.sources)
        ]
        for step in range(
            epoch * self.steps_per_epoch + start_step, (epoch + 1) * self.steps_per_epoch
        ):
            source, position = assignment.rows(step * rows, (step + 1) * rows)
            yield _joined(
                [
                    self._shard_rows(shard, source, position, orders)
                    for shard in range(len(self.sources[0].train))
                ]
            )

    def _shard_rows(
        self, shard: int, source: np.ndarray, position: np.ndarray, orders
    ) -> dict[str, np.ndarray]:
        width = self.ctx_len + 1
        tokens = np.full((len(source), width), tokenizer_lib.PAD_ID, np.int32)
        segment_ids = np.zeros((len(source), width), np.int32)
        for i, data in enumerate(self.sources):
            mine = source == i
            if mine.any():
                tokens[mine], segment_ids[mine] = data.train[shard].windows(
                    orders[i][shard](position[mine]), self.ctx_len
                )
        return input_pipeline.features(tokens, segment_ids)

    def block_rows(self) -> np.ndarray:
        return mixture.block_rows([s.source for s in self.sources])

    def source_epochs(self, step: int, seed: int) -> dict[str, float]:
        """Epochs of each source drawn by the end of `step` (1.5: halfway through its second)."""
        drawn = mixture.RowAssignment(self.block_rows(), seed).rows_before(
            step * self.rows_per_shard
        )
        return {s.source.name: float(n) / s.epoch_windows for s, n in zip(self.sources, drawn)}

    def validation_batches(self, source: int) -> Iterator[dict[str, np.ndarray]]:
        """(B / P, T) local batches of one source; rows past a shard's end have zero weight."""
        data = self.sources[source]
        shards = [
            input_pipeline.eval_batches(
                stream, self.ctx_len, self.rows_per_shard, data.eval_batches
            )
            for stream in data.validation
        ]
        return (_joined(parts) for parts in zip(*shards))


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The shards' rows of one batch, in shard order."""
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def num_shards(data_shards: int, batch_size: int) -> int:
    """data_shards, or one shard per process (0); checked against processes and batch."""
    count = data_shards or jax.process_count()
    if count < 1 or count % jax.process_count():
        raise UserError(
            f'data_shards ({data_shards}) must be a positive multiple of the '
            f'{jax.process_count()} processes (or 0 for one shard per process)'
        )
    if batch_size % count:
        raise UserError(
            f'batch_size ({batch_size}) must be divisible by the {count} data '
            'shards, which fill equal parts of each batch: change batch_size or '
            '--config.data_shards'
        )
    return count


def load(
    data: data_plan.DataPlan,
    tokenizer,
    log: Callable[[str], None] = print,
    progress: token_cache.BuildProgress | None = None,
) -> HostData:
    """Opens (or first builds) this process's shards of every source in the token cache.

    Every process must call it together; each builds and reads only its own shards. `progress`
    is told how a build advances (give it on one process only).
    """
    count = data.num_shards
    per_process = count // jax.process_count()
    mine = range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    rows = data.rows_per_shard
    loaded = []
    for source in data.sources:
        prefix = f'[{source.name}] ' if data.is_mixture else ''
        with distributed.fail_together():
            streams = token_cache.open_or_build(
                data.cache_dir,
                input_pipeline.DocumentSource(data.corpus(source)),
                tokenizer,
                count,
                mine,
                log=lambda line, prefix=prefix: log(prefix + line),
                progress=progress,
            )
        loaded.append(
            ([streams['train', k] for k in mine], [streams['validation', k] for k in mine])
        )
    # Per source, per shard in shard order: [[train windows, documents, tokens], [validation]].
    stats = distributed.allgather_json(
        [
            [[_stats(t, data.ctx_len), _stats(v, data.ctx_len)] for t, v in zip(train, validation)]
            for train, validation in loaded
        ]
    )
    shard_stats = [[s for host in stats for s in host[i]] for i in range(len(data.sources))]
    sources = [
        _source_data(data, source, train, validation, shard_stats[i])
        for i, (source, (train, validation)) in enumerate(zip(data.sources, loaded))
    ]
    totals = {key: sum(s.totals[key] for s in sources) for key in sources[0].totals}
    steps_per_epoch = sum(s.epoch_windows for s in sources) // rows
    if steps_per_epoch == 0:
        raise UserError(
            f'the training splits pack into {totals["train_windows"]} windows of '
            f'{data.ctx_len} tokens, fewer than one batch of {rows} rows per data '
            'shard: lower batch_size, ctx_len or data_shards, or add text'
        )
    return HostData(
        sources=sources,
        is_mixture=data.is_mixture,
        ctx_len=data.ctx_len,
        rows_per_shard=rows,
        steps_per_epoch=steps_per_epoch,
        totals=totals,
    )


def _stats(stream: input_pipeline.TokenStream, ctx_len: int) -> list[int]:
    return [stream.num_windows(ctx_len), stream.num_documents, stream.num_tokens]


def _source_data(
    data: data_plan.DataPlan, source: mixture.Source, train, validation, shard_stats
) -> SourceData:
    rows = data.rows_per_shard
    totals = {
        f'{split}_{name}': sum(s[i][j] for s in shard_stats)
        for i, split in enumerate(('train', 'validation'))
        for j, name in enumerate(_STATS)
    }
    if totals['train_documents'] == 0:
        raise UserError(data.no_text_message(source))
    smallest = min(s[0][0] for s in shard_stats)
    count = len(shard_stats)
    if data.is_mixture and smallest == 0:
        raise UserError(
            f'mixture source {source.name!r} has {totals["train_documents"]} '
            f'training documents, too few to give each of the {count} data shards '
            'one: lower data_shards, or add text to it'
        )
    if not data.is_mixture and smallest < rows:
        short = (
            f'fewer than one batch of {rows}'
            if count == 1
            else f'and its smallest of {count} data shards holds {smallest}, fewer than the '
            f'{rows} rows each shard fills per batch'
        )
        raise UserError(
            f'the training split packs into {totals["train_windows"]} windows of '
            f'{data.ctx_len} tokens, {short}: lower batch_size, ctx_len or '
            'data_shards, or add text'
        )
    # Whole batches where the smallest shard holds one, so one source keeps its epochs whole.
    epoch_windows = smallest - smallest % rows if smallest >= rows else smallest
    eval_batches = max(-(-s[1][0] // rows) for s in shard_stats)
    if data.eval_batches:
        eval_batches = min(eval_batches, data.eval_batches)
    return SourceData(
        source=source,
        train=train,
        validation=validation,
        epoch_windows=epoch_windows,
        eval_batches=eval_batches,
        totals=totals,
    )
