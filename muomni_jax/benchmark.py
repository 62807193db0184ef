"""Measures every stage of Stage A: model FLOPs, train step, compile, memory, input pipeline,
async checkpoint saves and KV-cache decoding. `launch/bench.py` prints the table and writes JSON.

Each timing is the median over `repeats` runs after warm-up. On CPU the MFU peak is a float32
matmul measured right before each timed train step, and the MFU is the median of the per-step
ratios, so a machine shared with other work (whose load changes by the second) compares the step
with the peak it could get at that moment; elsewhere the peak is flops.PEAK_BF16_FLOPS or the
config's peak_flops_per_device.
"""

from __future__ import annotations

import functools
import os
import resource
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from muomni_jax import checkpointing
from muomni_jax import flops
from muomni_jax import input_pipeline
from muomni_jax import partitioning
from muomni_jax import steps
from muomni_jax import tokenizer as tokenizer_lib
from muomni_jax import train
from muomni_jax.errors import UserError
from muomni_jax.thinker import Thinker, count_params


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _tokenizer(config) -> tuple[tokenizer_lib.Tokenizer, str]:
    """The run's tokenizer if one exists (config, then save_dir), else one trained here."""
    saved = os.path.join(config.save_dir, 'tokenizer.model')
    path = config.tokenizer_path or (saved if os.path.exists(saved) else '')
    if path:
        return tokenizer_lib.Tokenizer.load(path), path
    docs = input_pipeline.documents(config, 'train')
    tokenizer = tokenizer_lib.train_tokenizer(input_pipeline.document_texts(docs),
                                              config.vocab_size, config.tokenizer_sample_size)
    return tokenizer, 'trained by the bench'


def bench_input_pipeline(config, num_batches: int) -> tuple[dict[str, Any], Any]:
    """Tokenize + pack the training split, then deliver num_batches batches, on the host.

    Returns the figures and the first batch (to train on). End to end is the serial time of
    both stages for the tokens delivered, so the tokenizer's share is included.
    """
    tokenizer, source = _tokenizer(config)
    docs = input_pipeline.documents(config, 'train')
    start = time.perf_counter()
    split = input_pipeline.pack(docs, tokenizer, config.ctx_len)
    pack_s = time.perf_counter() - start
    steps = input_pipeline.steps_per_epoch(split, config.batch_size)
    if steps == 0:
        raise UserError(f'{config.data_path} packs into fewer than one batch of '
                         f'{config.batch_size} windows: lower batch_size or ctx_len')
    num_batches = min(num_batches, steps)
    batches = input_pipeline.train_batches(split, config.batch_size, seed=config.seed, epoch=0,
                                           num_steps=num_batches)
    first = next(batches)  # Includes the tf.data start-up, as a training run pays it.
    start = time.perf_counter()
    delivered = 1 + sum(1 for _ in batches)
    batches_s = time.perf_counter() - start
    tokens_per_batch = config.batch_size * config.ctx_len
    pack_rate = split.num_tokens / pack_s
    batch_rate = (delivered - 1) * tokens_per_batch / max(batches_s, 1e-9)
    figures = {
        'tokenizer': source,
        'corpus_tokens': split.num_tokens,
        'tokenize_pack_s': pack_s,
        'tokenize_pack_tokens_per_s': pack_rate,
        'batches_measured': delivered - 1,
        'batch_tokens_per_s': batch_rate,
        'end_to_end_tokens_per_s': 1.0 / (1.0 / pack_rate + 1.0 / batch_rate),
    }
    return figures, first


def bench_train_step(config, batch: dict[str, np.ndarray], *, warmup: int, repeats: int,
                     measure_peak: Callable[[], float] | None = None
                     ) -> tuple[dict[str, Any], Any, Any, Any]:
    """Time to the first step (trace + compile + run), then the median steady-state step.

    measure_peak, if given, runs before each timed step; its results are returned as 'peaks'.
    Returns the figures, the trained state, its graphdef and the mesh.
    """
    train.validate_config(config)
    mesh = partitioning.make_mesh(config.mesh)
    partitioning.check_batch_size(config.batch_size, mesh, config.gradient_accumulation_steps)
    setup = steps.create_train_state(config, mesh, max(warmup + repeats + 1, 2))
    state, graphdef, step = setup.state, setup.graphdef, setup.train_step
    batch = partitioning.global_batch(batch, partitioning.batch_sharding(mesh))

    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times, peaks = [], []
    for _ in range(repeats):
        if measure_peak is not None:
            peaks.append(measure_peak())
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    figures = {
        'first_step_s': first_step_s,
        'step_s': step_s,
        'step_s_all': times,
        'peaks': peaks,
        'tokens_per_s': config.batch_size * config.ctx_len / step_s,
        'loss': float(metrics['loss_sum']) / max(float(metrics['weight_sum']), 1.0),
    }
    return figures, state, graphdef, mesh


def bench_checkpoint(state: Any, repeats: int) -> dict[str, Any]:
    """How long Checkpointer.save blocks the caller, and how long the write takes in all."""
    blocking, total = [], []
    with tempfile.TemporaryDirectory() as directory:
        checkpointer = checkpointing.Checkpointer(directory, max_to_keep=1)
        checkpointer.start_writing(0)
        try:
            for step in range(1, repeats + 1):
                start = time.perf_counter()
                checkpointer.save(step, state, {'step': step})
                blocking.append(time.perf_counter() - start)
                checkpointer.wait()
                total.append(time.perf_counter() - start)
        finally:
            checkpointer.close()
    return {'save_blocking_s': float(np.median(blocking)), 'save_total_s': float(np.median(total)),
            'save_blocking_s_all': blocking}


def bench_decode(params: Any, graphdef: Any, batch_sizes: tuple[int, ...], new_tokens: int,
                 repeats: int) -> dict[str, Any]:
    """Greedy KV-cache decoding of new_tokens after a one-token prompt, tokens/s per batch size.

    Uses muomni_jax.sampling.generate_ids (issue 5); reports why not when it is missing.
    """
    try:
        from muomni_jax.sampling import generate_ids  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        return {'available': False, 'reason': f'muomni_jax.sampling.generate_ids: {e}'}
    model = nnx.merge(graphdef, params)
    figures = {'available': True, 'new_tokens': new_tokens}
    for batch_size in batch_sizes:
        prompts = [[tokenizer_lib.BOS_ID]] * batch_size
        # eos_id -1 never matches, so every row decodes all new_tokens.
        run = lambda: generate_ids(model, prompts, max_new_tokens=new_tokens, temperature=0.0,
                                   eos_id=-1)
        try:
            run()  # Compile.
        except UserError as e:  # e.g. decode_tokens longer than the model's context
            return {'available': False, 'reason': str(e)}
        seconds = _median_time(run, repeats)
        figures[f'batch_{batch_size}_tokens_per_s'] = batch_size * new_tokens / seconds
    return figures


def run_benchmark(config, *, warmup: int = 1, repeats: int = 3, pipeline_batches: int = 50,
                  checkpoint_repeats: int = 3, decode_tokens: int = 64,
                  decode_batch_sizes: tuple[int, ...] = (1, 8), peak_size: int = 2048,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every measurement on `config` (a configs/*.py ConfigDict) and returns the figures."""
    model_config = train.validate_config(config)
    device = jax.devices()[0]
    result: dict[str, Any] = {
        'conditions': {
            'device': device.device_kind, 'platform': device.platform,
            'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
            'load_average_1m_start': os.getloadavg()[0], 'jax': jax.__version__,
            'batch_size': config.batch_size, 'ctx_len': config.ctx_len, 'dtype': config.dtype,
            'dropout': config.dropout, 'loss_chunk_tokens': config.loss_chunk_tokens,
            'remat': config.remat, 'scan_layers': config.scan_layers, 'warmup': warmup,
            'repeats': repeats,
        },
    }
    per_token = flops.flops_per_token(model_config)
    abstract = nnx.eval_shape(lambda: Thinker(model_config, rngs=nnx.Rngs(0)))
    result['model'] = {'params': count_params(abstract),
                       'flops_per_token': per_token,
                       'flops_per_step': per_token['total'] * config.batch_size * config.ctx_len}

    log('Input pipeline...')
    result['input_pipeline'], batch = bench_input_pipeline(config, pipeline_batches)

    cpu_peak = device.platform == 'cpu' and not config.peak_flops_per_device
    log('Train step...')
    result['train'], state, graphdef, _ = bench_train_step(
        config, batch, warmup=warmup, repeats=repeats,
        measure_peak=functools.partial(flops.measure_matmul_peak, peak_size) if cpu_peak else None)
    train_figures = result['train']
    flops_per_step = result['model']['flops_per_step']
    train_figures['flops_per_s'] = flops_per_step / train_figures['step_s']
    if cpu_peak:
        peaks = train_figures.pop('peaks')
        result['peak'] = {'flops_per_s': float(np.median(peaks)), 'all': peaks,
                          'source': f'measured float32 {peak_size}^2 matmul before each step'}
        train_figures['mfu'] = float(np.median(
            [flops_per_step / t / p for t, p in zip(train_figures['step_s_all'], peaks)]))
    else:
        del train_figures['peaks']
        peak, source = flops.system_peak_flops(config.peak_flops_per_device)
        result['peak'] = {'flops_per_s': peak, 'source': source}
        train_figures['mfu'] = train_figures['flops_per_s'] / peak if peak else None
    result['input_pipeline']['ratio_to_training'] = (
        result['input_pipeline']['end_to_end_tokens_per_s'] / result['train']['tokens_per_s'])

    log('Checkpoint save...')
    result['checkpoint'] = bench_checkpoint(state, checkpoint_repeats)
    result['checkpoint']['blocking_over_step'] = (
        result['checkpoint']['save_blocking_s'] / result['train']['step_s'])

    log('Decode...')
    result['decode'] = bench_decode(state.params, graphdef, decode_batch_sizes, decode_tokens,
                                    repeats)
    result['peak_host_memory_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result['conditions']['load_average_1m_end'] = os.getloadavg()[0]
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as aligned 'name  value' lines."""
    m, t, p = result['model'], result['train'], result['input_pipeline']
    c, d, cond = result['checkpoint'], result['decode'], result['conditions']
    peak = result['peak']['flops_per_s']
    rows = [
        ('device', f'{cond["device"]} x{cond["num_devices"]} ({cond["cpu_count"]} host cores, '
                   f'load {cond["load_average_1m_start"]:.1f} -> '
                   f'{cond["load_average_1m_end"]:.1f})'),
        ('batch x ctx, dtype', f'{cond["batch_size"]} x {cond["ctx_len"]}, {cond["dtype"]}'),
        ('parameters', f'{m["params"]:,}'),
        ('FLOPs/token (train)', f'{m["flops_per_token"]["total"] / 1e6:.2f} M (blocks '
                                f'{m["flops_per_token"]["blocks"] / 1e6:.2f}, attention '
                                f'{m["flops_per_token"]["attention"] / 1e6:.2f}, lm_head '
                                f'{m["flops_per_token"]["lm_head"] / 1e6:.2f})'),
        ('first step (compile)', f'{t["first_step_s"]:.2f} s'),
        ('train step', f'{t["step_s"]:.3f} s (median of {cond["repeats"]})'),
        ('tokens/s', f'{t["tokens_per_s"]:,.0f}'),
        ('achieved FLOP/s', f'{t["flops_per_s"] / 1e9:.1f} GFLOP/s'),
        ('peak FLOP/s', f'{peak / 1e9:.1f} GFLOP/s (median; {result["peak"]["source"]})' if peak
         else result['peak']['source']),
        ('MFU', f'{100 * t["mfu"]:.1f}% (median of per-step step/peak ratios)'
                if t['mfu'] is not None else 'n/a'),
        ('peak host memory', f'{result["peak_host_memory_mb"]:,.0f} MB'),
        ('tokenize + pack', f'{p["tokenize_pack_tokens_per_s"]:,.0f} tok/s '
                            f'({p["corpus_tokens"]:,} tokens in {p["tokenize_pack_s"]:.1f} s)'),
        ('batch delivery', f'{p["batch_tokens_per_s"]:,.0f} tok/s'),
        ('input end to end', f'{p["end_to_end_tokens_per_s"]:,.0f} tok/s = '
                             f'{p["ratio_to_training"]:,.1f}x training'),
        ('ckpt save blocks', f'{c["save_blocking_s"]:.3f} s = {c["blocking_over_step"]:.2f} '
                             f'steps (write {c["save_total_s"]:.2f} s)'),
    ]
    if d['available']:
        for key, value in d.items():
            if key.endswith('_tokens_per_s'):
                rows.append((f'decode {key[:-len("_tokens_per_s")].replace("_", " ")}',
                             f'{value:,.0f} tok/s'))
    else:
        rows.append(('decode', f'unavailable ({d["reason"]})'))
    width = max(len(name) for name, _ in rows)
    return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)
