"""Stage A: pretrain the Thinker on text.

  python -m launch.stage_a --config=configs/tiny.py [--config.batch_size=8 ...] [--verbose]

Exit status: 0 when training finished or was stopped by SIGTERM / a first Ctrl-C (after saving a
checkpoint), 2 for a bad flag, config or input (one `error:` line), 130 after a second Ctrl-C.
"""

import sys

from absl import app, flags

from launch import cli, training_config


def main(argv):
    if len(argv) > 1:
        cli.fail(f'unexpected arguments: {" ".join(argv[1:])} (use --config.name=value)')
    config = training_config.value()
    # Imported after flag parsing: JAX and TF are slow to import.
    from muomni_jax.parallel import distributed
    from muomni_jax.training import train

    try:
        with cli.one_line_errors():
            distributed.initialize(config)  # Before any other JAX use; no-op for one process.
            train.train_and_evaluate(config)
    except KeyboardInterrupt:
        print('Aborted: nothing was saved after the last checkpoint.', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    app.run(main, flags_parser=training_config.parse_flags)
