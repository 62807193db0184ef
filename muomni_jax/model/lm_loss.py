"""The Thinker's next-token loss: the plain cross-entropy, the lm_head and cross-entropy fused
over chunks of positions, and the loss of a batch that the train and eval steps share.

The plain path (`Thinker.__call__`, then `cross_entropy`) materialises (B, T, V) float32
logits, then as many log-probabilities and, in the backward pass, as many gradients: at vocab
32000 that is 1 GB per 8192 tokens for each, written and read several times. Here the loss and
both gradients are computed chunk by chunk in the forward pass, so each (B, C, V) block of logits
is made once, used while it is in cache and dropped; the backward pass only scales the stored
(B, T, D) and (D, V) gradients by the incoming cotangent.

The matmul FLOPs are the plain path's (one forward and two backward matmuls per chunk, nothing
recomputed), and one exp per logit instead of two.

z-loss (z_loss_weight > 0, as in PaLM, MaxText and Levanter) adds z_loss_weight * logsumexp^2
per token, which keeps the softmax normaliser near 1 (log Z near 0) and steadies bfloat16
training. Its gradient is 2 * z_loss_weight * logsumexp * softmax, so the fused path folds it
into the same d_logits block: no extra matmul, and the logits are still never materialised.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Masked next-token loss in float32.

    Args:
      logits: (B, T, V); targets: (B, T) int; weights: (B, T) float, 0 where masked.
    Returns:
      (sum of weighted token losses, sum of weights), both () float32.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * weights), jnp.sum(weights)


def z_loss_sum(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(weights * logsumexp(logits)^2) () float32, for logits (B, T, V) and weights (B, T)."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(weights * lse**2)


def _time_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(B, T, ...) -> (T / chunk, B, chunk, ...): chunks of positions, each over all rows.

    Chunking the time axis keeps the batch axis, and with it the batch sharding, whole.
    """
    b, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)


def _from_time_chunks(x: jax.Array) -> jax.Array:
    """Inverse of _time_chunks."""
    n, b, c = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _logits(h_c: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, C, D) @ (D, V), both in the compute dtype, accumulated and returned in float32."""
    return jnp.einsum('bcd,dv->bcv', h_c, kernel, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_sum(hidden, kernel, targets, weights, chunk, z_loss_weight):
    """(sum(weights * (token loss + z_loss_weight * lse^2)), sum(weights * lse^2)), () float32
    each; forward only, no gradients made. The second output is a metric: its cotangent is
    ignored (chunked_cross_entropy stops its gradient)."""
    kernel = kernel.astype(hidden.dtype)

    def body(totals, xs):
        h_c, t_c, w_c = xs
        logits = _logits(h_c, kernel)
        target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        lse = jax.nn.logsumexp(logits, axis=-1)
        losses = lse - target_logit + z_loss_weight * lse**2
        return (totals[0] + jnp.sum(losses * w_c), totals[1] + jnp.sum(lse**2 * w_c)), None

    xs = tuple(_time_chunks(x, chunk) for x in (hidden, targets, weights))
    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    return jax.lax.scan(body, zeros, xs)[0]


def _loss_sum_fwd(hidden, kernel, targets, weights, chunk, z_loss_weight):
    compute_kernel = kernel.astype(hidden.dtype)

    def body(d_kernel, xs):
        h_c, t_c, w_c = xs
        logits = _logits(h_c, compute_kernel)
        # exp is the costliest elementwise op here: compute it once and reuse it for the grads.
        peak = jnp.max(logits, axis=-1, keepdims=True)
        shifted = logits - peak
        exps = jnp.exp(shifted)
        sums = jnp.sum(exps, axis=-1, keepdims=True)
        target_shifted = jnp.take_along_axis(shifted, t_c[..., None], axis=-1)
        lse = jnp.log(sums) + peak
        losses = (jnp.log(sums) - target_shifted)[..., 0]
        # d(sum w * loss) / d logits = w * (softmax - onehot(target)); z-loss adds
        # w * 2 * z_loss_weight * lse * softmax.
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        probs = exps / sums
        if z_loss_weight:
            losses = losses + z_loss_weight * lse[..., 0] ** 2
            probs = probs * (1.0 + 2.0 * z_loss_weight * lse)
        d_logits = jnp.where(vocab == t_c[..., None], probs - 1.0, probs) * w_c[..., None]
        d_logits = d_logits.astype(h_c.dtype)
        d_h = jnp.einsum(
            'bcv,dv->bcd', d_logits, compute_kernel, preferred_element_type=jnp.float32
        )
        d_kernel = d_kernel + jnp.einsum(
            'bcd,bcv->dv', h_c, d_logits, preferred_element_type=jnp.float32
        )
        return d_kernel, (losses, lse[..., 0] ** 2, d_h.astype(h_c.dtype))

    xs = tuple(_time_chunks(x, chunk) for x in (hidden, targets, weights))
    d_kernel, (losses, z, d_hidden) = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), xs)
    losses = _from_time_chunks(losses)
    residuals = (_from_time_chunks(d_hidden), d_kernel, losses, targets)
    return (jnp.sum(losses * weights), jnp.sum(_from_time_chunks(z) * weights)), residuals


def _loss_sum_bwd(chunk, z_loss_weight, residuals, cotangents):
    del chunk, z_loss_weight
    g = cotangents[0]  # The z sum's cotangent is ignored: it is a metric (see _loss_sum).
    d_hidden, d_kernel, losses, targets = residuals
    d_targets = jnp.zeros(targets.shape, jax.dtypes.float0)  # Integer input: no gradient.
    return (g * d_hidden).astype(d_hidden.dtype), g * d_kernel, d_targets, g * losses


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def time_chunk(batch_size: int, seq_len: int, chunk_tokens: int) -> int:
    """The largest divisor of seq_len whose chunk of batch_size rows holds <= chunk_tokens."""
    target = max(1, chunk_tokens // batch_size)
    return max(c for c in range(1, min(target, seq_len) + 1) if seq_len % c == 0)


def chunked_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk_tokens: int = 1024,
    z_loss_weight: float = 0.0,
    with_z: bool = False,
):
    """What `cross_entropy` (+ z_loss_weight * `z_loss_sum`) gives for the logits
    `hidden @ kernel`, with equal gradients.

    Args:
      hidden: (B, T, D) final-normed hidden states in the compute dtype.
      kernel: (D, V) float32 lm_head kernel, cast to the hidden states' dtype for the matmuls.
      targets: (B, T) int; weights: (B, T) float, 0 where masked.
      chunk_tokens: about how many tokens (B rows x C positions) each chunk holds.
      z_loss_weight: weight of the z-loss in the first output (and its gradients).
      with_z: also return sum(weights * lse^2), without gradient (a metric).
    Returns:
      (sum of weighted token losses [+ z term], sum of weights[, z sum]), () float32 each.
    """
    b, t, _ = hidden.shape
    chunk = time_chunk(b, t, chunk_tokens)
    loss_sum, z_sum = _loss_sum(
        hidden,
        kernel,
        targets.astype(jnp.int32),
        weights.astype(jnp.float32),
        chunk,
        float(z_loss_weight),
    )
    if with_z:
        return loss_sum, jnp.sum(weights), jax.lax.stop_gradient(z_sum)
    return loss_sum, jnp.sum(weights)


def batch_loss(
    params: nnx.State,
    batch: dict[str, jax.Array],
    dropout_key: jax.Array,
    graphdef: nnx.GraphDef,
    deterministic: bool,
    loss_chunk_tokens: int = 0,
    z_loss_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(objective sum, {'loss_sum', 'weight_sum', 'z_sum'}) of the Thinker (graphdef, params)
    on a batch of (B, T) inputs, targets, segment_ids, positions and weights.

    The objective, what the gradients are of, is loss_sum + z_loss_weight * z_sum: loss_sum the
    weighted cross-entropy sum, z_sum the weighted sum of logsumexp^2 (every value () float32).
    loss_chunk_tokens > 0 fuses the lm_head and the loss (chunked_cross_entropy).
    """
    model = nnx.merge(graphdef, params)
    inputs = dict(
        segment_ids=batch['segment_ids'],
        positions=batch['positions'],
        deterministic=deterministic,
        rngs=nnx.Rngs(dropout=dropout_key),
    )
    if loss_chunk_tokens:
        hidden = model.hidden_states(batch['inputs'], **inputs)
        # The lm_head matmuls run in the hidden states' dtype (matmul_dtype's, if lower).
        hidden = hidden.astype(model.config.matmul_compute_dtype)
        objective, weight_sum, z_sum = chunked_cross_entropy(
            hidden,
            model.lm_head.kernel[...],
            batch['targets'],
            batch['weights'],
            loss_chunk_tokens,
            z_loss_weight,
            with_z=True,
        )
        # The objective minus its z term: the cross-entropy to report (metrics only).
        loss_sum = jax.lax.stop_gradient(objective - z_loss_weight * z_sum)
    else:
        logits = model(batch['inputs'], **inputs)
        loss_sum, weight_sum = cross_entropy(logits, batch['targets'], batch['weights'])
        if z_loss_weight:
            z_sum = z_loss_sum(logits, batch['weights'])
            objective = loss_sum + z_loss_weight * z_sum
        else:  # Another pass over the (B, T, V) logits only when it is trained on.
            z_sum, objective = jnp.zeros((), jnp.float32), loss_sum
        z_sum = jax.lax.stop_gradient(z_sum)
    return objective, {
        'loss_sum': jax.lax.stop_gradient(loss_sum),
        'weight_sum': weight_sum,
        'z_sum': z_sum,
    }


def eval_step(
    params: nnx.State,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    loss_chunk_tokens: int = 0,
) -> dict[str, jax.Array]:
    """batch_loss without dropout, as {'loss_sum', 'weight_sum'}: validation and scoring."""
    _, sums = batch_loss(params, batch, jax.random.key(0), graphdef, True, loss_chunk_tokens)
    return {'loss_sum': sums['loss_sum'], 'weight_sum': sums['weight_sum']}
