"""Learning-rate schedules and optimizers: warmup-cosine (the default), WSD, AdamW and Muon."""

import importlib
import json
import math

import jax
import numpy as np
import pytest

from muomni_jax.errors import UserError
from muomni_jax.model.thinker import ThinkerConfig, abstract_model
from muomni_jax.training import run_plan, steps, train
from tests.support.configs import small_config, tiny_config
from tests.support.logs import log_without_timing


def _config(**overrides):
    return tiny_config(
        **{'learning_rate': 1.0, 'warmup_steps': 10, 'min_lr_ratio': 0.1, **overrides}
    )


def _optimizer(**overrides) -> run_plan.OptimizerPlan:
    return run_plan.resolve(_config(**overrides)).optimizer


def test_cosine_and_wsd_rates_worked_out_by_hand():
    """schedule(c) is the rate of update c + 1 (learning_rate 1, warmup 10, floor 0.1)."""
    cosine = steps.learning_rate_schedule(_optimizer(), 100)
    assert float(cosine(0)) == 0.0
    assert float(cosine(5)) == pytest.approx(0.5)  # Halfway up the warmup.
    assert float(cosine(10)) == pytest.approx(1.0)  # The peak, right after warmup.
    # Halfway through the cosine's 90 counts: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2.
    assert float(cosine(55)) == pytest.approx(0.55)
    # The last update (count 99): 0.1 + 0.9 * (1 + cos(89 pi / 90)) / 2, just above the floor,
    # which count 100 reaches: the original's LambdaLR has the same offset.
    assert float(cosine(99)) == pytest.approx(0.1002741, abs=1e-6)
    assert float(cosine(100)) == pytest.approx(0.1)

    wsd = steps.learning_rate_schedule(_optimizer(lr_schedule='wsd', decay_fraction=0.2), 100)
    lr = np.array([float(wsd(count)) for count in range(100)])
    np.testing.assert_allclose(lr[:11], np.linspace(0, 1, 11), atol=1e-6)
    np.testing.assert_allclose(lr[10:81], 1.0)  # Stable until the last 20 updates.
    # Then down by 0.9 / 19 per update: the last update (count 99) is exactly at the floor.
    np.testing.assert_allclose(lr[80:], np.linspace(1, 0.1, 20), atol=1e-6)


def test_wsd_without_room_to_decay_holds_the_peak():
    # 12 updates, warmup 10, decay_fraction 0.1: the decay would start at count 11, the last.
    wsd = steps.learning_rate_schedule(_optimizer(lr_schedule='wsd', decay_fraction=0.1), 12)
    assert [round(float(wsd(c)), 6) for c in range(9, 12)] == [0.9, 1.0, 1.0]


LOGGED_RATES = {  # (lr_schedule, warmup_steps, max_steps): {step: the rate its log line shows}
    # learning_rate 1e-2, min_lr_ratio 0.1. Step k logs the rate of update k, which is
    # 1e-2 * (k - 1) / warmup during warmup (the original's LambdaLR).
    ('cosine', 4, 12): {
        1: 0.0,
        4: 7.5e-3,
        5: 1e-2,
        12: 1e-2 * (0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8))),
    },
    ('cosine', 20, 12): {1: 0.0, 12: 1e-2 * 11 / 20},  # Still warming up at its end.
    # Warmup 4, stable to count 16 (the last 20% of 20 steps decays), then 3 linear updates.
    ('wsd', 4, 20): {1: 0.0, 4: 7.5e-3, 5: 1e-2, 17: 1e-2, 18: 7e-3, 19: 4e-3, 20: 1e-3},
    ('wsd', 20, 12): {1: 0.0, 12: 1e-2 * 11 / 20},
}


@pytest.mark.slow  # Four short trainings.
@pytest.mark.parametrize('lr_schedule,warmup_steps,max_steps', list(LOGGED_RATES))
def test_the_logged_rate_at_the_edges_of_the_schedule(
    tmp_path, corpus_sample, capsys, lr_schedule, warmup_steps, max_steps
):
    config = small_config(
        tmp_path / 'run',
        corpus_sample,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        learning_rate=1e-2,
        min_lr_ratio=0.1,
        decay_fraction=0.2,
        log_every=1,
        eval_every=100,
        save_every=100,
    )
    train.train_and_evaluate(config)
    logged = {r['step']: r['lr'] for r in log_without_timing(tmp_path / 'run') if 'lr' in r}
    expected = LOGGED_RATES[lr_schedule, warmup_steps, max_steps]
    assert {step: logged[step] for step in expected} == pytest.approx(expected, abs=1e-9)
    note = (
        "Schedule: warmup_steps=20 fills this run's 12 steps, so the rate rises to 0.0055 "
        '(learning_rate 0.01) and never decays; for a warmup and a decay, lower '
        '--config.warmup_steps (e.g. 1).'
    )
    assert (note in capsys.readouterr().out) == (warmup_steps >= max_steps)


def _one_update(optimizer, params, grads):
    tx = steps.make_optimizer(optimizer, total_steps=10)
    # Compiled: Newton-Schulz op by op took seconds.
    return jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads)


@pytest.mark.slow  # Compiles both optimizers' updates.
def test_muon_orthogonalizes_the_block_matrices_and_adamw_updates_the_rest():
    model_config = ThinkerConfig(
        vocab_size=64, n_layers=1, d_model=32, n_heads=4, d_ff=64, ctx_len=16
    )
    _, abstract = abstract_model(model_config)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 100))
    params = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), abstract)
    grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), abstract)
    optimizer = _optimizer(optimizer='muon', warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9)
    muon = _one_update(optimizer, params, grads)
    adamw = _one_update(
        _optimizer(warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9), params, grads
    )
    leaves = jax.tree_util.tree_flatten_with_path(muon)[0]
    checked = set()
    for (path, update), adamw_update, grad in zip(
        leaves, jax.tree.leaves(adamw), jax.tree.leaves(grads)
    ):
        name = jax.tree_util.keystr(path)
        if steps.is_muon_matrix(path, update):
            # An orthogonalized update: singular values close together (Newton-Schulz leaves
            # them within about [0.6, 1.3] of each other), RMS 0.2.
            # In numpy: an SVD compiled per matrix shape took seconds.
            condition = lambda m: float(np.linalg.cond(np.asarray(m)))
            assert condition(update) < min(3.0, condition(grad)), name
            rms = float(np.sqrt(np.mean(np.asarray(update) ** 2)))
            assert rms == pytest.approx(0.2, rel=0.3), name
            checked.add('muon')
        else:
            # AdamW's first step, in numpy: the bias-corrected moments are g and g^2, so the
            # update is -lr * g / (|g| + eps), with lr 1 (no warmup), eps 1e-8 and no decay:
            # -sign(g) but for the tiniest gradients. The same with optimizer='adamw'.
            grad = np.asarray(grad)
            expected = -grad / (np.abs(grad) + 1e-8)
            np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-7, err_msg=name)
            np.testing.assert_allclose(adamw_update, expected, rtol=1e-5, atol=1e-7, err_msg=name)
            checked.add(name.split('[')[1])
    assert checked == {'muon', "'blocks']", "'lm_head']", "'norm']", "'tok_emb']"}


@pytest.mark.slow  # A training.
def test_muon_trains_and_a_resume_with_another_optimizer_is_refused(tmp_path, corpus_sample):
    config = small_config(
        tmp_path / 'run',
        corpus_sample,
        optimizer='muon',
        max_steps=4,
        log_every=1,
        eval_every=2,
        save_every=4,
        learning_rate=3e-3,
    )
    train.train_and_evaluate(config)
    log = json.loads((tmp_path / 'run' / 'training_log.json').read_text())
    losses = [r['loss'] for r in log if 'loss' in r]
    validation = [r['val_loss'] for r in log if 'val_loss' in r]
    assert len(losses) == 4 and len(validation) == 2
    assert losses[-1] < losses[0] and validation[1] < validation[0], log  # It learns.
    config.optimizer = 'adamw'
    config.max_steps = 6
    with pytest.raises(UserError, match="was trained with optimizer 'muon', not 'adamw'"):
        train.train_and_evaluate(config)


@pytest.mark.parametrize(
    'field, value, expected',
    [
        ('optimizer', 'sgd', "optimizer 'sgd' is not one of adamw, muon"),
        ('lr_schedule', 'linear', "lr_schedule 'linear' is not one of cosine, wsd"),
        ('decay_fraction', 0.0, 'decay_fraction (0.0) must be in (0, 1]'),
        ('max_train_seconds', -1, 'max_train_seconds (-1) must be >= 0'),
    ],
)
def test_bad_recipe_fields_are_one_line(field, value, expected):
    with pytest.raises(UserError) as error:
        run_plan.resolve(_config(**{field: value}))
    assert expected in str(error.value)


@pytest.mark.parametrize('name', ['tiny', 'cpu_demo', 'cpu_fast'])
def test_every_shipped_config_is_valid(name):
    config = importlib.import_module(f'configs.{name}').get_config()
    run_plan.resolve(config)
    if name == 'cpu_fast':  # cpu_demo's model and batches; only the recipe differs.
        demo = importlib.import_module('configs.cpu_demo').get_config()
        differ = {k for k in config.keys() if config[k] != demo[k]}
        assert differ == {
            'learning_rate',
            'lr_schedule',
            'max_steps',
            'eval_every',
            'save_every',
            'save_dir',
        }
