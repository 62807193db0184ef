"""Sharded training on the 8 virtual CPU devices of conftest: every mesh trains the same model."""

import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from muomni_jax.errors import UserError
from muomni_jax.parallel import partitioning
from muomni_jax.training import checkpointing, run_plan, steps, train
from tests.support.configs import small_config
from tests.support.trees import assert_trees_equal

# Wide enough that most matrices pass the size at which partitioning starts to shard; one layer
# keeps the compiles short.
MODEL = dict(vocab_size=256, n_layers=1, d_model=128, n_heads=4, d_ff=256)
MESHES = {
    'data8': {'data': 8, 'fsdp': 1},
    'fsdp8': {'data': 1, 'fsdp': 8},
    'data2_fsdp4': {'data': 2, 'fsdp': 4},
}


def _config(save_dir, data_path, **overrides):
    return small_config(
        save_dir,
        data_path,
        **{**MODEL, 'max_steps': 5, 'log_every': 1, 'eval_every': 5, 'save_every': 3, **overrides},
    )


def _losses(save_dir):
    with open(save_dir / 'training_log.json') as f:
        log = json.load(f)
    return (
        {r['step']: r['loss'] for r in log if 'loss' in r},
        {r['step']: r['val_loss'] for r in log if 'val_loss' in r},
    )


@pytest.fixture(scope='module')
def runs(tmp_path_factory, corpus_sample):
    """Five steps on one device, then on each mesh of 8 devices, sharing one tokenizer."""
    root = tmp_path_factory.mktemp('meshes')
    train.train_and_evaluate(_config(root / 'one', corpus_sample), devices=jax.devices()[:1])
    tokenizer = str(root / 'one' / 'tokenizer.model')
    for name, mesh in MESHES.items():
        train.train_and_evaluate(
            _config(root / name, corpus_sample, mesh=mesh, tokenizer_path=tokenizer)
        )
    return root


@pytest.mark.slow  # Four trainings, each compiling its steps for another mesh.
@pytest.mark.parametrize('name', sorted(MESHES))
def test_every_mesh_gives_the_one_device_losses(runs, name):
    one_train, one_val = _losses(runs / 'one')
    train_losses, val_losses = _losses(runs / name)
    assert sorted(train_losses) == [1, 2, 3, 4, 5] and sorted(val_losses) == [5]
    for step, loss in one_train.items():
        np.testing.assert_allclose(train_losses[step], loss, rtol=1e-5, err_msg=f'step {step}')
    np.testing.assert_allclose(val_losses[5], one_val[5], rtol=1e-5)


def test_params_and_adam_moments_are_sharded_along_fsdp(corpus_sample, tmp_path):
    config = _config(tmp_path, corpus_sample, mesh=MESHES['data2_fsdp4'])
    mesh = partitioning.make_mesh(config.mesh)
    setup = steps.make_train_setup(run_plan.resolve(config), mesh, 10)
    state, p_train_step = setup.state, setup.train_step
    rng = np.random.default_rng(0)
    batch = {
        'inputs': rng.integers(3, 256, (8, 32)),
        'targets': rng.integers(3, 256, (8, 32)),
        'segment_ids': np.ones((8, 32)),
        'positions': np.tile(np.arange(32), (8, 1)),
        'weights': np.ones((8, 32), np.float32),
    }
    batch = {k: v.astype(np.float32 if k == 'weights' else np.int32) for k, v in batch.items()}
    state, _ = p_train_step(
        state, partitioning.global_batch(batch, partitioning.batch_sharding(mesh))
    )

    sharded = 0
    for path, value in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]:
        shards = value.addressable_shards
        assert len(shards) == 8, path
        if value.ndim >= 2 and value.size >= partitioning._MIN_SHARDED_SIZE:
            axis = value.sharding.spec.index('fsdp')
            expected = list(value.shape)
            expected[axis] //= 4
            assert all(s.data.shape == tuple(expected) for s in shards), path
            sharded += 1
        else:
            assert value.sharding.spec == P(), path
            assert all(s.data.shape == value.shape for s in shards), path
    # Embedding, lm_head, q, o and the 3 SwiGLU matrices, each with Adam's mu and nu.
    assert sharded == 3 * (2 + 5), sharded


@pytest.mark.slow
def test_checkpoint_moves_to_one_device_and_to_a_2x2_mesh(runs, tmp_path, capsys):
    """The fsdp=8 run's step-3 checkpoint restores exactly elsewhere, and training goes on."""
    source = runs / 'fsdp8'
    config = _config(source, '/unused')
    targets = {
        'fsdp8': partitioning.make_mesh(MESHES['fsdp8']),
        'one': partitioning.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1]),
        '2x2': partitioning.make_mesh({'data': 2, 'fsdp': 2}, jax.devices()[:4]),
    }
    restored = {}
    checkpointer = checkpointing.Checkpointer(str(source), read_only=True)
    for name, mesh in targets.items():
        setup = steps.make_train_setup(run_plan.resolve(config), mesh, initialize=False)
        shardings = setup.state_shardings
        state, meta = checkpointer.restore(3, setup.abstract_state)
        assert meta['step'] == 3
        for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
            assert leaf.sharding == sharding
        restored[name] = state
    checkpointer.close()
    assert all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(restored['one']))
    for name in ('one', '2x2'):
        assert_trees_equal(restored['fsdp8'], restored[name])

    # Steps 4 and 5 from that checkpoint match the uninterrupted fsdp=8 run.
    expected, _ = _losses(source)
    for name, mesh, devices in (
        ('one', {'data': 1, 'fsdp': 1}, jax.devices()[:1]),
        ('2x2', {'data': 2, 'fsdp': 2}, jax.devices()[:4]),
    ):
        save_dir = tmp_path / name
        shutil.copytree(source, save_dir)
        shutil.rmtree(save_dir / '5')
        capsys.readouterr()
        train.train_and_evaluate(_resume_config(source, save_dir, mesh), devices=devices)
        out = capsys.readouterr().out
        assert 'Resuming from checkpoint step 3' in out and '[Step 3/5]' not in out, out
        losses, _ = _losses(save_dir)
        for step in (4, 5):
            np.testing.assert_allclose(
                losses[step], expected[step], rtol=1e-5, err_msg=f'{name} step {step}'
            )


def _resume_config(source, save_dir, mesh):
    with open(source / 'config.json') as f:
        saved = json.load(f)
    return _config(save_dir, saved['data_path'], mesh=mesh, tokenizer_path=saved['tokenizer_path'])


def test_a_batch_that_does_not_divide_is_a_clear_error(tmp_path):
    mesh = partitioning.make_mesh({'data': 2, 'fsdp': -1})
    assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
    with pytest.raises(UserError, match=r'micro-batch \(12 = .*8 devices.*multiple of 8'):
        partitioning.check_batch_size(12, mesh, 1)
    with pytest.raises(UserError, match=r'micro-batch \(4 = .*8 devices'):
        partitioning.check_batch_size(16, mesh, 4)
    partitioning.check_batch_size(32, mesh, 4)
    with pytest.raises(UserError, match='cannot fill 8 devices'):
        partitioning.make_mesh({'data': 3, 'fsdp': -1})
    with pytest.raises(UserError, match='uses 4 devices but 8 are present'):
        partitioning.make_mesh({'data': 2, 'fsdp': 2})
    config = small_config(tmp_path, '/unused', batch_size=8, data_shards=3)
    with pytest.raises(UserError, match=r'batch_size \(8\) must be divisible by the 3 data shards'):
        run_plan.resolve(config)


def test_a_bad_batch_stops_the_run_before_save_dir_exists(tmp_path, corpus_sample):
    config = small_config(tmp_path / 'run', corpus_sample, batch_size=12)
    with pytest.raises(UserError, match='split evenly over the mesh'):
        train.train_and_evaluate(config)
    assert not (tmp_path / 'run').exists()


def test_too_little_text_for_one_batch_per_shard_is_a_clear_error(tmp_path):
    data = tmp_path / 'short.txt'
    sentences = [
        'The cat sat on the mat.',
        'The dog sat on the log.',
        'A bird sang in the tree.',
        'The fish swam in the pond.',
    ]
    data.write_text('\n'.join(sentences * 10) + '\n')  # < 2 windows per shard.
    config = small_config(
        tmp_path / 'run',
        data,
        vocab_size=64,
        val_split=0.0,
        ctx_len=256,
        batch_size=8,
        data_shards=4,
    )
    with pytest.raises(
        UserError,
        match=r'smallest of 4 data shards holds \d+, fewer than the 2 '
        r'rows each shard fills per batch',
    ):
        train.train_and_evaluate(config, devices=jax.devices()[:1])
    assert not (tmp_path / 'run').exists()
