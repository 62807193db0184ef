"""The accelerator check in one command (benchmarks/device_check.py says what it measures): the
real launcher, the step alone per attention kernel, and the original's GPU recipe beside ours.
Writes OUTPUT_DIR/device_check.json and device_check.md.

  python -m launch.device_check --output_dir=DIR [--quick] [--data_path=TEXT]

On a box without ml_collections, carry its wheel first; see README "GPU and TPU".
"""

from absl import app, flags

from launch import cli

_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'device_check', 'Where the JSON and table go.')
_QUICK = flags.DEFINE_bool(
    'quick',
    False,
    'Tiny shapes and few steps: the whole path in a few '
    'CPU minutes (a test of the script, not a measurement).',
)
_DATA_PATH = flags.DEFINE_string(
    'data_path',
    '',
    "The launcher's corpus; default: configs/accelerator.py's, found beside the configs package.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    from configs import accelerator  # After flag parsing: the config imports JAX.

    with cli.one_line_errors():
        from benchmarks import device_check  # After flag parsing: JAX and TF are slow to import.

        device_check.run(
            accelerator.get_config(),
            _OUTPUT_DIR.value,
            quick=_QUICK.value,
            data_path=_DATA_PATH.value,
        )


if __name__ == '__main__':
    app.run(main)
