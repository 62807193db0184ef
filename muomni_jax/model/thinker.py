"""The μOmni Thinker: a pre-norm decoder-only LM, the same function of the same
weights as the original PyTorch `ThinkerLM` (see shared/spec/thinker.md).

Parameter names mirror the PyTorch `state_dict` (`tok_emb`, `blocks.{i}.attn.q`, ...)
so that weight exchange is a renaming plus a transpose of linear kernels: nnx.Linear
stores `kernel` as (in, out), PyTorch stores `weight` as (out, in).

Shapes: B batch, T sequence, D d_model, H query heads, G kv groups, K head dim,
F d_ff, E experts, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muomni_jax.model import attention_kernels

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Finite, so a row with nothing to attend to gives a uniform softmax instead of NaN.
_MASK_VALUE = -1e30
# The spec's RMSNorm epsilon; every norm of the Thinker uses it, and exports declare it.
RMS_NORM_EPS = 1e-5


def _field(default, *, shape: bool = False, original: bool = True):
    """A ThinkerConfig field. shape: it fixes the shape of the parameters (a checkpoint restores
    only into the same values); original: the original μOmni's config.json holds it."""
    return dataclasses.field(default=default, metadata={'shape': shape, 'original': original})


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    """The model's fields: the one list that configs/tiny.py, MODEL_FIELDS, SHAPE_FIELDS and
    ORIGINAL_FIELDS (below the class) are read from. Defaults: the original thinker_tiny.json."""

    vocab_size: int = _field(32000, shape=True)  # Vocabulary; also the embedding and lm_head rows.
    n_layers: int = _field(4, shape=True)  # Number of transformer blocks.
    d_model: int = _field(256, shape=True)  # Residual stream width.
    n_heads: int = _field(4, shape=True)  # Attention heads; head dim is d_model // n_heads.
    d_ff: int = _field(1024, shape=True)  # Hidden width of each MLP (SwiGLU gate/up or GELU fc1).
    dropout: float = _field(0.1)  # On both residual branches, and attention probabilities too.
    rope_theta: float = _field(10000.0)  # RoPE frequency base.
    ctx_len: int = _field(512)  # Tokens per packed training window (the model's context).
    use_gqa: bool = _field(True, shape=True)  # Grouped-query attention (q, k, v), else fused qkv.
    kv_groups: int = _field(2, shape=True)  # Key/value groups under GQA; divides n_heads.
    use_swiglu: bool = _field(True, shape=True)  # SwiGLU MLP; False: GELU MLP with biases.
    use_moe: bool = _field(False, shape=True)  # Replace each MLP by a top-k mixture of experts.
    num_experts: int = _field(8, shape=True)  # Experts per MoE layer (only with use_moe).
    num_experts_per_tok: int = _field(2)  # Experts each token is routed to (only with use_moe).
    # Compute dtype: float32 on CPU, bfloat16 on GPU/TPU; params are always float32.
    dtype: str = _field('float32', original=False)
    # Matmul inputs only: 'bfloat16' casts both operands of every matmul (accumulating in
    # float32) and keeps params, activations and the residual stream in `dtype`.
    matmul_dtype: str = _field('float32', original=False)
    # Recompute each block's activations in the backward pass (saves memory).
    remat: bool = _field(False, original=False)
    # Run the blocks as one lax.scan: compile time flat in n_layers.
    scan_layers: bool = _field(False, original=False)
    # Causal attention in query blocks of this many tokens, each reading keys only up to its own
    # end, so the fully masked upper blocks are never computed; 0 or ctx_len: one block.
    attention_block: int = _field(128, original=False)
    # Dropout on the attention probabilities; -1: the same as dropout (the original's function).
    # At 0 the fused kernels serve training; the residual dropout still applies.
    attention_dropout: float = _field(-1.0, original=False)
    # 'auto' (each platform's choice), 'xla', 'cudnn' (GPU, bfloat16), 'pallas' (GPU) or
    # 'splash' (TPU): which kernel computes attention without dropout (model/attention_kernels.py).
    attention_impl: str = _field('auto', original=False)

    @classmethod
    def from_config(cls, config: Any) -> ThinkerConfig:
        """Builds from any mapping, ConfigDict or attribute object holding these
        field names; other fields are ignored, missing ones take the defaults."""
        kwargs = {}
        for field in dataclasses.fields(cls):
            if hasattr(config, '__contains__'):  # dict, Mapping, ConfigDict
                if field.name not in config:
                    continue
                value = config[field.name]
            elif hasattr(config, field.name):
                value = getattr(config, field.name)
            else:
                continue
            # JSON may spell 0.0 as 0 and 512 as 512.0; bools and strings pass as given.
            if field.type in ('int', int) and not isinstance(value, bool):
                if float(value) != int(value):
                    raise ValueError(f'{field.name} must be an integer, got {value!r}')
                value = int(value)
            elif field.type in ('float', float) and not isinstance(value, bool):
                value = float(value)
            kwargs[field.name] = value
        return cls(**kwargs)

    @property
    def attention_dropout_rate(self) -> float:
        return self.dropout if self.attention_dropout < 0 else self.attention_dropout

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(_DTYPES[self.dtype])

    @property
    def matmul_compute_dtype(self) -> jnp.dtype:
        """The dtype matmul operands are cast to: matmul_dtype, or the compute dtype if lower."""
        if self.dtype != 'float32':
            return self.compute_dtype
        return jnp.dtype(_DTYPES[self.matmul_dtype])

    # A list of independent checks, one per field or pair of fields, read top to bottom.
    def validate(self) -> None:
        """Raises ValueError naming the first inconsistency and how to fix it."""
        for name in ('vocab_size', 'n_layers', 'd_model', 'n_heads', 'd_ff'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f'{name} ({value!r}) must be a positive integer')
        if self.d_model % self.n_heads:
            raise ValueError(
                f'd_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}):'
                ' change one of them'
            )
        if self.head_dim % 2:
            raise ValueError(
                f'head dim d_model/n_heads ({self.head_dim}) must be even for RoPE:'
                ' change d_model or n_heads'
            )
        if self.use_gqa:
            if self.kv_groups <= 0:
                raise ValueError(
                    f'kv_groups ({self.kv_groups}) must be positive when use_gqa is true'
                )
            if self.n_heads % self.kv_groups:
                raise ValueError(
                    f'n_heads ({self.n_heads}) must be divisible by kv_groups'
                    f' ({self.kv_groups}) when use_gqa is true: change one of them'
                )
        if self.ctx_len < 2:
            raise ValueError(f'ctx_len ({self.ctx_len}) must be at least 2')
        if (
            isinstance(self.attention_block, bool)
            or not isinstance(self.attention_block, int)
            or self.attention_block < 0
        ):
            raise ValueError(
                f'attention_block ({self.attention_block!r}) must be a'
                ' non-negative integer (0: one block)'
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'dropout ({self.dropout}) must be in [0, 1)')
        if not (0.0 <= self.attention_dropout < 1.0 or self.attention_dropout == -1):
            raise ValueError(
                f'attention_dropout ({self.attention_dropout}) must be in [0, 1), '
                'or -1 for the same as dropout'
            )
        if self.rope_theta <= 0:
            raise ValueError(f'rope_theta ({self.rope_theta}) must be positive')
        if self.use_moe:
            if self.num_experts <= 0 or self.num_experts_per_tok <= 0:
                raise ValueError(
                    f'num_experts ({self.num_experts}) and num_experts_per_tok'
                    f' ({self.num_experts_per_tok}) must be positive when use_moe is true'
                )
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(
                    f'num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_experts'
                    f' ({self.num_experts}): lower it or add experts'
                )
        if self.dtype not in _DTYPES:
            raise ValueError(f'dtype ({self.dtype!r}) must be one of {sorted(_DTYPES)}')
        if self.matmul_dtype not in _DTYPES:
            raise ValueError(
                f'matmul_dtype ({self.matmul_dtype!r}) must be one of {sorted(_DTYPES)}'
            )
        attention_kernels.check(
            self.attention_impl, self.ctx_len, self.head_dim, self.matmul_compute_dtype
        )
        if self.attention_impl not in ('auto', 'xla') and self.attention_dropout_rate > 0:
            raise ValueError(
                f'attention_impl {self.attention_impl} computes no dropout on the '
                f'attention probabilities (attention_dropout '
                f'{self.attention_dropout_rate:g}): set attention_dropout=0 (the '
                'residual dropout stays) or use attention_impl=xla'
            )


# Every model field, in order; those that fix the parameter shapes; those of the original's
# config.json (weight exchange). Read these rather than listing field names again.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ThinkerConfig))
SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ThinkerConfig) if f.metadata['shape'])
ORIGINAL_FIELDS = tuple(f.name for f in dataclasses.fields(ThinkerConfig) if f.metadata['original'])


def count_params(state_or_model: Any) -> int:
    """Total number of parameter scalars of a module (its nnx.Param variables), an
    nnx.State, or a plain pytree of arrays / ShapeDtypeStructs (abstract is fine)."""
    if isinstance(state_or_model, nnx.Module):
        state_or_model = nnx.state(state_or_model, nnx.Param)
    leaves = jax.tree.leaves(state_or_model, is_leaf=lambda x: isinstance(x, nnx.Variable))
    total = 0
    for leaf in leaves:
        if isinstance(leaf, nnx.Variable):
            if not isinstance(leaf, nnx.Param):
                continue  # e.g. RNG counters in a full state
            leaf = leaf.get_value() if hasattr(leaf, 'get_value') else leaf.value
        total += int(np.prod(leaf.shape))
    return total


def abstract_model(model_config: ThinkerConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params as ShapeDtypeStructs) of a Thinker; no FLOPs, no memory."""
    return nnx.split(nnx.eval_shape(lambda: Thinker(model_config, rngs=nnx.Rngs(0))))


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
    """positions (B, T) int -> cos, sin (B, T, 1, K) float32, broadcastable over heads."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, K/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, H, K) -> same, rotated in float32 ("rotate half", not interleaved)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """segment_ids (B, T) -> bool (B, 1, T, T): causal and same document."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


@flax.struct.dataclass
class PackedMask:
    """The attention mask of packed windows, in both forms: the dense one the explicit path and
    XLA read, and the segment ids the fused kernels read (an unused form costs nothing: XLA
    drops it)."""

    dense: jax.Array  # (B, 1, T, T) bool, attention_mask(segment_ids).
    segment_ids: jax.Array  # (B, T) int, 0 = padding.

    @classmethod
    def of(cls, segment_ids: jax.Array) -> PackedMask:
        return cls(dense=attention_mask(segment_ids), segment_ids=segment_ids)


def _uniform_fan_in(d_in: int):
    """U(-1/sqrt(d_in), 1/sqrt(d_in)): PyTorch's nn.Linear default for weight and bias, the
    original's init (BUILD_NOTES: it reaches a lower loss here than GPT-2's N(0, 0.02))."""
    bound = 1 / math.sqrt(d_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _linear(cfg: ThinkerConfig, d_in: int, d_out: int, rngs: nnx.Rngs, *, bias=False):
    # With matmul_dtype below the compute dtype, the operands are cast down and the product is
    # accumulated and returned in the compute dtype.
    lower = cfg.matmul_compute_dtype != cfg.compute_dtype
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=cfg.matmul_compute_dtype,
        param_dtype=jnp.float32,
        preferred_element_type=cfg.compute_dtype if lower else None,
        kernel_init=_uniform_fan_in(d_in),
        bias_init=_uniform_fan_in(d_in),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x**2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, *, dtype, eps: float = RMS_NORM_EPS):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., D) in the compute dtype."""
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...]).astype(self.dtype)


class Attention(nnx.Module):
    """Causal self-attention with RoPE; GQA (`q`, `k`, `v`) or MHA (fused `qkv`).

    One module for every path: training and scoring (fused where the backend can), training
    with dropout on the probabilities, and decoding against a key/value cache. A new variant
    (QK-norm, a sliding window, ...) goes in `_project` or `_attend`, and every path gets it.
    """

    def __init__(self, cfg: ThinkerConfig, *, rngs: nnx.Rngs):
        d, k = cfg.d_model, cfg.head_dim
        self.n_heads, self.head_dim = cfg.n_heads, k
        self.n_groups = cfg.kv_groups if cfg.use_gqa else cfg.n_heads
        self.use_gqa = cfg.use_gqa
        self.matmul_dtype = cfg.matmul_compute_dtype
        if cfg.use_gqa:
            self.q = _linear(cfg, d, cfg.n_heads * k, rngs)
            self.k = _linear(cfg, d, self.n_groups * k, rngs)
            self.v = _linear(cfg, d, self.n_groups * k, rngs)
        else:
            self.qkv = _linear(cfg, d, 3 * d, rngs)
        self.o = _linear(cfg, d, d, rngs)
        self.attn_dropout = nnx.Dropout(cfg.attention_dropout_rate)
        self.block = cfg.attention_block
        self.impl = cfg.attention_impl

    def __call__(self, x, cos, sin, mask, *, deterministic=True, rngs=None, cache=None):
        """x (B, T, D), cos/sin (B, T, 1, K) -> (B, T, D).

        Without a cache, mask is a PackedMask of the window (or its dense (B, 1, T, T) bool form,
        which only the XLA path reads). With cache = (keys, values, index):
        keys and values (B, S, G, K) of this layer, index () int32 the slot of x's first token;
        x's keys and values are written there, the queries attend over all S slots under mask
        (B, 1, T, S) bool, and the result is (out, (keys, values)) updated.
        """
        b, t, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        if cache is not None:
            keys, values, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), index, axis=1)
        fused = cache is None and (deterministic or self.attn_dropout.rate == 0)
        impl = attention_kernels.resolve(
            self.impl,
            ctx_len=t,
            head_dim=self.head_dim,
            matmul_dtype=self.matmul_dtype,
            dropout=self.attn_dropout.rate,
        )
        if fused and isinstance(mask, PackedMask) and impl != 'xla':
            # The kernels skip the tiles above the diagonal themselves.
            md = self.matmul_dtype
            out = attention_kernels.attend(
                impl, q.astype(md), k.astype(md), v.astype(md), mask.dense, mask.segment_ids
            ).astype(q.dtype)
            return self.o(out.reshape(b, t, self.n_heads * self.head_dim))
        if isinstance(mask, PackedMask):
            mask = mask.dense
        if cache is None and 0 < self.block < t and t % self.block == 0:
            # Query block i reads keys [0, (i + 1) * block) only: each softmax row still spans
            # every key it may see, so this is exact, at (n + 1) / 2n of the work for n blocks.
            out = jnp.concatenate(
                [
                    self._attend(
                        q[:, start : start + self.block],
                        k[:, : start + self.block],
                        v[:, : start + self.block],
                        mask[:, :, start : start + self.block, : start + self.block],
                        fused=fused,
                        deterministic=deterministic,
                        rngs=rngs,
                    )
                    for start in range(0, t, self.block)
                ],
                axis=1,
            )
        else:
            out = self._attend(q, k, v, mask, fused=fused, deterministic=deterministic, rngs=rngs)
        out = self.o(out.reshape(b, t, self.n_heads * self.head_dim))
        return out if cache is None else (out, (k, v))

    def _project(self, x, cos, sin):
        """x (B, T, D) -> q (B, T, H, K), k and v (B, T, G, K); RoPE on q and k."""
        b, t, _ = x.shape
        if self.use_gqa:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q = apply_rope(q.reshape(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, self.n_groups, self.head_dim), cos, sin)
        return q, k, v.reshape(b, t, self.n_groups, self.head_dim)

    def _attend(self, q, k, v, mask, *, fused, deterministic, rngs):
        """q (B, T, H, K), k/v (B, S, G, K), mask (B, 1, T, S) -> (B, T, H, K).

        Query head h reads kv group h // (H // G) (the original's repeat_interleave).
        """
        dtype, md = q.dtype, self.matmul_dtype
        if fused:
            # XLA's fused attention: the same function, with the dense mask.
            return attention_kernels.attend(
                'xla', q.astype(md), k.astype(md), v.astype(md), mask, None
            ).astype(dtype)
        # Dropout on the probabilities, and the cache's padded slots, need them explicitly;
        # grouping the query heads reads each kv group without repeating it.
        b, t, _, _ = q.shape
        q = q.reshape(b, t, self.n_groups, self.n_heads // self.n_groups, self.head_dim)
        scores = jnp.einsum(
            'btgrk,bsgk->bgrts', q.astype(md), k.astype(md), preferred_element_type=jnp.float32
        )
        scores = jnp.where(mask[:, :, None], scores / math.sqrt(self.head_dim), _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = self.attn_dropout(probs, deterministic=deterministic, rngs=rngs)
        out = jnp.einsum(
            'bgrts,bsgk->btgrk', probs.astype(md), v.astype(md), preferred_element_type=dtype
        )
        return out.reshape(b, t, self.n_heads, self.head_dim)


class MLP(nnx.Module):
    """SwiGLU (`gate_proj`, `up_proj`, `down_proj`, no biases) or exact-GELU (`fc1`, `fc2`)."""

    def __init__(self, cfg: ThinkerConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.use_swiglu = cfg.use_swiglu
        if cfg.use_swiglu:
            self.gate_proj = _linear(cfg, d, f, rngs)
            self.up_proj = _linear(cfg, d, f, rngs)
            self.down_proj = _linear(cfg, f, d, rngs)
        else:
            self.fc1 = _linear(cfg, d, f, rngs, bias=True)
            self.fc2 = _linear(cfg, f, d, rngs, bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., D)."""
        if self.use_swiglu:
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class MoE(nnx.Module):
    """Top-k routed mixture of MLP experts (dense: every expert runs on every token)."""

    def __init__(self, cfg: ThinkerConfig, *, rngs: nnx.Rngs):
        self.top_k = cfg.num_experts_per_tok
        self.router = _linear(cfg, cfg.d_model, cfg.num_experts, rngs)
        self.experts = nnx.List([MLP(cfg, rngs=rngs) for _ in range(cfg.num_experts)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, D) -> (B, T, D)."""
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)  # (B, T, E)
        top_p, top_i = jax.lax.top_k(probs, self.top_k)
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        # (B, T, E) combine weights, zero for experts a token did not choose.
        weights = jnp.sum(jax.nn.one_hot(top_i, probs.shape[-1]) * top_p[..., None], axis=-2)
        out = jnp.zeros(x.shape, jnp.float32)
        for e, expert in enumerate(self.experts):
            out = out + weights[..., e : e + 1] * expert(x).astype(jnp.float32)
        return out.astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm decoder block: x + drop(attn(norm1 x)), then x + drop(mlp(norm2 x))."""

    def __init__(self, cfg: ThinkerConfig, *, rngs: nnx.Rngs):
        dtype = cfg.compute_dtype
        self.norm1 = RMSNorm(cfg.d_model, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = RMSNorm(cfg.d_model, dtype=dtype)
        self.use_moe = cfg.use_moe
        if cfg.use_moe:
            self.moe = MoE(cfg, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)
        self.resid_dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, cos, sin, mask, *, deterministic=True, rngs=None, cache=None):
        """x (B, T, D) -> (B, T, D); with a cache (see Attention), (x, (keys, values))."""
        h = self.attn(
            self.norm1(x), cos, sin, mask, deterministic=deterministic, rngs=rngs, cache=cache
        )
        if cache is not None:
            h, cache = h
        x = x + self.resid_dropout(h, deterministic=deterministic, rngs=rngs)
        ff = self.moe if self.use_moe else self.mlp
        h = ff(self.norm2(x))
        x = x + self.resid_dropout(h, deterministic=deterministic, rngs=rngs)
        return x if cache is None else (x, cache)


def _call_block(block, x, cos, sin, mask, deterministic, rngs):
    return block(x, cos, sin, mask, deterministic=deterministic, rngs=rngs)


# Only the block's inputs are kept for the backward pass, which runs its forward again.
_call_block_remat = nnx.remat(_call_block, static_argnums=(5,))


def _run_block(block, x, cos, sin, mask, deterministic, rngs, remat: bool):
    call = _call_block_remat if remat else _call_block
    return call(block, x, cos, sin, mask, deterministic, rngs)


class Thinker(nnx.Module):
    """Decoder-only LM. Packed rows: tokens attend causally within their segment."""

    def __init__(self, config: ThinkerConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.tok_emb = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=config.compute_dtype,
            # N(0, 1), nn.Embedding's default: the original's init, as for the linears.
            param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(stddev=1.0),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, dtype=config.compute_dtype)
        self.lm_head = _linear(config, config.d_model, config.vocab_size, rngs)

    def hidden_states(
        self, tokens, *, segment_ids=None, positions=None, deterministic=True, rngs=None
    ) -> jax.Array:
        """tokens (B, T) int; segment_ids (B, T) int, 0 = padding (default all ones);
        positions (B, T) int RoPE positions, restarting per document (default arange(T));
        rngs: nnx.Rngs with a 'dropout' stream, needed when deterministic=False.
        Returns the final-normed hidden states (B, T, D) in the compute dtype."""
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if not deterministic and self.config.dropout > 0 and rngs is None:
            raise ValueError('deterministic=False needs rngs=nnx.Rngs(dropout=...)')
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        mask = PackedMask.of(segment_ids)
        x = self.tok_emb(tokens)
        if self.config.scan_layers:
            x = self._scan_blocks(x, cos, sin, mask, deterministic, rngs)
        else:
            for block in self.blocks:
                x = _run_block(block, x, cos, sin, mask, deterministic, rngs, self.config.remat)
        return self.norm(x)

    def _scan_blocks(self, x, cos, sin, mask, deterministic, rngs):
        """The blocks as one lax.scan over their parameters, stacked here on the fly.

        The parameters stay one entry per block (blocks.0, blocks.1, ... as the original and
        every checkpoint name them); stacking copies the block weights once per call, small
        next to the compute. Dropout draws one key per layer, so its masks differ from the loop's.
        """
        graphdef = nnx.graphdef(self.blocks[0])
        stacked = jax.tree.map(
            lambda *xs: jnp.stack(xs), *[nnx.state(block) for block in self.blocks]
        )
        use_dropout = not deterministic and self.config.dropout > 0
        keys = (
            jax.random.split(rngs.dropout(), len(self.blocks))
            if use_dropout
            else jnp.zeros((len(self.blocks),), jnp.uint32)
        )

        def layer(x, xs):
            state, key = xs
            layer_rngs = nnx.Rngs(dropout=key) if use_dropout else None
            return _call_block(
                nnx.merge(graphdef, state), x, cos, sin, mask, deterministic, layer_rngs
            ), None

        if self.config.remat:
            layer = jax.checkpoint(layer)
        return jax.lax.scan(layer, x, (stacked, keys))[0]

    def __call__(
        self, tokens, *, segment_ids=None, positions=None, deterministic=True, rngs=None
    ) -> jax.Array:
        """Same arguments as `hidden_states`; returns logits (B, T, V) in float32."""
        h = self.hidden_states(
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            deterministic=deterministic,
            rngs=rngs,
        )
        return self.lm_head(h).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache (sampling): the same blocks, their attention
# reading and extending the cache.


@flax.struct.dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, in slots 0..S-1 of each row.

    keys, values: tuples of n_layers arrays (B, S, G, K) in the compute dtype, after RoPE.
    index: () int32, slots filled so far; the next tokens go to slots index, index + 1, ...
    start: (B,) int32, first real slot of each row: slots before it hold left padding.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    index: jax.Array
    start: jax.Array

    @classmethod
    def init(
        cls, config: ThinkerConfig, batch_size: int, max_len: int, start: jax.Array | None = None
    ) -> KVCache:
        groups = config.kv_groups if config.use_gqa else config.n_heads
        shape = (batch_size, max_len, groups, config.head_dim)
        zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.n_layers))
        if start is None:
            start = jnp.zeros((batch_size,), jnp.int32)
        return cls(
            keys=zeros,
            values=zeros,
            index=jnp.zeros((), jnp.int32),
            start=jnp.asarray(start, jnp.int32),
        )


def decode_step(
    model: Thinker, tokens: jax.Array, positions: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Runs new tokens through the model against the cache and appends their keys and values.

    tokens, positions: (B, T) int, the T tokens that follow the cache's `index` filled slots
    (a prefill is the whole left-padded prompt with T = its length; a decode step has T = 1).
    Returns logits (B, T, V) float32 and the cache with `index` advanced by T. Inference only:
    no dropout. The caller keeps index + T <= the cache length.
    """
    cfg = model.config
    t = tokens.shape[1]
    slots = jnp.arange(cache.keys[0].shape[1])
    query_slots = cache.index + jnp.arange(t)
    # Causal over slots, and never into a row's left padding.
    mask = (
        (slots[None, None, :] <= query_slots[None, :, None])
        & (slots[None, None, :] >= cache.start[:, None, None])
    )[:, None]  # (B, 1, T, S)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    x = model.tok_emb(tokens)
    new_keys, new_values = [], []
    for block, keys, values in zip(model.blocks, cache.keys, cache.values):
        x, (keys, values) = block(x, cos, sin, mask, cache=(keys, values, cache.index))
        new_keys.append(keys)
        new_values.append(values)
    logits = model.lm_head(model.norm(x)).astype(jnp.float32)
    return logits, cache.replace(
        keys=tuple(new_keys), values=tuple(new_values), index=cache.index + t
    )
