"""The KV-cache decode path and the samplers built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.inference import sampling
from muomni_jax.model.thinker import KVCache, ThinkerConfig, decode_step
from muomni_jax.training import sample_prompts
from tests.support.models import forward, perturbed_model

BASE = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, ctx_len=48, dropout=0.0)
VARIANTS = {
    'gqa_swiglu': ThinkerConfig(**BASE),
    'mha_gelu': ThinkerConfig(**BASE, use_gqa=False, use_swiglu=False),
    'gqa1_moe': ThinkerConfig(
        **{**BASE, 'n_layers': 1}, kv_groups=1, use_moe=True, num_experts=3, num_experts_per_tok=2
    ),
}


def _last_logits(model, seq, length=16):
    """Logits after each prefix of seq, from one compiled full forward over a padded row."""
    padded = jnp.zeros((1, length), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
    return forward(model, padded)[0, len(seq) - 1]  # Causal: the padding after it is unseen.


# The other variants compile their own decode steps; the fast tier keeps one.
@pytest.mark.parametrize(
    'name',
    [
        pytest.param(name, marks=[] if name == 'gqa_swiglu' else pytest.mark.slow)
        for name in sorted(VARIANTS)
    ],
)
def test_cached_decode_equals_full_forward(name):
    model = perturbed_model(VARIANTS[name])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 20)), jnp.int32)
    full = forward(model, tokens)
    cache = KVCache.init(model.config, 2, 24)
    positions = jnp.broadcast_to(jnp.arange(20), (2, 20))
    step = jax.jit(decode_step)
    prefill, cache = step(model, tokens[:, :12], positions[:, :12], cache)
    logits = [prefill]
    for t in range(12, 20):  # Then one token at a time, as the sampler does.
        out, cache = step(model, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
        logits.append(out)
    assert int(cache.index) == 20
    np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(full))) > 1.0  # The comparison is not between tiny numbers.


@pytest.mark.slow  # Compiles decode steps of its own shapes, like the three below.
def test_left_padded_rows_match_their_unpadded_forward():
    model = perturbed_model(VARIANTS['gqa_swiglu'])
    rng = np.random.default_rng(1)
    short, long = rng.integers(3, 64, 5), rng.integers(3, 64, 9)
    tokens = np.zeros((2, 9), np.int32)
    tokens[0, 4:], tokens[1] = short, long
    start = jnp.array([4, 0])
    positions = jnp.maximum(jnp.arange(9)[None] - start[:, None], 0)
    cache = KVCache.init(model.config, 2, 12, start)
    step = jax.jit(decode_step)
    logits, cache = step(model, jnp.asarray(tokens), positions, cache)
    nxt, _ = step(model, jnp.array([[7], [7]]), jnp.array([[5], [9]]), cache)
    expect_short = forward(model, jnp.asarray([list(short) + [7]]))[0]
    expect_long = forward(model, jnp.asarray([list(long) + [7]]))[0]
    np.testing.assert_allclose(logits[0, 4:], expect_short[:5], atol=1e-5, rtol=0)
    np.testing.assert_allclose(nxt[0, 0], expect_short[5], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[1], expect_long[:9], atol=1e-5, rtol=0)
    np.testing.assert_allclose(nxt[1, 0], expect_long[9], atol=1e-5, rtol=0)


def test_greedy_generation_follows_the_argmax_of_the_full_forward():
    model = perturbed_model(VARIANTS['gqa_swiglu'])
    prompts = [[1, 5, 9], [1, 7, 3, 8, 11, 4]]
    out = sampling.generate_ids(model, prompts, max_new_tokens=8, temperature=0.0, eos_id=-5)
    for prompt, new in zip(prompts, out):
        assert len(new) == 8
        seq = list(prompt)
        for token in new:
            assert token == int(jnp.argmax(_last_logits(model, seq)))
            seq.append(token)


def test_sampling_is_deterministic_under_a_seed():
    model = perturbed_model(VARIANTS['gqa_swiglu'])
    prompts = [[1, 5, 9], [1, 2]]
    kwargs = dict(max_new_tokens=8, temperature=1.5, eos_id=-5)
    a = sampling.generate_ids(model, prompts, seed=3, **kwargs)
    b = sampling.generate_ids(model, prompts, seed=3, **kwargs)
    c = sampling.generate_ids(model, prompts, seed=4, **kwargs)
    assert a == b and a != c


@pytest.mark.slow
def test_generation_stops_at_eos():
    model = perturbed_model(VARIANTS['gqa_swiglu'])
    greedy = sampling.generate_ids(
        model, [[1, 5, 9]], max_new_tokens=8, temperature=0.0, eos_id=-5
    )[0]
    eos = greedy[3]  # Call the 4th greedy token EOS: generation must end just before it.
    stopped = sampling.generate_ids(
        model, [[1, 5, 9]], max_new_tokens=8, temperature=0.0, eos_id=eos
    )[0]
    assert stopped == greedy[: greedy.index(eos)]


def _allowed(logits, top_k, top_p):
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)
    if top_k:
        order = order[:top_k]
        probs = np.asarray(jax.nn.softmax(logits[order]))
        order_probs = probs
    else:
        order_probs = probs[order]
    before = np.cumsum(order_probs) - order_probs
    return set(order[before < top_p].tolist())


@pytest.mark.parametrize('top_k,top_p', [(3, 1.0), (0, 0.5), (5, 0.7)])
def test_top_k_and_top_p_never_leave_their_set(top_k, top_p):
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 40)) * 2, jnp.float32)
    allowed = _allowed(logits[0], top_k, top_p)
    assert 1 <= len(allowed) < 40
    keys = jax.random.split(jax.random.key(0), 400)
    draws = jax.vmap(lambda k: sampling.sample_tokens(logits, k, 1.0, top_k, top_p))(keys)
    seen = set(np.asarray(draws).ravel().tolist())
    assert seen <= allowed
    assert len(seen) > 1  # Sampled, not argmax.
    filtered = sampling.filter_logits(logits, top_k, top_p)
    assert set(np.flatnonzero(np.isfinite(filtered[0])).tolist()) == allowed


@pytest.mark.slow
def test_generation_respects_top_k_end_to_end():
    model = perturbed_model(VARIANTS['gqa_swiglu'])
    out = sampling.generate_ids(
        model, [[1, 5]] * 4, max_new_tokens=8, temperature=1.0, top_k=2, seed=0, eos_id=-5
    )
    top2 = set(np.argsort(-np.asarray(_last_logits(model, [1, 5])))[:2].tolist())
    assert {row[0] for row in out} <= top2


def test_bad_arguments_are_user_errors():
    model = perturbed_model(VARIANTS['gqa_swiglu'])
    with pytest.raises(UserError, match='exceeds the model context'):
        sampling.generate_ids(model, [[1] * 40], max_new_tokens=10)
    with pytest.raises(UserError, match='top_p'):
        sampling.generate_ids(model, [[1]], top_p=0.0)


class _CharTokenizer:
    """Ids 3.. are the letters a..; enough of the Tokenizer interface for the samplers."""

    def encode(self, text):
        return [3 + ord(c) - ord('a') for c in text]

    def decode(self, ids):
        return ''.join(chr(ord('a') + i - 3) for i in ids if i >= 3)

    decode_continuation = tokenizer_lib.Tokenizer.decode_continuation


def test_next_token_distribution_is_the_sorted_softmax():
    model = perturbed_model(VARIANTS['gqa_swiglu'])
    top = sampling.next_token_distribution(model, _CharTokenizer(), 'cab', k=4)
    probs = np.asarray(jax.nn.softmax(_last_logits(model, [1, 5, 3, 4])))
    expected = np.argsort(-probs)[:4]
    assert [c.token_id for c in top] == expected.tolist()
    np.testing.assert_allclose([c.probability for c in top], probs[expected], rtol=1e-5)
    assert top[0].text == _CharTokenizer().decode([int(expected[0])])


def test_training_sampler_prints_one_line_per_prompt():
    config = VARIANTS['gqa_swiglu']
    model = perturbed_model(config)
    sampler = sample_prompts.training_sampler('cab| ab ', 8, config, _CharTokenizer())
    lines = sampler(nnx.state(model))
    assert len(lines) == 2 and lines[0].startswith("  Sample: 'cab' → '")
    assert lines[1].startswith("  Sample: 'ab' → '")
    assert sample_prompts.training_sampler('', 8, config, None) is None
