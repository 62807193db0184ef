"""The accelerator check: every figure a GPU or TPU should be measured for, in one go.

  python -m launch.device_check --output_dir=DIR [--quick]

1. The real launcher (`python -m launch.stage_a --config=configs/accelerator.py`: the tiny
   shape in bfloat16, attention_dropout 0, the bundled corpus) at batch 16, cold and then with
   a warm compilation cache, and at batch 128: its tokens/s (median of the log intervals after
   the first) and its first step.
2. The train step alone (measurements.bench_train_step) at batch 16 and 128 with each
   attention_impl the platform has, on packed synthetic windows: step time, tokens/s, MFU.
3. The original's GPU recipe (torch.autocast bfloat16, SDPA, torch.compile: OriginalRecipe.gpu)
   timed beside our step, interleaved, on the same batch, at batch 16 and 128.

It writes DIR/device_check.json (every figure) and DIR/device_check.md (the table, also
printed). --quick shrinks every shape and step count so the whole path runs on a CPU in a few
minutes (what tests/test_device_check.py runs); its figures mean nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import configs
from benchmarks import measurements, original
from muomni_jax.errors import UserError, first_line
from muomni_jax.io import run_dir
from muomni_jax.model import attention_kernels, flops
from muomni_jax.model.thinker import ThinkerConfig

# The launcher's config file, wherever the configs package is installed.
ACCELERATOR_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(configs.__file__)), 'accelerator.py'
)
# The kernels each platform can time (cudnn needs a GPU; pallas and splash would only be
# interpreted on a CPU, which times nothing useful but proves the path in --quick).
IMPLEMENTATIONS = {
    'gpu': ('xla', 'cudnn', 'pallas'),
    'tpu': ('xla', 'splash'),
    'cpu': ('xla', 'pallas'),
}
# The quick run's shape: one layer (the path is the same at any depth), a fraction of a second
# per step on a CPU.
_QUICK_MODEL = dict(
    vocab_size=256,
    n_layers=1,
    d_model=64,
    n_heads=4,
    d_ff=128,
    ctx_len=32,
    tokenizer_sample_size=20000,
    peak_flops_per_device=1e11,
)


@dataclasses.dataclass(frozen=True)
class Plan:
    batch_sizes: tuple[int, ...]
    launcher_steps: int  # Per launcher run; five log intervals (every launcher_steps // 5).
    warmup: int
    repeats: int
    compile_original: bool
    overrides: dict  # Config fields set on configs/accelerator.py.

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                batch_sizes=(4,),
                launcher_steps=5,
                warmup=1,
                repeats=2,
                compile_original=False,
                overrides=dict(_QUICK_MODEL, dtype='float32'),
            )
        return cls(
            batch_sizes=(16, 128),
            launcher_steps=300,
            warmup=3,
            repeats=20,
            compile_original=True,
            overrides={},
        )


def _config(base, plan: Plan, **fields):
    """base (configs/accelerator.py's) with the plan's and these fields."""
    config = base.copy_and_resolve_references()
    config.update(plan.overrides)
    config.update(fields)
    return config


def packed_batch(
    batch_size: int, ctx_len: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """A batch as the input pipeline packs one: three documents a window (cut at 1/4 and 5/8),
    positions restarting at each, every target weighted but the two document ends."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, (batch_size, ctx_len + 1)).astype(np.int32)
    cuts = [0, ctx_len // 4, 5 * ctx_len // 8, ctx_len]
    segment_ids = np.concatenate(
        [np.full(b - a, i + 1) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    ).astype(np.int32)
    positions = np.concatenate([np.arange(b - a) for a, b in zip(cuts, cuts[1:])])
    weights = np.append(segment_ids[:-1] == segment_ids[1:], 1.0).astype(np.float32)
    tile = lambda x: np.tile(x, (batch_size, 1))
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=tile(segment_ids),
        positions=tile(positions.astype(np.int32)),
        weights=tile(weights),
    )


def bundled_corpus(data_path: str) -> str:
    """data_path as an absolute path the launcher finds from any folder: as given where it exists
    from here, else beside the configs package (a checkout, or an editable install of one)."""
    if os.path.exists(data_path):
        return os.path.abspath(data_path)
    beside = os.path.join(os.path.dirname(os.path.dirname(ACCELERATOR_CONFIG)), data_path)
    if os.path.exists(beside):
        return beside
    raise UserError(
        f'data_path {data_path} is neither in this folder nor in the checkout of '
        f'{os.path.dirname(ACCELERATOR_CONFIG)}: pass --data_path=A_TEXT_FILE'
    )


def run_launcher(
    plan: Plan,
    batch_size: int,
    save_dir: str,
    compilation_cache: str,
    data_path: str,
    tokenizer_path: str = '',
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One `launch.stage_a` process on configs/accelerator.py; its tokens/s and first step."""
    fields = {
        **plan.overrides,
        'batch_size': batch_size,
        'max_steps': plan.launcher_steps,
        'log_every': max(plan.launcher_steps // 5, 1),
        'eval_every': 10**9,
        'save_every': 10**9,
        'eval_batches': 1,
        'sample_prompts': '',
        'warmup_steps': 10,
        'save_dir': save_dir,
        'compilation_cache_dir': compilation_cache,
        'tokenizer_path': tokenizer_path,
        'num_epochs': 1000,
        'data_path': data_path,
    }
    command = [
        sys.executable,
        '-m',
        'launch.stage_a',
        f'--config={ACCELERATOR_CONFIG}',
        *(f'--config.{k}={v}' for k, v in fields.items()),
    ]
    start = time.perf_counter()
    done = subprocess.run(
        command,
        env=dict(os.environ, PYTHONUNBUFFERED='1'),
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        log(done.stdout[-2000:] + done.stderr[-3000:])
        return {
            'batch_size': batch_size,
            'error': (done.stderr.strip().splitlines() or [f'exit {done.returncode}'])[-1],
        }
    with open(run_dir.training_log_path(save_dir)) as f:
        rates = [r['tokens_per_s'] for r in json.load(f) if 'tokens_per_s' in r]
    first = [line for line in done.stdout.splitlines() if line.startswith('First step: ')]
    return {
        'batch_size': batch_size,
        'steps': plan.launcher_steps,
        'wall_s': wall,
        'tokens_per_s_intervals': rates,
        # The first interval holds the compilation.
        'tokens_per_s': float(np.median(rates[1:] or rates)),
        'first_step_s': float(first[0].split()[2]) if first else None,
    }


def step_only(base, plan: Plan, platform: str, log) -> list[dict[str, Any]]:
    """The train step alone, per batch size and attention kernel."""
    rows = []
    for batch_size in plan.batch_sizes:
        for impl in IMPLEMENTATIONS.get(platform, ('xla',)):
            config = _config(base, plan, batch_size=batch_size, attention_impl=impl)
            row = {'batch_size': batch_size, 'attention_impl': impl}
            try:
                figures, _, _, _, _ = measurements.bench_train_step(
                    config,
                    packed_batch(batch_size, config.ctx_len, config.vocab_size),
                    warmup=plan.warmup,
                    repeats=plan.repeats,
                )
            except Exception as e:  # Any failure is a row of the table.
                row['error'] = first_line(e)
                log(f'  {impl} at batch {batch_size}: {row["error"]}')
                rows.append(row)
                continue
            row.update(
                step_s=figures.step_s,
                tokens_per_s=figures.tokens_per_s,
                first_step_s=figures.first_step_s,
                loss=figures.loss,
                mfu=_mfu(config, figures.tokens_per_s),
            )
            log(f'  {impl} at batch {batch_size}: {figures.tokens_per_s:,.0f} tok/s')
            rows.append(row)
    return rows


def _mfu(config, tokens_per_s: float) -> float | None:
    peak, _ = flops.system_peak_flops(config.peak_flops_per_device, measure_cpu=False)
    per_token = flops.flops_per_token(ThinkerConfig.from_config(config))['total']
    return per_token * tokens_per_s / peak if peak else None


def against_original(base, plan: Plan, platform: str, log) -> list[dict[str, Any]]:
    """The original's recipe beside our step (configs/accelerator.py, attention_impl auto),
    interleaved, per batch size."""
    recipe = original.OriginalRecipe.gpu() if platform == 'gpu' else original.OriginalRecipe()
    recipe = dataclasses.replace(recipe, compile=recipe.compile and plan.compile_original)
    rows = []
    for batch_size in plan.batch_sizes:
        config = _config(base, plan, batch_size=batch_size)
        batch = packed_batch(batch_size, config.ctx_len, config.vocab_size)
        _, _, state, _, step = measurements.bench_train_step(
            config, batch, warmup=plan.warmup, repeats=1
        )
        figures, _ = original.compare_with_original(
            config, batch, state, step, plan.repeats, recipe
        )
        rows.append({'batch_size': batch_size, **dataclasses.asdict(figures)})
        log(
            f'  batch {batch_size}: '
            + (f'{figures.speedup:.2f}x' if figures.available else figures.reason)
        )
    return rows


def run(
    base,
    output_dir: str,
    quick: bool = False,
    data_path: str = '',
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every measurement, on base (configs/accelerator.py's config); writes device_check.json
    and device_check.md into output_dir. The launcher trains on data_path (default: base's, found
    by bundled_corpus)."""
    plan = Plan.of(quick)
    data_path = bundled_corpus(data_path or base.data_path)
    device = jax.devices()[0]
    result: dict[str, Any] = {
        'device': device.device_kind,
        'platform': device.platform,
        'jax': jax.__version__,
        'devices': jax.device_count(),
        'quick': quick,
        'plan': dataclasses.asdict(plan),
        'auto': attention_kernels.AUTO,
        'load_average_1m_start': os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as work:
        log('The launcher (configs/accelerator.py)...')
        cache = os.path.join(work, 'compilation_cache')
        cold = run_launcher(
            plan, plan.batch_sizes[0], os.path.join(work, 'cold'), cache, data_path, log=log
        )
        tokenizer = run_dir.tokenizer_path(os.path.join(work, 'cold'))
        warm = run_launcher(
            plan,
            plan.batch_sizes[0],
            os.path.join(work, 'warm'),
            cache,
            data_path,
            tokenizer_path=tokenizer,
            log=log,
        )
        launcher = [dict(cold, cache='cold'), dict(warm, cache='warm')]
        for batch_size in plan.batch_sizes[1:]:
            save_dir = os.path.join(work, f'b{batch_size}')
            launcher.append(
                dict(
                    run_launcher(
                        plan,
                        batch_size,
                        save_dir,
                        cache,
                        data_path,
                        tokenizer_path=tokenizer,
                        log=log,
                    ),
                    cache='cold',
                )
            )
        result['launcher'] = launcher
    log('The train step alone, per attention kernel...')
    result['step_only'] = step_only(base, plan, device.platform, log)
    log("The original's recipe beside ours...")
    result['original'] = against_original(base, plan, device.platform, log)
    result['load_average_1m_end'] = os.getloadavg()[0]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'device_check.json'), 'w') as f:
        json.dump(result, f, indent=1)
    table = format_table(result)
    with open(os.path.join(output_dir, 'device_check.md'), 'w') as f:
        f.write(table + '\n')
    log(table)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as Markdown tables: launcher against step, kernels, the original."""

    def number(value, spec=',.0f'):
        return '-' if value is None else format(value, spec)

    lines = [
        f'{result["device"]} ({result["platform"]}, jax {result["jax"]}, '
        f'load {result["load_average_1m_start"]:.1f} -> {result["load_average_1m_end"]:.1f})',
        '',
        '| launcher run | batch | tokens/s | first step (s) | of step-only |',
        '|---|---|---|---|---|',
    ]
    best = {}
    for row in result['step_only']:
        if 'error' not in row:
            best[row['batch_size']] = max(best.get(row['batch_size'], 0), row['tokens_per_s'])
    auto = attention_kernels.AUTO.get(result['platform'], 'xla')
    same_impl = {
        r['batch_size']: r['tokens_per_s']
        for r in result['step_only']
        if r.get('attention_impl') == auto and 'error' not in r
    }
    for row in result['launcher']:
        if 'error' in row:
            lines.append(f'| {row["cache"]} | {row["batch_size"]} | error: {row["error"]} | | |')
            continue
        ratio = (
            row['tokens_per_s'] / same_impl[row['batch_size']]
            if row['batch_size'] in same_impl
            else None
        )
        lines.append(
            f'| {row["cache"]} cache | {row["batch_size"]} | '
            f'{number(row["tokens_per_s"])} | {number(row["first_step_s"], ".1f")} | '
            f'{number(ratio and 100 * ratio, ".1f")}% |'
        )
    lines += [
        '',
        '| attention_impl | batch | step (ms) | tokens/s | MFU | first step (s) |',
        '|---|---|---|---|---|---|',
    ]
    for row in result['step_only']:
        if 'error' in row:
            lines.append(
                f'| {row["attention_impl"]} | {row["batch_size"]} | error: '
                f'{row["error"][:120]} | | | |'
            )
            continue
        lines.append(
            f'| {row["attention_impl"]} | {row["batch_size"]} | '
            f'{1000 * row["step_s"]:.2f} | {number(row["tokens_per_s"])} | '
            f'{number(row["mfu"] and 100 * row["mfu"], ".1f")}% | '
            f'{row["first_step_s"]:.1f} |'
        )
    lines += [
        '',
        "| batch | original's recipe tokens/s | ours (accelerator.py) tokens/s | speed-up |",
        '|---|---|---|---|',
    ]
    for row in result['original']:
        if not row['available']:
            lines.append(f'| {row["batch_size"]} | not compared: {row["reason"]} | | |')
            continue
        lines.append(
            f'| {row["batch_size"]} | {number(row["tokens_per_s"])} | '
            f'{number(row["ours_tokens_per_s"])} | {row["speedup"]:.2f}x |'
        )
    return '\n'.join(lines)
