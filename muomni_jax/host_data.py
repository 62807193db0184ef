"""This process's rows of every global batch, read from its own shards of the corpus.

The corpus is cut by document into `num_shards` shards (document i of a split goes to shard
i % num_shards), and each shard is tokenized into its own stream in the token cache. Process p of P reads shards p*k .. p*k + k - 1 (k = num_shards / P), and each
shard fills batch_size / num_shards rows of every global batch. So the batches depend on the
number of shards, never on how many processes read them: with config.data_shards fixed, one CPU
and a pod slice train on the same batches, and a checkpoint resumes on either.

Shards pack into different window counts, so the processes agree on the steps per epoch (the
smallest shard's) and on the validation batches (the largest shard's; the others are padded
with fully masked rows).
"""

import dataclasses
from typing import Iterator

import jax
import numpy as np

from muomni_jax import distributed
from muomni_jax import input_pipeline
from muomni_jax import token_cache
from muomni_jax.errors import UserError


@dataclasses.dataclass
class HostData:
    """The token streams of this process's shards and the batch counts every process agreed on."""
    train: list[input_pipeline.TokenStream]
    validation: list[input_pipeline.TokenStream]
    ctx_len: int
    rows_per_shard: int  # Rows of each global batch that one shard fills.
    steps_per_epoch: int
    eval_batches: int
    totals: dict[str, int]  # Documents and tokens of each split over all shards.

    def train_batches(self, seed: int, epoch: int, start_step: int
                      ) -> Iterator[dict[str, np.ndarray]]:
        """(B / P, T) local batches of epoch `epoch` from `start_step` on."""
        shards = [input_pipeline.train_batches(
            stream, self.ctx_len, self.rows_per_shard, seed=seed, epoch=epoch,
            start_step=start_step, num_steps=self.steps_per_epoch) for stream in self.train]
        return _concatenated(shards)

    def validation_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """(B / P, T) local batches; rows past a shard's end have zero weight."""
        shards = [input_pipeline.eval_batches(stream, self.ctx_len, self.rows_per_shard,
                                              self.eval_batches) for stream in self.validation]
        return _concatenated(shards)


def _concatenated(shards: list[Iterator[dict[str, np.ndarray]]]
                  ) -> Iterator[dict[str, np.ndarray]]:
    for parts in zip(*shards):
        yield {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def num_shards(config) -> int:
    """config.data_shards, or one shard per process; checked against processes and batch."""
    count = config.data_shards or jax.process_count()
    if count < 1 or count % jax.process_count():
        raise UserError(f'data_shards ({config.data_shards}) must be a positive multiple of the '
                        f'{jax.process_count()} processes (or 0 for one shard per process)')
    if config.batch_size % count:
        raise UserError(f'batch_size ({config.batch_size}) must be divisible by the {count} data '
                        'shards, which fill equal parts of each batch: change batch_size or '
                        '--config.data_shards')
    return count


def load(config, tokenizer, log=print) -> HostData:
    """Opens (or first builds) this process's shards of both splits in the token cache.

    Every process must call it together; each builds and reads only its own shards.
    """
    count = num_shards(config)
    per_process = count // jax.process_count()
    first = jax.process_index() * per_process
    rows = config.batch_size // count
    with distributed.fail_together():
        source = input_pipeline.DocumentSource(config)
        streams = token_cache.open_or_build(config, source, tokenizer, count,
                                            range(first, first + per_process), log=log,
                                            verbose=jax.process_index() == 0)
    train = [streams['train', shard] for shard in range(first, first + per_process)]
    validation = [streams['validation', shard] for shard in range(first, first + per_process)]

    def stats(stream: input_pipeline.TokenStream) -> list[int]:
        return [stream.num_windows(config.ctx_len), stream.num_documents, stream.num_tokens]

    # Per shard, in shard order: [[train windows, documents, tokens], [the same for validation]].
    shard_stats = [s for host in distributed.allgather_json(
        [[stats(t), stats(v)] for t, v in zip(train, validation)]) for s in host]
    totals = {f'{split}_{name}': sum(s[i][j] for s in shard_stats)
              for i, split in enumerate(('train', 'validation'))
              for j, name in enumerate(('windows', 'documents', 'tokens'))}
    if totals['train_documents'] == 0:
        raise UserError(f'{source.name} holds no training text (empty, blank lines only, or all in '
                        'validation): point data_path at a text file with one document per line')
    smallest = min(s[0][0] for s in shard_stats)
    steps_per_epoch = smallest // rows
    if steps_per_epoch == 0:
        short = (f'fewer than one batch of {rows}' if count == 1 else
                 f'and its smallest of {count} data shards holds {smallest}, fewer than the '
                 f'{rows} rows each shard fills per batch')
        raise UserError(f'the training split packs into {totals["train_windows"]} windows of '
                        f'{config.ctx_len} tokens, {short}: lower batch_size, ctx_len or '
                        'data_shards, or add text')
    eval_batches = max(-(-s[1][0] // rows) for s in shard_stats)
    if config.eval_batches:
        eval_batches = min(eval_batches, config.eval_batches)
    return HostData(train=train, validation=validation, ctx_len=config.ctx_len,
                    rows_per_shard=rows, steps_per_epoch=steps_per_epoch,
                    eval_batches=eval_batches, totals=totals)
