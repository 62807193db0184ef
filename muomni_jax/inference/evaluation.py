"""Score a Thinker on any text: mean next-token loss, perplexity and the tokens counted."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from muomni_jax.data import input_pipeline
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.model import lm_loss
from muomni_jax.model.thinker import Thinker


def evaluate_text(
    model: Thinker, tokenizer: tokenizer_lib.Tokenizer, data_path: str, batch_size: int = 16
) -> dict[str, float]:
    """Every document of data_path (one per non-empty line), packed as in training.

    Returns loss (nats per predicted token), perplexity, tokens (predicted tokens counted) and
    documents.
    """
    if batch_size <= 0:
        raise UserError(f'batch_size ({batch_size}) must be positive')
    source = input_pipeline.CorpusSpec(data_path=data_path, val_split=0.0)
    stream, _ = input_pipeline.in_memory_stream(
        input_pipeline.document_bytes(source, 'train'), tokenizer
    )
    ctx_len = model.config.ctx_len
    if stream.num_windows(ctx_len) == 0:
        raise UserError(f'{data_path} holds no text to score: give a file with non-empty lines')
    graphdef, params = nnx.split(model)
    step = jax.jit(functools.partial(lm_loss.eval_step, graphdef=graphdef))
    loss_sum = weight_sum = 0.0
    num_batches = -(-stream.num_windows(ctx_len) // batch_size)
    for batch in input_pipeline.eval_batches(stream, ctx_len, batch_size, num_batches):
        metrics = jax.device_get(step(params, batch))
        loss_sum += float(metrics['loss_sum'])
        weight_sum += float(metrics['weight_sum'])
    loss = loss_sum / max(weight_sum, 1.0)
    return {
        'loss': loss,
        'perplexity': lm_loss.perplexity(loss),
        'tokens': int(weight_sum),
        'documents': stream.num_documents,
    }
