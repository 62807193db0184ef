"""Benchmark Stage A on this machine: FLOPs, step time, MFU, compile, memory, input pipeline,
checkpoint blocking and decoding.

  python -m launch.bench --config=configs/tiny.py [--repeats=5] [--output=bench.json]
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from launch import cli
from muomni_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file.', lock_config=True
)
_OUTPUT = flags.DEFINE_string('output', '', 'JSON file to write; default <save_dir>/bench.json.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Train steps run after the first, before timing.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats of each figure (the median).')
_PIPELINE_BATCHES = flags.DEFINE_integer('pipeline_batches', 50, 'Batches the input bench reads.')
_DECODE_TOKENS = flags.DEFINE_integer('decode_tokens', 64, 'New tokens per decode repeat.')
_PEAK_SIZE = flags.DEFINE_integer('peak_size', 2048, 'Side of the CPU peak matmul.')
_COMPARE_ORIGINAL = flags.DEFINE_bool(
    'compare_original', True, 'Also time the original PyTorch step beside ours (needs torch).'
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    config = _CONFIG.value
    output = _OUTPUT.value or os.path.join(config.save_dir, 'bench.json')
    with cli.one_line_errors():
        from benchmarks import measurements  # After flag parsing: JAX and TF are slow to import.

        if _REPEATS.value < 1 or _WARMUP.value < 0:
            raise UserError('--repeats must be >= 1 and --warmup >= 0')
        result = measurements.run_benchmark(
            config,
            warmup=_WARMUP.value,
            repeats=_REPEATS.value,
            pipeline_batches=_PIPELINE_BATCHES.value,
            decode_tokens=_DECODE_TOKENS.value,
            peak_size=_PEAK_SIZE.value,
            compare_original=_COMPARE_ORIGINAL.value,
        )
    print(measurements.format_table(result))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, 'w') as f:
        json.dump(result.to_json(), f, indent=1)
    print(f'Wrote {output}')


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    app.run(main)
