"""Pre-flight: compile the real train and eval steps for GPUs or TPUs this machine need not have,
and say whether the config fits and how fast it could go (muomni_jax/training/preflight.py).

  python -m launch.preflight --config=configs/tiny.py --target=v5e-256
  python -m launch.preflight --config=configs/accelerator.py --target=h100x8 --config.batch_size=256
  python -m launch.preflight --config=configs/large.py --target=v5p-128,v6e-64,h100x8 \\
      --output=preflight.json

Needs the targets' compilers: pip install --target .compilers -r requirements-preflight.txt
(read from .compilers, or --compilers=DIR; an installed libtpu or CUDA plugin serves too).
Exit status: 0 when the config fits every target, 1 when one does not fit, 2 for a bad flag,
config or target (one `error:` line).
"""

import json
import os
import sys

from absl import app, flags

from launch import cli, training_config

_TARGET = flags.DEFINE_list(
    'target',
    None,
    'Targets: v4-N, v5e-N, v5p-N, v6e-N (Cloud TPU slice names), a100xN, h100xN, h200xN.',
)
_OUTPUT = flags.DEFINE_string('output', None, 'Also write every report to this JSON file.')
_COMPILERS = flags.DEFINE_string(
    'compilers',
    '.compilers',
    'A folder the compilers were installed into with pip install --target.',
)


def _use_compilers(argv: list[str]) -> None:
    """Before JAX starts a backend: the compilers' folder on the path, and every compile on this
    host's CPU (the targets are described, not probed; libtpu and the CUDA plugin stay quiet)."""
    folder = next((a.split('=', 1)[1] for a in argv if a.startswith('--compilers=')), '.compilers')
    if os.path.isdir(folder):
        sys.path.insert(0, os.path.abspath(folder))
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    # libtpu's one-process-per-host lockfile guards TPU chips; a compile uses none, so several
    # pre-flights (and the tests') may run side by side.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    # Nothing to autotune on: no device runs here.
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_autotune_level=0'
    ).strip()


def _mb(n: float) -> str:
    return f'{n / 1e9:.2f} GB' if n >= 1e9 else f'{n / 1e6:.1f} MB'


def _seconds(s: float) -> str:
    return f'{s * 1e3:.2f} ms' if s < 1 else f'{s:.2f} s'


def describe(report: dict) -> str:
    """The report of one target as the lines the console shows."""
    m, roof = report['memory_per_device'], report['roofline']
    mesh = ' '.join(f'{k}={v}' for k, v in report['mesh'].items())
    share = m['total'] / report['device_memory']
    lines = [
        f'Target {report["target"]}: {report["chips"]} x {report["device_kind"]} '
        f'({report["hosts"]} host{"s" if report["hosts"] > 1 else ""}, {report["topology"]}); '
        f'mesh {mesh}; batch {report["batch_size"]} x {report["ctx_len"]}, accumulation '
        f'{report["gradient_accumulation_steps"]}; attention_impl {report["attention_impl"]}',
        f'  Memory per device: state {_mb(m["state"])}, batch {_mb(m["batch"])}, temporaries '
        f'{_mb(m["temporaries"])}, code {_mb(m["code"])}; total {_mb(m["total"])} of '
        f'{_mb(report["device_memory"])} ({share:.0%}): '
        + ('fits' if report['fits'] else 'DOES NOT FIT'),
    ]
    if report['compiler_refused']:
        lines.append(f'    The compiler refused it: {report["compiler_refused"]}')
    for remedy in report.get('remedies', []):
        if 'error' in remedy:
            lines.append(f'    {remedy["change"]}: {remedy["error"]}')
        else:
            lines.append(
                f'    {remedy["change"]}: total {_mb(remedy["total_bytes"])} per device, '
                + ('fits' if remedy['fits'] else 'still does not fit')
            )
    compiler = report['compiler_flops_per_device']
    lines.append(
        f'  FLOPs per step: {roof["model_flops_per_step"]:.3g} (model/flops.py); the '
        "compiler's: "
        + (
            f"{compiler:.3g} per device, a loop's body counted once"
            if compiler
            else 'none for this target'
        )
    )
    if report['collectives']:
        lines.append(
            '  Collectives per step, per device: '
            + ', '.join(
                f'{op} x{c["count"]} ({_mb(c["bytes"])})' for op, c in report['collectives'].items()
            )
        )
    lines.append(f'  Attention compiled as: {", ".join(report["kernels"])}')
    if report['attention_gathers']:
        lines.append(
            f'  Warning: {report["attention_gathers"]} all-gathers bring whole '
            'micro-batches of queries, keys or values onto every device: the '
            'attention kernel is not partitioned.'
        )
    parts = ', '.join(
        f'{k[:-2]} {_seconds(roof[k])}'
        for k in ('compute_s', 'memory_s', 'collectives_s')
        if k in roof
    )
    lines.append(
        f'  Roofline floor: {_seconds(roof["floor_s"])} a step ({parts}), so at most '
        f'{roof["tokens_per_s_ceiling"]:,.0f} tokens/s: a bound from published peaks, '
        'not a measurement'
    )
    lines.append(
        f'  Compile: train step {report["compile_s"]:.1f} s, eval step '
        f'{report["eval_compile_s"]:.1f} s'
    )
    return '\n'.join(lines)


def main(argv):
    if len(argv) > 1:
        cli.fail(f'unexpected arguments: {" ".join(argv[1:])} (use --config.name=value)')
    config = training_config.value()
    reports = []
    with cli.one_line_errors():
        if not _TARGET.value:
            from muomni_jax.errors import UserError

            raise UserError('give --target, e.g. --target=v5e-256 or --target=h100x8,v6e-64')
        from muomni_jax.training import preflight

        for target in _TARGET.value:
            report = preflight.check(config, target)
            print(describe(report), flush=True)
            reports.append(report)
    if _OUTPUT.value:
        with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
            json.dump(reports, f, indent=1)
    sys.exit(0 if all(r['fits'] for r in reports) else 1)


if __name__ == '__main__':
    _use_compilers(sys.argv)
    flags.mark_flags_as_required(['config'])
    app.run(main, flags_parser=training_config.parse_flags)
