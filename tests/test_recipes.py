"""Recipes for a time budget: a schedule fitted to schedule_seconds, an average of the params
(ema_decay) and z-loss (z_loss_weight)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muomni_jax
from muomni_jax.errors import UserError
from muomni_jax.model import lm_loss
from muomni_jax.training import run_plan, schedule_fit, steps, train
from tests.support.checkpoints import one_device_mesh, saved_state
from tests.support.clock import Clock
from tests.support.configs import small_config
from tests.support.logs import log_without_timing
from tests.support.trees import assert_trees_equal

# ------------------------------------------------------------------------------------------
# z-loss


def _loss_inputs(seed=0, b=2, t=8, d=16, v=50):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(keys[0], (b, t, d))
    kernel = jax.random.normal(keys[1], (d, v)) * 0.5
    targets = jax.random.randint(keys[2], (b, t), 0, v)
    weights = (jax.random.uniform(keys[3], (b, t)) > 0.2).astype(jnp.float32)
    return hidden, kernel, targets, weights


def _plain_objective(hidden, kernel, targets, weights, z_loss_weight):
    """The reference: materialised logits, optax's cross-entropy, and z-loss written out."""
    logits = hidden @ kernel
    ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    return ce + z_loss_weight * jnp.sum(weights * lse**2)


@pytest.mark.parametrize('z_loss_weight', [0.0, 1e-4, 0.1])
def test_fused_z_loss_value_and_gradients_equal_a_plain_reference(z_loss_weight):
    hidden, kernel, targets, weights = _loss_inputs()
    fused = lambda h, k, w: lm_loss.chunked_cross_entropy(h, k, targets, w, 4, z_loss_weight)[0]
    plain = lambda h, k, w: _plain_objective(h, k, targets, w, z_loss_weight)
    value, grads = jax.value_and_grad(fused, argnums=(0, 1, 2))(hidden, kernel, weights)
    expected, expected_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(hidden, kernel, weights)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The z term is visible: its gradient is not the plain cross-entropy's.
    if z_loss_weight >= 0.1:
        ce_grad = jax.grad(lambda h: _plain_objective(h, kernel, targets, weights, 0.0))(hidden)
        assert not np.allclose(grads[0], ce_grad, rtol=1e-3)


def test_the_batch_loss_reports_cross_entropy_and_the_z_sum_apart_from_its_objective():
    """Metrics stay the cross-entropy (the loss and perplexity mean what they did); the
    objective the gradients follow adds z_loss_weight * z_sum. Both paths agree."""
    config = small_config('unused', 'unused', z_loss_weight=0.01)
    setup = steps.make_train_setup(run_plan.resolve(config), one_device_mesh(), 1)
    rng = np.random.default_rng(0)
    batch = {
        'inputs': rng.integers(0, 256, (4, 32)),
        'targets': rng.integers(0, 256, (4, 32)),
        'segment_ids': np.ones((4, 32), np.int32),
        'positions': np.tile(np.arange(32), (4, 1)),
        'weights': np.ones((4, 32), np.float32),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    results = {}
    for chunk in (0, 64):
        objective, sums = lm_loss.batch_loss(
            setup.state.params, batch, jax.random.key(0), setup.graphdef, True, chunk, 0.01
        )
        results[chunk] = float(objective), {k: float(v) for k, v in sums.items()}
    (objective, sums), (fused_objective, fused_sums) = results[0], results[64]
    assert objective == pytest.approx(sums['loss_sum'] + 0.01 * sums['z_sum'], rel=1e-6)
    assert sums['z_sum'] > 0 and sums['weight_sum'] == 4 * 32
    assert fused_objective == pytest.approx(objective, rel=1e-5)
    for key in sums:
        assert fused_sums[key] == pytest.approx(sums[key], rel=1e-5)
    plain_ce = lm_loss.eval_step(setup.state.params, batch, graphdef=setup.graphdef)
    assert float(plain_ce['loss_sum']) == pytest.approx(sums['loss_sum'], rel=1e-6)


# ------------------------------------------------------------------------------------------
# The moving average of the params


def test_the_average_equals_a_numpy_recurrence_over_the_same_updates():
    decay = 0.8
    config = small_config('unused', 'unused', ema_decay=decay, learning_rate=1e-2, warmup_steps=0)
    setup = steps.make_train_setup(run_plan.resolve(config), one_device_mesh(), 1)
    state = setup.state
    assert isinstance(state, steps.AveragedTrainState)
    average = jax.tree.map(np.asarray, jax.device_get(state.params))
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = {
            'inputs': rng.integers(0, 256, (8, 32)),
            'targets': rng.integers(0, 256, (8, 32)),
            'segment_ids': np.ones((8, 32), np.int32),
            'positions': np.tile(np.arange(32), (8, 1)),
            'weights': np.ones((8, 32), np.float32),
        }
        state, _ = setup.train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        params = jax.device_get(state.params)
        average = jax.tree.map(
            lambda e, p: decay * e + (1 - decay) * np.asarray(p), average, params
        )
    got = jax.device_get(state.ema_params)
    for want, have in zip(jax.tree.leaves(average), jax.tree.leaves(got)):
        np.testing.assert_allclose(have, want, rtol=2e-6, atol=1e-7)
    # The average lags the params: it is not a copy of them.
    assert not all(
        np.array_equal(a, p) for a, p in zip(jax.tree.leaves(got), jax.tree.leaves(params))
    )


def _assert_leaves_equal(loaded, saved):
    """load()'s nnx.State against the saved tree as read back (plain dicts), leaf by leaf."""
    loaded, saved = jax.tree.leaves(loaded), jax.tree.leaves(saved)
    assert len(loaded) == len(saved)
    for a, b in zip(loaded, saved):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow  # Trainings, and restores with and without the average.
def test_a_run_with_an_average_validates_both_and_loads_the_average(
    tmp_path, corpus_sample, capsys
):
    save_dir = tmp_path / 'ema'
    summary = train.train_and_evaluate(small_config(save_dir, corpus_sample, ema_decay=0.5))
    out = capsys.readouterr().out
    assert '| EMA loss=' in out
    final = log_without_timing(save_dir)[-1]
    assert (
        final['val_ema_loss'] != final['val_loss']
        and summary['val_ema_loss'] == final['val_ema_loss']
    )
    meta = json.loads((save_dir / '6' / 'meta' / 'metadata').read_text())
    assert meta['ema'] is True
    state = saved_state(save_dir, 6)
    average = muomni_jax.load(str(save_dir))  # auto: the average, as the run asked for.
    params = muomni_jax.load(str(save_dir), weights='params')
    _assert_leaves_equal(average.params, state['ema_params'])
    _assert_leaves_equal(params.params, state['params'])
    # Turned off on resume: the average is dropped and training goes on from the params.
    resumed = tmp_path / 'resumed'
    shutil.copytree(save_dir, resumed)
    train.train_and_evaluate(small_config(resumed, corpus_sample, max_steps=8, ema_decay=0.0))
    assert not json.loads((resumed / '8' / 'meta' / 'metadata').read_text())['ema']
    with pytest.raises(UserError, match='holds no moving average'):
        muomni_jax.load(str(resumed), weights='ema')
    # Turned on over a checkpoint without it: the average starts at the restored params.
    plain = tmp_path / 'plain'
    train.train_and_evaluate(small_config(plain, corpus_sample))
    train.train_and_evaluate(small_config(plain, corpus_sample, max_steps=7, ema_decay=0.5))
    assert 'val_ema_loss' in log_without_timing(plain)[-1]


# ------------------------------------------------------------------------------------------
# The schedule fitted to a time budget


def test_the_fitted_length_fits_the_budget_with_its_validations():
    fit = lambda **kw: schedule_fit.fitted_total_steps(
        **{
            'budget_s': 100,
            'elapsed_s': 10,
            'compile_s': 5,
            'step_s': 1.0,
            'done_steps': 11,
            'upper_steps': 10_000,
            'eval_every': 30,
            'eval_batches': 0,
            **kw,
        }
    )
    assert fit() == 11 + 85
    # 9 eval batches every 30 steps cost 9/3 = 3 step-times per 30 steps: 10% more per step.
    assert fit(eval_batches=9) == 11 + 77
    assert fit(upper_steps=50) == 50  # The data (or max_steps) ends first.
    assert fit(budget_s=12) == 11  # Already over budget: ends at once.


def _budget_config(save_dir, corpus_sample, **extra):
    # Steps 2-5 are timed (cosine: within the 5 warmup steps): 7 s in, with 5 s of compiling.
    # Left: 20 - 7 - 5 = 8 s of 0.5 s steps, each 1 + (2 eval batches / 3) / 3 of a step with
    # validations: 13 more steps, 18 in all.
    fields = dict(
        max_steps=0,
        num_epochs=1,
        warmup_steps=5,
        schedule_seconds=20,
        log_every=1,
        eval_every=3,
        save_every=6,
    )
    return small_config(save_dir, corpus_sample, **{**fields, **extra})


@pytest.mark.slow  # Three trainings.
def test_a_time_budgeted_run_decays_by_its_last_step_and_resumes_bitwise(
    monkeypatch, tmp_path, corpus_sample, capsys
):
    # The loop starts at 0, the first step (compiling) ends at 5 s, and every later step takes
    # 0.5 s.
    clock = Clock([0.0, 5.0, 7.0])
    monkeypatch.setattr(schedule_fit, 'now', clock)
    fitted_dir = tmp_path / 'fitted'
    config = _budget_config(fitted_dir, corpus_sample)
    train.train_and_evaluate(config)
    out = capsys.readouterr().out
    assert clock.readings == 3
    assert (
        'Schedule fitted to schedule_seconds=20: 0.500 s/step over steps 2-5, 5.0 s to '
        'compile -> 18 steps (the decay ends at the budget).'
    ) in out
    assert '[Step 18/18]' in out and '→ Final validation' in out
    log = log_without_timing(fitted_dir)
    assert max(r['step'] for r in log) == 18
    schedule = steps.learning_rate_schedule(run_plan.resolve(config).optimizer, 18)
    # Each step logs the rate of its update; the last update's is the schedule's one before
    # its end, which is min_lr_ratio of the peak.
    assert [r['lr'] for r in log if 'lr' in r] == [float(schedule(s - 1)) for s in range(1, 19)]
    assert float(schedule(18)) == pytest.approx(config.learning_rate * config.min_lr_ratio)
    assert json.loads((fitted_dir / '6' / 'meta' / 'metadata').read_text())['schedule_steps'] == 18

    # An uninterrupted run told its length from the start computes the same run: the steps
    # before the fit used the rates the fitted schedule gives them.
    told_dir = tmp_path / 'told'
    train.train_and_evaluate(
        _budget_config(told_dir, corpus_sample, schedule_seconds=0, max_steps=18)
    )
    assert log_without_timing(told_dir) == log

    # Resumed from step 6, the run keeps its recorded length and never times a step again.
    resumed = tmp_path / 'resumed'
    shutil.copytree(fitted_dir, resumed)
    for step in ('12', '18'):
        shutil.rmtree(resumed / step)
    monkeypatch.setattr(schedule_fit, 'now', lambda: pytest.fail('the length was fitted again'))
    train.train_and_evaluate(_budget_config(resumed, corpus_sample))
    out = capsys.readouterr().out
    assert 'Schedule: 18 steps, as fitted to schedule_seconds when this run began.' in out
    assert log_without_timing(resumed) == log
    assert_trees_equal(saved_state(fitted_dir, 18), saved_state(resumed, 18))


def test_the_fit_step_stays_within_cosine_warmup():
    def optimizer(**fields):
        return run_plan.resolve(small_config('unused', 'unused', **fields)).optimizer

    cosine = optimizer(warmup_steps=5, lr_schedule='cosine')
    assert schedule_fit.fit_step(cosine, 0, 1000) == 5
    long_warmup = optimizer(warmup_steps=100, lr_schedule='cosine')
    assert schedule_fit.fit_step(long_warmup, 0, 1000) == 1 + schedule_fit.MEASURED_STEPS
    wsd = optimizer(warmup_steps=2, lr_schedule='wsd')
    assert schedule_fit.fit_step(wsd, 40, 1000) == 41 + schedule_fit.MEASURED_STEPS
    assert schedule_fit.fit_step(wsd, 0, 4) == 4
