"""The batches a run's steps read: this host's rows of each global batch, placed on the mesh."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import jax

from muomni_jax.data import host_data
from muomni_jax.parallel import partitioning

# Batches placed on the devices ahead of the step that reads them; transfers are asynchronous.
PREFETCH_BATCHES = 2


def train_batches(
    data: host_data.HostData,
    mesh,
    *,
    seed: int,
    num_epochs: int,
    start_step: int,
    log: Callable[[str], None],
) -> Iterator[dict[str, jax.Array]]:
    """(B, T) global batches from start_step on, epoch after epoch, placed on the devices ahead;
    one `Epoch n/N:` line as each epoch begins."""
    epoch = start_step // data.steps_per_epoch
    start = start_step - epoch * data.steps_per_epoch
    batch_sharding = partitioning.batch_sharding(mesh)
    while True:
        log(f'Epoch {epoch + 1}/{num_epochs}:')
        batches = data.train_batches(seed, epoch, start)
        yield from prefetch(
            (partitioning.global_batch(batch, batch_sharding) for batch in batches),
            PREFETCH_BATCHES,
        )
        epoch, start = epoch + 1, 0


def prefetch(iterator: Iterator[Any], size: int) -> Iterator[Any]:
    """Yields the iterator's items while keeping `size` more already made (device-placed)."""
    queue = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
