"""Learning-rate schedules and optimizers: warmup-cosine (the default), WSD, AdamW and Muon."""

import importlib
import json

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from muomni_jax.errors import UserError
from muomni_jax.model.thinker import ThinkerConfig, abstract_model
from muomni_jax.training import config_checks
from muomni_jax.training import steps
from muomni_jax.training import train
from tests.conftest import small_config


def _config(**overrides):
    config = tiny.get_config()
    config.update(dict(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1))
    config.update(overrides)
    return config


def test_the_default_schedule_is_the_seed_warmup_cosine():
    schedule = steps.learning_rate_schedule(_config(), 100)
    expected = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, 0.1)
    for step in range(101):
        assert float(schedule(step)) == pytest.approx(float(expected(step)))


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_floor():
    schedule = steps.learning_rate_schedule(_config(lr_schedule='wsd', decay_fraction=0.2), 100)
    lr = np.array([float(schedule(step)) for step in range(101)])
    np.testing.assert_allclose(lr[:11], np.linspace(0, 1, 11), atol=1e-6)
    np.testing.assert_allclose(lr[10:81], 1.0)  # Stable until the last 20% of the steps.
    np.testing.assert_allclose(lr[80:], np.linspace(1, 0.1, 21), atol=1e-6)


def _one_update(config, params, grads):
    tx = steps.make_optimizer(config, total_steps=10)
    # Compiled: Newton-Schulz op by op took seconds.
    return jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads)


@pytest.mark.slow  # Compiles both optimizers' updates.
def test_muon_orthogonalizes_the_block_matrices_and_adamw_updates_the_rest():
    model_config = ThinkerConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=4, d_ff=64,
                                 ctx_len=16)
    _, abstract = abstract_model(model_config)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 100))
    params = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), abstract)
    grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), abstract)
    config = _config(optimizer='muon', warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9)
    muon = _one_update(config, params, grads)
    adamw = _one_update(_config(warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9), params,
                        grads)
    leaves = jax.tree_util.tree_flatten_with_path(muon)[0]
    checked = set()
    for (path, update), adamw_update, grad in zip(leaves, jax.tree.leaves(adamw),
                                                  jax.tree.leaves(grads)):
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
            # AdamW's first step is -lr * g / |g|, as with optimizer='adamw'.
            np.testing.assert_allclose(update, adamw_update, rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(update, -np.sign(grad), atol=1e-3, err_msg=name)
            checked.add(name.split('[')[1])
    assert checked == {'muon', "'blocks']", "'lm_head']", "'norm']", "'tok_emb']"}


@pytest.mark.slow  # A training.
def test_muon_trains_and_a_resume_with_another_optimizer_is_refused(tmp_path, corpus_sample):
    config = small_config(tmp_path / 'run', corpus_sample, optimizer='muon', max_steps=4,
                          log_every=1, eval_every=2, save_every=4, learning_rate=3e-3)
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


@pytest.mark.parametrize('field, value, expected', [
    ('optimizer', 'sgd', "optimizer 'sgd' is not one of adamw, muon"),
    ('lr_schedule', 'linear', "lr_schedule 'linear' is not one of cosine, wsd"),
    ('decay_fraction', 0.0, 'decay_fraction (0.0) must be in (0, 1]'),
    ('max_train_seconds', -1, 'max_train_seconds (-1) must be >= 0'),
])
def test_bad_recipe_fields_are_one_line(field, value, expected):
    with pytest.raises(UserError) as error:
        config_checks.validate_config(_config(**{field: value}))
    assert expected in str(error.value)


@pytest.mark.parametrize('name', ['tiny', 'cpu_demo', 'cpu_fast'])
def test_every_shipped_config_is_valid(name):
    config = importlib.import_module(f'configs.{name}').get_config()
    config_checks.validate_config(config)
    if name == 'cpu_fast':  # cpu_demo's model and batches; only the recipe differs.
        demo = importlib.import_module('configs.cpu_demo').get_config()
        differ = {k for k in config.keys() if config[k] != demo[k]}
        assert differ == {'learning_rate', 'lr_schedule', 'max_steps', 'eval_every', 'save_every',
                          'save_dir'}
