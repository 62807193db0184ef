"""The validation loss of a run's params: each source's, and their mixture-weighted mean."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from muomni_jax.data import host_data
from muomni_jax.model import lm_loss
from muomni_jax.parallel import partitioning
from muomni_jax.training import steps


def validation_metrics(
    data: host_data.HostData, eval_step: Callable, mesh, params: nnx.State
) -> dict[str, float]:
    """Validation loss and perplexity (all windows, or eval_batches per shard) of each source,
    and their mixture-weighted mean; {} when there is no validation text.

    eval_step: (params, (B, T) batch) -> summed metrics (steps.TrainSetup.eval_step). A
    mixture's record also holds val/<name>/loss and val/<name>/ppl of each source.
    """
    batch_sharding = partitioning.batch_sharding(mesh)
    losses = {}
    for index, source in enumerate(data.sources):
        total = None
        for batch in data.validation_batches(index):
            total = steps.add_metrics(
                total, eval_step(params, partitioning.global_batch(batch, batch_sharding))
            )
        if total is not None and float(total['weight_sum']) > 0:
            losses[source.source] = float(total['loss_sum']) / float(total['weight_sum'])
    if not losses:
        return {}
    # Sources without validation text are left out; the others keep their relative weights.
    loss = sum(s.weight * value for s, value in losses.items()) / sum(s.weight for s in losses)
    result = {'val_loss': loss, 'val_ppl': lm_loss.perplexity(loss)}
    if data.is_mixture:
        for source, value in losses.items():
            result[f'val/{source.name}/loss'] = value
            result[f'val/{source.name}/ppl'] = lm_loss.perplexity(value)
    return result
