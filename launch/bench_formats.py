"""Token-cache build rate of the same text as plain text, JSON Lines and Parquet, side by side.

  python data/text/write_formats.py     # the bundled corpus as .jsonl(.gz/.zst), .parquet, saved/
  python -m launch.bench_formats --config=configs/tiny.py [--folder=data/text/formats]

Prints tokens/s per format and its ratio to plain text (the formats take turns in each repeat).
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
_FOLDER = flags.DEFINE_string(
    'folder', 'data/text/formats', "data/text/write_formats.py's output folder."
)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Builds per format (the median).')
_NAMES = {
    'text': 'corpus.txt',
    'jsonl': 'corpus.jsonl',
    'jsonl.gz': 'corpus.jsonl.gz',
    'jsonl.zst': 'corpus.jsonl.zst',
    'parquet': 'corpus.parquet',
    'saved': 'saved',
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    with cli.one_line_errors():
        from benchmarks import cache_formats  # After flag parsing: JAX and TF are slow to import.

        paths = {name: os.path.join(_FOLDER.value, file) for name, file in _NAMES.items()}
        paths['text'] = _CONFIG.value.data_path
        missing = [p for p in paths.values() if not os.path.exists(p)]
        if missing:
            raise UserError(
                f'{missing[0]} does not exist: run python data/text/write_formats.py '
                f'{_CONFIG.value.data_path} {_FOLDER.value} first'
            )
        if _REPEATS.value < 1:
            raise UserError('--repeats must be >= 1')
        figures = cache_formats.bench_cache_build(_CONFIG.value, paths, _REPEATS.value)
    for name, f in figures.items():
        print(
            f'{name:10s} {f["tokens_per_s"]:>12,.0f} tokens/s  {f["seconds"]:6.2f} s  '
            f'x{f["ratio_to_first"]:.2f} of text'
        )
    print(json.dumps({'load_average': os.getloadavg(), 'figures': figures}))


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    app.run(main)
