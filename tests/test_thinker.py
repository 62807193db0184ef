"""Tests for muomni_jax.model.thinker against shared/spec/thinker.md.

The numpy reference below is written from the spec, independently of the model code:
float64, explicit per-head / per-position loops, weights read from the nnx state.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from muomni_jax.model.thinker import (
    MODEL_FIELDS,
    ORIGINAL_FIELDS,
    SHAPE_FIELDS,
    Attention,
    Thinker,
    ThinkerConfig,
    apply_rope,
    attention_mask,
    count_params,
    rope_cos_sin,
)
from tests.support.models import perturbed_model

TINY = ThinkerConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=48, kv_groups=2)


def make_model(cfg, seed=0):
    """perturbed_model: every param O(1)-scale random, so the comparisons below are not
    dominated by the init's scales or ones/zeros."""
    return perturbed_model(cfg, seed)


@functools.partial(jax.jit, static_argnames=('deterministic',))
def _jit_forward(model, tokens, segment_ids, positions, deterministic, rngs):
    return model(
        tokens, segment_ids=segment_ids, positions=positions, deterministic=deterministic, rngs=rngs
    )


def forward(model, tokens, segment_ids=None, positions=None, deterministic=True, rngs=None):
    """model(tokens, ...) as a numpy array, compiled once per model shape: run op by op, the
    forward passes of this file took a minute."""
    return np.asarray(_jit_forward(model, tokens, segment_ids, positions, deterministic, rngs))


def set_params(model, pure):
    """Overwrites a module's params from a nested dict like nnx.to_pure_dict gives."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), pure))
    nnx.update(model, state)


def params_np(model):
    return jax.tree.map(
        lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )


# ----------------------------------------------------------------- numpy reference


def ref_rmsnorm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w


def ref_rope(x, pos, theta):
    """x (T, K) for one head, pos (T,): rotate each pair (x_i, x_{i+K/2}) by pos*theta^(-2i/K)."""
    t, k = x.shape
    out = np.empty_like(x)
    for j in range(t):
        for i in range(k // 2):
            a = pos[j] * theta ** (-2 * i / k)
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            out[j, i], out[j, i + k // 2] = rot @ np.array([x[j, i], x[j, i + k // 2]])
    return out


def ref_attention(p, x, cfg, seg, pos, group_of=None):
    """x (T, D) one row. group_of(h) -> kv group index (default: h // (H // G))."""
    t, d = x.shape
    h_n, k = cfg.n_heads, d // cfg.n_heads
    if 'qkv' in p:
        qkv = x @ p['qkv']['kernel']
        q, kk, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        g_n = h_n
    else:
        q, kk, v = x @ p['q']['kernel'], x @ p['k']['kernel'], x @ p['v']['kernel']
        g_n = kk.shape[1] // k
    group_of = group_of or (lambda h: h // (h_n // g_n))
    heads = []
    for h in range(h_n):
        g = group_of(h)
        qh = ref_rope(q[:, h * k : (h + 1) * k], pos, cfg.rope_theta)
        kh = ref_rope(kk[:, g * k : (g + 1) * k], pos, cfg.rope_theta)
        vh = v[:, g * k : (g + 1) * k]
        s = qh @ kh.T / math.sqrt(k)
        allowed = np.array([[j <= i and seg[i] == seg[j] for j in range(t)] for i in range(t)])
        s = np.where(allowed, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ vh)
    return np.concatenate(heads, axis=-1) @ p['o']['kernel']


def ref_mlp(p, x):
    if 'gate_proj' in p:
        g = x @ p['gate_proj']['kernel']
        return (g / (1 + np.exp(-g)) * (x @ p['up_proj']['kernel'])) @ p['down_proj']['kernel']
    h = x @ p['fc1']['kernel'] + p['fc1']['bias']
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    return h @ p['fc2']['kernel'] + p['fc2']['bias']


def ref_moe(p, x, top_k):
    out = np.zeros_like(x)
    for j in range(x.shape[0]):
        logits = x[j] @ p['router']['kernel']
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs)[:top_k]
        for e in chosen:
            out[j] += (
                probs[e] / probs[chosen].sum() * ref_mlp(p['experts'][int(e)], x[j : j + 1])[0]
            )
    return out


def ref_forward(p, cfg, tokens, seg=None, pos=None):
    """tokens (B, T) -> logits (B, T, V), one row at a time."""
    rows = []
    for b in range(tokens.shape[0]):
        t = tokens.shape[1]
        sb = np.ones(t, int) if seg is None else seg[b]
        pb = np.arange(t) if pos is None else pos[b]
        x = p['tok_emb']['embedding'][tokens[b]]
        for i in range(cfg.n_layers):
            blk = p['blocks'][i]
            x = x + ref_attention(blk['attn'], ref_rmsnorm(x, blk['norm1']['weight']), cfg, sb, pb)
            h = ref_rmsnorm(x, blk['norm2']['weight'])
            x = x + (
                ref_moe(blk['moe'], h, cfg.num_experts_per_tok)
                if cfg.use_moe
                else ref_mlp(blk['mlp'], h)
            )
        rows.append(ref_rmsnorm(x, p['norm']['weight']) @ p['lm_head']['kernel'])
    return np.stack(rows)


def random_tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


# ----------------------------------------------------------------- tests


def test_param_count_and_layout_of_tiny_config():
    cfg = ThinkerConfig()
    model = nnx.eval_shape(lambda: Thinker(cfg, rngs=nnx.Rngs(0)))
    assert count_params(model) == 20_318_464
    assert count_params(nnx.state(model)) == 20_318_464
    flat = {
        '/'.join(map(str, path)): v.shape
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert flat['tok_emb/embedding'] == (32000, 256)
    assert flat['blocks/3/attn/q/kernel'] == (256, 256)
    assert flat['blocks/3/attn/k/kernel'] == (256, 128)  # 2 kv groups x 64
    assert flat['blocks/0/mlp/gate_proj/kernel'] == (256, 1024)
    assert flat['blocks/0/mlp/down_proj/kernel'] == (1024, 256)
    assert flat['blocks/0/norm1/weight'] == (256,)
    assert flat['lm_head/kernel'] == (256, 32000)
    assert 'lm_head/bias' not in flat and 'norm/weight' in flat
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_causality():
    model = make_model(TINY)
    tokens = random_tokens((2, 10), TINY.vocab_size)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % TINY.vocab_size)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max(axis=-1).min() > 1e-4


def test_packed_segments_are_isolated_and_position_restarted():
    model = make_model(TINY)
    doc1, doc2 = random_tokens((1, 5), 64, seed=1), random_tokens((1, 7), 64, seed=2)
    packed = jnp.concatenate([doc1, doc2], axis=1)
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    out = forward(model, packed, segment_ids=seg, positions=pos)

    changed = packed.at[0, 2].set((packed[0, 2] + 1) % 64)
    out2 = forward(model, changed, segment_ids=seg, positions=pos)
    np.testing.assert_array_equal(out[:, 5:], out2[:, 5:])
    assert np.abs(out[:, 2:5] - out2[:, 2:5]).max() > 1e-4

    alone = forward(model, doc2)
    np.testing.assert_allclose(out[:, 5:], alone, atol=1e-5, rtol=1e-5)


def test_padding_segment_zero_does_not_leak():
    model = make_model(TINY)
    tokens = random_tokens((1, 8), 64)
    seg = jnp.asarray([[1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
    pos = jnp.asarray([[0, 1, 2, 3, 4, 0, 0, 0]], jnp.int32)
    out = forward(model, tokens, segment_ids=seg, positions=pos)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:, :5], forward(model, tokens[:, :5]), atol=1e-5, rtol=1e-5)


def test_rope_matches_explicit_rotation():
    b, t, h, k = 2, 6, 3, 8
    x = np.random.default_rng(0).standard_normal((b, t, h, k)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4, 5], [7, 0, 1, 100, 2, 3]], np.int32)
    cos, sin = rope_cos_sin(jnp.asarray(pos), k, 10000.0)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np.stack(
        [
            np.stack(
                [ref_rope(x[i, :, j].astype(np.float64), pos[i], 10000.0) for j in range(h)], axis=1
            )
            for i in range(b)
        ]
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Position 0 is the identity.
    np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-7)


def test_gqa_with_one_group_per_head_equals_mha():
    gqa_cfg = dataclasses.replace(TINY, use_gqa=True, kv_groups=TINY.n_heads)
    mha_cfg = dataclasses.replace(TINY, use_gqa=False)
    gqa, mha = make_model(gqa_cfg, seed=3), make_model(mha_cfg, seed=4)
    g = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    m = nnx.to_pure_dict(nnx.state(mha, nnx.Param))
    for i in range(TINY.n_layers):
        ga, ma = g['blocks'][i]['attn'], m['blocks'][i]['attn']
        ma['qkv']['kernel'] = jnp.concatenate(
            [ga['q']['kernel'], ga['k']['kernel'], ga['v']['kernel']], axis=1
        )
        ma['o'] = ga['o']
        m['blocks'][i].update({k: g['blocks'][i][k] for k in ('norm1', 'norm2', 'mlp')})
    m.update({k: g[k] for k in ('tok_emb', 'norm', 'lm_head')})
    set_params(mha, m)
    tokens = random_tokens((2, 9), 64)
    np.testing.assert_allclose(forward(mha, tokens), forward(gqa, tokens), atol=1e-5, rtol=1e-5)


def test_gqa_uses_repeat_interleave_grouping():
    cfg = dataclasses.replace(TINY, n_heads=4, kv_groups=2)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    p = jax.tree.map(
        lambda x: np.asarray(x, np.float64) * 20, nnx.to_pure_dict(nnx.state(attn, nnx.Param))
    )
    set_params(attn, p)  # large weights: peaked softmax, so a wrong grouping shows
    x = np.random.default_rng(1).standard_normal((1, 7, cfg.d_model))
    seg, pos = np.ones((1, 7), np.int32), np.arange(7)[None]
    cos, sin = rope_cos_sin(jnp.asarray(pos), cfg.head_dim, cfg.rope_theta)
    got = np.asarray(attn(jnp.asarray(x, jnp.float32), cos, sin, attention_mask(jnp.asarray(seg))))
    interleave = {0: 0, 1: 0, 2: 1, 3: 1}
    tiled = {0: 0, 1: 1, 2: 0, 3: 1}
    want = ref_attention(p, x[0], cfg, seg[0], pos[0], group_of=interleave.get)
    wrong = ref_attention(p, x[0], cfg, seg[0], pos[0], group_of=tiled.get)
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-5)
    assert np.abs(got[0] - wrong).max() > 1e-2


@pytest.mark.parametrize(
    'variant',
    [
        dict(use_gqa=True, use_swiglu=True),
        dict(use_gqa=False, use_swiglu=False),
        dict(use_gqa=True, use_swiglu=True, use_moe=True, num_experts=4, num_experts_per_tok=2),
        dict(use_gqa=False, use_swiglu=False, use_moe=True, num_experts=3, num_experts_per_tok=1),
        dict(use_gqa=True, use_swiglu=True, attention_block=2),
        dict(use_gqa=False, use_swiglu=False, attention_block=4),
    ],
    ids=[
        'gqa-swiglu',
        'mha-gelu',
        'moe-swiglu',
        'moe-gelu-top1',
        'gqa-blocks-of-2',
        'mha-blocks-of-4',
    ],
)
def test_forward_matches_numpy_reference(variant):
    cfg = dataclasses.replace(TINY, **variant)
    model = make_model(cfg, seed=5)
    tokens = random_tokens((2, 8), cfg.vocab_size, seed=6)
    seg = np.array([[1] * 8, [1, 1, 1, 2, 2, 2, 2, 0]])
    pos = np.array([list(range(8)), [0, 1, 2, 0, 1, 2, 3, 0]])
    got = forward(model, tokens, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    want = ref_forward(params_np(model), cfg, np.asarray(tokens), seg, pos)
    assert np.abs(want).max() > 0.5  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_hidden_states_and_lm_head_compose_to_logits():
    model = make_model(TINY)
    tokens = random_tokens((1, 5), 64)
    h = model.hidden_states(tokens)
    assert h.shape == (1, 5, TINY.d_model)
    # Both op by op: a compiled forward may fuse the two and round differently.
    np.testing.assert_array_equal(np.asarray(model.lm_head(h)), np.asarray(model(tokens)))


@pytest.mark.slow  # Five compiled forward and backward passes per case.
@pytest.mark.parametrize('scan_layers', [False, True], ids=['loop', 'scan'])
def test_attention_blocks_give_the_same_logits_and_gradients(scan_layers):
    """Query blocks that skip the masked upper keys compute the one-block function: logits and
    gradients agree in float32 over packed rows whose documents cross the block edges; a length
    the block does not divide falls back to one block."""
    tokens = random_tokens((2, 16), 64, seed=3)
    seg = jnp.asarray([[1] * 5 + [2] * 11, [1] * 9 + [2] * 4 + [0] * 3])
    pos = jnp.asarray([list(range(5)) + list(range(11)), list(range(9)) + list(range(4)) + [0] * 3])

    def loss_and_grads(block, t=16):
        # One layer: the blocks are within a layer's attention; more only adds compile time.
        model = make_model(
            dataclasses.replace(TINY, n_layers=1, attention_block=block, scan_layers=scan_layers),
            seed=4,
        )
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(
                tokens[:, :t], segment_ids=seg[:, :t], positions=pos[:, :t]
            )
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * (seg[:, :t] > 0)), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))

    one_logits, one_grads = loss_and_grads(0)
    for block in (4, 8):
        logits, grads = loss_and_grads(block)
        np.testing.assert_allclose(logits, one_logits, atol=2e-5, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads, one_grads
        )
    np.testing.assert_allclose(
        loss_and_grads(5, t=13)[0], loss_and_grads(0, t=13)[0], atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    'block', [0, pytest.param(4, marks=pytest.mark.slow)], ids=['one-block', 'blocks-of-4']
)
def test_dropout(block):
    cfg = dataclasses.replace(TINY, dropout=0.1, attention_block=block)
    model = make_model(cfg)
    tokens = random_tokens((2, 8), 64)
    # Deterministic calls ignore the rate: the same params without dropout give the same logits.
    clean = forward(make_model(dataclasses.replace(cfg, dropout=0.0)), tokens)
    np.testing.assert_array_equal(forward(model, tokens), clean)
    run = lambda seed: forward(model, tokens, deterministic=False, rngs=nnx.Rngs(dropout=seed))
    a, a2, b = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, a2)
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(a - clean).max() > 1e-3
    with pytest.raises(ValueError, match='rngs'):
        model(tokens, deterministic=False)


@pytest.mark.slow  # Compiles a bfloat16 model of its own.
def test_bfloat16_compute():
    model32 = make_model(TINY, seed=7)
    model16 = make_model(dataclasses.replace(TINY, dtype='bfloat16'), seed=7)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    tokens = random_tokens((2, 8), 64)
    out16, out32 = forward(model16, tokens), forward(model32, tokens)
    assert out16.dtype == jnp.float32 and model16.hidden_states(tokens).dtype == jnp.bfloat16
    err = np.abs(np.asarray(out16) - np.asarray(out32)).max()
    assert 0 < err < 0.1 * np.abs(np.asarray(out32)).max()


@pytest.mark.parametrize(
    'fields, message',
    [
        (dict(d_model=250), r'd_model \(250\) must be divisible by n_heads \(4\)'),
        (dict(n_heads=4, kv_groups=3), r'n_heads \(4\) must be divisible by kv_groups \(3\)'),
        (dict(d_model=24, n_heads=8), r'must be even for RoPE'),
        (dict(use_moe=True, num_experts=2, num_experts_per_tok=3), r'num_experts_per_tok \(3\)'),
        (dict(dropout=1.0), r'dropout'),
        (dict(ctx_len=1), r'ctx_len'),
        (dict(attention_block=-1), r'attention_block \(-1\) must be a non-negative integer'),
    ],
)
def test_validate_rejects_bad_configs(fields, message):
    with pytest.raises(ValueError, match=message):
        ThinkerConfig(**fields).validate()
    with pytest.raises(ValueError, match=message):
        Thinker(ThinkerConfig(**fields), rngs=nnx.Rngs(0))


def test_from_config_ignores_unknown_and_defaults_missing():
    cfg = ThinkerConfig.from_config({'d_model': 128, 'dropout': 0, 'ctx_len': 512.0, 'lr': 3e-4})
    assert cfg == ThinkerConfig(d_model=128, dropout=0.0)
    assert isinstance(cfg.dropout, float) and isinstance(cfg.ctx_len, int)
    assert ThinkerConfig.from_config({}) == ThinkerConfig()


def test_defaults_are_the_original_tiny_thinker_and_the_field_lists_derive_from_them():
    default = ThinkerConfig()
    default.validate()
    assert (
        default.vocab_size,
        default.n_layers,
        default.d_model,
        default.n_heads,
        default.d_ff,
        default.kv_groups,
    ) == (32000, 4, 256, 4, 1024, 2)
    assert SHAPE_FIELDS == (
        'vocab_size',
        'n_layers',
        'd_model',
        'n_heads',
        'd_ff',
        'use_gqa',
        'kv_groups',
        'use_swiglu',
        'use_moe',
        'num_experts',
    )
    # All but dtype, matmul_dtype, remat, scan_layers, attention_block, attention_dropout and
    # attention_impl.
    assert ORIGINAL_FIELDS == MODEL_FIELDS[:-7]
    assert set(MODEL_FIELDS) <= set(tiny.get_config())
