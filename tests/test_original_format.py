"""Weight exchange with the original μOmni PyTorch Thinker.

The PyTorch reference below is written from shared/spec/thinker.md alone, so agreeing with it
checks our model and our exporter against the spec, not against themselves.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from muomni_jax import original_format
from muomni_jax.errors import UserError
from muomni_jax.thinker import Thinker, ThinkerConfig

BASE = dict(vocab_size=96, n_layers=2, d_model=32, n_heads=4, d_ff=48, ctx_len=32, dropout=0.0,
            rope_theta=500.0)
VARIANTS = {
    'gqa_swiglu': ThinkerConfig(**BASE),
    'mha_gelu': ThinkerConfig(**BASE, use_gqa=False, use_swiglu=False),
    'moe_gelu': ThinkerConfig(**BASE, use_swiglu=False, use_moe=True, num_experts=3,
                              num_experts_per_tok=2),
}


def _model(config, seed=0):
    graphdef, params = nnx.split(Thinker(config, rngs=nnx.Rngs(params=seed)))
    # Larger than the 0.02 init, and non-trivial norm scales and biases, so mistakes show.
    keys = iter(jax.random.split(jax.random.key(seed + 1), 100))
    params = jax.tree.map(
        lambda x: x * 6 if x.ndim == 2 else x + 0.3 * jax.random.normal(next(keys), x.shape),
        params)
    return nnx.merge(graphdef, params)


def _tokens(config, batch=2, length=12):
    return np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))


# ----------------------------------------------------------------------------------------------
# The reference: the original's ThinkerLM, as the spec describes it.


def _reference_class():
    torch = pytest.importorskip('torch')
    nn, F = torch.nn, torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    class Attention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.h, self.dk, self.gqa = c.n_heads, c.d_model // c.n_heads, c.use_gqa
            self.theta = c.rope_theta
            if c.use_gqa:
                self.g = c.n_heads // 2  # The original always uses n_heads // 2 groups.
                self.q = nn.Linear(c.d_model, c.d_model, bias=False)
                self.k = nn.Linear(c.d_model, self.g * self.dk, bias=False)
                self.v = nn.Linear(c.d_model, self.g * self.dk, bias=False)
            else:
                self.g = c.n_heads
                self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
            self.o = nn.Linear(c.d_model, c.d_model, bias=False)

        def forward(self, x):
            b, t, d = x.shape
            if self.gqa:
                q, k, v = self.q(x), self.k(x), self.v(x)
            else:
                q, k, v = self.qkv(x).split(d, dim=-1)
            q = q.view(b, t, self.h, self.dk)
            k, v = k.view(b, t, self.g, self.dk), v.view(b, t, self.g, self.dk)
            inv_freq = self.theta ** (-torch.arange(0, self.dk, 2, dtype=torch.float32) / self.dk)
            angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None]
            emb = torch.cat([angles, angles], dim=-1)[None, :, None, :]
            q = q * emb.cos() + rotate_half(q) * emb.sin()
            k = k * emb.cos() + rotate_half(k) * emb.sin()
            k = k.repeat_interleave(self.h // self.g, dim=2)
            v = v.repeat_interleave(self.h // self.g, dim=2)
            q, k, v = (a.transpose(1, 2) for a in (q, k, v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float('-inf')).softmax(-1)
            return self.o((probs @ v).transpose(1, 2).reshape(b, t, d))

    class MLP(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.swiglu = c.use_swiglu
            if c.use_swiglu:
                self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
                self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
                self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)
            else:
                self.fc1 = nn.Linear(c.d_model, c.d_ff)
                self.fc2 = nn.Linear(c.d_ff, c.d_model)

        def forward(self, x):
            if self.swiglu:
                return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            return self.fc2(F.gelu(self.fc1(x)))

    class MoE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.k = c.num_experts_per_tok
            self.router = nn.Linear(c.d_model, c.num_experts, bias=False)
            self.experts = nn.ModuleList([MLP(c) for _ in range(c.num_experts)])

        def forward(self, x):
            top_p, top_i = self.router(x).softmax(-1).topk(self.k, dim=-1)
            top_p = top_p / top_p.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                weight = (top_p * (top_i == e)).sum(-1, keepdim=True)
                out = out + weight * expert(x)
            return out

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm1, self.norm2 = RMSNorm(c.d_model), RMSNorm(c.d_model)
            self.attn = Attention(c)
            self.use_moe = c.use_moe
            if c.use_moe:
                self.moe = MoE(c)
            else:
                self.mlp = MLP(c)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + (self.moe if self.use_moe else self.mlp)(self.norm2(x))

    class ThinkerLM(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
            self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layers)])
            self.norm = RMSNorm(c.d_model)
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

        def forward(self, ids):
            x = self.tok_emb(ids)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.norm(x))

    return torch, ThinkerLM


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_pytorch_reference_loads_the_export_strictly_and_gives_our_logits(name, tmp_path):
    torch, ThinkerLM = _reference_class()
    config = VARIANTS[name]
    model = _model(config)
    path = str(tmp_path / 'thinker.pt')
    original_format.write_weights(path, nnx.state(model), config)
    reference = ThinkerLM(config)
    reference.load_state_dict(torch.load(path, weights_only=True)['model'], strict=True)
    tokens = _tokens(config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).numpy()
    ours = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))
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
        path, {'rope_theta': config.rope_theta, 'ctx_len': config.ctx_len, 'dropout': 0.0})
    assert imported == config
    model = nnx.merge(nnx.graphdef(Thinker(config, rngs=nnx.Rngs(0))), params)
    tokens = _tokens(config)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4)


@pytest.mark.parametrize('suffix', ['.pt', '.safetensors'])
@pytest.mark.parametrize('name', ['gqa_swiglu', 'moe_gelu'])
def test_export_then_import_gives_identical_params(name, suffix, tmp_path):
    if suffix == '.pt':
        pytest.importorskip('torch')
    config = VARIANTS[name]
    params = nnx.state(_model(config))
    path = str(tmp_path / f'thinker{suffix}')
    written = original_format.write_weights(path, params, config)
    base = {} if suffix == '.safetensors' else {'rope_theta': config.rope_theta,
                                                'ctx_len': config.ctx_len, 'dropout': 0.0}
    imported, restored = original_format.read_weights(path, base)
    assert imported == config
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if suffix == '.safetensors':
        from safetensors.numpy import load_file
        assert all(k.startswith('thinker.') for k in load_file(path))
        assert written[1].endswith('config.json')


def test_the_group_count_comes_from_the_weights_not_the_config(tmp_path):
    config = ThinkerConfig(**{**BASE, 'kv_groups': 1})
    path = str(tmp_path / 'thinker.safetensors')
    original_format.write_weights(path, nnx.state(_model(config)), config)
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
    state_dict = original_format.to_state_dict(nnx.state(_model(config)))
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
        original_format.write_weights(str(tmp_path / 'x.bin'), nnx.state(_model(config)), config)
    with pytest.raises(UserError, match='does not exist'):
        original_format.read_weights(str(tmp_path / 'missing.pt'))
