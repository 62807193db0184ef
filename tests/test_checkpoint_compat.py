"""Checkpoints written before a refactor still restore after it (tests/fixtures/checkpoint_v1).

The fixture is a 4-step run saved by the code of commit b7c1f33 (make_checkpoint_v1.py); the
numbers below were read from it with that code.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from muomni_jax.errors import UserError
from muomni_jax.inference import loading
from muomni_jax.interop import original_checkpoints
from muomni_jax.parallel import partitioning
from muomni_jax.training import checkpointing, run_plan, steps

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'checkpoint_v1')
LOSS_ON_FIXED_TOKENS = 5.525517463684082
PARAMS_ABS_SUM = 215.43894958496094
OPT_STATE_ABS_SUM = 5.393927574157715


def _abs_sum(tree) -> float:
    return float(
        sum(
            jnp.abs(x).sum() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
        )
    )


def test_params_of_an_old_checkpoint_restore_and_give_the_same_loss():
    checkpoint = loading.load(FIXTURE)
    tokens = (jnp.arange(2 * 17) * 7 % 256).reshape(2, 17)
    logits = jax.jit(lambda model, x: model(x))(checkpoint.model(), tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    np.testing.assert_allclose(float(loss), LOSS_ON_FIXED_TOKENS, rtol=1e-5)
    np.testing.assert_allclose(_abs_sum(checkpoint.params), PARAMS_ABS_SUM, rtol=1e-5)


def test_the_whole_train_state_of_an_old_checkpoint_restores():
    # The fixture's config.json predates later fields (optimizer, ...): today's defaults fill them.
    config = tiny.get_config()
    config.update(loading.read_config(FIXTURE).to_dict())
    setup = steps.make_train_setup(
        run_plan.resolve(config), partitioning.make_mesh(config.mesh, None), initialize=False
    )
    state, meta = checkpointing.Checkpointer(FIXTURE, read_only=True).restore_latest(
        setup.abstract_state
    )
    assert int(state.step) == 4
    assert meta['step'] == 4 and meta['steps_per_epoch'] == 225
    np.testing.assert_allclose(_abs_sum(state.params), PARAMS_ABS_SUM, rtol=1e-5)
    np.testing.assert_allclose(_abs_sum(state.opt_state), OPT_STATE_ABS_SUM, rtol=1e-5)


def test_exporting_into_a_save_dir_refuses_to_replace_its_config(tmp_path):
    save_dir = tmp_path / 'run'
    shutil.copytree(FIXTURE, save_dir)
    config_json = (save_dir / 'config.json').read_text()
    with pytest.raises(UserError, match='is not an exported config.json'):
        original_checkpoints.export_checkpoint(str(save_dir), str(save_dir / 'thinker.safetensors'))
    assert (save_dir / 'config.json').read_text() == config_json
    assert loading.read_config(str(save_dir)).d_model == 16
    # A folder of its own takes the export, and a second export there replaces the first.
    output = tmp_path / 'export' / 'thinker.safetensors'
    for _ in range(2):
        written = original_checkpoints.export_checkpoint(str(save_dir), str(output))
    assert json.loads(open(written[1]).read())['thinker']['d_model'] == 16
