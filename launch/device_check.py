"""The accelerator check of issue 21, in one command (muomni_jax/device_check.py says what it
measures): the real launcher, the step alone per attention kernel, and the original's GPU
recipe beside ours. Writes OUTPUT_DIR/device_check.json and device_check.md.

  python -m launch.device_check --output_dir=DIR [--quick]

On a box without ml_collections (the H200 here), carry its wheel first; see README "GPU and TPU".
"""

from absl import app
from absl import flags

from launch import cli

_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'device_check', 'Where the JSON and table go.')
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny shapes and few steps: the whole path in a few '
                           'CPU minutes (a test of the script, not a measurement).')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    from configs import accelerator  # pylint: disable=import-outside-toplevel
    with cli.one_line_errors():
        from muomni_jax import device_check  # pylint: disable=import-outside-toplevel
        device_check.run(accelerator.get_config(), _OUTPUT_DIR.value, quick=_QUICK.value)


if __name__ == '__main__':
    app.run(main)
