"""Text generation from a Thinker with a key/value cache, and next-token distributions.

`generate` left-pads a batch of prompts to one length, runs one jitted program that prefills the
cache with the whole prompt and then decodes in a `lax.while_loop`, one token per iteration, until
every row has emitted EOS or max_new_tokens. Left padding keeps every row's next slot the same, so
one cache index serves the batch; each row's RoPE positions start at 0 at its first real token and
the attention mask (KVCache.start) hides its padding.

Prompts are encoded as the training data is, `[BOS] + pieces`, so a prompt reads as the start of
a document. Shapes: B prompts, P padded prompt length, N max_new_tokens, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.model.thinker import KVCache, Thinker, decode_step

# Prompt lengths are rounded up to a multiple of this, so prompts of similar length share one
# compiled program.
_PROMPT_BUCKET = 16
_NO_TOKEN = -1  # Fills the output after a row stops.


class Candidate(NamedTuple):
    """One possible next token: its id, its text and its probability."""

    token_id: int
    text: str
    probability: float


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets every logit outside the top-k and the top-p nucleus to -inf.

    logits: (B, V) float32. top_k: keep the k largest (0 keeps all). top_p: keep the smallest set
    of most likely tokens whose probability reaches top_p (1.0 keeps all); the most likely token
    is always kept. Returns (B, V).
    """
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the tokens more likely than it hold less than top_p between them.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = mass_before < top_p
    cutoff = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_tokens(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array
) -> jax.Array:
    """logits (B, V), temperature () -> (B,) int32: argmax when temperature is 0, else a
    filtered sample. A cond, not a where, so greedy decoding skips the top-k/top-p sort."""

    def sample():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        return jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)

    return jax.lax.cond(temperature > 0, sample, lambda: jnp.argmax(logits, axis=-1)).astype(
        jnp.int32
    )


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'top_k'))
def _generate(
    params, tokens, start, key, temperature, top_p, eos_id, *, graphdef, max_new_tokens, top_k
):
    """tokens (B, P) left-padded, start (B,) first real column -> (B, N) new ids, _NO_TOKEN
    after a row's EOS (the EOS itself is kept)."""
    model = nnx.merge(graphdef, params)
    batch, prompt_len = tokens.shape
    cache = KVCache.init(model.config, batch, prompt_len + max_new_tokens, start)
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - start[:, None], 0)
    logits, cache = decode_step(model, tokens, positions, cache)
    key, step_key = jax.random.split(key)
    token = sample_tokens(logits[:, -1], step_key, temperature, top_k, top_p)
    out = jnp.full((batch, max_new_tokens), _NO_TOKEN, jnp.int32).at[:, 0].set(token)

    def keep_going(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def decode(carry):
        i, cache, token, out, done, key = carry
        position = (prompt_len - start + i - 1)[:, None]
        # A stopped row's token is _NO_TOKEN; feed it a valid id (its output is dropped anyway).
        feed = jnp.maximum(token, 0)[:, None]
        logits, cache = decode_step(model, feed, position, cache)
        key, step_key = jax.random.split(key)
        token = sample_tokens(logits[:, 0], step_key, temperature, top_k, top_p)
        token = jnp.where(done, _NO_TOKEN, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, cache, token, out, done | (token == eos_id), key

    carry = (jnp.ones((), jnp.int32), cache, token, out, token == eos_id, key)
    return jax.lax.while_loop(keep_going, decode, carry)[3]


def generate_ids(
    model: Thinker,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int = tokenizer_lib.EOS_ID,
) -> list[list[int]]:
    """Continues each prompt (a list of ids, BOS included) and returns its new ids, without EOS.

    temperature 0 is greedy. The same model, prompts and arguments give the same ids for a seed.
    Works on params laid out on any mesh: call it from every process of a multi-process run.
    """
    ctx_len = model.config.ctx_len
    if max_new_tokens < 1:
        raise UserError(f'max_new_tokens ({max_new_tokens}) must be at least 1')
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UserError(
            f'temperature ({temperature}) must be >= 0, top_p ({top_p}) in (0, 1] '
            f'and top_k ({top_k}) >= 0'
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError('every prompt needs at least one token (BOS)')
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > ctx_len:
        raise UserError(
            f'a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} '
            f'exceeds the model context ({ctx_len}): shorten the prompt or lower '
            'max_new_tokens'
        )
    prompt_len = min(-(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET, ctx_len - max_new_tokens)
    tokens = np.full((len(prompts), prompt_len), tokenizer_lib.PAD_ID, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for row, prompt in enumerate(prompts):
        start[row] = prompt_len - len(prompt)
        tokens[row, start[row] :] = prompt
    graphdef, params = nnx.split(model)
    out = _generate(
        params,
        tokens,
        start,
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(eos_id),
        graphdef=graphdef,
        max_new_tokens=max_new_tokens,
        top_k=min(top_k, model.config.vocab_size),
    )
    if jax.process_count() > 1:  # Rows may be spread over processes; every one needs them all.
        out = multihost_utils.process_allgather(out, tiled=True)
    results = []
    for row in np.asarray(jax.device_get(out)).tolist():
        ids = [t for t in row if t != _NO_TOKEN]
        results.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return results


def encode_prompt(tokenizer: tokenizer_lib.Tokenizer, prompt: str) -> list[int]:
    return [tokenizer_lib.BOS_ID] + tokenizer.encode(prompt)


def generate(
    model: Thinker, tokenizer: tokenizer_lib.Tokenizer, prompts: Sequence[str] | str, **kwargs: Any
) -> list[str]:
    """Continues each text prompt; returns the new text only. kwargs as in `generate_ids`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    ids = generate_ids(model, prompt_ids, **kwargs)
    return [tokenizer.decode_continuation(p, row) for p, row in zip(prompt_ids, ids)]


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _next_token_probs(params, tokens, *, graphdef):
    """tokens (1, T) -> (V,) probabilities of the token after them."""
    return jax.nn.softmax(nnx.merge(graphdef, params)(tokens)[0, -1])


def next_token_distribution(
    model: Thinker, tokenizer: tokenizer_lib.Tokenizer, prompt: str, k: int = 5
) -> list[Candidate]:
    """The k most likely next tokens after `prompt`, most likely first.

    "The cat sat on the" -> [Candidate(..., 'mat', 0.6), Candidate(..., 'couch', 0.25), ...]
    """
    tokens = encode_prompt(tokenizer, prompt)
    if len(tokens) > model.config.ctx_len:
        raise UserError(
            f'the prompt has {len(tokens)} tokens, more than the model context '
            f'({model.config.ctx_len}): shorten it'
        )
    graphdef, params = nnx.split(model)
    probs = np.asarray(
        jax.device_get(_next_token_probs(params, np.asarray([tokens], np.int32), graphdef=graphdef))
    )
    top = np.argsort(-probs, kind='stable')[:k]
    return [Candidate(int(i), tokenizer.decode([int(i)]), float(probs[i])) for i in top]
