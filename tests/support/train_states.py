"""A small Thinker's train state and a batch for it, for tests of the training step itself."""

import dataclasses
import functools

import jax
import numpy as np

from muomni_jax.model.thinker import ThinkerConfig, abstract_model
from muomni_jax.training import run_plan, steps

MODEL = ThinkerConfig(
    vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, ctx_len=16, dropout=0.0
)

# One layer where the check is about the step, not the model: half the compile.
ONE_LAYER = dataclasses.replace(MODEL, n_layers=1)


def random_batch(seed=0, batch=8, ctx=16):
    """A batch of features of random tokens (batch, ctx + 1): two documents per row, and
    padding at the end of the last row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, (batch, ctx + 1)).astype(np.int32)
    segment_ids = np.ones((batch, ctx + 1), np.int32)
    segment_ids[:, ctx // 2 :] = 2
    segment_ids[-1, -3:] = 0  # Padding at the very end.
    from muomni_jax.data import input_pipeline

    return input_pipeline.features(tokens, segment_ids)


def init_state(model_config, tx, seed=0):
    # Compiled: initialized op by op, a model takes seconds.
    return jax.jit(functools.partial(steps.init_state, model_config=model_config, tx=tx))(
        jax.random.PRNGKey(seed)
    )


def new_state(config, total_steps=10, model=MODEL):
    """(state, graphdef, tx): a fresh state of `model` with config's optimizer."""
    tx = steps.make_optimizer(run_plan.resolve(config).optimizer, total_steps)
    state = init_state(model, tx)
    graphdef, _ = abstract_model(model)
    return state, graphdef, tx
