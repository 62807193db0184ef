"""Fused attention kernels for packed windows: causal attention within each document, GQA.

Each computes what `thinker.Attention._attend`'s explicit path computes without dropout: query
head h reads kv group h // (H // G), a query sees the keys of its own segment up to itself, scale
1/sqrt(K), softmax in float32. Padding (segment 0) attends to earlier padding, as the dense mask
has it; its outputs are never trained on.

  xla     jax.nn.dot_product_attention(implementation='xla') with the dense (B, 1, T, T) mask:
          every platform. In jax 0.10.2 implementation=None is this path too, never cuDNN.
  cudnn   jax.nn.dot_product_attention(implementation='cudnn') with the same dense mask, which
          cuDNN reads as a bias: NVIDIA GPUs, bfloat16 operands only.
  pallas  the Pallas Triton flash attention with segment ids (jax.experimental.pallas.ops.gpu):
          NVIDIA GPUs; no GQA in the kernel, so k and v are repeated to H heads. Skips the tiles
          above the diagonal.
  splash  the TPU splash attention with SegmentIds and a causal mask (GQA native), per example
          under vmap; the window must be a multiple of 128. Skips the tiles above the diagonal.

pallas and splash run on a CPU in Pallas's interpreter (slow; what the tests check them with).
Shapes: B batch, T window, H query heads, G kv groups, K head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas', 'splash')
# What 'auto' runs on each platform. Only 'xla' has been timed beside the others on each of
# them so far (BUILD_NOTES "Attention kernels"), so it stays the choice until the device check
# (scripts/device_check.py) measures a faster one that computes the same function.
AUTO = {'cpu': 'xla', 'gpu': 'xla', 'tpu': 'xla'}
# Where each kernel compiles; pallas and splash also run on a CPU, interpreted.
PLATFORMS = {'xla': ('cpu', 'gpu', 'tpu'), 'cudnn': ('gpu',), 'pallas': ('gpu', 'cpu'),
             'splash': ('tpu', 'cpu')}
# The splash kernel's tiles: 128 lanes on a TPU.
SPLASH_BLOCK = 128
# Pallas Triton's tiles: its dots need sides of at least 16.
PALLAS_MIN_BLOCK = 16


def resolve(implementation: str, platform: str | None = None) -> str:
    """'auto' -> the platform's choice (AUTO); any other name as it is."""
    if implementation != 'auto':
        return implementation
    return AUTO.get(platform or jax.default_backend(), 'xla')


def check(implementation: str, ctx_len: int, head_dim: int, matmul_dtype) -> None:
    """Raises ValueError naming what a kernel cannot compute for this shape or dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'attention_impl {implementation!r} must be one of '
                         f'{", ".join(IMPLEMENTATIONS)}')
    if implementation == 'splash' and ctx_len % SPLASH_BLOCK:
        raise ValueError(f'attention_impl splash needs ctx_len a multiple of {SPLASH_BLOCK} '
                         f'(got {ctx_len}): change ctx_len or use attention_impl=xla')
    if implementation == 'pallas' and ctx_len % PALLAS_MIN_BLOCK:
        raise ValueError(f'attention_impl pallas needs ctx_len a multiple of {PALLAS_MIN_BLOCK} '
                         f'(got {ctx_len}): change ctx_len or use attention_impl=xla')
    if implementation == 'cudnn':
        if jnp.dtype(matmul_dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError('attention_impl cudnn needs bfloat16 operands: set dtype=bfloat16 '
                             '(or matmul_dtype=bfloat16), or use attention_impl=xla')
        if head_dim % 8 or head_dim > 256:
            raise ValueError(f'attention_impl cudnn needs a head dim that is a multiple of 8 and '
                             f'at most 256 (got {head_dim}): change d_model or n_heads')


def check_platform(implementation: str, platform: str) -> None:
    """Raises ValueError when the kernel does not run on this platform at all."""
    if platform not in PLATFORMS[resolve(implementation, platform)]:
        where = ' or '.join(p.upper() for p in PLATFORMS[implementation])
        raise ValueError(f'attention_impl {implementation} runs on {where}, not on '
                         f'{platform.upper()}: use attention_impl=auto or xla')


def _interpret() -> bool:
    """Pallas kernels run interpreted where they cannot compile (a CPU)."""
    return jax.default_backend() == 'cpu'


def attend(implementation: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           segment_ids: jax.Array) -> jax.Array:
    """q (B, T, H, K), k/v (B, T, G, K), mask (B, 1, T, T) bool, segment_ids (B, T) int
    -> (B, T, H, K) in q's dtype. q, k and v are already in the matmul dtype."""
    scale = 1 / math.sqrt(q.shape[-1])
    implementation = resolve(implementation)
    if implementation in ('xla', 'cudnn'):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation=implementation)
    if implementation == 'pallas':
        return _pallas(q, k, v, segment_ids, scale)
    return _splash(q, k, v, segment_ids, scale)


def _pallas(q, k, v, segment_ids, scale):
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=import-outside-toplevel
    t, heads, groups = q.shape[1], q.shape[2], k.shape[2]
    # The kernel reads kv head h for query head h: repeat each group (repeat_interleave), whose
    # gradient sums the group's heads back.
    k, v = (jnp.repeat(x, heads // groups, axis=2) for x in (k, v))
    block = max(b for b in (128, 64, 32, 16) if t % b == 0)
    backward = min(block, 64)  # Triton's fused backward keeps more tiles live.
    sizes = attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=backward,
                                 block_kv_dkv=backward, block_q_dq=backward,
                                 block_kv_dq=backward)
    return attention.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale, causal=True,
                         block_sizes=sizes, interpret=_interpret())


@functools.cache
def _splash_kernel(t: int, heads: int, interpret: bool):
    # pylint: disable-next=import-outside-toplevel
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(heads)])
    b = SPLASH_BLOCK
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                              block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash(q, k, v, segment_ids, scale):
    # pylint: disable-next=import-outside-toplevel
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    kernel = _splash_kernel(q.shape[1], q.shape[2], _interpret())
    # Per example, heads first; splash takes no scale, so q carries it.
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    segment_ids = segment_ids.astype(jnp.int32)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(
        q=s1, kv=s1)))(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                       heads_first(v), segment_ids)
    return heads_first(out).astype(q.dtype)
