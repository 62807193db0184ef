"""Plot training curves of one or more Stage A runs from their training_log.json.

python -m launch.plot --checkpoint_dir=checkpoints/cpu_demo [--checkpoint_dir=OTHER ...]
    [--output=curves.png]
"""

import os

from absl import app, flags

from launch import cli

_CHECKPOINT_DIRS = flags.DEFINE_multi_string(
    'checkpoint_dir', None, 'save_dir of a run; repeat the flag to compare runs on one figure.'
)
_OUTPUT = flags.DEFINE_string(
    'output',
    '',
    'PNG to write. Default: CHECKPOINT_DIR/training_curves.png for one run, '
    'training_curves.png in the current folder for several.',
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    dirs = _CHECKPOINT_DIRS.value
    output = _OUTPUT.value or (
        os.path.join(dirs[0], 'training_curves.png') if len(dirs) == 1 else 'training_curves.png'
    )
    with cli.one_line_errors():
        # After flag parsing: matplotlib is slow to import.
        from muomni_jax.inference import plotting

        plotting.plot_runs(dirs, output)
    print(f'Wrote {output}')


if __name__ == '__main__':
    flags.mark_flags_as_required(['checkpoint_dir'])
    app.run(main)
