"""Training batches of one token stream alone, built from the library's parts (EpochOrder,
TokenStream.windows, features) as host_data builds them for a shard: the reference the tests
compare the cached and legacy paths with."""

from collections.abc import Iterator

import numpy as np

from muomni_jax.data import input_pipeline


def steps_per_epoch(stream: input_pipeline.TokenStream, ctx_len: int, batch_size: int) -> int:
    """Whole batches per epoch; the remainder windows wait for the next epoch's permutation."""
    return stream.num_windows(ctx_len) // batch_size


def train_batches(
    stream: input_pipeline.TokenStream,
    ctx_len: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """(batch_size, ctx_len) batches of epoch `epoch` from `start_step` on, in an order fixed by
    (seed, epoch)."""
    num_steps = steps_per_epoch(stream, ctx_len, batch_size)
    if num_steps == 0:
        return
    order = input_pipeline.EpochOrder(stream.num_windows(ctx_len), num_steps * batch_size, seed)
    for step in range(epoch * num_steps + start_step, (epoch + 1) * num_steps):
        yield input_pipeline.features(
            *stream.windows(order(step * batch_size + np.arange(batch_size)), ctx_len)
        )
