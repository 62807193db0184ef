import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muomni_jax.model import lm_loss
from muomni_jax.model.thinker import abstract_model
from muomni_jax.parallel import partitioning
from muomni_jax.training import checkpointing, run_plan, steps, train
from tests.support.configs import small_config
from tests.support.train_states import ONE_LAYER, init_state, new_state, random_batch
from tests.support.trees import assert_trees_equal


def test_cross_entropy_is_masked_mean_in_float32():
    logits = jnp.array([[[2.0, 0.0], [0.0, 3.0], [5.0, -5.0]]], jnp.bfloat16)
    targets = jnp.array([[0, 1, 1]])
    weights = jnp.array([[1.0, 1.0, 0.0]])
    loss_sum, weight_sum = lm_loss.cross_entropy(logits, targets, weights)
    expected = -np.log(np.exp(2) / (np.exp(2) + 1)) - np.log(np.exp(3) / (np.exp(3) + 1))
    assert loss_sum.dtype == jnp.float32 and float(weight_sum) == 2.0
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    config = small_config(
        '/tmp/unused', '/tmp/unused', learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1
    )
    schedule = steps.learning_rate_schedule(run_plan.resolve(config).optimizer, total_steps=100)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 1e-4, rtol=1e-5)
    assert float(schedule(50)) < float(schedule(20))


def test_weight_decay_skips_norms_biases_and_embeddings():
    config = small_config('/tmp/unused', '/tmp/unused')
    state, _, _ = new_state(config, model=ONE_LAYER)
    mask = steps.weight_decay_mask(state.params)
    flat = {
        '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    assert not flat['tok_emb/embedding/value']
    assert not flat['norm/weight/value'] and not flat['blocks/0/norm1/weight/value']
    assert flat['lm_head/kernel/value'] and flat['blocks/0/attn/q/kernel/value']


@pytest.mark.slow  # Two compiles of the step.
def test_gradient_accumulation_equals_one_big_batch():
    config = small_config('/tmp/unused', '/tmp/unused')
    state, graphdef, tx = new_state(config, model=ONE_LAYER)
    batch = random_batch()
    step = lambda a: jax.jit(
        functools.partial(
            steps.train_step, graphdef=graphdef, tx=tx, accumulation_steps=a, deterministic=True
        )
    )
    one, m1 = step(1)(state, batch)
    four, m4 = step(4)(state, batch)
    np.testing.assert_allclose(float(m1['loss_sum']), float(m4['loss_sum']), rtol=1e-5)
    np.testing.assert_allclose(float(m1['grad_norm']), float(m4['grad_norm']), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_nonfinite_step_leaves_params_unchanged():
    config = small_config('/tmp/unused', '/tmp/unused')
    state, graphdef, tx = new_state(config, model=ONE_LAYER)
    batch = random_batch()
    batch['weights'] = batch['weights'] * np.float32('nan')
    step = jax.jit(
        functools.partial(
            steps.train_step, graphdef=graphdef, tx=tx, accumulation_steps=1, deterministic=True
        )
    )
    new, metrics = step(state, batch)
    assert int(metrics['nonfinite']) == 1 and int(new.opt_state.notfinite_count) == 1
    assert_trees_equal(state.params, new.params)


@pytest.mark.slow  # Two compiles of a step with dropout.
def test_dropout_depends_on_the_step_and_the_seed_only():
    """The dropout masks come from (state.rng, state.step): a state rebuilt from the same seed
    and a freshly traced step give the same loss (no randomness drawn while tracing, none kept
    between calls), another step or another seed a different one."""
    config = small_config('/tmp/unused', '/tmp/unused')
    model = dataclasses.replace(ONE_LAYER, dropout=0.5)
    tx = steps.make_optimizer(run_plan.resolve(config).optimizer, 10)
    graphdef, _ = abstract_model(model)
    new_step = lambda: jax.jit(
        functools.partial(
            steps.train_step, graphdef=graphdef, tx=tx, accumulation_steps=1, deterministic=False
        )
    )
    batch, step = random_batch(), new_step()
    state = init_state(model, tx)
    _, m0 = step(state, batch)
    _, m0_again = new_step()(init_state(model, tx), batch)
    _, m1 = step(state.replace(step=state.step + 1), batch)
    other_seed = state.replace(rng=init_state(model, tx, seed=1).rng)  # Same params.
    _, m0_other_seed = step(other_seed, batch)
    assert float(m0['loss_sum']) == float(m0_again['loss_sum'])
    assert float(m0['loss_sum']) != float(m1['loss_sum'])
    assert float(m0['loss_sum']) != float(m0_other_seed['loss_sum'])


def _numpy_checksums(tree) -> dict[str, list[int]]:
    """The checksums a save records, worked out in numpy: per leaf path, the sum of its elements
    as uint32 (a 4-byte element's bits, others' values) and the sum of each times its position
    1, 2, ..., both modulo 2**32."""
    checksums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(leaf)
        bits = (x.view(np.uint32) if x.dtype.itemsize == 4 else x.astype(np.uint32)).ravel()
        bits = bits.astype(np.uint64)  # Products of two numbers below 2**32 fit.
        position = np.arange(1, bits.size + 1, dtype=np.uint64)
        checksums[jax.tree_util.keystr(path)] = [
            int(bits.sum() % 2**32),
            int((bits * position % 2**32).sum() % 2**32),
        ]
    return checksums


def test_checkpoint_round_trip_is_exact(tmp_path):
    config = small_config('/tmp/unused', '/tmp/unused')
    state, graphdef, tx = new_state(config, model=ONE_LAYER)
    step = jax.jit(
        functools.partial(
            steps.train_step, graphdef=graphdef, tx=tx, accumulation_steps=1, deterministic=True
        )
    )
    state, _ = step(state, random_batch())  # Non-trivial Adam moments and counters.
    mesh = partitioning.make_mesh({'data': 2, 'fsdp': 4})
    shardings = partitioning.state_shardings(mesh, state)
    state = jax.device_put(state, shardings)
    ckpt = checkpointing.Checkpointer(str(tmp_path / 'run'))
    ckpt.start_writing(0)
    ckpt.save(1, state, {'step': 1, 'epoch': 0})
    ckpt.wait()
    abstract = checkpointing.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
    restored, meta = ckpt.restore_latest(abstract)
    ckpt.close()
    # The saved meta, and the checksum of every array, which the restore verified.
    assert meta == {'step': 1, 'epoch': 0, 'checksums': _numpy_checksums(state), 'ema': False}
    assert len(meta['checksums']) == len(jax.tree.leaves(state))
    assert_trees_equal(state, restored, check_sharding=True)


@pytest.mark.slow
def test_overfits_repeated_sentences(tmp_path):
    sentences = [
        'The cat sat on the mat.',
        'The dog sat on the log.',
        'A bird sang in the tree.',
        'The fish swam in the pond.',
    ]
    data = tmp_path / 'repeat.txt'
    data.write_text('\n'.join(sentences * 40) + '\n')
    config = small_config(
        tmp_path / 'run',
        data,
        vocab_size=64,
        val_split=0.0,
        ctx_len=32,
        max_steps=120,
        num_epochs=100,
        learning_rate=3e-3,
        warmup_steps=10,
        log_every=20,
        eval_every=1000,
        save_every=1000,
    )
    summary = train.train_and_evaluate(config)
    log = json.load(open(tmp_path / 'run' / 'training_log.json'))
    assert log[-1]['loss'] < log[0]['loss'] / 4
    assert summary['ppl'] < 2.0, summary
    assert [r['step'] for r in log] == list(range(20, 121, 20))
