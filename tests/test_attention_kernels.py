"""The fused attention kernels (model/attention_kernels.py) compute the Thinker's function.

pallas (the Pallas Triton flash attention) and splash (the TPU splash attention) run here in
Pallas's interpreter: the Thinker's logits and every parameter gradient must equal the XLA
path's within float32 tolerance, on packed rows (documents cut mid-window, padding) with GQA.
cudnn needs an NVIDIA GPU and is only checked on one (scripts/device_check.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muomni_jax.errors import UserError
from muomni_jax.model import attention_kernels
from muomni_jax.model.thinker import Thinker, ThinkerConfig
from muomni_jax.training import config_checks


def packed_batch(t, vocab, rows=2, seed=0):
    """Tokens, segment ids (three documents, then padding) and positions restarting per document."""
    rng = np.random.default_rng(seed)
    lengths = [t // 4, t // 2, t // 8]
    segment_ids = np.concatenate(
        [np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(t - sum(lengths))]
    ).astype(np.int32)
    positions = np.concatenate(
        [np.arange(n) for n in lengths] + [np.zeros(t - sum(lengths))]
    ).astype(np.int32)
    tokens = rng.integers(0, vocab, (rows, t)).astype(np.int32)
    return (
        jnp.asarray(tokens),
        jnp.asarray(np.tile(segment_ids, (rows, 1))),
        jnp.asarray(np.tile(positions, (rows, 1))),
    )


def loss_and_grads(cfg, params, tokens, segment_ids, positions, deterministic=True, seed=0):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Thinker(cfg, rngs=nnx.Rngs(0))))

    def loss(p):
        model = nnx.merge(graphdef, p)
        logits = model(
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            deterministic=deterministic,
            rngs=nnx.Rngs(dropout=seed),
        )
        # Padding's outputs are never trained on: leave them out, as the loss weights do.
        return jnp.sum(
            jnp.where(segment_ids[..., None] > 0, logits, 0.0) ** 2
        ) / logits.size, logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads


def assert_same_outputs(reference, kernel, segment_ids):
    """(loss, logits, grads) of a kernel against the XLA path's, padding's logits left out."""
    (value, logits, grads), (k_value, k_logits, k_grads) = reference, kernel
    real = np.asarray(segment_ids) > 0
    np.testing.assert_allclose(
        np.asarray(k_logits)[real], np.asarray(logits)[real], atol=2e-5, rtol=1e-5
    )
    np.testing.assert_allclose(k_value, value, rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(k_grads)
    ):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def assert_same_function(base, impl, t):
    cfg = dataclasses.replace(base, ctx_len=t, attention_impl='xla')
    params = nnx.state(Thinker(cfg, rngs=nnx.Rngs(1)))
    batch = packed_batch(t, cfg.vocab_size)
    value, logits, grads = loss_and_grads(cfg, params, *batch)
    k_value, k_logits, k_grads = loss_and_grads(
        dataclasses.replace(cfg, attention_impl=impl), params, *batch
    )
    assert_same_outputs((value, logits, grads), (k_value, k_logits, k_grads), batch[1])


# One layer: a kernel replaces each layer's attention alone, so more layers only add compile and
# interpreter time.
GQA = ThinkerConfig(
    vocab_size=64,
    n_layers=1,
    d_model=32,
    n_heads=4,
    d_ff=48,
    kv_groups=2,
    dropout=0.0,
    attention_block=16,
)


@pytest.mark.slow  # The kernel interpreted: tens of seconds.
@pytest.mark.parametrize('base', [GQA, dataclasses.replace(GQA, use_gqa=False)], ids=['gqa', 'mha'])
def test_pallas_computes_the_xla_function(base):
    # 32 tokens, as 64 did, are one kernel block (attention_kernels takes the largest of
    # 128/64/32/16 that divides t), holding three documents and padding.
    assert_same_function(base, 'pallas', 32)


@pytest.mark.slow
def test_splash_computes_the_xla_function():
    assert_same_function(GQA, 'splash', 128)


@pytest.mark.slow  # Both kernels interpreted, on 8 devices.
@pytest.mark.parametrize('impl,t', [('pallas', 32), ('splash', 128)])
def test_kernels_split_the_rows_over_a_mesh_and_compute_the_xla_function(impl, t):
    """Under on_mesh the kernel runs in shard_map, one block of rows per device (here a
    data=2 x fsdp=4 mesh of CPU devices, each interpreting its own rows)."""
    mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    cfg = dataclasses.replace(GQA, ctx_len=t, attention_impl='xla')
    params = nnx.state(Thinker(cfg, rngs=nnx.Rngs(1)))
    batch = packed_batch(t, cfg.vocab_size, rows=8)
    value, logits, grads = loss_and_grads(cfg, params, *batch)
    kernel_cfg = dataclasses.replace(cfg, attention_impl=impl)
    sharded = jax.jit(
        attention_kernels.on_mesh(mesh, lambda p, *b: loss_and_grads(kernel_cfg, p, *b)),
        in_shardings=(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            rows,
            rows,
            rows,
        ),
    )
    lowered = sharded.lower(params, *batch)
    assert 'shard_map' in lowered.as_text() or 'sdy.manual_computation' in lowered.as_text()
    k_value, k_logits, k_grads = lowered.compile()(params, *batch)
    assert_same_outputs((value, logits, grads), (k_value, k_logits, k_grads), batch[1])


def test_the_interpreter_is_used_only_when_compiling_for_a_cpu():
    cpu_mesh = jax.make_mesh((1,), ('data',))
    with attention_kernels._placed_on(cpu_mesh):
        assert attention_kernels._interpret()

    class FakeDevice:  # A compile target's device, as a topology description gives it.
        def __init__(self, platform):
            self.platform = platform

    class FakeMesh:
        def __init__(self, platform):
            self.devices = np.array([FakeDevice(platform)])

    for platform in ('tpu', 'cuda', 'gpu'):
        with attention_kernels._placed_on(FakeMesh(platform)):
            assert not attention_kernels._interpret()
            assert attention_kernels.resolve(
                'auto', ctx_len=512, head_dim=64, matmul_dtype=jnp.bfloat16
            ) == ('splash' if platform == 'tpu' else 'cudnn')
    # auto falls back to xla where its kernel cannot compute the shape, dtype or dropout.
    assert attention_kernels.resolve('auto', 'tpu', ctx_len=96) == 'xla'
    assert attention_kernels.resolve('auto', 'gpu', matmul_dtype=jnp.float32) == 'xla'
    assert attention_kernels.resolve('auto', 'gpu', dropout=0.1) == 'xla'


@pytest.mark.slow
def test_attention_dropout_defaults_to_dropout_and_at_0_the_kernels_train():
    cfg = dataclasses.replace(GQA, ctx_len=32, dropout=0.3, attention_impl='xla')
    assert cfg.attention_dropout_rate == 0.3  # -1: the same as dropout, the original's function.
    params = nnx.state(Thinker(cfg, rngs=nnx.Rngs(1)))
    batch = packed_batch(32, cfg.vocab_size)
    same = dataclasses.replace(cfg, attention_dropout=0.3)
    np.testing.assert_array_equal(
        loss_and_grads(cfg, params, *batch, deterministic=False)[1],
        loss_and_grads(same, params, *batch, deterministic=False)[1],
    )
    # attention_dropout=0: the residual dropout still applies, and a kernel trains the same
    # function as the explicit path, mask for mask.
    no_attention = dataclasses.replace(cfg, attention_dropout=0.0)
    trained = loss_and_grads(no_attention, params, *batch, deterministic=False)
    clean = loss_and_grads(no_attention, params, *batch, deterministic=True)
    assert float(jnp.max(jnp.abs(trained[1] - clean[1]))) > 1e-2
    kernel = loss_and_grads(
        dataclasses.replace(no_attention, attention_impl='pallas'),
        params,
        *batch,
        deterministic=False,
    )
    real = np.asarray(batch[1]) > 0
    np.testing.assert_allclose(
        np.asarray(kernel[1])[real], np.asarray(trained[1])[real], atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    'fields, message',
    [
        (dict(attention_impl='flash'), "attention_impl 'flash' must be one of auto, xla, cudnn"),
        (dict(attention_impl='splash', ctx_len=96), 'splash needs ctx_len a multiple of 128'),
        (dict(attention_impl='pallas', ctx_len=40), 'pallas needs ctx_len a multiple of 16'),
        (
            dict(attention_impl='pallas', dropout=0.1),
            'attention_impl pallas computes no dropout on the attention probabilities',
        ),
        (dict(attention_impl='cudnn', dropout=0.0), 'cudnn needs bfloat16 operands'),
        (dict(attention_dropout=1.5), 'attention_dropout (1.5) must be in [0, 1)'),
    ],
)
def test_impossible_kernel_settings_are_one_line(fields, message):
    with pytest.raises(
        ValueError, match=message.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')
    ):
        dataclasses.replace(ThinkerConfig(), **fields).validate()


def test_a_kernel_for_another_platform_is_refused_before_anything_runs():
    cudnn = ThinkerConfig(dtype='bfloat16', dropout=0.0, attention_impl='cudnn')
    cudnn.validate()
    with pytest.raises(UserError, match='attention_impl cudnn runs on GPU, not on CPU'):
        config_checks.check_platform(cudnn, 'cpu')
    config_checks.check_platform(cudnn, 'gpu')
    with pytest.raises(UserError, match='splash runs on TPU or CPU, not on GPU'):
        config_checks.check_platform(dataclasses.replace(cudnn, attention_impl='splash'), 'gpu')
    # auto is each platform's own choice, so it runs everywhere.
    for platform in ('cpu', 'gpu', 'tpu'):
        config_checks.check_platform(dataclasses.replace(cudnn, attention_impl='auto'), platform)
        assert attention_kernels.resolve('auto', platform) in attention_kernels.PLATFORMS
