"""Measures every stage of Stage A: model FLOPs, train step, compile, memory, the token cache
(build, open, batch delivery), async checkpoint saves and KV-cache decoding, and the original's
step beside ours (benchmarks/original.py). `launch/bench.py` prints the table and writes JSON.

Each timing is the median over `repeats` runs after warm-up. On CPU the MFU peak is a float32
matmul measured right before each timed train step, and the MFU is the median of the per-step
ratios, so a machine shared with other work (whose load changes by the second) compares the step
with the peak it could get at that moment; elsewhere the peak is flops.PEAK_BF16_FLOPS or the
config's peak_flops_per_device.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks.original import OriginalFigures, compare_with_original
from muomni_jax.data import host_data, tokenizer_setup
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.inference import sampling
from muomni_jax.model import flops
from muomni_jax.model.thinker import abstract_model, count_params
from muomni_jax.parallel import partitioning
from muomni_jax.training import checkpointing, run_plan, steps

# ----------------------------------------------------------------------------------------------
# One dataclass per section; BenchResult.to_json() is what launch/bench.py writes.


@dataclasses.dataclass
class Conditions:
    """What the figures were measured on and with."""

    device: str
    platform: str
    num_devices: int
    cpu_count: int | None
    load_average_1m_start: float
    jax: str
    batch_size: int
    ctx_len: int
    dtype: str
    dropout: float
    loss_chunk_tokens: int
    remat: bool
    scan_layers: bool
    warmup: int
    repeats: int
    load_average_1m_end: float | None = None


@dataclasses.dataclass
class ModelFigures:
    params: int
    flops_per_token: dict[str, float]  # flops.flops_per_token: total, blocks, attention, lm_head.
    flops_per_step: float


@dataclasses.dataclass
class InputPipelineFigures:
    corpus_tokens: int  # Both splits.
    cache_build_s: float  # Tokenizing the corpus into an empty token cache.
    cache_build_tokens_per_s: float
    cache_open_s: float  # Opening the built cache again, as every later run does.
    cache_bytes_per_token: float  # On disk.
    batches_measured: int
    batch_tokens_per_s: float  # Training batches cut from the cache by host_data, host only.
    placed_tokens_per_s: float  # The same batches, each also placed on the devices.
    sources: int = 1  # Sources of the mixture the batches draw from.
    ratio_to_training: float | None = None  # placed_tokens_per_s / training tokens/s.


@dataclasses.dataclass
class TrainFigures:
    first_step_s: float  # Trace + compile + run.
    step_s: float  # Median of the timed steps.
    step_s_all: list[float]
    tokens_per_s: float
    loss: float
    flops_per_s: float = 0.0
    mfu: float | None = None  # None: no peak known.


@dataclasses.dataclass
class PeakFigures:
    flops_per_s: float | None
    source: str
    all: list[float] | None = None  # Each measurement, on CPU (one before each timed step).


@dataclasses.dataclass
class CheckpointFigures:
    save_blocking_s: float  # How long Checkpointer.save blocks the caller (median).
    save_total_s: float  # Until the write is on disk (median).
    save_blocking_s_all: list[float]
    blocking_over_step: float = 0.0  # save_blocking_s in train steps.


@dataclasses.dataclass
class DecodeFigures:
    available: bool
    reason: str = ''  # Why not, when unavailable.
    new_tokens: int = 0
    tokens_per_s: dict[int, float] = dataclasses.field(default_factory=dict)  # By batch size.


@dataclasses.dataclass
class BenchResult:
    conditions: Conditions
    model: ModelFigures
    input_pipeline: InputPipelineFigures
    train: TrainFigures
    peak: PeakFigures
    checkpoint: CheckpointFigures
    decode: DecodeFigures
    peak_host_memory_mb: float
    original: OriginalFigures = dataclasses.field(
        default_factory=lambda: OriginalFigures(available=False, reason='not measured')
    )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Measurements


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_input_pipeline(config, num_batches: int) -> tuple[InputPipelineFigures, Any]:
    """Builds the token cache of every source from scratch (in a temporary cache_dir), opens it
    again as a resumed run would, then delivers num_batches training batches through the
    trainer's own path (host_data: every source of a mixture, this process's shards), each
    also placed on the devices as the training loop places it.

    Returns the figures and the first host batch (to train on). The tokenizer is the run's
    (config, then save_dir) or, when there is none yet, one trained here like a first run's.
    """
    plan = run_plan.resolve(config)
    tokenizer = tokenizer_setup.load_or_train_tokenizer(plan.data, plan.output.save_dir)
    quiet = lambda line: None
    sharding = partitioning.batch_sharding(partitioning.make_mesh(config.mesh))
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = dataclasses.replace(plan.data, cache_dir=cache_dir)
        start = time.perf_counter()
        data = host_data.load(cached, tokenizer, quiet)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        data = host_data.load(cached, tokenizer, quiet)
        open_s = time.perf_counter() - start
        disk_bytes = sum(
            f.stat().st_size
            for key in os.scandir(cache_dir)
            for f in os.scandir(key.path)
            if f.name.endswith(('.tokens', '.docs'))
        )
        # The first batch pays for the epoch permutations, as a training run's does; the rest
        # are timed, twice: cut on the host, then also placed as the loop places them.
        first = next(data.train_batches(config.seed, 0, 0))
        delivered = min(num_batches, data.steps_per_epoch) - 1
        rest = lambda: itertools.islice(data.train_batches(config.seed, 0, 1), delivered)
        start = time.perf_counter()
        for _ in rest():
            pass
        host_s = time.perf_counter() - start
        start = time.perf_counter()
        for batch in rest():
            jax.block_until_ready(partitioning.global_batch(batch, sharding))
        placed_s = time.perf_counter() - start
    tokens = data.totals['train_tokens'] + data.totals['validation_tokens']
    batch_tokens = config.batch_size * config.ctx_len
    figures = InputPipelineFigures(
        corpus_tokens=tokens,
        cache_build_s=build_s,
        cache_build_tokens_per_s=tokens / build_s,
        cache_open_s=open_s,
        cache_bytes_per_token=disk_bytes / max(tokens, 1),
        batches_measured=delivered,
        sources=len(data.sources),
        batch_tokens_per_s=delivered * batch_tokens / max(host_s, 1e-9),
        placed_tokens_per_s=delivered * batch_tokens / max(placed_s, 1e-9),
    )
    return figures, first


def bench_train_step(
    config,
    batch: dict[str, np.ndarray],
    *,
    warmup: int,
    repeats: int,
    measure_peak: Callable[[], float] | None = None,
) -> tuple[TrainFigures, list[float], Any, Any, Callable]:
    """Time to the first step (trace + compile + run), then the median steady-state step.

    measure_peak, if given, runs before each timed step; its results are returned second.
    Returns the figures, the peaks, the trained state, its graphdef and the jitted step.
    """
    plan = run_plan.resolve(config)
    mesh = partitioning.make_mesh(config.mesh)
    partitioning.check_batch_size(config.batch_size, mesh, config.gradient_accumulation_steps)
    setup = steps.make_train_setup(plan, mesh, max(warmup + repeats + 1, 2))
    state, step = setup.state, setup.train_step
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
    figures = TrainFigures(
        first_step_s=first_step_s,
        step_s=step_s,
        step_s_all=times,
        tokens_per_s=config.batch_size * config.ctx_len / step_s,
        loss=float(metrics['loss_sum']) / max(float(metrics['weight_sum']), 1.0),
    )
    return figures, peaks, state, setup.graphdef, step


def _peak_and_mfu(
    config, figures: TrainFigures, peaks: list[float], flops_per_step: float, peak_size: int
) -> PeakFigures:
    """Sets figures.flops_per_s and .mfu; the peak: the CPU matmuls measured, else the table."""
    figures.flops_per_s = flops_per_step / figures.step_s
    if peaks:
        figures.mfu = float(
            np.median([flops_per_step / t / p for t, p in zip(figures.step_s_all, peaks)])
        )
        return PeakFigures(
            flops_per_s=float(np.median(peaks)),
            all=peaks,
            source=f'best float32 {peak_size}^2 matmul before each step',
        )
    peak, source = flops.system_peak_flops(config.peak_flops_per_device)
    figures.mfu = figures.flops_per_s / peak if peak else None
    return PeakFigures(flops_per_s=peak, source=source)


def bench_checkpoint(state: Any, repeats: int) -> CheckpointFigures:
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
    return CheckpointFigures(
        save_blocking_s=float(np.median(blocking)),
        save_total_s=float(np.median(total)),
        save_blocking_s_all=blocking,
    )


def bench_decode(
    params: Any, graphdef: Any, batch_sizes: tuple[int, ...], new_tokens: int, repeats: int
) -> DecodeFigures:
    """Greedy KV-cache decoding of new_tokens after a one-token prompt, tokens/s per batch size."""
    model = nnx.merge(graphdef, params)
    figures = DecodeFigures(available=True, new_tokens=new_tokens)
    for batch_size in batch_sizes:
        prompts = [[tokenizer_lib.BOS_ID]] * batch_size
        # eos_id -1 never matches, so every row decodes all new_tokens.
        run = functools.partial(
            sampling.generate_ids,
            model,
            prompts,
            max_new_tokens=new_tokens,
            temperature=0.0,
            eos_id=-1,
        )
        try:
            run()  # Compile.
        except UserError as e:  # e.g. decode_tokens longer than the model's context
            return DecodeFigures(available=False, reason=str(e))
        figures.tokens_per_s[batch_size] = batch_size * new_tokens / _median_time(run, repeats)
    return figures


def _conditions(config, warmup: int, repeats: int) -> Conditions:
    device = jax.devices()[0]
    return Conditions(
        device=device.device_kind,
        platform=device.platform,
        num_devices=jax.device_count(),
        cpu_count=os.cpu_count(),
        load_average_1m_start=os.getloadavg()[0],
        jax=jax.__version__,
        batch_size=config.batch_size,
        ctx_len=config.ctx_len,
        dtype=config.dtype,
        dropout=config.dropout,
        loss_chunk_tokens=config.loss_chunk_tokens,
        remat=config.remat,
        scan_layers=config.scan_layers,
        warmup=warmup,
        repeats=repeats,
    )


def run_benchmark(
    config,
    *,
    warmup: int = 1,
    repeats: int = 3,
    pipeline_batches: int = 50,
    checkpoint_repeats: int = 3,
    decode_tokens: int = 64,
    decode_batch_sizes: tuple[int, ...] = (1, 8),
    peak_size: int = 2048,
    compare_original: bool = True,
    log: Callable[[str], None] = print,
) -> BenchResult:
    """Runs every measurement on `config` (a configs/*.py ConfigDict) and returns the figures."""
    model_config = run_plan.resolve(config).model
    conditions = _conditions(config, warmup, repeats)
    per_token = flops.flops_per_token(model_config)
    model = ModelFigures(
        params=count_params(abstract_model(model_config)[1]),
        flops_per_token=per_token,
        flops_per_step=per_token['total'] * config.batch_size * config.ctx_len,
    )

    log('Input pipeline...')
    pipeline, batch = bench_input_pipeline(config, pipeline_batches)

    cpu_peak = conditions.platform == 'cpu' and not config.peak_flops_per_device
    log('Train step...')
    train_figures, peaks, state, graphdef, step = bench_train_step(
        config,
        batch,
        warmup=warmup,
        repeats=repeats,
        measure_peak=functools.partial(flops.measure_matmul_peak, peak_size) if cpu_peak else None,
    )
    peak = _peak_and_mfu(config, train_figures, peaks, model.flops_per_step, peak_size)
    pipeline.ratio_to_training = pipeline.placed_tokens_per_s / train_figures.tokens_per_s

    original = OriginalFigures(available=False, reason='--compare_original=false')
    if compare_original:
        log('The original (PyTorch) step, interleaved with ours...')
        original, state = compare_with_original(config, batch, state, step, repeats)

    log('Checkpoint save...')
    checkpoint = bench_checkpoint(state, checkpoint_repeats)
    checkpoint.blocking_over_step = checkpoint.save_blocking_s / train_figures.step_s

    log('Decode...')
    decode = bench_decode(state.params, graphdef, decode_batch_sizes, decode_tokens, repeats)
    conditions.load_average_1m_end = os.getloadavg()[0]
    return BenchResult(
        conditions=conditions,
        model=model,
        input_pipeline=pipeline,
        train=train_figures,
        peak=peak,
        checkpoint=checkpoint,
        decode=decode,
        original=original,
        peak_host_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def format_table(result: BenchResult) -> str:
    """The figures as aligned 'name  value' lines."""
    m, t, p = result.model, result.train, result.input_pipeline
    c, d, cond, peak = result.checkpoint, result.decode, result.conditions, result.peak
    per_token = m.flops_per_token
    rows = [
        (
            'device',
            f'{cond.device} x{cond.num_devices} ({cond.cpu_count} host cores, '
            f'load {cond.load_average_1m_start:.1f} -> {cond.load_average_1m_end:.1f})',
        ),
        ('batch x ctx, dtype', f'{cond.batch_size} x {cond.ctx_len}, {cond.dtype}'),
        ('parameters', f'{m.params:,}'),
        (
            'FLOPs/token (train)',
            f'{per_token["total"] / 1e6:.2f} M (blocks '
            f'{per_token["blocks"] / 1e6:.2f}, attention '
            f'{per_token["attention"] / 1e6:.2f}, lm_head '
            f'{per_token["lm_head"] / 1e6:.2f})',
        ),
        ('first step (compile)', f'{t.first_step_s:.2f} s'),
        ('train step', f'{t.step_s:.3f} s (median of {cond.repeats})'),
        ('tokens/s', f'{t.tokens_per_s:,.0f}'),
        ('achieved FLOP/s', f'{t.flops_per_s / 1e9:.1f} GFLOP/s'),
        (
            'peak FLOP/s',
            f'{peak.flops_per_s / 1e9:.1f} GFLOP/s (median; {peak.source})'
            if peak.flops_per_s
            else peak.source,
        ),
        (
            'MFU',
            f'{100 * t.mfu:.1f}% (median of per-step step/peak ratios)'
            if t.mfu is not None
            else 'n/a',
        ),
        ('peak host memory', f'{result.peak_host_memory_mb:,.0f} MB'),
        (
            'token cache build',
            f'{p.cache_build_tokens_per_s:,.0f} tok/s '
            f'({p.corpus_tokens:,} tokens in {p.cache_build_s:.1f} s, '
            f'{p.cache_bytes_per_token:.2f} bytes/token on disk)',
        ),
        ('token cache open', f'{1000 * p.cache_open_s:.1f} ms'),
        (
            'batches from cache',
            f'{p.batch_tokens_per_s:,.0f} tok/s on the host, '
            f'{p.placed_tokens_per_s:,.0f} tok/s placed on the devices = '
            f'{p.ratio_to_training:,.1f}x what training consumes '
            f'({p.sources} source{"s" if p.sources > 1 else ""})',
        ),
        (
            'ckpt save blocks',
            f'{c.save_blocking_s:.3f} s = {c.blocking_over_step:.2f} '
            f'steps (write {c.save_total_s:.2f} s)',
        ),
    ]
    o = result.original
    rows.append(
        (
            'original (PyTorch) step',
            f'{o.tokens_per_s:,.0f} tok/s; ours {o.ours_tokens_per_s:,.0f} tok/s in the same '
            f'run: {o.speedup:.2f}x (torch {o.torch}, interleaved)'
            if o.available
            else f'not compared ({o.reason})',
        )
    )
    if d.available:
        rows += [(f'decode batch {b}', f'{rate:,.0f} tok/s') for b, rate in d.tokens_per_s.items()]
    else:
        rows.append(('decode', f'unavailable ({d.reason})'))
    width = max(len(name) for name, _ in rows)
    return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)
