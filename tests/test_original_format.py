"""Weight exchange with the original μOmni PyTorch Thinker.

The PyTorch reference (muomni_jax/interop/torch_reference.py) is written from shared/spec/thinker.md
alone, so agreeing with it checks our model and our exporter against the spec, not against
themselves.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muomni_jax.errors import UserError
from muomni_jax.interop import original_format
from muomni_jax.model.thinker import ThinkerConfig, abstract_model
from tests.support.models import forward, perturbed_model
from tests.support.trees import assert_trees_equal

BASE = dict(
    vocab_size=96,
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_ff=48,
    ctx_len=32,
    dropout=0.0,
    rope_theta=500.0,
)
VARIANTS = {
    'gqa_swiglu': ThinkerConfig(**BASE),
    'mha_gelu': ThinkerConfig(**BASE, use_gqa=False, use_swiglu=False),
    'moe_gelu': ThinkerConfig(
        **BASE, use_swiglu=False, use_moe=True, num_experts=3, num_experts_per_tok=2
    ),
}


def _tokens(config, batch=2, length=12):
    return np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))


# ----------------------------------------------------------------------------------------------
# The reference: the original's ThinkerLM, as the spec describes it.


def _reference_class():
    """(torch, ThinkerLM), or a skip where torch is not installed."""
    torch = pytest.importorskip('torch')
    from muomni_jax.interop import torch_reference

    return torch, torch_reference.ThinkerLM


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_pytorch_reference_loads_the_export_strictly_and_gives_our_logits(name, tmp_path):
    torch, ThinkerLM = _reference_class()
    config = VARIANTS[name]
    model = perturbed_model(config)
    path = str(tmp_path / 'thinker.pt')
    original_format.write_weights(path, nnx.state(model), config)
    reference = ThinkerLM(config)
    reference.load_state_dict(torch.load(path, weights_only=True)['model'], strict=True)
    tokens = _tokens(config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).numpy()
    ours = np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_a_compiled_pytorch_state_dict_imports(tmp_path):
    torch, ThinkerLM = _reference_class()
    config = VARIANTS['gqa_swiglu']
    torch.manual_seed(0)
    reference = ThinkerLM(config)
    state_dict = {'_orig_mod.' + k: v for k, v in reference.state_dict().items()}
    path = str(tmp_path / 'thinker_step_7.pt')
    torch.save({'model': state_dict, 'optimizer': {}, 'scheduler': {}}, path)
    imported, params = original_format.read_weights(
        path, {'rope_theta': config.rope_theta, 'ctx_len': config.ctx_len, 'dropout': 0.0}
    )
    assert imported == config
    model = nnx.merge(abstract_model(config)[0], params)
    tokens = _tokens(config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(tokens))), expected, atol=1e-4)


@pytest.mark.parametrize('suffix', ['.pt', '.safetensors'])
@pytest.mark.parametrize('name', ['gqa_swiglu', 'moe_gelu'])
def test_export_then_import_gives_identical_params(name, suffix, tmp_path):
    if suffix == '.pt':
        pytest.importorskip('torch')
    config = VARIANTS[name]
    params = nnx.state(perturbed_model(config))
    path = str(tmp_path / f'thinker{suffix}')
    written = original_format.write_weights(path, params, config)
    base = (
        {}
        if suffix == '.safetensors'
        else {'rope_theta': config.rope_theta, 'ctx_len': config.ctx_len, 'dropout': 0.0}
    )
    imported, restored = original_format.read_weights(path, base)
    assert imported == config
    assert_trees_equal(params, restored)
    if suffix == '.safetensors':
        from safetensors.numpy import load_file

        assert all(k.startswith('thinker.') for k in load_file(path))
        assert written[1].endswith('config.json')


def test_the_group_count_comes_from_the_weights_not_the_config(tmp_path):
    config = ThinkerConfig(**{**BASE, 'kv_groups': 1})
    path = str(tmp_path / 'thinker.safetensors')
    original_format.write_weights(path, nnx.state(perturbed_model(config)), config)
    # A config.json that claims 2 groups, as the original's configs may.
    import json

    config_path = tmp_path / 'config.json'
    saved = json.loads(config_path.read_text())
    saved['thinker']['kv_groups'] = 2
    config_path.write_text(json.dumps(saved))
    imported, _ = original_format.read_weights(path)
    assert imported.kv_groups == 1
    assert original_format.original_compatibility_warning(imported) is not None
    assert original_format.original_compatibility_warning(VARIANTS['gqa_swiglu']) is None


def test_import_names_every_mismatch():
    config = VARIANTS['gqa_swiglu']
    state_dict = original_format.to_state_dict(nnx.state(perturbed_model(config)))
    del state_dict['blocks.1.mlp.up_proj.weight']
    state_dict['blocks.0.attn.extra.weight'] = np.zeros((2, 2), np.float32)
    state_dict['blocks.0.attn.o.weight'] = np.zeros((32, 31), np.float32)
    with pytest.raises(UserError) as error:
        original_format.from_state_dict(state_dict, config)
    message = str(error.value)
    assert 'missing blocks.1.mlp.up_proj.weight [48, 32]' in message
    assert 'unexpected blocks.0.attn.extra.weight' in message
    assert 'blocks.0.attn.o.weight has shape [32, 31], expected [32, 32]' in message


def test_wrong_suffix_and_missing_file_are_user_errors(tmp_path):
    config = VARIANTS['gqa_swiglu']
    with pytest.raises(UserError, match='.pt or .safetensors'):
        original_format.write_weights(
            str(tmp_path / 'x.bin'), nnx.state(perturbed_model(config)), config
        )
    with pytest.raises(UserError, match='does not exist'):
        original_format.read_weights(str(tmp_path / 'missing.pt'))


@pytest.mark.parametrize(
    'content, raised',
    [
        (b'hello world\n', 'KeyError'),  # What torch.load raised as a traceback before.
        (bytes(range(256)) * 8, 'UnpicklingError'),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, content, raised):
    pytest.importorskip('torch')
    path = tmp_path / 'x.pt'
    path.write_bytes(content)
    with pytest.raises(
        UserError,
        match=rf'^cannot read {path} as a PyTorch checkpoint '
        rf'\({raised}',
    ):
        original_format.read_weights(str(path))
    junk = tmp_path / 'x.safetensors'
    junk.write_bytes(content)
    with pytest.raises(UserError, match=rf'^cannot read {junk} as safetensors \('):
        original_format.read_weights(str(junk))
