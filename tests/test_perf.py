"""The performance work: FLOP count, benchmark, live MFU, and each fast path equal to the plain
one (fused cross-entropy, fused attention, remat, device prefetch). No timing assertions."""

import dataclasses
import functools
import inspect
import json
import os
import pathlib
import resource
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import measurements
from benchmarks import original as original_bench
from muomni_jax.model import flops, lm_loss
from muomni_jax.model.thinker import Thinker, ThinkerConfig, abstract_model
from muomni_jax.training import device_batches, periodic_actions, steps, train
from tests.support.clock import Clock
from tests.support.configs import PEAK_FLOPS, small_config
from tests.support.environment import REPO
from tests.support.processes import run_module
from tests.support.train_states import ONE_LAYER, new_state, random_batch


def test_flops_per_token_matches_a_hand_count():
    cfg = ThinkerConfig(
        vocab_size=100,
        n_layers=2,
        d_model=8,
        n_heads=2,
        d_ff=16,
        ctx_len=10,
        use_gqa=True,
        kv_groups=1,
        use_swiglu=True,
    )
    # Per layer: q 8x8, k and v 8x4 each (one group of head dim 4), o 8x8; gate, up 8x16, down
    # 16x8: 64 + 32 + 32 + 64 + 384 = 576 weights; two layers 1152. lm_head 8 x 100 = 800.
    # Causal attention: 6 * layers * d * (T + 1) = 6 * 2 * 8 * 11 = 1056.
    got = flops.flops_per_token(cfg)
    assert got == {
        'blocks': 6 * 1152,
        'attention': 1056,
        'lm_head': 6 * 800,
        'total': 6 * 1152 + 1056 + 6 * 800,
    }
    # MoE counts only the top-k experts a token runs through, plus the router.
    moe = dataclasses.replace(
        cfg, use_moe=True, num_experts=4, num_experts_per_tok=2, use_swiglu=False
    )
    assert flops.matmul_params(moe)['blocks'] == 2 * (192 + 2 * 256 + 8 * 4)


def test_peak_table_by_device_kind():
    gpu = lambda kind: types.SimpleNamespace(platform='gpu', device_kind=kind)
    assert flops.device_peak_flops(gpu('NVIDIA H100 80GB HBM3')) == 989e12
    assert flops.device_peak_flops(gpu('NVIDIA H100 PCIe')) == 756e12
    assert (
        flops.device_peak_flops(types.SimpleNamespace(platform='tpu', device_kind='TPU v4'))
        == 275e12
    )
    assert flops.device_peak_flops(gpu('Some Future GPU')) is None
    assert flops.device_peak_flops(types.SimpleNamespace(platform='cpu', device_kind='cpu')) is None
    peak, source = flops.system_peak_flops(5e9)
    assert peak == 5e9 * jax.device_count() and 'config' in source
    assert flops.system_peak_flops(measure_cpu=False) == (None, 'none (CPU peak not measured)')


def test_the_cpu_peak_is_the_best_of_its_timed_matmuls(monkeypatch):
    """The best, not the median: load can only slow a matmul down, and a peak read low makes
    every MFU high. A fake clock times the five runs after the warm-up."""
    durations = [0.5, 0.25, 0.75, 0.4, 0.3]
    times = [t for i, d in enumerate(durations) for t in (10.0 * i, 10.0 * i + d)]
    monkeypatch.setattr(flops, 'time', Clock(times, step=0.0))
    peak, source = flops.system_peak_flops(measure_cpu=True, cpu_size=64)
    # Per process, not per virtual device: the eight share this process's cores.
    assert peak == 2 * 64**3 / 0.25
    assert source == 'best float32 64^2 matmul'


def _plain_loss(hidden, kernel, targets, weights):
    logits = jnp.einsum('btd,dv->btv', hidden, kernel)
    return lm_loss.cross_entropy(logits, targets, weights)[0]


@pytest.mark.parametrize('chunk_tokens', [1, 12, 40, 10_000])
def test_fused_cross_entropy_equals_plain_values_and_gradients(chunk_tokens):
    rng = np.random.default_rng(0)
    b, t, d, v = 4, 10, 16, 50
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((d, v)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32)
    fused = lambda h, k, w: 2.5 * lm_loss.chunked_cross_entropy(h, k, targets, w, chunk_tokens)[0]
    plain = lambda h, k, w: 2.5 * _plain_loss(h, k, targets, w)
    # The cotangent 2.5 checks that the backward pass scales the stored gradients.
    value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(hidden, kernel, weights)
    want_value, want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(hidden, kernel, weights)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Forward alone (evaluation) takes the gradient-free path and gives the same sums.
    loss_sum, weight_sum = lm_loss.chunked_cross_entropy(
        hidden, kernel, targets, weights, chunk_tokens
    )
    np.testing.assert_allclose(loss_sum, want_value / 2.5, rtol=1e-6)
    assert float(weight_sum) == float(jnp.sum(weights))


def test_time_chunk_divides_the_sequence():
    assert lm_loss.time_chunk(16, 512, 1024) == 64
    assert lm_loss.time_chunk(4, 10, 12) == 2  # At most 3 positions; 3 does not divide 10.
    assert lm_loss.time_chunk(64, 16, 8) == 1


@pytest.mark.slow  # Each fast path below compiles both paths' gradients: seconds apiece.
def test_train_step_with_fused_loss_equals_plain():
    config = small_config('/tmp/unused', '/tmp/unused')
    state, graphdef, tx = new_state(config)
    step = lambda chunk: jax.jit(
        functools.partial(
            steps.train_step,
            graphdef=graphdef,
            tx=tx,
            accumulation_steps=2,
            deterministic=True,
            loss_chunk_tokens=chunk,
        )
    )
    batch = random_batch()
    plain, m_plain = step(0)(state, batch)
    fused, m_fused = step(32)(state, batch)
    np.testing.assert_allclose(m_fused['loss_sum'], m_plain['loss_sum'], rtol=1e-5)
    np.testing.assert_allclose(m_fused['grad_norm'], m_plain['grad_norm'], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(fused.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    evaluated = jax.jit(
        functools.partial(lm_loss.eval_step, graphdef=graphdef, loss_chunk_tokens=32)
    )(state.params, batch)
    np.testing.assert_allclose(evaluated['loss_sum'], m_plain['loss_sum'], rtol=1e-5)


def _first_of_batch_loss(params, *, batch, graphdef, deterministic, loss_chunk_tokens):
    """lm_loss.batch_loss's loss, for jax.value_and_grad."""
    return lm_loss.batch_loss(
        params,
        batch,
        jax.random.PRNGKey(1),
        graphdef,
        deterministic=deterministic,
        loss_chunk_tokens=loss_chunk_tokens,
    )[0]


# The plain path without dropout (fused attention), and the fused loss with dropout (manual).
@pytest.mark.slow
@pytest.mark.parametrize('loss_chunk_tokens, dropout', [(0, 0.0), (32, 0.1)])
def test_bfloat16_matmuls_keep_float32_state_and_stay_close_to_float32(loss_chunk_tokens, dropout):
    """matmul_dtype='bfloat16': every matmul's operands in bfloat16, accumulated in float32; the
    params, the residual stream, the loss and the gradients stay float32 and near the float32
    run (bfloat16 keeps 8 bits of mantissa: relative errors of about 1e-2)."""
    batch = random_batch()
    results = {}
    for matmul_dtype in ('float32', 'bfloat16'):
        cfg = dataclasses.replace(ONE_LAYER, matmul_dtype=matmul_dtype, dropout=dropout)
        graphdef, params = _init(cfg)
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(
            batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions']
        )
        assert hidden.dtype == jnp.float32
        loss = functools.partial(
            _first_of_batch_loss,
            batch=batch,
            graphdef=graphdef,
            deterministic=dropout == 0,
            loss_chunk_tokens=loss_chunk_tokens,
        )
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
        results[matmul_dtype] = value, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
    (value32, grads32), (value16, grads16) = results['float32'], results['bfloat16']
    assert float(value16) != float(value32)  # The option is on...
    np.testing.assert_allclose(value16, value32, rtol=1e-2)  # ...and close.
    cosine = jnp.dot(grads16, grads32) / jnp.linalg.norm(grads16) / jnp.linalg.norm(grads32)
    assert float(cosine) > 0.999


def _init(cfg):
    """(graphdef, params) of the init itself, whose gradients here are O(1-10), the scale the
    tolerances below are set for; compiled, not op by op."""
    graphdef, _ = abstract_model(cfg)
    params = jax.jit(lambda: nnx.split(Thinker(cfg, rngs=nnx.Rngs(0)))[1])()
    return graphdef, params


def _loss_and_grads(cfg, deterministic, tokens, segment_ids):
    graphdef, params = _init(cfg)

    def loss(p):
        logits = nnx.merge(graphdef, p)(
            tokens, segment_ids=segment_ids, deterministic=deterministic, rngs=nnx.Rngs(dropout=1)
        )
        return jnp.sum(jnp.sin(logits))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
@pytest.mark.parametrize('use_gqa', [True, False])
def test_fused_attention_equals_the_manual_path(use_gqa):
    # A dropout rate of 1e-12 keeps every value and scales by exactly 1 in float32, so the
    # non-deterministic call computes the same function through the manual attention path.
    # One layer: the attention paths are per layer; more would only add compile time.
    cfg = ThinkerConfig(
        vocab_size=64,
        n_layers=1,
        d_model=32,
        n_heads=4,
        d_ff=48,
        ctx_len=16,
        kv_groups=2,
        use_gqa=use_gqa,
        dropout=1e-12,
    )
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1, 2, 0, 0]], 2, 0).repeat(4, 1), jnp.int32)
    fast_loss, fast_grads = _loss_and_grads(cfg, True, tokens, segment_ids)
    manual_loss, manual_grads = _loss_and_grads(cfg, False, tokens, segment_ids)
    np.testing.assert_allclose(fast_loss, manual_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(manual_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('dropout', [0.0, 0.3])
def test_remat_gives_equal_gradients(dropout):
    cfg = ThinkerConfig(
        vocab_size=64, n_layers=1, d_model=32, n_heads=4, d_ff=48, ctx_len=16, dropout=dropout
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    segment_ids = jnp.ones((2, 16), jnp.int32)
    loss, grads = _loss_and_grads(cfg, dropout == 0, tokens, segment_ids)
    remat_loss, remat_grads = _loss_and_grads(
        dataclasses.replace(cfg, remat=True), dropout == 0, tokens, segment_ids
    )
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        # Gradients here are O(1-10); recomputation may round a near-zero one differently by
        # ~1e-6 (seen on this machine's XLA CPU before and after issue 11), as in the scan test.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('remat', [False, True])
def test_scan_over_layers_equals_the_loop(remat):
    cfg = ThinkerConfig(
        vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=48, ctx_len=16, dropout=0.0
    )  # Two layers: the fewest a scan over layers needs.
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], 2, 0), jnp.int32)
    loss, grads = _loss_and_grads(cfg, True, tokens, segment_ids)
    scanned = dataclasses.replace(cfg, scan_layers=True, remat=remat)
    scan_loss, scan_grads = _loss_and_grads(scanned, True, tokens, segment_ids)
    # Same parameter names and shapes: checkpoints do not depend on the flag.
    assert jax.tree.structure(grads) == jax.tree.structure(scan_grads)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(scan_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_scan_over_layers_applies_dropout_and_remat_keeps_its_masks():
    cfg = ThinkerConfig(
        vocab_size=64,
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_ff=48,
        ctx_len=16,
        dropout=0.3,
        scan_layers=True,
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    segment_ids = jnp.ones((2, 16), jnp.int32)
    clean, _ = _loss_and_grads(cfg, True, tokens, segment_ids)
    dropped, grads = _loss_and_grads(cfg, False, tokens, segment_ids)
    remat_loss, remat_grads = _loss_and_grads(
        dataclasses.replace(cfg, remat=True), False, tokens, segment_ids
    )
    assert abs(float(clean) - float(dropped)) > 1e-3
    np.testing.assert_allclose(remat_loss, dropped, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # Gradients here are O(10).


def test_prefetch_keeps_order_and_runs_ahead():
    made = []

    def source():
        for i in range(5):
            made.append(i)
            yield i

    stream = device_batches.prefetch(source(), 2)
    assert next(stream) == 0 and made == [0, 1, 2]  # Two items made ahead of the consumer.
    assert list(stream) == [1, 2, 3, 4]
    assert list(device_batches.prefetch(iter([]), 2)) == []


# Training FLOPs per token of small_config's model (vocab 256, 2 layers, d_model 64, 4 heads of
# 16 in 2 kv groups, SwiGLU d_ff 128, ctx 32), counted by hand: per layer q and o 64x64, k and v
# 64x32, gate, up and down 64x128: 36,864 weights, 73,728 in two layers; lm_head 64x256 =
# 16,384; 6 * (73,728 + 16,384) = 540,672, plus causal attention 6 * 2 * 64 * (32 + 1) = 25,344.
SMALL_FLOPS_PER_TOKEN = 566_016


def _mfu_records(save_dir):
    with open(save_dir / 'training_log.json') as f:
        return [r for r in json.load(f) if 'loss' in r]


def test_training_log_carries_tokens_per_s_and_mfu(trained_run):
    """The MFU of a log line is the model's FLOPs per second over the peak of all devices: with
    the peak stated (PEAK_FLOPS per device; the session's run has 8), mfu / tokens_per_s
    is FLOPs per token over that peak, whatever the speed."""
    save_dir = pathlib.Path(trained_run[0])
    records = _mfu_records(save_dir)
    assert [r['step'] for r in records] == [2, 4, 6]
    for record in records:
        assert record['mfu'] == pytest.approx(
            record['tokens_per_s'] * SMALL_FLOPS_PER_TOKEN / (PEAK_FLOPS * 8), rel=1e-9
        )


def test_the_bench_mfu_is_the_median_of_per_step_ratios():
    """On CPU the peak is measured before each timed step; the MFU pairs each step with its
    peak and takes the median, so a load spike on one pair does not move it."""
    figures = measurements.TrainFigures(
        first_step_s=9.0, step_s=0.5, step_s_all=[0.5, 0.25, 1.0], tokens_per_s=0.0, loss=0.0
    )
    peak = measurements._peak_and_mfu(
        None, figures, [1e9, 4e9, 1e9], flops_per_step=1e9, peak_size=64
    )
    # Per-step ratios 1e9 / t / p: 2.0, 1.0, 1.0.
    assert figures.mfu == 1.0 and figures.flops_per_s == 1e9 / 0.5
    assert (peak.flops_per_s, peak.all) == (1e9, [1e9, 4e9, 1e9])
    assert peak.source == 'best float32 64^2 matmul before each step'
    # A stated peak (or a table's) is one figure for every step.
    stated = types.SimpleNamespace(peak_flops_per_device=2e9)
    peak = measurements._peak_and_mfu(stated, figures, [], 1e9, 64)
    assert figures.mfu == 1e9 / 0.5 / (2e9 * jax.device_count())
    assert peak.source == 'config peak_flops_per_device'


@pytest.mark.slow  # A training of its own.
def test_live_mfu_divides_by_the_measured_cpu_peak(monkeypatch, tmp_path, corpus_sample):
    """With no peak stated, a CPU run measures it with flops.measure_matmul_peak at
    CPU_PEAK_SIZE, launch.bench's default --peak_size (test_bench_figures_on_a_fake_clock): the
    log's MFU and the bench's are the same ratio to the same measurement."""
    sizes = []
    monkeypatch.setattr(
        flops,
        'measure_matmul_peak',
        lambda size=flops.CPU_PEAK_SIZE, *a, **k: sizes.append(size) or 3e9,
    )
    monkeypatch.setattr(periodic_actions, 'PEAK_EVERY_S', 1e9)  # However loaded the machine.
    config = small_config(
        tmp_path / 'run',
        corpus_sample,
        max_steps=2,
        log_every=1,
        eval_every=100,
        save_every=100,
        peak_flops_per_device=0.0,
    )
    train.train_and_evaluate(config)
    assert sizes == [flops.CPU_PEAK_SIZE]  # Once at the start; again only after a minute.
    for record in _mfu_records(tmp_path / 'run'):
        assert record['mfu'] == pytest.approx(
            record['tokens_per_s'] * SMALL_FLOPS_PER_TOKEN / 3e9, rel=1e-9
        )
    flag_default = next(
        line for line in open(os.path.join(REPO, 'launch', 'bench.py')) if "'peak_size'" in line
    )
    assert f', {flops.CPU_PEAK_SIZE}, ' in flag_default
    assert (
        inspect.signature(measurements.run_benchmark).parameters['peak_size'].default
        == flops.CPU_PEAK_SIZE
    )


@pytest.mark.slow  # Every stage of the bench, each compiling its own steps.
def test_bench_figures_on_a_fake_clock(monkeypatch, tmp_path, corpus_sample):
    """launch.bench's figures, each from a known time: every timed stretch takes 0.5 s on the
    fake clock, and the peak measured before each timed step is 3 GFLOP/s."""
    clock = Clock(step=0.5)
    monkeypatch.setattr(measurements, 'time', clock)
    monkeypatch.setattr(original_bench, 'time', clock)
    sizes = []
    monkeypatch.setattr(
        flops,
        'measure_matmul_peak',
        lambda size=flops.CPU_PEAK_SIZE, *a, **k: sizes.append(size) or 3e9,
    )
    config = small_config(
        tmp_path / 'run',
        corpus_sample,
        n_layers=1,
        d_model=32,
        d_ff=64,
        ctx_len=16,
        batch_size=8,
        peak_flops_per_device=0.0,
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = measurements.run_benchmark(
        config,
        warmup=0,
        repeats=1,
        pipeline_batches=3,
        checkpoint_repeats=2,
        decode_tokens=2,
        peak_size=128,
        log=lambda line: None,
    )
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens_per_step = 8 * 16
    # By hand: per token 6 * (9,216 block weights (as in test_bench_runs_end_to_end: q and o
    # 32x32, k and v 32x16, SwiGLU 3 x 32x64) + 8,192 of lm_head) + attention 6 * 32 * 17.
    flops_per_step = (6 * (9_216 + 8_192) + 6 * 32 * 17) * tokens_per_step
    train_figures, pipeline = result.train, result.input_pipeline
    assert result.model.flops_per_step == flops_per_step
    assert (train_figures.first_step_s, train_figures.step_s_all) == (0.5, [0.5])
    assert train_figures.tokens_per_s == tokens_per_step / 0.5
    assert train_figures.flops_per_s == flops_per_step / 0.5
    assert sizes == [128]  # One timed step, one peak right before it.
    assert (result.peak.flops_per_s, result.peak.all) == (3e9, [3e9])
    assert train_figures.mfu == pytest.approx(flops_per_step / 0.5 / 3e9, rel=1e-12)
    assert (pipeline.cache_build_s, pipeline.cache_open_s) == (0.5, 0.5)
    assert pipeline.cache_build_tokens_per_s == pipeline.corpus_tokens / 0.5
    # Three batches: the first pays the epoch's permutation and is left out.
    assert pipeline.batches_measured == 2
    assert pipeline.batch_tokens_per_s == 2 * tokens_per_step / 0.5
    assert pipeline.ratio_to_training == 2.0
    # save() returns after one tick, the write is done after two.
    assert result.checkpoint.save_blocking_s_all == [0.5, 0.5]
    assert (result.checkpoint.save_total_s, result.checkpoint.blocking_over_step) == (1.0, 1.0)
    assert result.decode.tokens_per_s == {1: 1 * 2 / 0.5, 8: 8 * 2 / 0.5}
    original = result.original
    assert original.available and (original.step_s, original.ours_step_s) == ([0.5], [0.5])
    assert original.speedup == 1.0
    assert rss_before <= result.peak_host_memory_mb <= rss_after  # Megabytes, this process's.


@pytest.mark.slow
def test_bench_runs_end_to_end_and_writes_json(tmp_path, corpus_sample):
    """launch.bench's CLI smoke run on one device, as a user has: the table and a JSON with
    every section. The figures themselves are checked on a fake clock above."""
    output = tmp_path / 'bench.json'
    args = [
        '--config.vocab_size=256',
        '--config.n_layers=1',
        '--config.d_model=32',
        '--config.n_heads=4',
        '--config.d_ff=64',
        '--config.ctx_len=16',
        '--config.batch_size=4',
        '--config.tokenizer_sample_size=20000',
        f'--config.data_path={corpus_sample}',
        f'--config.save_dir={tmp_path / "run"}',
        '--repeats=1',
        '--warmup=0',
        '--pipeline_batches=3',
        '--decode_tokens=2',
        '--peak_size=128',
        '--compare_original=false',
        f'--output={output}',
    ]
    run = run_module(
        'launch.bench',
        f'--config={os.path.join(REPO, "configs/tiny.py")}',
        *args,
        cwd=str(tmp_path),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'MFU' in run.stdout and 'tokens/s' in run.stdout
    assert 'token cache build' in run.stdout and 'batches from cache' in run.stdout
    assert 'original (PyTorch) step' in run.stdout and 'not compared' in run.stdout
    assert f'Wrote {output}' in run.stdout
    result = json.loads(output.read_text())
    assert set(result) == {
        'conditions',
        'model',
        'input_pipeline',
        'train',
        'peak',
        'checkpoint',
        'decode',
        'original',
        'peak_host_memory_mb',
    }
    assert result['conditions']['num_devices'] == 1
    cfg = ThinkerConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=4, d_ff=64, ctx_len=16)
    assert result['model']['flops_per_token'] == flops.flops_per_token(cfg)
    # Embedding and lm_head, q/o 32 wide and k/v (two kv groups of 8) 16 wide, SwiGLU, norms.
    assert result['model']['params'] == 2 * 256 * 32 + 3 * 32 * 32 + 3 * 32 * 64 + 3 * 32
    assert len(result['train']['step_s_all']) == 1 and len(result['peak']['all']) == 1
    assert result['peak']['source'] == 'best float32 128^2 matmul before each step'
    pipeline = result['input_pipeline']
    assert pipeline['batches_measured'] == 2
    # uint16 ids plus an int64 offset per document (a few dozen tokens each).
    assert 2.0 < pipeline['cache_bytes_per_token'] < 3.0
    # The original's step beside ours is timed on the fake clock above; here the flag is off.
    assert result['original'] == {
        **result['original'],
        'available': False,
        'reason': '--compare_original=false',
    }
    # Two new tokens fit the 16-token context: decoding is measured at both batch sizes.
    assert result['decode']['available'] is True
    assert set(result['decode']['tokens_per_s']) == {'1', '8'}
