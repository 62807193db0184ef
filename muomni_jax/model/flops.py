"""Model FLOPs per trained token, device peaks, and MFU.

Training FLOPs per token (forward + backward = 3 x forward; a matmul of an input by a (m, n)
weight costs 2mn per token forward):

  6 * N_blocks                       matmul weights of the blocks (attention q/k/v/o or qkv/o,
                                     MLP, router; for MoE only the top-k experts a token uses)
  + 6 * d_model * vocab_size         the lm_head (the embedding lookup is a gather: no FLOPs)
  + 6 * n_layers * d_model * (T + 1) attention scores QK^T and the weighted sum PV: forward
                                     2 * 2 * d_model per (query, key) pair; with causal masking
                                     a query at position t sees t + 1 keys, (T + 1) / 2 on average

Norms, RoPE, softmax and the optimizer are not counted, as is the convention (PaLM, MaxText), so
MFU is the share of the device's matmul peak spent on the model's useful matmuls. Packed
documents make attention cheaper still; this count ignores that and charges the full causal
window, as an implementation without per-document kernels computes it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from muomni_jax.model.thinker import ThinkerConfig

# Dense bfloat16 peak FLOP/s of one JAX device, by a substring of jax.Device.device_kind.
# First match wins, so longer names come first. Sources: vendor data sheets (no sparsity).
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12),
    ('H100', 989e12),  # SXM / HBM3
    ('H200', 989e12),
    ('H800', 989e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('L4', 121e12),
    ('A10G', 70e12),
    ('V100', 125e12),  # float16 tensor cores; no bfloat16
    ('TPU v6 lite', 918e12),  # v6e (Trillium)
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),  # one device is one chip (megacore)
    ('TPU v3', 61.5e12),  # one device is one of a chip's two cores
    ('TPU v2', 23e12),
)


def matmul_params(cfg: ThinkerConfig) -> dict[str, int]:
    """Weights that multiply each token's activations, per part of the model."""
    d, f, k = cfg.d_model, cfg.d_ff, cfg.head_dim
    kv = (cfg.kv_groups if cfg.use_gqa else cfg.n_heads) * k
    attention = d * d + 2 * d * kv + d * d  # q, k, v, o (MHA's fused qkv is the same count)
    mlp = (3 if cfg.use_swiglu else 2) * d * f
    if cfg.use_moe:
        mlp = cfg.num_experts_per_tok * mlp + d * cfg.num_experts  # chosen experts + router
    return {'blocks': cfg.n_layers * (attention + mlp), 'lm_head': d * cfg.vocab_size}


def flops_per_token(cfg: ThinkerConfig, seq_len: int | None = None) -> dict[str, float]:
    """Training FLOPs per token (see the module docstring), by part, and their 'total'."""
    seq_len = cfg.ctx_len if seq_len is None else seq_len
    params = matmul_params(cfg)
    parts = {
        'blocks': 6.0 * params['blocks'],
        'attention': 6.0 * cfg.n_layers * cfg.d_model * (seq_len + 1),
        'lm_head': 6.0 * params['lm_head'],
    }
    parts['total'] = sum(parts.values())
    return parts


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """The table's bfloat16 peak for an accelerator, or None (CPU, or a kind not in the table)."""
    device = jax.devices()[0] if device is None else device
    if device.platform == 'cpu':
        return None
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in device.device_kind.lower():
            return peak
    return None


# The CPU peak: the same measurement for the live MFU of every log line and for launch.bench,
# so the two agree. A 2048^2 float32 matmul keeps every core busy for about 0.1 s.
CPU_PEAK_SIZE = 2048
CPU_PEAK_REPEATS = 5


def measure_matmul_peak(
    size: int = CPU_PEAK_SIZE, repeats: int = CPU_PEAK_REPEATS, dtype=jnp.float32
) -> float:
    """FLOP/s of a jitted (size, size) @ (size, size) matmul on the default device: the best of
    `repeats` runs after a warm-up run. On CPU this is the host's peak (one JAX CPU device uses
    every core).

    The best, not the median: other work on a shared machine, or the input pipeline's threads
    still winding down, can only slow a run down, and a peak read low makes every MFU high.
    """
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / min(times)


def system_peak_flops(
    override_per_device: float = 0.0,
    *,
    measure_cpu: bool = True,
    cpu_size: int = CPU_PEAK_SIZE,
    devices: list[jax.Device] | None = None,
) -> tuple[float | None, str]:
    """Peak FLOP/s of the run's devices (default: all), and where the figure came from.

    override_per_device > 0 wins. Accelerators use the table, times the device count. On CPU
    every virtual device shares the same cores, so the peak is measure_matmul_peak per process
    (about 0.6 s at cpu_size 2048), or None when measure_cpu is False.
    """
    devices = jax.devices() if devices is None else devices
    if override_per_device > 0:
        return override_per_device * len(devices), 'config peak_flops_per_device'
    if devices[0].platform == 'cpu':
        if not measure_cpu:
            return None, 'none (CPU peak not measured)'
        peak = measure_matmul_peak(cpu_size)
        return peak * jax.process_count(), f'best float32 {cpu_size}^2 matmul'
    peak = device_peak_flops(devices[0])
    if peak is None:
        return None, f'unknown device kind {devices[0].device_kind!r}: set peak_flops_per_device'
    return peak * len(devices), f'bfloat16 peak of {devices[0].device_kind}'
