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

Where a kernel runs is the platform of the devices the step is compiled for: the mesh that
`on_mesh` places the traced function on (a pre-flight compiles for TPUs or GPUs on a CPU host),
else the default device, where an unplaced jit runs. pallas and splash run on a CPU in Pallas's
interpreter (slow; what the tests check them with). On a mesh of several devices they run under
jax.shard_map, one block of rows per device (the mesh's every axis splits the batch, as
parallel.partitioning lays batches out): Mosaic cannot be partitioned automatically, and
Triton's call would otherwise be fed the whole batch, gathered onto every device. cuDNN's call
has XLA's own partitioning rule.
Shapes: B batch, T window, H query heads, G kv groups, K head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas', 'splash')
# What 'auto' runs on each platform, where the shape and dtype allow it (else xla). On GPUs
# cuDNN: it partitions under a sharded batch and needs less memory than xla (launch.preflight);
# whether pallas is faster stays open until a device times both (launch.device_check). On TPUs
# splash: it partitions (under shard_map) and skips the tiles above the diagonal.
AUTO = {'cpu': 'xla', 'gpu': 'cudnn', 'tpu': 'splash'}
# Where each kernel compiles; pallas and splash also run on a CPU, interpreted.
PLATFORMS = {
    'xla': ('cpu', 'gpu', 'tpu'),
    'cudnn': ('gpu',),
    'pallas': ('gpu', 'cpu'),
    'splash': ('tpu', 'cpu'),
}
# The splash kernel's tiles: 128 lanes on a TPU.
SPLASH_BLOCK = 128
# Pallas Triton's tiles: its dots need sides of at least 16.
PALLAS_MIN_BLOCK = 16


_MESH: contextvars.ContextVar[jax.sharding.Mesh | None] = contextvars.ContextVar(
    'attention_kernels_mesh', default=None
)


def on_mesh(mesh: jax.sharding.Mesh, fn: Callable) -> Callable:
    """fn, whose kernels are traced for `mesh`'s devices and partitioned over its batch."""

    @functools.wraps(fn)
    def placed(*args, **kwargs):
        with _placed_on(mesh):
            return fn(*args, **kwargs)

    return placed


@contextlib.contextmanager
def _placed_on(mesh: jax.sharding.Mesh) -> Iterator[None]:
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def platform_of(device) -> str:
    """'cpu', 'gpu' or 'tpu' ('cuda' and 'rocm' devices are GPUs)."""
    return 'gpu' if device.platform in ('cuda', 'rocm', 'gpu') else device.platform


def target_platform() -> str:
    """The platform being compiled for: the placed mesh's, else the default device's."""
    mesh = _MESH.get()
    return platform_of(mesh.devices.flat[0] if mesh is not None else jax.devices()[0])


def resolve(
    implementation: str,
    platform: str | None = None,
    *,
    ctx_len: int | None = None,
    head_dim: int | None = None,
    matmul_dtype=None,
    dropout: float = 0.0,
) -> str:
    """'auto' -> the platform's choice (AUTO), or xla where that kernel cannot compute this
    shape, dtype or attention dropout; any other name as it is."""
    if implementation != 'auto':
        return implementation
    choice = AUTO.get(platform or target_platform(), 'xla')
    if choice == 'xla' or dropout > 0:
        return 'xla'
    try:
        check(choice, ctx_len or SPLASH_BLOCK, head_dim or 64, matmul_dtype or jnp.bfloat16)
    except ValueError:
        return 'xla'
    return choice


def check(implementation: str, ctx_len: int, head_dim: int, matmul_dtype) -> None:
    """Raises ValueError naming what a kernel cannot compute for this shape or dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f'attention_impl {implementation!r} must be one of {", ".join(IMPLEMENTATIONS)}'
        )
    if implementation == 'splash' and ctx_len % SPLASH_BLOCK:
        raise ValueError(
            f'attention_impl splash needs ctx_len a multiple of {SPLASH_BLOCK} '
            f'(got {ctx_len}): change ctx_len or use attention_impl=xla'
        )
    if implementation == 'pallas' and ctx_len % PALLAS_MIN_BLOCK:
        raise ValueError(
            f'attention_impl pallas needs ctx_len a multiple of {PALLAS_MIN_BLOCK} '
            f'(got {ctx_len}): change ctx_len or use attention_impl=xla'
        )
    if implementation == 'cudnn':
        if jnp.dtype(matmul_dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                'attention_impl cudnn needs bfloat16 operands: set dtype=bfloat16 '
                '(or matmul_dtype=bfloat16), or use attention_impl=xla'
            )
        if head_dim % 8 or head_dim > 256:
            raise ValueError(
                f'attention_impl cudnn needs a head dim that is a multiple of 8 and '
                f'at most 256 (got {head_dim}): change d_model or n_heads'
            )


def check_platform(implementation: str, platform: str) -> None:
    """Raises ValueError when the kernel does not run on this platform at all."""
    platform = 'gpu' if platform in ('cuda', 'rocm') else platform
    if platform not in PLATFORMS[resolve(implementation, platform)]:
        where = ' or '.join(p.upper() for p in PLATFORMS[implementation])
        raise ValueError(
            f'attention_impl {implementation} runs on {where}, not on '
            f'{platform.upper()}: use attention_impl=auto or xla'
        )


def _interpret() -> bool:
    """Pallas kernels run interpreted where they cannot compile: when compiling for a CPU."""
    return target_platform() == 'cpu'


def attend(
    implementation: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    segment_ids: jax.Array,
) -> jax.Array:
    """q (B, T, H, K), k/v (B, T, G, K), mask (B, 1, T, T) bool, segment_ids (B, T) int
    -> (B, T, H, K) in q's dtype. q, k and v are already in the matmul dtype; implementation
    is resolved (not 'auto')."""
    scale = 1 / math.sqrt(q.shape[-1])
    if implementation in ('xla', 'cudnn'):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation=implementation
        )
    kernel = functools.partial(
        _pallas if implementation == 'pallas' else _splash, scale=scale, interpret=_interpret()
    )
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    # One block of rows per device, every mesh axis named (Mosaic refuses automatic axes).
    rows = P(tuple(mesh.axis_names))
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(rows, rows, rows, rows), out_specs=rows, check_vma=False
    )(q, k, v, segment_ids)


def _pallas(q, k, v, segment_ids, scale, interpret):
    from jax.experimental.pallas.ops.gpu import attention

    t, heads, groups = q.shape[1], q.shape[2], k.shape[2]
    # The kernel reads kv head h for query head h: repeat each group (repeat_interleave), whose
    # gradient sums the group's heads back.
    k, v = (jnp.repeat(x, heads // groups, axis=2) for x in (k, v))
    block = max(b for b in (128, 64, 32, 16) if t % b == 0)
    backward = min(block, 64)  # Triton's fused backward keeps more tiles live.
    sizes = attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=backward,
        block_kv_dkv=backward,
        block_q_dq=backward,
        block_kv_dq=backward,
    )
    return attention.mha(
        q,
        k,
        v,
        segment_ids.astype(jnp.int32),
        sm_scale=scale,
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )


@functools.cache
def _splash_kernel(t: int, heads: int, interpret: bool):
    # Imported here: only this kernel needs it.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(heads)])
    b = SPLASH_BLOCK
    sizes = splash.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash(q, k, v, segment_ids, scale, interpret):
    # Imported here: only this kernel needs it.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
    # Per example, heads first; splash takes no scale, so q carries it.
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    segment_ids = segment_ids.astype(jnp.int32)
    out = jax.vmap(
        lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1))
    )(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), segment_ids)
    return heads_first(out).astype(q.dtype)
